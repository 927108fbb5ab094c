"""Settings: defaults < TOML/YAML file < EVALSTREAM_* environment < overrides; typos are errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evalstream.service.settings import Settings


def test_precedence_file_env_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('data_dir = "/from/file"\ntop_k = [1, 3]\nnum_bins = 20\nprimary_metric = "ece"\n')
    s = Settings.load(toml, env={"EVALSTREAM_NUM_BINS": "10", "EVALSTREAM_TOKEN": "client-side"}, num_bins=7)
    assert (s.data_dir, s.top_k, s.num_bins, s.primary_metric) == ("/from/file", (1, 3), 7, "ece")
    assert s.primary_higher_is_better is False
    s = Settings.load(toml, env={"EVALSTREAM_TOP_K": "1,5,10", "EVALSTREAM_STORE_SYNCHRONOUS": "full"})
    assert s.top_k == (1, 5, 10) and s.store_synchronous == "full" and s.num_bins == 20
    defaults = Settings.load(env={})
    assert defaults.grpc_address == "127.0.0.1:50051" and defaults.metrics_address == "127.0.0.1:9464"
    assert defaults.primary_metric == "nll" and defaults.retention_keep_latest == 5
    assert defaults.max_message_bytes == 8 << 20 and defaults.torch_threads == 1


def test_yaml_with_an_evalstream_section(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "evalstream:\n  device: cpu\n  inverse_temperatures: [0.5, 1.0, 2.0]\n  torch_threads: 2\n"
    )
    s = Settings.load(path, env={})
    assert (s.device, s.inverse_temperatures, s.torch_threads) == ("cpu", (0.5, 1.0, 2.0), 2)
    assert s.engine_config().temperatures == (0.5, 1.0, 2.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_bin": 3}, "unknown setting 'num_bin'"),
        ({"primary_metric": "mean_confidence"}, "valid:"),
        ({"top_k": "1,x"}, "setting top_k"),
        ({"max_open_shards": 0}, "max_open_shards must be >= 1"),
        ({"inverse_temperatures": "0.5,2.0"}, "contain 1.0"),
        ({"store_synchronous": "off"}, "store_synchronous"),
    ],
)
def test_bad_values_say_what_to_fix(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.load(env={}, **values)


def test_bad_env_value_names_the_source() -> None:
    with pytest.raises(ValueError, match=r"environment.*expected an integer"):
        Settings.load(env={"EVALSTREAM_NUM_BINS": "many"})


def test_describe_lists_every_setting_with_docs() -> None:
    rows = Settings.describe()
    assert all(doc for _, _, doc in rows)
    assert {"data_dir", "primary_metric", "retention_keep_latest", "max_samples_per_evaluation"} <= {
        name for name, _, _ in rows
    }


def test_configuration_doc_lists_every_setting_and_default() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for name, default, _ in Settings.describe():
        row = f"| `{name}` | `{default}` |" if default else f'| `{name}` | `""` |'
        assert row in doc, f"docs/configuration.md is missing or outdated for {name}"


def test_toml_loads_without_tomllib_as_on_python_3_10(tmp_path: Path) -> None:
    """Python 3.10 has no tomllib: settings fall back to tomli (a dependency there) for TOML files.

    Checked in a fresh interpreter with tomllib made unimportable, so this runs on every Python.
    """
    toml = tmp_path / "s.toml"
    toml.write_text("num_bins = 12\ntop_k = [1, 3]\n")
    code = (
        "import sys\n"
        "sys.modules['tomllib'] = None  # what Python 3.10 is like: no tomllib to import\n"
        "from evalstream.service.settings import Settings\n"
        f"s = Settings.load({str(toml)!r}, env={{}})\n"
        "print(s.num_bins, s.top_k, 'tomli' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["12", "(1,", "3)", "True"]
