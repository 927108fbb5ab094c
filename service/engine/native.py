"""Builds and loads the temperature model's CPU kernel (rest_moments.c) with the system C compiler.

Why at run time: the kernel is specialised to the grid's plan of powers (compiled in, so the loop
keeps its sums in registers) and to this machine's vector width (``-march=native``), as
TorchInductor does for its own kernels; the compiler it needs is the one inductor needs too. Each
library is built once per (source, plan, compiler, machine) into a cache directory and reused by
later processes (``EVALSTREAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/evalstream`` or
``~/.cache/evalstream``); a build goes to a temporary name and is renamed into place, so replicas
starting together never load a half-written file. Without a compiler, or where a build fails, the
engine computes the same sums with PyTorch (moments.py), logged once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from evalstream.service.engine.moments import Plan

log = logging.getLogger(__name__)

SOURCE = "rest_moments.c"
# Score dtypes every build of the kernel reads as they are; float16 too where the machine converts it
# in hardware (``reads``); others are upcast to float32 first.
DTYPES = (torch.float32, torch.bfloat16)
# Tried in order: the machine's full vector width, then the compiler's defaults.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno"),
    ("-O3", "-fPIC", "-shared", "-fno-math-errno"),
)
# Rows are split across threads only when a call has this many scores or more (thread hand-off
# costs ~20 us; 256k scores take ~0.5 ms).
SPLIT_SCORES = 1 << 18

_P = ctypes.c_void_p
_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}
_pool: ThreadPoolExecutor | None = None


def c_compiler() -> str | None:
    """$CC, else cc, gcc or clang on PATH."""
    cc = os.environ.get("CC")
    for name in ([cc] if cc else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir() -> Path:
    explicit = os.environ.get("EVALSTREAM_CACHE_DIR")
    if explicit:
        return Path(explicit) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "evalstream" / "native"


def plan_source(plan: Plan) -> str:
    """The #defines that compile ``plan`` into the kernel (see rest_moments.c): op i is
    exp(scale x) when a < 0, else the product of ops a and b."""
    stmts = []
    for i, (a, b, scale) in enumerate(plan.ops):
        stmts.append(f"v[{i}] = EXP({float(scale)!r}f);" if a < 0 else f"v[{i}] = v[{a}] * v[{b}];")
    return (
        f"#define NOPS {len(plan.ops)}\n#define NOUT {len(plan.outs)}\n"
        f"#define PLAN {' '.join(stmts)}\n#define OUTS {', '.join(map(str, plan.outs))}\n"
        f"#define ONE_OUT {plan.one_out}\n#define TWO_OP {plan.two_op}\n"
    )


@functools.cache
def _machine() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def library(plan: Plan) -> ctypes.CDLL | None:
    """The kernel for this plan: loaded from the cache, else built; None (logged) where it cannot be."""
    source = plan_source(plan) + resources.files("evalstream.service.engine").joinpath(SOURCE).read_text()
    cc = c_compiler()
    key = hashlib.sha256(f"{source}\0{cc}\0{FLAG_SETS}\0{_machine()}".encode()).hexdigest()[:24]
    with _lock:
        if key not in _libraries:
            _libraries[key] = _load(source, cc, key)
        return _libraries[key]


def _load(source: str, cc: str | None, key: str) -> ctypes.CDLL | None:
    if cc is None:
        log.warning("no C compiler on PATH (CC, cc, gcc, clang): the temperature model's sums run in PyTorch")
        return None
    # The cache directory, else the temporary one (a read-only home, as in the Kubernetes manifests).
    places = (cache_dir(), Path(tempfile.gettempdir()) / f"evalstream-native-{os.getuid()}")
    problems: list[str] = []
    for directory in places:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / f"rest_moments-{key}.so"
            if not target.exists() and not _build(source, cc, directory, target):
                return None
            break
        except OSError as exc:
            problems.append(f"{directory}: {exc}")
    else:
        log.warning(
            "no writable place to build %s (%s); its sums run in PyTorch", SOURCE, "; ".join(problems)
        )
        return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:  # e.g. a temporary directory mounted noexec
        log.warning("loading %s failed (%s); its sums run in PyTorch", target, exc)
        return None
    lib.rest_moments_nout.restype = ctypes.c_int
    lib.rest_moments_has_f16.restype = ctypes.c_int
    entries = [lib.row_pass, lib.row_pass_bf16] + ([lib.row_pass_f16] if lib.rest_moments_has_f16() else [])
    for fn in entries:
        fn.argtypes = [_P, _P, ctypes.c_int64, ctypes.c_int64, _P, _P, _P, _P, _P, _P, _P]
        fn.restype = None
    return lib


def reads(lib: ctypes.CDLL, dtype: torch.dtype) -> bool:
    """Whether ``lib`` reads scores of ``dtype`` in place (widening them in the loop, exactly)."""
    return dtype in DTYPES or (dtype == torch.float16 and _reads_float16(lib))


@functools.cache
def _reads_float16(lib: ctypes.CDLL) -> bool:
    """Whether this build converts float16 in hardware (asked once a library, not once a block)."""
    return bool(lib.rest_moments_has_f16())


@dataclass(frozen=True)
class Output:
    """What the kernel returns for a block of n rows: the model's sums [n, G, 3] (S0, S1, S2 at each
    grid point), the row maximum, the largest other score, the first index of the maximum, and with
    labels the rest of the row pass: stats [n, 4] (nll, confidence, brier, entropy), ints [n, 3]
    (pred, rank, ties) and the logsumexp [n]."""

    sums: torch.Tensor
    row_max: torch.Tensor
    rest_max: torch.Tensor
    first: torch.Tensor
    stats: torch.Tensor | None = None
    ints: torch.Tensor | None = None
    lse: torch.Tensor | None = None


def run(lib: ctypes.CDLL, z: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
    """The kernel over a contiguous CPU block of a dtype it ``reads`` (half-width scores are widened
    inside the loop, never copied): the model's sums, and with int64 ``labels`` the whole row pass.
    Rows are split across torch's intra-op thread count (ctypes releases the GIL)."""
    n, c = z.shape
    if not reads(lib, z.dtype):
        raise TypeError(f"the native row pass does not read {z.dtype} here; upcast to float32")
    fn = {torch.bfloat16: lib.row_pass_bf16, torch.float16: lib.row_pass_f16}.get(z.dtype, lib.row_pass)
    g = int(lib.rest_moments_nout())
    f32 = torch.float32
    out = Output(
        torch.empty((n, g, 3), dtype=f32),
        torch.empty(n, dtype=f32),
        torch.empty(n, dtype=f32),
        torch.empty(n, dtype=torch.int32),
    )
    if labels is not None:
        out = dataclasses.replace(
            out,
            stats=torch.empty((n, 4), dtype=f32),
            ints=torch.empty((n, 3), dtype=torch.int32),
            lse=torch.empty(n, dtype=f32),
        )

    def at(t: torch.Tensor | None, row: int) -> int | None:
        """The address of ``row`` in a contiguous tensor (None stays NULL)."""
        return None if t is None else t.data_ptr() + row * t.stride(0) * t.element_size()

    def part(lo: int, hi: int) -> None:
        fn(
            at(z, lo),
            at(labels, lo),
            hi - lo,
            c,
            at(out.sums, lo),
            at(out.row_max, lo),
            at(out.rest_max, lo),
            at(out.first, lo),
            at(out.stats, lo),
            at(out.ints, lo),
            at(out.lse, lo),
        )

    _split(part, n, c)
    return out


def _split(part: Callable[[int, int], None], n: int, c: int) -> None:
    """``part`` over row ranges, one a thread of torch's intra-op count (ctypes releases the GIL)."""
    threads = min(torch.get_num_threads(), n)
    if threads <= 1 or n * c < SPLIT_SCORES:
        part(0, n)
        return
    bounds = np.linspace(0, n, threads + 1).astype(int)
    futures = [_executor().submit(part, int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]
    for f in futures:
        f.result()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="rest-moments")
        return _pool


def _build(source: str, cc: str, directory: Path, target: Path) -> bool:
    """Compile ``source`` into ``target`` through a temporary name (an atomic rename, so a replica
    starting beside this one never loads a half-written file); False (logged) where it fails."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(tmp) / SOURCE
        src.write_text(source)
        out = Path(tmp) / "kernel.so"
        errors = []
        for flags in FLAG_SETS:
            run = subprocess.run(
                [cc, *flags, "-o", str(out), str(src), "-lm"], capture_output=True, text=True
            )
            if run.returncode == 0:
                os.replace(out, target)
                return True
            errors.append(run.stderr.strip()[-2000:])
    log.warning("building %s failed; its sums run in PyTorch:\n%s", SOURCE, "\n".join(errors))
    return False
