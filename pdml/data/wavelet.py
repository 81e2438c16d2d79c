"""Wavelet split of the paper's code: ``low, high = wavelet_split(img)`` with ``img == low + high``.

``low`` is the image rebuilt from the level-``level`` approximation coefficients only
(db3, level 6 by default): the smooth part the network never sees (it carries the global
CT numbers). ``high`` is the image rebuilt from all detail coefficients: what the network
sees and predicts. The low part of the *input* is added back to the network's output.

Padding: the image is padded (symmetric, like PyWavelets' default) so each side becomes a
multiple of ``2**level`` after adding a margin of the filter length on both sides; the
margin keeps border effects out of the cropped result. The transform itself is periodised.

Two evaluations of the same linear map:

- NumPy input: PyWavelets ``wavedec2`` / ``waverec2``, with ``low`` and ``high`` rebuilt
  separately (approximation only, details only), so ``low + high == img`` checks the
  padding and the perfect reconstruction.
- torch input (any device, e.g. a CUDA batch in the training loop): the approximation-only
  reconstruction of a separable 2-D transform is separable, ``low = A_H · img · A_Wᵀ`` with
  ``A_n`` the ``n × n`` matrix of the 1-D pad -> approximation-only reconstruction -> crop
  (built once per size with PyWavelets on the unit vectors, cached); ``high = img − low``.
  Two small matmuls in float64 on the tensor's device; the tests check it against the
  PyWavelets path.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np
import pywt
import torch

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


@contextlib.contextmanager
def _quiet_level_warning():
    # PyWavelets warns that level 6 exceeds its "useful" level for small images; the
    # periodised transform is still perfectly invertible, and the padding margin keeps
    # the wrap-around away from the cropped image.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Level value of", category=UserWarning)
        yield


def _split_numpy(arr: np.ndarray, wavelet: str, level: int):
    H, W = arr.shape[-2:]
    filter_len = pywt.Wavelet(wavelet).dec_len
    ph, pw = _padding(H, level, filter_len), _padding(W, level, filter_len)
    padded = np.pad(arr, [(0, 0)] * (arr.ndim - 2) + [ph, pw], mode="symmetric")
    with _quiet_level_warning():
        coeffs = pywt.wavedec2(padded, wavelet, mode="periodization", level=level,
                               axes=(-2, -1))
        approx_only = [coeffs[0]] + [tuple(np.zeros_like(d) for d in det)
                                     for det in coeffs[1:]]
        detail_only = [np.zeros_like(coeffs[0])] + list(coeffs[1:])
        crop = (Ellipsis, slice(ph[0], ph[0] + H), slice(pw[0], pw[0] + W))
        low = pywt.waverec2(approx_only, wavelet, mode="periodization", axes=(-2, -1))[crop]
        high = pywt.waverec2(detail_only, wavelet, mode="periodization", axes=(-2, -1))[crop]
    return low, high


@functools.lru_cache(maxsize=32)
def lowpass_matrix(size: int, wavelet: str = DEFAULT_WAVELET,
                   level: int = DEFAULT_LEVEL) -> np.ndarray:
    """``[size, size]`` float64 matrix A with ``low = A @ x`` for a 1-D signal ``x``
    (pad, approximation-only reconstruction, crop; as :func:`wavelet_split` per axis)."""
    filter_len = pywt.Wavelet(wavelet).dec_len
    before, after = _padding(size, level, filter_len)
    padded = np.pad(np.eye(size), [(before, after), (0, 0)], mode="symmetric")
    with _quiet_level_warning():
        coeffs = pywt.wavedec(padded, wavelet, mode="periodization", level=level, axis=0)
        coeffs = [coeffs[0]] + [np.zeros_like(c) for c in coeffs[1:]]
        low = pywt.waverec(coeffs, wavelet, mode="periodization", axis=0)
    return np.ascontiguousarray(low[before:before + size])


def wavelet_split(img, wavelet: str = DEFAULT_WAVELET, level: int = DEFAULT_LEVEL):
    """Split ``img`` into (low, high) frequency parts, ``low + high == img``.

    ``img``: NumPy array or torch tensor ``[..., H, W]`` (any leading dims, any float dtype;
    HU or unit scale: the split is linear). Returns ``(low, high)`` of the same kind, shape,
    dtype and device (NumPy: computed in float64 with PyWavelets; torch: float64 matmuls on
    the tensor's device, see the module doc).
    """
    if isinstance(img, np.ndarray):
        if img.ndim < 2:
            raise ValueError(f"img must be [..., H, W], got shape {img.shape}")
        dtype = img.dtype if np.issubdtype(img.dtype, np.floating) else np.float32
        low, high = _split_numpy(img.astype(np.float64), wavelet, level)
        return low.astype(dtype), high.astype(dtype)
    if img.dim() < 2:
        raise ValueError(f"img must be [..., H, W], got shape {tuple(img.shape)}")
    H, W = img.shape[-2:]
    a_h = torch.from_numpy(lowpass_matrix(H, wavelet, level)).to(img.device)
    a_w = torch.from_numpy(lowpass_matrix(W, wavelet, level)).to(img.device)
    x = img.detach().to(torch.float64)
    low64 = a_h @ x @ a_w.T
    high64 = x - low64
    dtype = img.dtype if img.is_floating_point() else torch.float32
    return low64.to(dtype), high64.to(dtype)
