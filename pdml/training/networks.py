"""The run's networks, built from its config: generator, discriminator, projection heads."""
from __future__ import annotations

from typing import Optional

from pdml.models import PatchDiscriminator, ProjectionHeads, RRDNGenerator
from pdml.training.config import TrainConfig


def build_generator(cfg: TrainConfig) -> RRDNGenerator:
    return RRDNGenerator(channels=1, features=cfg.features, growth=cfg.growth,
                         block_layers=cfg.block_layers, input_residual=cfg.input_residual)


def build_networks(cfg: TrainConfig) -> tuple[RRDNGenerator, PatchDiscriminator, Optional[ProjectionHeads]]:
    generator = build_generator(cfg)
    discriminator = PatchDiscriminator(channels=1, ndf=cfg.ndf, layers=cfg.d_layers)
    heads = None
    if cfg.loss != "none":
        heads = ProjectionHeads(cfg.loss_layers, in_channels=cfg.features,
                                hidden=cfg.head_dim, out_channels=cfg.head_dim)
    return generator, discriminator, heads
