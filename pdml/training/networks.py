"""The run's networks, built from its config: generator, discriminator, projection heads,
and the scale they see (:func:`to_network`, :func:`from_network`: the one place the unit
window, the input centre and ``net_scale`` meet, for training and inference alike).

``cfg.arch`` picks the set: "pdml" (:class:`pdml.models.RRDNGenerator`, a plain
:class:`pdml.models.PatchDiscriminator`, PyTorch's default initialisation) or "dmlct" (the
paper's reference code, :mod:`pdml.models.dmlct`: its generator, its discriminator with
squeeze-excitation, and normal(0, 0.01) initial weights for all three networks).
``cfg.d_input`` applies to both.
"""
from __future__ import annotations

from typing import Optional

from pdml.data import HU_WINDOW, hu_to_unit
from pdml.models import (FeatureGenerator, PatchDiscriminator, ProjectionHeads, RRDNGenerator,
                         dmlct, init_normal_)
from pdml.training.config import D_HIGHPASS_HU, D_LOWPASS_CENTER_HU, D_LOWPASS_HU, TrainConfig


def build_generator(cfg: TrainConfig) -> FeatureGenerator:
    if cfg.arch == "dmlct":
        return dmlct.DmlCtGenerator(channels=1, features=cfg.features, growth=cfg.growth,
                                    block_layers=cfg.block_layers)
    return RRDNGenerator(channels=1, features=cfg.features, growth=cfg.growth,
                         block_layers=cfg.block_layers, input_residual=cfg.input_residual)


def network_zero_hu(cfg: TrainConfig) -> float:
    """The HU value the networks see as 0: 0 HU for the wavelet high band (zero-mean),
    else ``cfg.input_center_hu`` (None: the unit window's low edge, the paper's input)."""
    if cfg.wavelet:
        return 0.0
    return float(cfg.input_center_hu) if cfg.input_center_hu is not None else HU_WINDOW[0]


def to_network(unit, cfg: TrainConfig):
    """Unit-window values (``hu_to_unit(hu, clip=False)`` of an image, or of its wavelet
    high band) -> what the networks see: ``(unit − unit(zero)) · net_scale`` with zero =
    :func:`network_zero_hu`. Array or tensor of any shape in, same kind and shape out."""
    zero = float(hu_to_unit(network_zero_hu(cfg), clip=False))
    return (unit - zero) * cfg.resolved_net_scale


def from_network(values, cfg: TrainConfig):
    """The inverse of :func:`to_network`: the networks' values -> the unit window."""
    zero = float(hu_to_unit(network_zero_hu(cfg), clip=False))
    return values / cfg.resolved_net_scale + zero


def _hu_per_network_unit(cfg: TrainConfig) -> float:
    """HU per unit of what the networks see (``unit window · net_scale``)."""
    return (HU_WINDOW[1] - HU_WINDOW[0]) / cfg.resolved_net_scale


def discriminator_highpass_gain(cfg: TrainConfig) -> Optional[float]:
    """The gain of the discriminator's high-pass input (None: it sees the image): the
    networks see ``unit window · net_scale``, the discriminator ``HU / D_HIGHPASS_HU``."""
    if "highpass" not in cfg.d_input.split("+"):
        return None
    return _hu_per_network_unit(cfg) / D_HIGHPASS_HU


def discriminator_lowpass(cfg: TrainConfig) -> Optional[tuple[float, float]]:
    """``(gain, offset)`` of the discriminator's soft-window view of the local mean
    (:class:`pdml.models.discriminator.LowPass`; None without it): the networks' values
    ``x`` are HU ``x · window / net_scale + zero``, the view ``tanh((mean₃ₓ₃(HU) −
    D_LOWPASS_CENTER_HU) / D_LOWPASS_HU)``. With the wavelet split the networks see the
    zero-mean high band, so the view is nearly flat there (it is meant for whole images)."""
    if "lowpass" not in cfg.d_input.split("+"):
        return None
    return (_hu_per_network_unit(cfg) / D_LOWPASS_HU,
            (network_zero_hu(cfg) - D_LOWPASS_CENTER_HU) / D_LOWPASS_HU)


def build_networks(cfg: TrainConfig) -> tuple[FeatureGenerator, PatchDiscriminator, Optional[ProjectionHeads]]:
    generator = build_generator(cfg)
    gain = discriminator_highpass_gain(cfg)
    keep_image = cfg.d_input.startswith("image+")
    lowpass = discriminator_lowpass(cfg)
    if cfg.arch == "dmlct":
        discriminator = dmlct.dml_ct_discriminator(channels=1, ndf=cfg.ndf, layers=cfg.d_layers,
                                                   highpass_gain=gain, keep_image=keep_image,
                                                   lowpass=lowpass)
    else:
        discriminator = PatchDiscriminator(channels=1, ndf=cfg.ndf, layers=cfg.d_layers,
                                           highpass_gain=gain, keep_image=keep_image,
                                           lowpass=lowpass)
    heads = None
    if cfg.loss != "none":
        heads = ProjectionHeads(cfg.loss_layers, in_channels=cfg.features,
                                hidden=cfg.head_dim, out_channels=cfg.head_dim)
        if cfg.arch == "dmlct":
            init_normal_(heads, dmlct.INIT_STD)
    return generator, discriminator, heads
