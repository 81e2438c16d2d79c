"""PatchGAN discriminator with spectral norm (3×3 kernels, as the paper uses).

``forward(x [B, 1, H, W]) -> [B, 1, H', W']`` raw scores (LSGAN targets 1 real / 0 fake),
one per receptive-field patch. Layout for ``layers = 3`` and ``ndf = 32``:
conv s2 1→32, then s2 32→64, s2 64→128, then s1 128→256, then s1 256→1;
LeakyReLU(0.2) between, no normalisation layers (spectral norm bounds each layer).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    def __init__(self, channels: int = 1, ndf: int = 32, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        widths = [ndf * min(2 ** i, 8) for i in range(layers + 1)]
        mods: list[nn.Module] = []
        in_ch = channels
        for i, width in enumerate(widths):
            stride = 2 if i < layers else 1
            mods += [spectral_norm(nn.Conv2d(in_ch, width, 3, stride=stride, padding=1)),
                     nn.LeakyReLU(0.2)]
            in_ch = width
        mods.append(spectral_norm(nn.Conv2d(in_ch, 1, 3, stride=1, padding=1)))
        self.net = nn.Sequential(*mods)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        return self.net(x)
