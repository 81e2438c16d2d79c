"""The paper's generator: a residual-in-residual dense network (RRDN) for CT slices.

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
every named layer are ``[B, F, H, W]``: the metric loss samples its patches there
(the paper uses ``trunk`` and ``fusion``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

FEATURE_LAYERS = ("head", "rdb1", "rdb2", "rdb3", "trunk", "fusion")
"""Names of the layers whose ``[B, F, H, W]`` maps :meth:`RRDNGenerator.features` returns."""

DEFAULT_LOSS_LAYERS = ("trunk", "fusion")
"""The layers the paper's metric loss uses."""

RESIDUAL_SCALE = 0.2
"""β of the dense blocks' and the group's residuals (keeps the deep stack near identity at init)."""


def sn_conv(in_ch: int, out_ch: int, kernel: int, bias: bool = True) -> nn.Module:
    """Spectral-normalised conv, stride 1, 'same' size; replicate padding for kernels > 1."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=bias,
                     padding_mode="replicate" if kernel > 1 else "zeros")
    return spectral_norm(conv)


class SqueezeExcitation(nn.Module):
    """Channel attention: ``x * sigmoid(W₂ relu(W₁ mean_hw(x)))``; ``[B, C, H, W]`` -> same."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.squeeze = sn_conv(channels, hidden, 1)
        self.excite = sn_conv(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        w = torch.sigmoid(self.excite(torch.relu(self.squeeze(w))))
        return x * w


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
        feats = [x]
        for conv in self.convs:
            feats.append(self.act(conv(torch.cat(feats, dim=1))))
        out = self.attention(self.fuse(torch.cat(feats, dim=1)))
        return x + RESIDUAL_SCALE * out


class RRDNGenerator(nn.Module):
    """The paper's generator. ``forward(x [B, 1, H, W]) -> [B, 1, H, W]`` (input dtype / autocast).

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
        self.input_residual = input_residual
        self.head = sn_conv(channels, features, 3)
        self.rdbs = nn.ModuleList(
            ResidualDenseBlock(features, growth, block_layers) for _ in range(blocks))
        self.fusion = sn_conv(features, features, 1)
        # no bias: the generator predicts a zero-mean high-frequency image, and a constant
        # offset of its output would shift the CT numbers, the very error the paper fights
        self.tail = sn_conv(features, channels, 3, bias=False)

    def _run(self, x: torch.Tensor, layers: Sequence[str], stop_early: bool):
        """Run the network, collecting the maps of ``layers``; returns (out or None, maps)."""
        unknown = [name for name in layers if name not in FEATURE_LAYERS]
        if unknown:
            raise ValueError(f"unknown feature layer(s) {unknown}; choose from {FEATURE_LAYERS}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        wanted = set(layers)
        maps: dict[str, torch.Tensor] = {}

        def keep(name: str, t: torch.Tensor) -> bool:
            if name in wanted:
                maps[name] = t
            return stop_early and len(maps) == len(wanted)

        head = self.head(x)
        if keep("head", head):
            return None, [maps[n] for n in layers]
        h = head
        for i, rdb in enumerate(self.rdbs, start=1):
            h = rdb(h)
            if keep(f"rdb{i}", h):
                return None, [maps[n] for n in layers]
        trunk = head + RESIDUAL_SCALE * h
        if keep("trunk", trunk):
            return None, [maps[n] for n in layers]
        fusion = self.fusion(trunk)
        if keep("fusion", fusion):
            return None, [maps[n] for n in layers]
        out = self.tail(head + fusion)
        if self.input_residual:
            out = x + out
        return out, [maps[n] for n in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, (), stop_early=False)[0]

    def forward_with_features(self, x: torch.Tensor, layers: Sequence[str] = DEFAULT_LOSS_LAYERS):
        """``-> (out [B, 1, H, W], [map [B, F, H, W] for each name in layers])`` in one pass."""
        return self._run(x, tuple(layers), stop_early=False)

    def features(self, x: torch.Tensor, layers: Sequence[str] = DEFAULT_LOSS_LAYERS) -> list[torch.Tensor]:
        """The maps ``[B, F, H, W]`` of ``layers`` (in that order); stops after the deepest one."""
        if not layers:
            raise ValueError("layers must name at least one feature layer")
        return self._run(x, tuple(layers), stop_early=True)[1]
