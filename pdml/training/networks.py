"""The run's networks, built from its config: generator, discriminator, projection heads.

``cfg.arch`` picks the set: "pdml" (:class:`pdml.models.RRDNGenerator`, a plain
:class:`pdml.models.PatchDiscriminator`, PyTorch's default initialisation) or "dmlct" (the
paper's reference code, :mod:`pdml.models.dmlct`: its generator, its discriminator with
squeeze-excitation, and normal(0, 0.01) initial weights for all three networks).
``cfg.d_input`` applies to both.
"""
from __future__ import annotations

from typing import Optional

from pdml.data import HU_WINDOW
from pdml.models import (FeatureGenerator, PatchDiscriminator, ProjectionHeads, RRDNGenerator,
                         dmlct, init_normal_)
from pdml.training.config import D_HIGHPASS_HU, TrainConfig


def build_generator(cfg: TrainConfig) -> FeatureGenerator:
    if cfg.arch == "dmlct":
        return dmlct.DmlCtGenerator(channels=1, features=cfg.features, growth=cfg.growth,
                                    block_layers=cfg.block_layers)
    return RRDNGenerator(channels=1, features=cfg.features, growth=cfg.growth,
                         block_layers=cfg.block_layers, input_residual=cfg.input_residual)


def discriminator_highpass_gain(cfg: TrainConfig) -> Optional[float]:
    """The gain of the discriminator's high-pass input (None: it sees the image): the
    networks see ``unit window · net_scale``, the discriminator ``HU / D_HIGHPASS_HU``."""
    if cfg.d_input != "highpass":
        return None
    window_hu = HU_WINDOW[1] - HU_WINDOW[0]
    return window_hu / D_HIGHPASS_HU / cfg.resolved_net_scale


def build_networks(cfg: TrainConfig) -> tuple[FeatureGenerator, PatchDiscriminator, Optional[ProjectionHeads]]:
    generator = build_generator(cfg)
    gain = discriminator_highpass_gain(cfg)
    if cfg.arch == "dmlct":
        discriminator = dmlct.dml_ct_discriminator(channels=1, ndf=cfg.ndf, layers=cfg.d_layers,
                                                   highpass_gain=gain)
    else:
        discriminator = PatchDiscriminator(channels=1, ndf=cfg.ndf, layers=cfg.d_layers,
                                           highpass_gain=gain)
    heads = None
    if cfg.loss != "none":
        heads = ProjectionHeads(cfg.loss_layers, in_channels=cfg.features,
                                hidden=cfg.head_dim, out_channels=cfg.head_dim)
        if cfg.arch == "dmlct":
            init_normal_(heads, dmlct.INIT_STD)
    return generator, discriminator, heads
