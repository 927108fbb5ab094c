"""ChunkReducer: a chunk of scores in, one compact record per sample out, in one fused pass.

Per block of rows (z = scores upcast to float32, y = labels):

    m           = max_c z_c
    rank        = #{c : z_c > z_y}               (strictly larger; capped at max_rank)
    ties        = #{c != y : z_c == z_y}         (exact equals; top-k credit is expected over ties)
    pred        = the first index of the max     (argmax: the binary view, as torch/numpy)
    p           = softmax(z)                     (PyTorch's kernel, into a reused buffer)
    conf        = max_c p_c = 1 / S,  log S = -log conf,  S = sum_c exp(z_c - m)
    nll         = (m - z_y) + log S
    brier       = sum_c p_c^2 - 2 p_y + 1
    entropy     = log S - sum_c p_c (z_c - m)
    log_rest, rest_slope, rest_curvature: the temperature model's columns (moments.py, curve.py)

Buffers are allocated once, sized for ``rows`` rows, and reused for every block
of every chunk: fresh full-size tensors per chunk cost page faults that
dominate the arithmetic. The reducer keeps no other state, and every check
runs before a record is returned, so a rejected chunk changes nothing.

That is the eager backend (one PyTorch operation, one pass over the block, ~30
a block). The compiled backend runs the same quantities, from unnormalised
powers of exp(z - m), as one TorchInductor kernel over the whole chunk (see
fused.py); both agree with the float64 reference to float32 rounding. The
finiteness and log-probability checks run once a chunk, after the arithmetic,
so a GPU never waits on the host between blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from evalstream.service.engine.config import EngineConfig
from evalstream.service.engine.errors import ChunkError
from evalstream.service.engine.fused import KernelKey, RowPass, compiler_available, kernel_for
from evalstream.service.engine.moments import RestMoments
from evalstream.service.engine.records import FIELDS, NO_SAMPLE_ID, Records
from evalstream.service.engine.validate import locate_non_finite, validate

# One [rows, C] float32 buffer stays at or under this size: ~256 rows at C=3,000, so the
# block's working set stays in L2/L3 across the ~25 passes (measured fastest of 32..1024 rows
# on a 2-core EPYC: 1024-row blocks were 1.5x slower). Rows shrink further for huge C.
BUFFER_BYTES = 3 << 20
# On a GPU the cache argument does not apply and each block costs ~25 kernel launches: larger blocks.
CUDA_BUFFER_BYTES = 64 << 20
# Log-probability rows may exceed log(1) = 0 by this much in logsumexp (rounding in the sender).
LOG_PROB_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


# Brings (floats, ints, logsumexp) from the engine's device to the host (see ChunkReducer.reduce).
Outputs3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
HostCopy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Outputs3]


def resolve_device(spec: str) -> torch.device:
    """ "auto" is CUDA when available, else CPU; "cpu" and "cuda:N" are taken as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"engine device {spec!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"engine device must be 'auto', 'cpu' or 'cuda:N', got {spec!r}")
    return dev


def resolve_backend(spec: str, device: torch.device) -> str:
    """ "auto" is compiled on CPU where a C++ compiler is found, else eager (the compiled CUDA path
    needs Triton and is opt-in: "compiled"); "eager" and "compiled" are taken as given."""
    if spec == "auto":
        return "compiled" if device.type == "cpu" and compiler_available() else "eager"
    return spec


