"""Image-quality metrics for a batch of CT slices, all inputs in HU.

Inputs: NumPy arrays or torch tensors ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` (any
float dtype, any device; they are copied to the CPU in float64). Every metric returns a
NumPy float64 array ``[B]`` (one value per image).

- :func:`psnr`, :func:`ssim`: in the paper's window: both images mapped with
  :func:`pdml.data.hu_to_unit` (``[-1000, 1000]`` HU -> ``[0, 1]``, clipped), data range 1.
  SSIM is scikit-image's ``structural_similarity`` (7x7 uniform window, its defaults).
- :func:`rmse`: root-mean-square difference in HU (no window).
- :func:`noise_std`: noise standard deviation in HU, the mean over homogeneous regions of
  interest (ROIs) of the pixel standard deviation inside each ROI (with a truth image: of
  ``image − truth``, which removes anatomy; without: of the image itself).
- :func:`hu_shift`: CT-number shift in HU, the mean over homogeneous ROIs of
  ``mean(output − truth)``: a global offset of the output's CT numbers shows here, while
  zero-mean noise averages out.

Automatic ROI selection (:func:`homogeneous_rois`): the reference image (the truth, else
the image itself, smoothed) is tiled into non-overlapping ``roi_size`` squares; tiles whose
every pixel lies in the soft-tissue range (default -150 to 250 HU: fat, water, muscle,
organs; not air, lung or bone) are candidates, and the ``count`` candidates with the
smallest standard deviation of the reference are used. When no tile qualifies, the
``count`` tiles with the smallest standard deviation among those not containing air
(< -900 HU) are used, and when none of those exist, any tiles.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
# scikit-image loads a submodule's functions on first use (~0.2 s for SSIM)
import skimage.metrics

from pdml.data.hu import HU_WINDOW, hu_to_unit

Roi = Tuple[int, int, int]   # (top row, left column, side) in pixels
SOFT_TISSUE_HU = (-150.0, 250.0)


def _batch(x, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{name} must be [H, W], [B, H, W] or [B, 1, H, W], got {x.shape}")
    return x


def _pair(output, truth) -> Tuple[np.ndarray, np.ndarray]:
    out, ref = _batch(output, "output"), _batch(truth, "truth")
    if out.shape != ref.shape:
        raise ValueError(f"output {out.shape} and truth {ref.shape} differ in shape")
    return out, ref


def psnr(output, truth, window=HU_WINDOW) -> np.ndarray:
    """PSNR in dB of ``output`` against ``truth`` (HU) in ``window``; ``[B]``."""
    out, ref = _pair(output, truth)
    mse = ((hu_to_unit(out, window) - hu_to_unit(ref, window)) ** 2).mean(axis=(1, 2))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def ssim(output, truth, window=HU_WINDOW) -> np.ndarray:
    """SSIM of ``output`` against ``truth`` (HU) in ``window`` (scikit-image); ``[B]``."""
    out, ref = _pair(output, truth)
    o, r = hu_to_unit(out, window), hu_to_unit(ref, window)
    return np.array([skimage.metrics.structural_similarity(o[b], r[b], data_range=1.0)
                     for b in range(out.shape[0])])


def rmse(output, truth) -> np.ndarray:
    """Root-mean-square error in HU; ``[B]``."""
    out, ref = _pair(output, truth)
    return np.sqrt(((out - ref) ** 2).mean(axis=(1, 2)))


def _default_roi_size(shape) -> int:
    return int(max(8, min(shape) // 16))


def homogeneous_rois(reference, roi_size: Optional[int] = None, count: int = 4,
                     hu_range: Tuple[float, float] = SOFT_TISSUE_HU) -> List[List[Roi]]:
    """Automatic homogeneous ROIs of each image of ``reference`` (HU), see the module doc.

    ``roi_size``: side in pixels (default ``max(8, min(H, W) // 16)``: 16 px at 256²,
    32 px at 512²). Returns, per image, a list of up to ``count`` ``(row, col, side)``.
    """
    ref = _batch(reference, "reference")
    side = roi_size or _default_roi_size(ref.shape[1:])
    H, W = ref.shape[1:]
    nh, nw = H // side, W // side
    if nh == 0 or nw == 0:
        raise ValueError(f"roi_size {side} is larger than the image {H}x{W}")
    rois = []
    for img in ref:
        tiles = img[: nh * side, : nw * side].reshape(nh, side, nw, side).swapaxes(1, 2)
        tiles = tiles.reshape(nh * nw, side * side)
        stds = tiles.std(axis=1)
        in_range = ((tiles >= hu_range[0]) & (tiles <= hu_range[1])).all(axis=1)
        no_air = (tiles >= -900.0).all(axis=1)
        for mask in (in_range, no_air, np.ones_like(in_range)):
            if mask.any():
                break
        candidates = np.flatnonzero(mask)
        chosen = candidates[np.argsort(stds[candidates], kind="stable")[:count]]
        rois.append([(int(t // nw) * side, int(t % nw) * side, side) for t in chosen])
    return rois


def _roi_values(img: np.ndarray, rois: Sequence[Roi]):
    for r, c, s in rois:
        yield img[r:r + s, c:c + s]


def noise_std(image, truth=None, rois: Optional[List[List[Roi]]] = None,
              roi_size: Optional[int] = None) -> np.ndarray:
    """Noise std in HU, mean over homogeneous ROIs; ``[B]``.

    With ``truth`` the std is of ``image − truth`` (pure noise) and the ROIs come from
    ``truth``; without, the std is of ``image`` and the ROIs come from ``image`` smoothed
    by a 5x5 mean (so the noise itself does not decide where the ROIs go).
    """
    img = _batch(image, "image")
    if truth is not None:
        img, ref = _pair(image, truth)
        values = img - ref
    else:
        from scipy.ndimage import uniform_filter  # ~0.2 s: only this branch needs it

        ref = uniform_filter(img, size=(1, 5, 5), mode="nearest")
        values = img
    if rois is None:
        rois = homogeneous_rois(ref, roi_size)
    return np.array([np.mean([v.std() for v in _roi_values(values[b], rois[b])])
                     for b in range(img.shape[0])])


def hu_shift(output, truth, rois: Optional[List[List[Roi]]] = None,
             roi_size: Optional[int] = None) -> np.ndarray:
    """Mean HU difference ``output − truth`` over homogeneous ROIs of ``truth``; ``[B]``."""
    out, ref = _pair(output, truth)
    if rois is None:
        rois = homogeneous_rois(ref, roi_size)
    diff = out - ref
    return np.array([np.mean([v.mean() for v in _roi_values(diff[b], rois[b])])
                     for b in range(out.shape[0])])
