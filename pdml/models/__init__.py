"""The networks: pdml's generator (RRDN) and PatchGAN discriminator (``--arch pdml``), the
paper's reference-code networks (:mod:`pdml.models.dmlct`, ``--arch dmlct``), projection heads."""
from pdml.models.discriminator import PatchDiscriminator
from pdml.models.dmlct import (DmlCtDenseBlock, DmlCtGenerator, dml_ct_discriminator,
                               load_dml_ct_discriminator, load_dml_ct_generator)
from pdml.models.feature_generator import DEFAULT_LOSS_LAYERS, FEATURE_LAYERS, FeatureGenerator
from pdml.models.generator import RRDNGenerator, ResidualDenseBlock
from pdml.models.heads import ProjectionHead, ProjectionHeads
from pdml.models.layers import SqueezeExcitation, init_normal_

__all__ = ["FeatureGenerator", "RRDNGenerator", "ResidualDenseBlock", "SqueezeExcitation",
           "PatchDiscriminator", "DmlCtGenerator", "DmlCtDenseBlock", "dml_ct_discriminator",
           "load_dml_ct_generator", "load_dml_ct_discriminator", "ProjectionHead",
           "ProjectionHeads", "init_normal_", "FEATURE_LAYERS", "DEFAULT_LOSS_LAYERS"]
