"""Building blocks both generators and the discriminator use: spectral-normalised convs,
squeeze-excitation channel attention, and the normal(0, std) initialisation of DML_CT.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm


def init_normal_(module: nn.Module, std: float) -> nn.Module:
    """Every ``Conv*`` / ``Linear`` weight of ``module`` drawn from normal(0, ``std``), every
    bias of those layers zero (DML_CT's ``init_net(init_type="normal", init_gain=std)``);
    returns ``module``.

    Apply it before :func:`spectral_norm` wraps a layer: the spectral norm's power
    iteration then starts from the final weights. A layer already parametrized raises
    ValueError (its ``weight`` is computed, writing it would not reach the parameter).
    """
    for m in module.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            if parametrize.is_parametrized(m, "weight"):
                raise ValueError(f"init_normal_: {type(m).__name__} is already parametrized "
                                 "(spectral norm); initialise it before wrapping it")
            with torch.no_grad():
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
    return module


def sn_conv(in_ch: int, out_ch: int, kernel: int, bias: bool = True, stride: int = 1,
            init_std: Optional[float] = None, padding_mode: Optional[str] = None) -> nn.Module:
    """Spectral-normalised conv, 'same' padding (``kernel // 2``).

    ``padding_mode``: None picks replicate padding for kernels > 1 (the borders of a CT
    slice are not pulled towards zero); ``init_std``: :func:`init_normal_` before the
    spectral norm is attached (None: PyTorch's default initialisation).
    """
    if padding_mode is None:
        padding_mode = "replicate" if kernel > 1 else "zeros"
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias,
                     padding_mode=padding_mode)
    if init_std is not None:
        init_normal_(conv, init_std)
    return spectral_norm(conv)


class SqueezeExcitation(nn.Module):
    """Channel attention: ``x * sigmoid(W₂ relu(W₁ mean_hw(x)))``; ``[B, C, H, W]`` -> same.

    ``W₁``: 1×1 conv C → max(1, C // reduction), ``W₂``: back to C, both with bias;
    spectral-normalised when ``spectral`` (pdml's generator) or plain (DML_CT's
    discriminator); ``init_std`` as in :func:`sn_conv`.
    """

    def __init__(self, channels: int, reduction: int = 4, spectral: bool = True,
                 init_std: Optional[float] = None):
        super().__init__()
        hidden = max(1, channels // reduction)
        if spectral:
            self.squeeze = sn_conv(channels, hidden, 1, init_std=init_std)
            self.excite = sn_conv(hidden, channels, 1, init_std=init_std)
        else:
            self.squeeze = nn.Conv2d(channels, hidden, 1)
            self.excite = nn.Conv2d(hidden, channels, 1)
            if init_std is not None:
                init_normal_(self, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        w = torch.sigmoid(self.excite(torch.relu(self.squeeze(w))))
        return x * w
