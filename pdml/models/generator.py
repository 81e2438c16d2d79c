"""pdml's generator (``--arch pdml``): a residual-in-residual dense network (RRDN) for CT
slices. The network of the paper's reference code is :mod:`pdml.models.dmlct`
(``--arch dmlct``); this one differs from it in the places listed there.

Layout (every convolution spectral-normalised, 3×3 ones with replicate padding so the
borders of a CT slice are not pulled towards zero):

    x [B, 1, H, W]
    └─ head       3×3 conv 1 → F                         (F = 32 features)
       └─ trunk   residual-in-residual group: head + β·RDB₃(RDB₂(RDB₁(head)))
          └─ fusion  1×1 conv F → F
             └─ tail 3×3 conv F → 1 of (head + fusion), without bias
    out = x + tail   (``input_residual=True``: the trunk learns what to remove)

Each residual dense block (RDB) has its own weights: 5 densely connected 3×3 convs
(the i-th sees F + i·G channels, G = growth 8; the first four add G channels each,
the fifth maps back to F), squeeze-excitation channel attention on the fifth's output,
and a scaled local residual. The spatial size never changes, so the feature maps of
every named layer are ``[B, F, H, W]`` (:mod:`pdml.models.feature_generator`): the
metric loss samples its patches there (the paper uses ``trunk`` and ``fusion``).
"""
from __future__ import annotations

import torch
from torch import nn

from pdml.models.dense import dense_convs
from pdml.models.feature_generator import DEFAULT_LOSS_LAYERS, FEATURE_LAYERS, FeatureGenerator
from pdml.models.layers import SqueezeExcitation, sn_conv

__all__ = ["RRDNGenerator", "ResidualDenseBlock", "RESIDUAL_SCALE", "FEATURE_LAYERS",
           "DEFAULT_LOSS_LAYERS"]

RESIDUAL_SCALE = 0.2
"""β of the dense blocks' and the group's residuals (keeps the deep stack near identity at init)."""


class ResidualDenseBlock(nn.Module):
    """``layers`` densely connected 3×3 convs + SE attention + local residual; ``[B, F, H, W]`` -> same."""

    def __init__(self, features: int = 32, growth: int = 8, layers: int = 5):
        super().__init__()
        if layers < 2:
            raise ValueError(f"layers must be >= 2, got {layers}")
        self.convs = nn.ModuleList(
            sn_conv(features + i * growth, growth, 3) for i in range(layers - 1))
        self.fuse = sn_conv(features + (layers - 1) * growth, features, 3)
        self.attention = SqueezeExcitation(features)
        self.act = nn.LeakyReLU(0.2, inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one buffer instead of a concatenation and a padded copy per conv (pdml.models.dense)
        convs = [*self.convs, self.fuse]
        fused = dense_convs(x, [c.weight for c in convs], [c.bias for c in convs],
                            self.act.negative_slope, activate_last=False)
        return torch.add(x, self.attention(fused), alpha=RESIDUAL_SCALE)


class RRDNGenerator(FeatureGenerator):
    """pdml's RRDN. ``forward(x [B, 1, H, W]) -> [B, 1, H, W]`` (input dtype / autocast);
    ``forward_with_features`` and ``features`` as in :class:`FeatureGenerator`.

    Args:
        channels: image channels in and out (1 for CT).
        features: F, the width of the trunk (32 in the paper).
        blocks: number of residual dense blocks in the trunk, each with its own weights (3).
        growth: channels added by each dense conv (8).
        block_layers: 3×3 convs per dense block (5).
        input_residual: add the input to the output (the network predicts a correction).
    """

    def __init__(self, channels: int = 1, features: int = 32, blocks: int = 3, growth: int = 8,
                 block_layers: int = 5, input_residual: bool = True):
        super().__init__()
        if blocks != 3:
            # FEATURE_LAYERS names rdb1..rdb3; other depths would need other names.
            raise ValueError(f"blocks must be 3 (the paper's RRDN), got {blocks}")
        self.channels, self.num_features = channels, features
        self.trunk_scale = RESIDUAL_SCALE
        self.input_residual = input_residual
        self.head = sn_conv(channels, features, 3)
        self.rdbs = nn.ModuleList(
            ResidualDenseBlock(features, growth, block_layers) for _ in range(blocks))
        self.fusion = sn_conv(features, features, 1)
        # no bias: the generator predicts a zero-mean high-frequency image, and a constant
        # offset of its output would shift the CT numbers, the very error the paper fights
        self.tail = sn_conv(features, channels, 3, bias=False)

    def blocks(self) -> nn.ModuleList:
        return self.rdbs

    def _output(self, x: torch.Tensor, head: torch.Tensor, fusion: torch.Tensor) -> torch.Tensor:
        out = self.tail(head + fusion)
        return x + out if self.input_residual else out
