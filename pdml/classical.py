"""Classical denoisers as baselines: TV, non-local means and BM3D.

The HU-shift experiment's table (:mod:`pdml.experiments`) and the trainer's summary
(:func:`pdml.training.evaluate.classical_rows`) put them beside the networks.

Each runs per slice in the paper's unit window without clipping
(:func:`pdml.data.hu_to_unit` with ``clip=False``: [-1000, 1000] HU -> [0, 1], values
outside pass linearly) and goes back to HU. One scalar, the *strength*, sets each:

- ``tv``: scikit-image's ``denoise_tv_chambolle``, ``weight = strength·σ̂``;
- ``nlm``: scikit-image's ``denoise_nl_means`` (5×5 patches, search distance 6, fast
  mode) with ``sigma = σ̂`` and ``h = strength·σ̂``;
- ``bm3d``: the ``bm3d`` package, its default profile (single-threaded, so the result is
  reproducible), white noise ``sigma_psd = strength·σ̂``;

where σ̂ is the slice's own noise estimate (scikit-image's ``estimate_sigma``, a wavelet
median absolute deviation, in the unit window), so one strength fits slices of any dose.

Tuning (:func:`tune`), once per method on tuning slices with a clean truth: every strength
of the method's grid (:data:`GRIDS`) denoises them, and the strength with the highest mean
PSNR (:func:`pdml.metrics.psnr`, the paper's window) against the truth wins (ties: the
smaller strength). The evaluation (:func:`pdml.training.evaluate.classical_rows`) then
scores the tuned denoisers on other slices with the trainer's held-out evaluation
(:func:`pdml.training.evaluate_slices`: PSNR, SSIM, noise std and HU shift in homogeneous
ROIs), the same numbers the trained networks get.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
# scikit-image loads a submodule's functions on first use (~1 s for these): importing
# this module costs nothing until a baseline runs
from skimage import restoration

from pdml import metrics
from pdml.data.hu import hu_to_unit, unit_to_hu

METHODS = ("tv", "nlm", "bm3d")
NAMES = {"tv": "TV (Chambolle)", "nlm": "non-local means", "bm3d": "BM3D"}
SHORT_NAMES = {"tv": "TV", "nlm": "NLM", "bm3d": "BM3D"}
STRENGTH_NAMES = {"tv": "weight/σ̂", "nlm": "h/σ̂", "bm3d": "σ/σ̂"}
GRIDS = {
    "tv": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
    "nlm": (0.4, 0.6, 0.8, 1.0, 1.3, 1.6),
    "bm3d": (0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
}
"""Each method's strengths tried by :func:`tune` (see the module docstring for the units)."""

NLM_PATCH, NLM_DISTANCE = 5, 6


