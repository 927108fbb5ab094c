#!/usr/bin/env bash
# Build the sdist, and the wheel from it, as a user's pip would; install the wheel into a clean venv (no
# editable finder, no source tree on sys.path) and run the installed CLI and every subpackage from
# it: proves the package-dir mapping (service/ -> evalstream.service, client/ -> evalstream.client)
# holds outside the checkout. The clean venv borrows the dev venv's third-party packages through a
# .pth path line (a path line does not run the dev venv's own .pth hooks, so its editable
# evalstream stays out), which keeps this to seconds instead of a second torch install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# No --sdist/--wheel: build makes the sdist, then the wheel from that sdist (what pip does).
"$PY" -m build --outdir "$out/dist" . >"$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
deps=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -m venv --without-pip "$out/venv"
site=$("$out/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" >"$site/evalstream-check-deps.pth"
"$PY" -m pip --python "$out/venv/bin/python" install -q --no-deps "$out"/dist/evalstream-*.whl
cd "$out"  # nothing of the checkout importable from here
"$out/venv/bin/evalstream" --help >/dev/null
"$out/venv/bin/python" - <<'PY'
import importlib, pkgutil
import evalstream
names = [m.name for m in pkgutil.walk_packages(evalstream.__path__, "evalstream.")]
for name in names:
    mod = importlib.import_module(name)
    assert "site-packages" in (mod.__file__ or ""), f"{name} imported from {mod.__file__}, not the wheel"
need = {"evalstream.service", "evalstream.service.engine", "evalstream.service.compare", "evalstream.wire",
        "evalstream.service.store", "evalstream.service.auth", "evalstream.client", "evalstream.v1"}
missing = need - set(names)
assert not missing, f"the wheel lacks {sorted(missing)}"
# The temperature model's native kernel ships as source in the wheel and builds from there.
import shutil, tempfile, os
from importlib import resources
assert resources.files("evalstream.service.engine").joinpath("rest_moments.c").is_file(), "the wheel lacks rest_moments.c"
if shutil.which("cc") or shutil.which("gcc"):
    os.environ["EVALSTREAM_CACHE_DIR"] = tempfile.mkdtemp()
    from evalstream.service.engine.moments import RestMoments
    assert RestMoments((0.5, 1.0, 2.0), 10).has_rows, "the native kernel did not build from the wheel"
print(f"wheel and sdist built; {len(names)} modules import from the installed wheel; evalstream --help runs")
PY
