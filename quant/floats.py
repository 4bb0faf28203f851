"""Source float formats as numpy sees them. Kept apart from the writer so that reading a
checkpoint does not import numba (``mixcli convert`` starts reading while numba loads)."""

from __future__ import annotations

import numpy as np


def to_float32(a: np.ndarray) -> np.ndarray:
    """Stored values -> float32. uint16 arrays are bf16 bit patterns (numpy has no bf16 dtype)."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)
