"""Wavelet split of the paper's code: ``low, high = wavelet_split(img)`` with ``img == low + high``.

``low`` is the image rebuilt from the level-``level`` approximation coefficients only
(db3, level 6 by default): the smooth part the network never sees (it carries the global
CT numbers). ``high`` is the image rebuilt from all detail coefficients: what the network
sees and predicts. The low part of the *input* is added back to the network's output.

Both parts are computed as separate inverse transforms (not ``high = img - low``), so the
identity ``low + high == img`` is a real check of the padding and perfect reconstruction.

Padding: the image is padded (symmetric, like PyWavelets' default) so each side becomes a
multiple of ``2**level`` after adding a margin of the filter length on both sides; the
margin keeps border effects out of the cropped result.
"""
from __future__ import annotations

import warnings

import numpy as np

DEFAULT_WAVELET = "db3"
DEFAULT_LEVEL = 6


def _padding(size: int, level: int, filter_len: int):
    """(before, after) so that ``size + before + after`` is a multiple of 2**level and both
    sides get at least ``filter_len`` pixels of margin."""
    block = 2 ** level
    minimum = size + 2 * filter_len
    total = -(-minimum // block) * block
    before = (total - size) // 2
    return before, total - size - before


def wavelet_split(img, wavelet: str = DEFAULT_WAVELET, level: int = DEFAULT_LEVEL):
    """Split ``img`` into (low, high) frequency parts.

    ``img``: NumPy array or torch tensor ``[..., H, W]`` (any leading dims, any float dtype;
    HU or unit scale, the split is linear). Returns ``(low, high)`` of the same kind, shape,
    dtype and device. Computed in float64 with PyWavelets on the CPU.
    """
    import pywt

    is_torch = not isinstance(img, np.ndarray)
    if is_torch:
        import torch

        device, dtype = img.device, img.dtype
        arr = img.detach().to("cpu", torch.float64).numpy()
    else:
        dtype = img.dtype if np.issubdtype(img.dtype, np.floating) else np.float32
        arr = np.asarray(img, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"img must be [..., H, W], got shape {tuple(arr.shape)}")
    H, W = arr.shape[-2:]
    filter_len = pywt.Wavelet(wavelet).dec_len
    ph, pw = _padding(H, level, filter_len), _padding(W, level, filter_len)
    pad = [(0, 0)] * (arr.ndim - 2) + [ph, pw]
    padded = np.pad(arr, pad, mode="symmetric")
    with warnings.catch_warnings():
        # PyWavelets warns that level 6 exceeds its "useful" level for small images; the
        # periodised transform is still perfectly invertible, and the padding margin keeps
        # the wrap-around away from the cropped image.
        warnings.filterwarnings("ignore", message="Level value of", category=UserWarning)
        coeffs = pywt.wavedec2(padded, wavelet, mode="periodization", level=level,
                               axes=(-2, -1))
    approx_only = [coeffs[0]] + [tuple(np.zeros_like(d) for d in det) for det in coeffs[1:]]
    detail_only = [np.zeros_like(coeffs[0])] + list(coeffs[1:])
    crop = (Ellipsis, slice(ph[0], ph[0] + H), slice(pw[0], pw[0] + W))
    low = pywt.waverec2(approx_only, wavelet, mode="periodization", axes=(-2, -1))[crop]
    high = pywt.waverec2(detail_only, wavelet, mode="periodization", axes=(-2, -1))[crop]
    if is_torch:
        return (torch.from_numpy(np.ascontiguousarray(low)).to(device, dtype),
                torch.from_numpy(np.ascontiguousarray(high)).to(device, dtype))
    return low.astype(dtype), high.astype(dtype)
