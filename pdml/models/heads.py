"""Projection heads of the patch-wise losses: one per generator feature layer.

Each head is a 2-layer MLP applied at every pixel (1×1 convs): ``[B, F, H, W] -> [B, D, H, W]``
(F = 32 -> 128 -> ReLU -> 128). The fused op (:func:`pdml.ops.patch_metric` /
:func:`pdml.ops.patch_nce`) then gathers the sampled patches, L2-normalises them and
computes the loss, so the heads never see a gathered or normalised row.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ProjectionHead(nn.Sequential):
    """1×1 conv ``in → hidden``, ReLU, 1×1 conv ``hidden → out``."""

    def __init__(self, in_channels: int = 32, hidden: int = 128, out_channels: int = 128):
        super().__init__(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(),
                         nn.Conv2d(hidden, out_channels, 1))


class ProjectionHeads(nn.Module):
    """One :class:`ProjectionHead` per named layer (``heads[name]``), applied in order.

    ``forward([map [B, F, H, W] per layer]) -> [projected [B, D, H, W] per layer]``.
    """

    def __init__(self, layers: Sequence[str], in_channels: int = 32, hidden: int = 128,
                 out_channels: int = 128):
        super().__init__()
        if not layers:
            raise ValueError("layers must name at least one feature layer")
        self.layers = tuple(layers)
        self.heads = nn.ModuleDict(
            {name: ProjectionHead(in_channels, hidden, out_channels) for name in self.layers})

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} maps (layers {self.layers}), got {len(maps)}")
        return [self.heads[name](m) for name, m in zip(self.layers, maps)]