def best_available() -> str:
    """The strongest method that runs here: "bm3d" when its optional package is installed
    (``pip install 'pdml[classical]'``), else "nlm"."""
    return "bm3d" if importlib.util.find_spec("bm3d") is not None else "nlm"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _slices(hu, name: str) -> tuple[np.ndarray, bool]:
    """``hu`` ``[H, W]`` or ``[S, H, W]`` -> (float32 ``[S, H, W]``, was 2-D)."""
    x = np.asarray(hu, dtype=np.float32)
    if x.ndim not in (2, 3) or min(x.shape[-2:]) < 8:
        raise ValueError(f"{name} must be [H, W] or [S, H, W] HU slices of at least 8x8, "
                         f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf")
    return (x[None] if x.ndim == 2 else x), x.ndim == 2


def noise_sigma(unit: np.ndarray) -> float:
    """σ̂ of one slice ``[H, W]`` in the unit window (scikit-image's ``estimate_sigma``)."""
    return float(restoration.estimate_sigma(unit, channel_axis=None))


def _denoise_unit(method: str, unit: np.ndarray, strength: float) -> np.ndarray:
    sigma = noise_sigma(unit)
    if method == "tv":
        return restoration.denoise_tv_chambolle(unit, weight=strength * sigma, channel_axis=None)
    if method == "nlm":
        return restoration.denoise_nl_means(unit, patch_size=NLM_PATCH,
                                            patch_distance=NLM_DISTANCE, h=strength * sigma,
                                            sigma=sigma, fast_mode=True, channel_axis=None)
    try:
        import bm3d  # optional (non-commercial licence): imported where it is used
    except ImportError:
        raise ImportError("the BM3D baseline needs the optional bm3d package (licensed for "
                          "non-commercial use only): pip install 'pdml[classical]'") from None
    profile = bm3d.BM3DProfile()  # the library's default ('np') settings
    # single-threaded: with threads the aggregation's rounding, hence the result, varies
    profile.num_threads = 1
    return bm3d.bm3d(unit, sigma_psd=strength * sigma, profile=profile)


def denoise(method: str, hu, strength: float) -> np.ndarray:
    """Denoise CT slices ``hu`` (``[H, W]`` or ``[S, H, W]``, HU) with ``method`` at
    ``strength`` -> float32 HU, same shape. Each slice is denoised on its own."""
    _check_method(method)
    if not (np.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a positive number, got {strength!r}")
    x, flat = _slices(hu, "hu")
    out = np.empty_like(x)
    for s in range(x.shape[0]):
        unit = hu_to_unit(x[s].astype(np.float64), clip=False)
        out[s] = unit_to_hu(np.asarray(_denoise_unit(method, unit, float(strength))))
    return out[0] if flat else out


def _paired(ld_hu, truth_hu, what: str) -> tuple[np.ndarray, np.ndarray]:
    ld, _ = _slices(ld_hu, f"{what}_ld_hu")
    truth, _ = _slices(truth_hu, f"{what}_truth_hu")
    if ld.shape != truth.shape:
        raise ValueError(f"{what}_ld_hu {ld.shape} and {what}_truth_hu {truth.shape} must be "
                         f"paired slices of one shape")
    return ld, truth


def tune(method: str, ld_hu, truth_hu, grid: Optional[Sequence[float]] = None
         ) -> tuple[float, dict[float, float]]:
    """The strength of ``grid`` (default :data:`GRIDS`) with the highest mean PSNR of the
    denoised ``ld_hu`` against ``truth_hu`` (paired ``[S, H, W]`` HU) -> ``(strength,
    {strength: mean PSNR in dB})``; ties go to the smaller strength."""
    _check_method(method)
    ld, truth = _paired(ld_hu, truth_hu, "tune")
    grid = sorted(float(s) for s in (GRIDS[method] if grid is None else grid))
    if not grid:
        raise ValueError("grid must hold at least one strength")
    scores = {s: float(np.mean(metrics.psnr(denoise(method, ld, s), truth))) for s in grid}
    best = max(grid, key=lambda s: (scores[s], -s))
    return best, scores


@dataclass
class TunedBaseline:
    """One classical denoiser tuned on the tuning slices and applied to the evaluation
    slices: ``denoised`` float32 ``[S, H, W]`` HU, ``scores`` the tuning PSNR per strength,
    ``seconds`` the time of tuning plus denoising."""
    method: str
    strength: float
    scores: dict
    denoised: np.ndarray = field(repr=False)
    seconds: float

    @property
    def name(self) -> str:
        return f"{NAMES[self.method]}, {STRENGTH_NAMES[self.method]} {self.strength:g}"


def tuned_baselines(val_ld_hu, tune_ld_hu, tune_truth_hu,
                    methods: Sequence[str] = METHODS,
                    grids: Optional[dict] = None) -> list[TunedBaseline]:
    """Tune each of ``methods`` on the tuning pair (:func:`tune`), then denoise
    ``val_ld_hu`` (``[S, H, W]`` HU) with the chosen strength; -> one
    :class:`TunedBaseline` per method, in order."""
    val_ld, _ = _slices(val_ld_hu, "val_ld_hu")
    out = []
    for method in methods:
        _check_method(method)
        t0 = time.perf_counter()
        strength, scores = tune(method, tune_ld_hu, tune_truth_hu,
                                None if grids is None else grids.get(method))
        denoised = denoise(method, val_ld, strength)
        out.append(TunedBaseline(method, strength, scores, denoised, time.perf_counter() - t0))
    return out
