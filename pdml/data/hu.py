"""Hounsfield units (HU) and the paper's display window.

Everything in :mod:`pdml.data` stores images in HU (float32). Networks see the window
transform of the paper: ``[-1000, 1000]`` HU mapped linearly to ``[0, 1]`` ("unit" scale).
Both functions accept NumPy arrays or torch tensors of any shape and return the same kind.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

HU_WINDOW: Tuple[float, float] = (-1000.0, 1000.0)
"""The paper's window, (low, high) in HU, mapped to (0, 1)."""


def _check_window(window) -> Tuple[float, float]:
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"window must be (low, high) with high > low, got {window!r}")
    return low, high


def hu_to_unit(hu, window=HU_WINDOW, clip: bool = True):
    """HU -> unit scale: ``(hu - low) / (high - low)``, clipped to ``[0, 1]`` when ``clip``.

    ``hu``: array or tensor of any shape, HU. Returns the same kind and shape, floating
    (float32 for integer input).
    """
    low, high = _check_window(window)
    x = _as_float(hu)
    x = (x - low) / (high - low)
    if clip:
        x = x.clip(0.0, 1.0)
    return x


def unit_to_hu(unit, window=HU_WINDOW):
    """Unit scale -> HU: ``low + unit * (high - low)`` (the inverse of :func:`hu_to_unit`
    inside the window). Same kind and shape as the input."""
    low, high = _check_window(window)
    return _as_float(unit) * (high - low) + low


def _as_float(x):
    """Floating copy-free view when already floating; integer input -> float32."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        x = np.asarray(x)
        return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
    # torch tensor
    return x if x.is_floating_point() else x.float()
