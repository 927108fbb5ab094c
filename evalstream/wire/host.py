"""Arrays as the wire sees them, torch or numpy, without ever importing torch.

torch is never imported here: a torch tensor can only be passed in by a caller that has imported it
already, so numpy users and the CLI never pay for loading it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt


def imported_torch() -> Any:
    """The torch module if the process has finished importing it, else None (never imported here).

    A module another thread is still importing is in ``sys.modules`` half built (no ``Tensor``
    or ``cuda`` yet): it counts as not imported, which is true of every value a caller can hold,
    since no tensor exists before torch's import completes.
    """
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return None
    return torch


def is_tensor(x: object) -> bool:
    torch = imported_torch()
    return torch is not None and isinstance(x, torch.Tensor)


def host_array(x: Any) -> npt.NDArray[Any]:
    """A numpy view of a host torch tensor or array, bfloat16 as its int16 bit patterns (numpy has no
    bfloat16; an ``ml_dtypes`` array is viewed the same way); other arrays as they are.

    The one place bfloat16 becomes int16: the client's host copies, the server's staging blocks and
    :func:`encode_tensor` all read it through here.
    """
    if not is_tensor(x):
        a = np.asarray(x)
        return a.view(np.int16) if a.dtype.name == "bfloat16" else a  # e.g. ml_dtypes.bfloat16
    if x.dtype == imported_torch().bfloat16:
        x = x.view(imported_torch().int16)
    view: npt.NDArray[Any] = x.numpy()
    return view
