"""Denoise CT slices with a trained generator; rebuild that generator from a checkpoint.

Used by ``pdml-denoise`` (:mod:`pdml.cli`), the trainer's evaluation and the experiments.
"""
from __future__ import annotations

import numpy as np
import torch

from pdml.models import FeatureGenerator
from pdml.training.checkpoint import checkpoint_config
from pdml.training.config import TrainConfig, TrainError, autocast
from pdml.training.networks import build_generator, from_network, to_network


def generator_from_checkpoint(ckpt: dict, device: torch.device, which: str = "generator"
                              ) -> tuple[FeatureGenerator, TrainConfig]:
    """Rebuild the trained generator (eval mode) and the run's validated config from a
    checkpoint (:func:`pdml.training.load_checkpoint`); TrainError when they do not fit.
    The config's ``arch`` picks the network ("pdml" for checkpoints written before the
    option existed)."""
    cfg = checkpoint_config(ckpt, "checkpoint")
    try:
        state = ckpt["model"][which]
    except (KeyError, TypeError) as e:
        raise TrainError(f"checkpoint lacks the {which} weights ({type(e).__name__}: {e})") from None
    generator = build_generator(cfg)
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise TrainError(f"checkpoint's generator weights do not fit the {cfg.arch!r} "
                         f"generator of its config (another model?): "
                         f"{' '.join(first[:3])[:300]}") from None
    return generator.to(device).eval(), cfg


@torch.no_grad()
def denoise_hu(generator: FeatureGenerator, hu, cfg: TrainConfig, device: torch.device,
               precision: str = "fp32", batch_size: int = 4, progress=None) -> np.ndarray:
    """Denoise CT slices: ``hu`` float ``[S, H, W]`` (or ``[H, W]``) in HU -> float32, same shape.

    The slices are split by the wavelet transform (in HU) when the run used it; the
    high-frequency part (else the whole slice) goes to the unit window without clipping
    (values outside [-1000, 1000] HU pass through linearly) and to the networks' scale
    (:func:`pdml.training.networks.to_network`: ``net_scale``, the input centre), the
    generator replaces it, and the low-frequency part is added back.
    ``progress``: optional callable ``(slices_done)`` for a progress bar.
    """
    from pdml.data.hu import hu_to_unit, unit_to_hu
    from pdml.data.wavelet import wavelet_split

    hu = np.asarray(hu, dtype=np.float32)
    squeeze = hu.ndim == 2
    if squeeze:
        hu = hu[None]
    if hu.ndim != 3:
        raise ValueError(f"hu must be [S, H, W] or [H, W], got shape {hu.shape}")
    generator.eval()
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
        with context:
            y = generator(x)
        y = from_network(y.float().squeeze(1).cpu().numpy(), cfg)
        out[start:start + batch_size] = low + unit_to_hu(y)
        if progress is not None:
            progress(min(start + batch_size, hu.shape[0]))
    return out[0] if squeeze else out
