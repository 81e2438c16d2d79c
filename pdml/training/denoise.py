"""Denoise CT slices with a trained generator: :func:`denoise_hu`, the one path from HU
slices to denoised HU slices (``pdml-denoise``, the trainer's held-out evaluation, the
experiments), its tiled forward pass and its precision, and :func:`autocast`, the
precision context of the training step and of inference alike.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch

from pdml.data.hu import hu_to_unit, unit_to_hu
from pdml.data.wavelet import wavelet_split
from pdml.models import FeatureGenerator
from pdml.training.config import AUTOCAST_DTYPES, PRECISIONS, TrainConfig
from pdml.training.distributed import native_bf16
from pdml.training.networks import from_network, to_network


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def forward_tiled(generator: torch.nn.Module, x: torch.Tensor, tile: Optional[int],
                  **forward_kwargs) -> torch.Tensor:
    """``generator(x)`` for ``x [B, C, H, W]``, computed ``tile × tile`` pixels at a time.

    Each tile runs with a halo of ``generator.receptive_radius()`` pixels of the image
    around it (cut off at the image's border, where the network's own replicate padding
    applies as on the whole slice), so every output pixel sees exactly the inputs it sees
    on the whole slice: the output equals ``generator(x)`` up to rounding. The maps of a
    tile stay cache-sized where those of a 512² slice do not. Whole-slice when ``tile``
    is None, the slice fits one tile, or the network has a global operation
    (``receptive_radius()`` None, e.g. pdml's squeeze-excitation means).
    """
    radius_of = getattr(generator, "receptive_radius", None)
    radius = radius_of() if radius_of is not None else None
    H, W = x.shape[-2:]
    if tile is None or radius is None or (H <= tile and W <= tile):
        return generator(x, **forward_kwargs)
    out = None
    for top in range(0, H, tile):
        for left in range(0, W, tile):
            bottom, right = min(top + tile, H), min(left + tile, W)
            y0, x0 = max(top - radius, 0), max(left - radius, 0)
            part = generator(x[..., y0:min(bottom + radius, H), x0:min(right + radius, W)],
                             **forward_kwargs)
            if out is None:
                out = part.new_empty((*x.shape[:-3], part.shape[-3], H, W))
            out[..., top:bottom, left:right] = part[..., top - y0:bottom - y0, left - x0:right - x0]
    return out


DENOISE_TILE = 0
"""``pdml-denoise``'s default ``--tile`` (0: whole slices). In ``benchmarks/bench_generator.py``
256² tiles (with their 17-pixel halo: 1.28× the FLOPs of a 512² slice) were 1.1× faster
than whole slices while every new 512² map cost page faults, and slower once freed memory
is kept for reuse (:func:`pdml.training.distributed.keep_freed_memory`)."""

DENOISE_PRECISIONS = ("auto", *PRECISIONS)
"""``precision`` of :func:`denoise_hu` and ``pdml-denoise --precision``."""


def denoise_precision(request: str, device: torch.device) -> str:
    """The autocast precision of a denoise ``request``: "auto" is "bf16" where ``device``
    computes bf16 natively (:func:`pdml.training.distributed.native_bf16`), else "fp32";
    any other request is kept. Its HU error against fp32 is bounded by
    ``tests/test_inference_speed.py`` (mean absolute ≤ 0.5 HU on the built-in slices)."""
    if request not in DENOISE_PRECISIONS:
        raise ValueError(f"precision must be one of {DENOISE_PRECISIONS}, got {request!r}")
    if request == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return request


@torch.no_grad()
def denoise_hu(generator: FeatureGenerator, hu, cfg: TrainConfig, device: torch.device,
               precision: str = "fp32", batch_size: int = 4, progress=None,
               tile: Optional[int] = None) -> np.ndarray:
    """Denoise CT slices: ``hu`` float ``[S, H, W]`` (or ``[H, W]``) in HU -> float32, same shape.

    The slices are split by the wavelet transform (in HU) when the run used it; the
    high-frequency part (else the whole slice) goes to the unit window without clipping
    (values outside [-1000, 1000] HU pass through linearly) and to the networks' scale
    (:func:`pdml.training.networks.to_network`: ``net_scale``, the input centre), the
    generator replaces it, and the low-frequency part is added back.
    ``precision``: "fp32", "bf16", "fp16" or "auto" (:func:`denoise_precision`); a
    :class:`FeatureGenerator` runs its dense blocks in that precision and the rest in fp32
    (``block_dtype`` of its ``forward``), another module runs under autocast;
    ``tile``: compute in tiles of that many pixels a side (:func:`forward_tiled`; the same
    output), None: whole slices. ``progress``: optional callable ``(slices_done)`` for a
    progress bar.
    """
    hu = np.asarray(hu, dtype=np.float32)
    squeeze = hu.ndim == 2
    if squeeze:
        hu = hu[None]
    if hu.ndim != 3:
        raise ValueError(f"hu must be [S, H, W] or [H, W], got shape {hu.shape}")
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be >= 1 or None, got {tile}")
    generator.eval()
    precision = denoise_precision(precision, device)
    # a FeatureGenerator runs only its dense blocks in a lower precision (its input and
    # output keep fp32's resolution of the HU); another module runs under autocast
    block_dtype = (AUTOCAST_DTYPES.get(precision) if isinstance(generator, FeatureGenerator)
                   else None)
    context = autocast(device, precision)
    out = np.empty_like(hu)
    for start in range(0, hu.shape[0], batch_size):
        chunk = hu[start:start + batch_size]
        # split in HU, as the training crops are (pdml.training.data.HighFrequencyCrops)
        if cfg.wavelet:
            low, high = wavelet_split(chunk, cfg.wavelet_name, cfg.wavelet_level)
        else:
            low, high = np.zeros_like(chunk), chunk
        x = to_network(hu_to_unit(high, clip=False).astype(np.float32), cfg)
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1).to(device)
        if block_dtype is not None:
            y = forward_tiled(generator, x, tile, block_dtype=block_dtype)
        else:
            with context:
                y = forward_tiled(generator, x, tile)
        y = from_network(y.float().squeeze(1).cpu().numpy(), cfg)
        out[start:start + batch_size] = low + unit_to_hu(y)
        if progress is not None:
            progress(min(start + batch_size, hu.shape[0]))
    return out[0] if squeeze else out
