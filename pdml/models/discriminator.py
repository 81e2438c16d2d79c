"""PatchGAN discriminator with spectral norm (3×3 kernels, as the paper uses).

``forward(x [B, 1, H, W]) -> [B, 1, H', W']`` raw scores (LSGAN targets 1 real / 0 fake),
one per receptive-field patch. Layout for ``layers = 3`` and ``ndf = 32``:
conv s2 1→32, then s2 32→64, s2 64→128, then s1 128→256, then s1 256→1;
LeakyReLU(0.2) between, no normalisation layers (spectral norm bounds each layer).

With ``highpass_gain`` the discriminator judges the image's finest texture instead of the
image: its first layer sees ``gain · (x − mean₃ₓ₃(x))`` (:class:`HighPass`). Noise is
what differs most between LD and ND at that scale, while the anatomy's edges, hundreds of
HU strong, dominate the image itself; docs/training.md has the measurement.

With ``attention_reduction`` (DML_CT's discriminator, :func:`pdml.models.dmlct.dml_ct_discriminator`)
a squeeze-excitation block (plain 1×1 convs, C → C // reduction → C) follows the
LeakyReLU of every conv but the first and the last.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pdml.models.layers import SqueezeExcitation, sn_conv


class HighPass(nn.Module):
    """``gain · (x − mean₃ₓ₃(x))`` per channel, borders replicated; ``[B, C, H, W]`` -> same.

    No parameters and no buffers: it adds nothing to a state_dict.
    """

    def __init__(self, gain: float):
        super().__init__()
        if not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local_mean = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return self.gain * (x - local_mean)

    def extra_repr(self) -> str:
        return f"gain={self.gain}"


class PatchDiscriminator(nn.Module):
    """Args: ``channels`` in; ``ndf`` width of the first conv (doubling per layer, at most
    8·ndf); ``layers`` stride-2 convs; ``highpass_gain``: judge the 3×3 high-pass (None: the
    image); ``attention_reduction``: squeeze-excitation after each inner conv (None: none);
    ``init_std``: normal(0, std) weights and zero biases
    (:func:`pdml.models.layers.init_normal_`; None: PyTorch's default)."""

    def __init__(self, channels: int = 1, ndf: int = 32, layers: int = 3,
                 highpass_gain: Optional[float] = None,
                 attention_reduction: Optional[int] = None, init_std: Optional[float] = None):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if attention_reduction is not None and attention_reduction < 1:
            raise ValueError(f"attention_reduction must be >= 1, got {attention_reduction}")
        self.input_filter = nn.Identity() if highpass_gain is None else HighPass(highpass_gain)
        widths = [ndf * min(2 ** i, 8) for i in range(layers + 1)]
        mods: list[nn.Module] = []
        in_ch = channels
        for i, width in enumerate(widths):
            stride = 2 if i < layers else 1
            mods += [sn_conv(in_ch, width, 3, stride=stride, init_std=init_std,
                             padding_mode="zeros"),
                     nn.LeakyReLU(0.2)]
            if attention_reduction is not None and i > 0:
                mods.append(SqueezeExcitation(width, attention_reduction, spectral=False,
                                              init_std=init_std))
            in_ch = width
        mods.append(sn_conv(in_ch, 1, 3, init_std=init_std, padding_mode="zeros"))
        self.net = nn.Sequential(*mods)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        return self.net(self.input_filter(x))
