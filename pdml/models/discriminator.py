"""PatchGAN discriminator with spectral norm (3×3 kernels, as the paper uses).

``forward(x [B, 1, H, W]) -> [B, 1, H', W']`` raw scores (LSGAN targets 1 real / 0 fake),
one per receptive-field patch. Layout for ``layers = 3`` and ``ndf = 32``:
conv s2 1→32, then s2 32→64, s2 64→128, then s1 128→256, then s1 256→1;
LeakyReLU(0.2) between, no normalisation layers (spectral norm bounds each layer).

With ``highpass_gain`` the discriminator judges the image's finest texture instead of the
image: its first layer sees ``gain · (x − mean₃ₓ₃(x))`` (:class:`HighPass`). Noise is
what differs most between LD and ND at that scale, while the anatomy's edges, hundreds of
HU strong, dominate the image itself; docs/training.md has the measurement. The high-pass
removes a constant offset, so such a discriminator cannot see a CT-number shift; with
``keep_image`` as well its first layer sees both, the image and its high-pass as two
channels (:class:`ImageAndHighPass`): noise and CT numbers at once (docs/hu-shift.md).
With ``lowpass`` too, a third channel holds the local mean in a soft-tissue window
(:class:`LowPass`), where a CT-number offset of 100 HU is about half a unit instead of the
image's 0.05: the offset stays visible to D once the noise is gone.

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


class LowPass(nn.Module):
    """``tanh(gain · mean₃ₓ₃(x) + offset)`` per channel, borders replicated; ``[B, C, H, W]``
    -> same. With ``gain`` = HU per input unit / window width and ``offset`` the window's
    centre in those units (negated) it is the local mean in a soft window: steep in soft
    tissue, saturating in air and bone. No parameters and no buffers.
    """

    def __init__(self, gain: float, offset: float = 0.0):
        super().__init__()
        if not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        self.gain, self.offset = float(gain), float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local_mean = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return torch.tanh(self.gain * local_mean + self.offset)

    def extra_repr(self) -> str:
        return f"gain={self.gain}, offset={self.offset}"


class ImageAndHighPass(nn.Module):
    """``cat(x, gain · (x − mean₃ₓ₃(x)))`` along channels, and with ``lowpass`` (gain,
    offset) a third view ``tanh(gain · mean₃ₓ₃(x) + offset)``; ``[B, C, H, W]`` ->
    ``[B, 2C, H, W]`` (``[B, 3C, H, W]`` with ``lowpass``).

    No parameters and no buffers (:class:`HighPass`, :class:`LowPass` give the other views).
    """

    def __init__(self, gain: float, lowpass: Optional[tuple[float, float]] = None):
        super().__init__()
        self.highpass = HighPass(gain)
        self.lowpass = None if lowpass is None else LowPass(*lowpass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [x, self.highpass(x)]
        if self.lowpass is not None:
            views.append(self.lowpass(x))
        return torch.cat(views, dim=1)


class PatchDiscriminator(nn.Module):
    """Args: ``channels`` in; ``ndf`` width of the first conv (doubling per layer, at most
    8·ndf); ``layers`` stride-2 convs; ``highpass_gain``: judge the 3×3 high-pass (None: the
    image); ``keep_image``: with ``highpass_gain``, the image and its high-pass as two
    input views (the first conv takes ``2·channels``); ``lowpass``: with ``keep_image``, a
    third view, the local mean in a soft window (:class:`LowPass`'s ``(gain, offset)``; the
    first conv takes ``3·channels``); ``attention_reduction``:
    squeeze-excitation after each inner conv (None: none);
    ``init_std``: normal(0, std) weights and zero biases
    (:func:`pdml.models.layers.init_normal_`; None: PyTorch's default)."""

    def __init__(self, channels: int = 1, ndf: int = 32, layers: int = 3,
                 highpass_gain: Optional[float] = None, keep_image: bool = False,
                 lowpass: Optional[tuple[float, float]] = None,
                 attention_reduction: Optional[int] = None, init_std: Optional[float] = None):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if attention_reduction is not None and attention_reduction < 1:
            raise ValueError(f"attention_reduction must be >= 1, got {attention_reduction}")
        if keep_image and highpass_gain is None:
            raise ValueError("keep_image needs highpass_gain (the image alone is the default)")
        if lowpass is not None and not keep_image:
            raise ValueError("lowpass needs keep_image (a third view beside the image and its "
                             "high-pass)")
        if highpass_gain is None:
            self.input_filter: nn.Module = nn.Identity()
        else:
            self.input_filter = (ImageAndHighPass(highpass_gain, lowpass) if keep_image
                                 else HighPass(highpass_gain))
        widths = [ndf * min(2 ** i, 8) for i in range(layers + 1)]
        mods: list[nn.Module] = []
        in_ch = (1 + keep_image + (lowpass is not None)) * channels
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