def _rowdot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sum_c a[r, c] * b[r, c] per row. A product into a reused buffer and torch's cascaded
    row sum is both faster and more accurate than bmm/einsum here (measured: bmm's float32
    accumulation over 3,000 classes loses ~1e-5 relative; this ~2e-7)."""
    return torch.mul(a, b, out=scratch).sum(dim=1)


@dataclass
class _Staging:
    """A pinned host buffer and the event of the last device copy out of it."""

    buffer: torch.Tensor
    copied: torch.cuda.Event | None = None


class ChunkReducer:
    """Reduces chunks of one evaluation (fixed class count and config) to Records.

    ``score_kind`` is "logits" or "log_probabilities". The arithmetic is the same
    (softmax is shift-invariant, and log-probabilities are logits whose
    logsumexp is 0); for log-probabilities each row's logsumexp must be at most
    a small tolerance above 0, else the chunk is rejected.

    Use from one thread at a time.
    """

    def __init__(self, num_classes: int, config: EngineConfig, score_kind: str = "logits") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if score_kind not in ("logits", "log_probabilities"):
            raise ValueError(f"score_kind must be 'logits' or 'log_probabilities', got {score_kind!r}")
        self.num_classes = num_classes
        self.config = config
        self.score_kind = score_kind
        self.device = resolve_device(config.device)
        self.backend = resolve_backend(config.backend, self.device)
        cap = CUDA_BUFFER_BYTES if self.device.type == "cuda" else BUFFER_BYTES
        self.rows = max(1, min(config.block_rows, cap // (4 * num_classes)))
        self.moments = RestMoments(tuple(config.inverse_temperatures), num_classes)
        self.grid = np.asarray(config.inverse_temperatures, dtype=np.float64)
        if config.intra_op_threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(config.intra_op_threads)
        self._buffers: dict[str, torch.Tensor] = {}
        self._first_weights = torch.arange(num_classes, 0, -1, dtype=torch.float32, device=self.device)
        self._staging: dict[torch.dtype, list[_Staging]] = {}
        self._turn = 0

    # -- buffers -------------------------------------------------------------------------------

    def _buf(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A [rows, C] scratch buffer, allocated on first use and reused after."""
        buf = self._buffers.get(name)
        if buf is None:
            buf = torch.empty((self.rows, self.num_classes), dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf

    def _stage(self, block: torch.Tensor) -> torch.Tensor:
        """Copy a CPU block to the device through pinned buffers (async H2D).

        Two pinned buffers per dtype, used in turn: the host fills one while the device may
        still be reading the other, and a buffer is refilled only after its copy's event has
        completed (nothing else syncs between blocks)."""
        slots = self._staging.get(block.dtype)
        if slots is None:
            shape = (self.rows, self.num_classes)
            slots = [_Staging(torch.empty(shape, dtype=block.dtype, pin_memory=True)) for _ in range(2)]
            self._staging[block.dtype] = slots
        self._turn ^= 1
        slot = slots[self._turn]
        if slot.copied is not None:
            slot.copied.synchronize()
        b = block.shape[0]
        slot.buffer[:b].copy_(block)
        dev = self._buf("device_in_" + str(block.dtype).rsplit(".", 1)[-1], block.dtype)[:b]
        dev.copy_(slot.buffer[:b], non_blocking=True)
        slot.copied = torch.cuda.Event()
        slot.copied.record()
        return dev

    # -- public --------------------------------------------------------------------------------

    def active_backend(self, dtype: torch.dtype = torch.float32) -> str:
        """The backend that reduces scores of ``dtype``: "compiled" once its kernel compiled (or the
        native row pass serves it), else "eager" (compiles on first use, as ``reduce`` would)."""
        return "compiled" if self._native_rows() or self._kernel(dtype) is not None else "eager"

    @property
    def native_library(self) -> str | None:
        """The file of the native row pass when it reduces this reducer's chunks, else None (for logs:
        an operator sees which pass runs and where it was built)."""
        lib = self.moments.lib
        return str(lib._name) if lib is not None and self._native_rows() else None

    def _native_rows(self) -> bool:
        """The compiled backend on the CPU runs the native row pass (rest_moments.c): one loop a row for
        every column, the temperature model's included, where inductor's kernel would leave those
        to a second loop. TorchInductor compiles the CPU pass only where that kernel cannot be built."""
        return self.backend == "compiled" and self.device.type == "cpu" and self.moments.has_rows

    def reduce(
        self, scores: object, labels: object, sample_ids: object = None, to_host: HostCopy | None = None
    ) -> Records:
        """Records for one chunk; ``ChunkError`` (and nothing else changed) on bad input.

        ``to_host`` brings the engine's outputs (floats, ints, logsumexp) to the host before they
        are checked and turned into records: a caller on a device passes one that copies them into
        pinned buffers and waits on an event (client/reduce.py); by default ``.cpu()``."""
        chunk = validate(scores, labels, sample_ids, self.num_classes)
        n = chunk.labels.shape[0]
        grid = self.config.inverse_temperatures
        g = len(grid)
        if n == 0:
            return Records.empty(grid)
        native_rows = self._native_rows()
        kernel = None if native_rows else self._kernel(chunk.scores.dtype)
        with torch.no_grad():
            if native_rows:
                floats, ints, lse = self.moments.rows(chunk.scores, chunk.labels)
            elif kernel is None:
                floats, ints, lse = self._reduce_eager(chunk.scores, chunk.labels)
            else:
                floats, ints, lse = self._reduce_compiled(kernel, chunk.scores, chunk.labels)
            if to_host is not None:
                floats, ints, lse = to_host(floats, ints, lse)
            self._check(chunk.scores, floats, lse)
        floats_np = floats.cpu().numpy()
        ints_np = ints.cpu().numpy()
        ids = (
            chunk.sample_ids.numpy().astype(FIELDS["sample_id"], copy=True)
            if chunk.sample_ids is not None
            else np.full(n, NO_SAMPLE_ID, dtype=FIELDS["sample_id"])
        )
        return Records(
            sample_id=ids,
            label=chunk.labels.numpy().astype(FIELDS["label"]),
            pred=ints_np[:, 0].copy(),
            rank=np.minimum(ints_np[:, 1], self.config.max_rank).astype(FIELDS["rank"]),
            ties=ints_np[:, 2].astype(FIELDS["ties"]),
            nll=floats_np[:, 0].copy(),
            confidence=floats_np[:, 1].copy(),
            brier=floats_np[:, 2].copy(),
            entropy=floats_np[:, 3].copy(),
            log_rest=np.ascontiguousarray(floats_np[:, 4 : 4 + g]),
            rest_slope=floats_np[:, 4 + g : 4 + 2 * g].astype(FIELDS["rest_slope"]),
            rest_curvature=floats_np[:, 4 + 2 * g :].astype(FIELDS["rest_curvature"]),
            inverse_temperatures=self.grid.copy(),
        )

    # -- backends ------------------------------------------------------------------------------

    def _kernel(self, dtype: torch.dtype) -> RowPass | None:
        """The compiled row pass for this dtype, or None for the eager path."""
        if self.backend == "eager":
            return None
        threads = torch.get_num_threads() if self.device.type == "cpu" else 0
        key = KernelKey(
            self.num_classes,
            tuple(self.config.inverse_temperatures),
            self.config.max_rank,
            dtype,
            str(self.device),
            threads,
        )
        return kernel_for(key)

    def _reduce_compiled(
        self, kernel: RowPass, scores: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One kernel call over the whole chunk: each row is independent, so no blocks are needed."""
        n = scores.shape[0]
        z = scores.detach().to(self.device, non_blocking=True)
        if not z.is_contiguous():
            z = z.contiguous()  # the kernel is specialised for row-major [n, C]
        y = labels.to(self.device, non_blocking=True)
        if n == 1:  # a dynamic row count must be >= 2, or the kernel would be recompiled for 1
            z, y = z.expand(2, -1).contiguous(), y.expand(2).contiguous()
        floats, ints, lse = kernel(z, y)
        model = self.moments(z[:n])  # half scores are read as they are (moments.py)
        return torch.cat([floats[:n], model], dim=1), ints[:n], lse[:n]

    def _reduce_eager(
        self, scores: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block loop: outputs filled block by block on the device."""
        n = labels.shape[0]
        g = len(self.config.inverse_temperatures)
        # Output columns: nll, conf, brier, entropy, the model's 3 x G; pred, rank, ties; logsumexp.
        floats = torch.empty((n, 4 + 3 * g), dtype=torch.float32, device=self.device)
        ints = torch.empty((n, 3), dtype=torch.int32, device=self.device)
        lse = torch.empty(n, dtype=torch.float32, device=self.device)
        labels_dev = labels.to(self.device, non_blocking=True)
        for start in range(0, n, self.rows):
            end = min(n, start + self.rows)
            self._reduce_block(
                scores[start:end], labels_dev[start:end], floats[start:end], ints[start:end], lse[start:end]
            )
        return floats, ints, lse

    def _check(self, scores: torch.Tensor, floats: torch.Tensor, lse: torch.Tensor) -> None:
        """Reject the chunk at its first row with a non-finite NLL or entropy (any NaN/Inf score gives
        one) or, for log-probabilities, a logsumexp above the tolerance. One host sync a chunk."""
        bad = ~(torch.isfinite(floats[:, 0]) & torch.isfinite(floats[:, 3]))
        tol = LOG_PROB_TOLERANCE[scores.dtype]
        if self.score_kind == "log_probabilities":
            bad = bad | (lse > tol)
        if not bool(bad.any()):
            return
        r = int(bad.nonzero()[0, 0])
        value = float(lse[r])
        if not (np.isfinite(float(floats[r, 0])) and np.isfinite(float(floats[r, 3]))):
            raise locate_non_finite(scores[r : r + 1], r)
        raise ChunkError(
            "log_probabilities_invalid",
            f"row {r} has logsumexp {value:.6g} > {tol} (probabilities sum to "
            f"{float(np.exp(value)):.6g}); send logits or normalised log-probabilities",
        )

    # -- the fused pass ------------------------------------------------------------------------

    def _upcast(self, block: torch.Tensor) -> torch.Tensor:
        """The block as contiguous float32 on the device, copying only when needed."""
        if block.device != self.device:
            block = self._stage(block) if self.device.type == "cuda" else block.to(self.device)
        if block.dtype == torch.float32 and block.is_contiguous():
            return block
        z = self._buf("z")[: block.shape[0]]
        z.copy_(block)
        return z

    def _reduce_block(
        self,
        raw: torch.Tensor,
        y: torch.Tensor,
        out_f: torch.Tensor,
        out_i: torch.Tensor,
        out_lse: torch.Tensor,
    ) -> None:
        b = raw.shape[0]
        z = self._upcast(raw)
        yy = y.unsqueeze(1)
        work = self._buf("work")[:b]  # float scratch, reused by each step below
        # amax and a float compare are ~10x faster on CPU than max-with-indices and a bool mask.
        m = torch.amax(z, dim=1)
        zy = z.gather(1, yy).squeeze(1)
        rank = torch.gt(z, zy.unsqueeze(1), out=work).sum(dim=1)  # exact: counts < 2**24
        ties = torch.eq(z, zy.unsqueeze(1), out=work).sum(dim=1) - 1  # the label equals itself
        # First index of the max: weights C, C-1, ... on the positions equal to the max.
        torch.eq(z, m.unsqueeze(1), out=work).mul_(self._first_weights)
        first = self.num_classes - torch.amax(work, dim=1)
        p = torch.softmax(z, 1, out=self._buf("p")[:b])
        conf = torch.amax(p, dim=1)
        log_s = -torch.log(conf)
        nll = (m - zy) + log_s
        p_y = p.gather(1, yy).squeeze(1)
        p2 = torch.mul(p, p, out=self._buf("p_sq")[:b])
        sum_p2 = p2.sum(dim=1)
        brier = sum_p2 - 2.0 * p_y + 1.0
        # sum_c p_c (z_c - m): every term <= 0, no cancellation against m.
        torch.sub(z, m.unsqueeze(1), out=work).mul_(p)
        entropy = log_s - work.sum(dim=1)

        torch.add(m, log_s, out=out_lse)
        out_f[:, 0] = nll
        out_f[:, 1] = conf
        out_f[:, 2] = brier
        out_f[:, 3] = entropy
        out_f[:, 4:] = self.moments(z)
        out_i[:, 0] = first
        out_i[:, 1] = rank.clamp_(max=float(self.config.max_rank))
        out_i[:, 2] = ties
