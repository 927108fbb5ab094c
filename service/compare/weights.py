"""Poisson bootstrap weights, generated in blocks of replicates.

The classic bootstrap draws n indices with replacement per replicate; at a
million samples the index draws and the random gathers they drive cost about
25 ms a replicate on this class of machine (measured in bench/bootstrap.py),
half a minute for 1,000 replicates. The Poisson bootstrap gives every sample an
independent multiplicity w_i ~ Poisson(1) instead (Hanley & MacGibbon 2006;
Chamandy et al. 2012). For large n it is equivalent to the multinomial one, it
needs no gather (statistics become weighted sums, i.e. matrix products), and its
weights come from a 65,536-entry lookup table indexed by 16 random bits, four
samples per 64-bit draw of the generator.

Replicate r always consumes the same ``ceil(n / 4)`` 64-bit outputs of the
generator, whatever the block size, so results depend only on the seed and the
number of replicates (see ``reference_weights`` for the plain per-replicate form).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

# Elements of one weight block (rows x samples); 8M float32 = 32 MB.
BLOCK_ELEMENTS = 1 << 23


def _poisson_table() -> npt.NDArray[np.float32]:
    """Inverse CDF of Poisson(1) at the midpoints of 2**16 equal-probability cells."""
    cells = (np.arange(1 << 16, dtype=np.float64) + 0.5) / float(1 << 16)
    cdf = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(20)])
    return np.searchsorted(cdf, cells, side="right").astype(np.float32)


POISSON_TABLE: npt.NDArray[np.float32] = _poisson_table()


def words_per_replicate(n: int) -> int:
    """64-bit generator outputs one replicate consumes (16 bits per sample)."""
    return (n + 3) // 4


def block_rows(n: int, replicates: int) -> int:
    """Replicates per block so that one block of weights stays near BLOCK_ELEMENTS."""
    return max(1, min(replicates, BLOCK_ELEMENTS // max(n, 1)))


def weight_blocks(seed: int, replicates: int, n: int) -> Iterator[npt.NDArray[np.float32]]:
    """Yield [rows, n] float32 Poisson(1) weights, ``replicates`` rows in all."""
    rng = np.random.Generator(np.random.PCG64(seed))
    words = words_per_replicate(n)
    rows = block_rows(n, replicates)
    done = 0
    while done < replicates:
        b = min(rows, replicates - done)
        raw = rng.bit_generator.random_raw(b * words)
        cells = np.asarray(raw, dtype=np.uint64).view(np.uint16).reshape(b, 4 * words)[:, :n]
        yield POISSON_TABLE[cells]
        done += b


def reference_weights(seed: int, replicates: int, n: int) -> npt.NDArray[np.float32]:
    """The same weights, one replicate at a time (for tests and readers)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = np.empty((replicates, n), dtype=np.float32)
    for r in range(replicates):
        raw = np.asarray(rng.bit_generator.random_raw(words_per_replicate(n)), dtype=np.uint64)
        out[r] = POISSON_TABLE[raw.view(np.uint16)[:n]]
    return out
