"""The paper's networks: generator (RRDN), PatchGAN discriminator, projection heads."""
from pdml.models.discriminator import PatchDiscriminator
from pdml.models.generator import (DEFAULT_LOSS_LAYERS, FEATURE_LAYERS, RRDNGenerator,
                                   ResidualDenseBlock, SqueezeExcitation)
from pdml.models.heads import ProjectionHead, ProjectionHeads

__all__ = ["RRDNGenerator", "ResidualDenseBlock", "SqueezeExcitation", "PatchDiscriminator",
           "ProjectionHead", "ProjectionHeads", "FEATURE_LAYERS", "DEFAULT_LOSS_LAYERS"]
