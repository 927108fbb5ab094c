"""What the engine computes, fixed per evaluation so every chunk's records line up."""

from __future__ import annotations

from dataclasses import dataclass

# Inverse temperatures b = 1/T where the engine stores each sample's temperature model (curve.py):
# T from 0.05 to 20 at ratios 1.5-2, every point a multiple k/20 with k = 1, 2, 3, 5, 10, 20, 30, 50,
# 100, 200, 400, each the sum of two earlier ones, so the kernel forms every power from one
# exponential with one product (moments.plan). 11 points: 126-byte records.
DEFAULT_INVERSE_TEMPERATURES: tuple[float, ...] = (
    0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0,
)  # fmt: skip
# How the reducer runs its per-row arithmetic (see reducer.py and fused.py).
BACKENDS: tuple[str, ...] = ("eager", "compiled", "auto")


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the metric engine.

    ``top_k``: the k of every reported top-k accuracy.
    ``num_bins``: equal-width (and equal-mass) calibration bins.
    ``inverse_temperatures``: grid for the temperature scan; must contain 1.0.
    ``max_rank``: the label's rank is stored capped here (uint16 records).
    ``device``: "auto" (CUDA when available), "cpu" or "cuda:N".
    ``block_rows``: rows processed per fused pass; buffers are sized for it once.
    ``top_confusions``: how many (label, prediction) pairs to report.
    ``intra_op_threads``: torch threads for the CPU path (0 leaves torch's default).
    ``backend``: "eager" (PyTorch operations, one pass each; the temperature model's sums from the
    native kernel where it builds), "compiled" (on the CPU the whole row pass in the native kernel,
    moments.py and rest_moments.c, ~2.7x the eager throughput; where that cannot be built, and on
    CUDA, the per-row arithmetic fused by TorchInductor, whose first chunk of each (class count,
    score dtype) compiles, ~3.5 s warm, ~11 s cold on 2 cores; falls back to eager, logged, when
    compiling fails) or "auto" (compiled on CPU where a C++ compiler is found, else eager).
    """

    top_k: tuple[int, ...] = (1, 5)
    num_bins: int = 15
    inverse_temperatures: tuple[float, ...] = DEFAULT_INVERSE_TEMPERATURES
    max_rank: int = 65535
    device: str = "auto"
    block_rows: int = 1024
    top_confusions: int = 20
    intra_op_threads: int = 0
    backend: str = "eager"

    def __post_init__(self) -> None:
        if not self.top_k or any(k < 1 for k in self.top_k):
            raise ValueError(f"top_k must be a non-empty list of positive integers, got {self.top_k}")
        if self.num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {self.num_bins}")
        if 1.0 not in self.inverse_temperatures or any(a <= 0 for a in self.inverse_temperatures):
            raise ValueError(
                f"inverse_temperatures must be positive and contain 1.0, got {self.inverse_temperatures}"
            )
        if list(self.inverse_temperatures) != sorted(set(self.inverse_temperatures)):
            raise ValueError("inverse_temperatures must be strictly increasing")
        if not 1 <= self.max_rank <= 65535:
            raise ValueError(f"max_rank must be in [1, 65535], got {self.max_rank}")
        if max(self.top_k) > self.max_rank:
            raise ValueError(f"top_k {max(self.top_k)} exceeds max_rank {self.max_rank} (ranks are capped)")
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {self.block_rows}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    @property
    def temperatures(self) -> tuple[float, ...]:
        """Temperatures T in increasing order."""
        return tuple(1.0 / a for a in reversed(self.inverse_temperatures))
