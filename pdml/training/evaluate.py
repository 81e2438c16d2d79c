"""Held-out evaluation: denoise the validation slices, then score them (HU / dB)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from pdml import classical, metrics
from pdml.models import FeatureGenerator
from pdml.training.config import TrainConfig
from pdml.training.data import ValItem
from pdml.training.denoise import denoise_hu


def denoise_slices(generator: FeatureGenerator, val: Sequence[ValItem], cfg: TrainConfig,
                   device: torch.device) -> list[np.ndarray]:
    """The denoised ``ld`` of every held-out slice: float32 ``[H, W]`` HU each, in order.

    Slices of one shape go through the network together (``cfg.precision`` autocast).
    """
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(val):
        groups.setdefault(item.ld.shape, []).append(i)
    denoised: list[Optional[np.ndarray]] = [None] * len(val)
    for idxs in groups.values():
        out = denoise_hu(generator, np.stack([val[i].ld for i in idxs]), cfg, device,
                         precision=cfg.precision)
        for j, i in enumerate(idxs):
            denoised[i] = out[j]
    return denoised


def evaluate_slices(val: Sequence[ValItem], denoised: Sequence[np.ndarray]) -> dict:
    """Mean metrics (HU / dB) of the denoised slices and, prefixed ``ld_``, of the LD input.

    ``denoised``: one float32 ``[H, W]`` HU image per item of ``val``
    (:func:`denoise_slices`). With a reference (truth or ND): PSNR, SSIM, noise std of
    ``image − reference`` and the HU shift ``image − reference`` in homogeneous ROIs
    (:mod:`pdml.metrics`). Without (unpaired data and no validation folders): the noise
    std of the image and the HU shift of the denoised slice against its LD input.
    -> ``{name: float or None, ..., "slices": count}``; ``psnr`` is None without a reference.
    """
    if len(denoised) != len(val):
        raise ValueError(f"denoised must hold one image per held-out slice ({len(val)}), "
                         f"got {len(denoised)}")
    per: dict[str, list[float]] = {}

    def add(key, value):
        per.setdefault(key, []).append(float(np.asarray(value).reshape(-1)[0]))

    for item, den in zip(val, denoised):
        if item.nd is not None:
            for prefix, img in (("", den), ("ld_", item.ld)):
                add(prefix + "psnr", metrics.psnr(img, item.nd))
                add(prefix + "ssim", metrics.ssim(img, item.nd))
                add(prefix + "noise_std", metrics.noise_std(img, item.nd))
                add(prefix + "hu_shift", metrics.hu_shift(img, item.nd))
        else:
            add("noise_std", metrics.noise_std(den))
            add("ld_noise_std", metrics.noise_std(item.ld))
            add("hu_shift", metrics.hu_shift(den, item.ld))
            add("ld_hu_shift", 0.0)
    result: dict[str, Any] = {k: float(np.mean(v)) for k, v in per.items()}
    if "psnr" not in result:
        result["psnr"] = None
    result["slices"] = len(val)
    return result


def classical_rows(val: Sequence[ValItem], methods: Sequence[str], tune_every: int = 2,
                   grids: Optional[dict] = None) -> list[tuple[dict, np.ndarray]]:
    """Classical baselines scored exactly like a network on the held-out slices ``val``
    (each with a reference ``nd``): each of ``methods`` (:mod:`pdml.classical`) is tuned
    once on ``val[::tune_every]`` (highest mean PSNR against the reference), then denoises
    every slice of ``val`` and is scored by :func:`evaluate_slices`.

    -> one ``(row, denoised)`` per method: ``row`` holds ``method``, ``name``,
    ``strength``, ``strength_name``, ``tuning_psnr`` ({strength: dB}), ``tuning_slices``,
    ``seconds`` and the metrics of :func:`evaluate_slices`; ``denoised`` float32
    ``[S, H, W]`` HU. ValueError when a slice has no reference or slices differ in shape.
    """
    if not val or any(item.nd is None for item in val):
        raise ValueError("val: classical baselines are tuned and scored against references; "
                         "every held-out slice needs one")
    if tune_every < 1:
        raise ValueError(f"tune_every must be >= 1, got {tune_every}")
    tune = val[::tune_every]
    baselines = classical.tuned_baselines(np.stack([i.ld for i in val]),
                                          np.stack([i.ld for i in tune]),
                                          np.stack([i.nd for i in tune]), methods, grids)
    out = []
    for b in baselines:
        row = {"method": b.method, "name": b.name, "strength": b.strength,
               "strength_name": classical.STRENGTH_NAMES[b.method],
               "tuning_psnr": {f"{k:g}": v for k, v in b.scores.items()},
               "tuning_slices": list(range(0, len(val), tune_every)), "seconds": b.seconds,
               **evaluate_slices(val, list(b.denoised))}
        out.append((row, b.denoised))
    return out
