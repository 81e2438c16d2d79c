"""The networks of the paper's reference code (DML_CT), at its defaults (``--arch dmlct``).

Generator (DML_CT's ``RRDBNet`` as its ``create_network`` builds it: ``ngf = 32``,
growth 8, 3 blocks of 5 layers, replicate padding, spectral norm on every conv):

    x [B, 1, H, W]
    └─ head     3×3 conv 1 → F                            (F = 32)
       └─ trunk head + 0.1·RDB(RDB(RDB(head)))            ONE dense block, applied 3 times
          └─ fusion  1×1 conv F → F
    out = tail(LeakyReLU₀.₂(fusion))     tail: 3×3 conv F → 1, with bias

The dense block: 5 densely connected 3×3 convs (the i-th sees F + i·G channels, G = 8;
the first four give G channels, the fifth F), each followed by LeakyReLU(0.2), the fifth
included; output ``x + 0.1·fifth``. DML_CT builds the trunk as ``num_blocks * [block]``,
a list holding one module three times, so the three applications share their weights;
here that is one module called three times. There is no skip around the trunk (DML_CT's
``forward`` reads its own ``residual_bool`` keyword, default False, which its training code
never passes; the ``--gen_residual`` the network is built with is stored but unused) and
no global input residual.

Named maps (:mod:`pdml.models.feature_generator`): ``head``, ``rdb1..3`` (after each
application), ``trunk`` (DML_CT's NCE layer 1), ``fusion`` (NCE layer 2).

Discriminator (DML_CT's ``NLayerDiscriminatorSN``, ``ndf = 32``, 3 layers):
:class:`pdml.models.PatchDiscriminator` with squeeze-excitation (reduction 16, plain convs)
after every inner conv (:func:`dml_ct_discriminator`).

Projection heads: DML_CT's ``ConvF_down_pool`` with ``netF_down = 0`` is
:class:`pdml.models.ProjectionHeads` (32 → 128 → 128).

Initialisation: DML_CT's ``init_net`` runs after construction on generator, discriminator
and every head, and draws every conv / linear weight from normal(0, 0.01) and zeroes every
bias; it overwrites the dense blocks' own kaiming×0.1 initialisation and reaches the
spectral-normalised weights (``weight`` shares storage with ``weight_orig`` there).
:data:`INIT_STD`.

How pdml's own networks (``--arch pdml``) differ: three dense blocks with their own
weights, residual scale 0.2, no activation after the fifth dense conv but
squeeze-excitation there, an input residual, ``tail(head + fusion)`` without bias and
without LeakyReLU, a discriminator without attention, PyTorch's default initialisation.

Spectral norm: DML_CT uses ``torch.nn.utils.spectral_norm`` (keys ``weight_orig``,
``weight_u``, ``weight_v``), pdml the parametrization (``parametrizations.weight.original``,
``.0._u``, ``.0._v``); the arithmetic (σ = uᵀWv, one power iteration per training
forward) is the same. :func:`load_dml_ct_generator` and :func:`load_dml_ct_discriminator`
load the authors' state_dicts. pdml runs 15 power iterations when the norm is attached
(after the initialisation), DML_CT starts from random u, v: only the first steps' σ differ.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from pdml.models.dense import dense_convs
from pdml.models.discriminator import PatchDiscriminator
from pdml.models.feature_generator import FeatureGenerator
from pdml.models.layers import sn_conv

INIT_STD = 0.01
"""DML_CT's ``--init_type normal --init_gain 0.01``: the std of every initial weight."""

RESIDUAL_SCALE = 0.1
"""DML_CT's residual scale, of the dense block and of the trunk."""

DISCRIMINATOR_REDUCTION = 16
"""Squeeze-excitation reduction of DML_CT's discriminator."""

REPEATS = 3
"""Applications of the shared dense block (DML_CT's ``num_blocks``; FEATURE_LAYERS names rdb1..3)."""


class DmlCtDenseBlock(nn.Module):
    """DML_CT's residual dense block: ``layers`` densely connected 3×3 convs, each followed
    by LeakyReLU(0.2); ``x [B, F, H, W] -> x + 0.1·last [B, F, H, W]``."""

    def __init__(self, features: int = 32, growth: int = 8, layers: int = 5,
                 init_std: Optional[float] = INIT_STD):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.convs = nn.ModuleList(
            sn_conv(features + i * growth, growth if i < layers - 1 else features, 3,
                    init_std=init_std)
            for i in range(layers))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one buffer instead of a concatenation and a padded copy per conv (pdml.models.dense)
        last = dense_convs(x, [c.weight for c in self.convs], [c.bias for c in self.convs],
                           self.act.negative_slope, activate_last=True)
        return torch.add(x, last, alpha=RESIDUAL_SCALE)


class DmlCtGenerator(FeatureGenerator):
    """DML_CT's generator (module docstring). ``forward(x [B, 1, H, W]) -> [B, 1, H, W]``;
    ``forward_with_features`` / ``features`` as in :class:`FeatureGenerator`.

    Args: ``channels`` in and out; ``features`` F (DML_CT's ``ngf``, 32); ``growth`` (8);
    ``block_layers`` convs per dense block (5); ``init_std``: normal(0, std) initial
    weights (None: PyTorch's default).
    """

    def __init__(self, channels: int = 1, features: int = 32, growth: int = 8,
                 block_layers: int = 5, init_std: Optional[float] = INIT_STD):
        super().__init__()
        self.channels, self.num_features = channels, features
        self.trunk_scale = RESIDUAL_SCALE
        self.head = sn_conv(channels, features, 3, init_std=init_std)
        self.rdb = DmlCtDenseBlock(features, growth, block_layers, init_std=init_std)
        self.fusion = sn_conv(features, features, 1, init_std=init_std)
        self.tail = sn_conv(features, channels, 3, init_std=init_std)
        self.act = nn.LeakyReLU(0.2)

    def blocks(self) -> list[nn.Module]:
        return [self.rdb] * REPEATS

    def receptive_radius(self) -> int:
        """How far (pixels) an output pixel's inputs reach: one per 3×3 conv (head, every
        dense conv of every application, tail); no global operation."""
        return 2 + REPEATS * len(self.rdb.convs)

    def _output(self, x: torch.Tensor, head: torch.Tensor, fusion: torch.Tensor) -> torch.Tensor:
        return self.tail(self.act(fusion))


def dml_ct_discriminator(channels: int = 1, ndf: int = 32, layers: int = 3,
                         init_std: Optional[float] = INIT_STD,
                         highpass_gain: Optional[float] = None,
                         keep_image: bool = False,
                         lowpass: Optional[tuple[float, float]] = None) -> PatchDiscriminator:
    """DML_CT's ``NLayerDiscriminatorSN`` (``ndf`` 32, ``n_layers`` 3 by default);
    ``highpass_gain``, ``keep_image`` and ``lowpass`` as in :class:`PatchDiscriminator`
    (pdml's options, not DML_CT's)."""
    return PatchDiscriminator(channels, ndf, layers, highpass_gain=highpass_gain,
                              keep_image=keep_image, lowpass=lowpass,
                              attention_reduction=DISCRIMINATOR_REDUCTION, init_std=init_std)


# --------------------------------------------------------------------------- the authors' weights

_SPECTRAL_KEYS = {"weight_orig": "parametrizations.weight.original",
                  "weight_u": "parametrizations.weight.0._u",
                  "weight_v": "parametrizations.weight.0._v"}


def _layer_groups(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, dict]]:
    """``[(module prefix, {leaf: tensor})]`` in the order the modules first appear."""
    groups: dict[str, dict] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = value
    return list(groups.items())


def _load_in_order(module: nn.Module, theirs: list[tuple[str, dict]], what: str) -> None:
    """Load ``theirs`` (DML_CT layer groups, old-style spectral-norm leaves) into the
    weighted layers of ``module`` in module order, strictly, checking every shape."""
    ours = [(name, m) for name, m in module.named_modules()
            if isinstance(m, nn.Conv2d)]
    if len(ours) != len(theirs):
        raise ValueError(f"{what}: expected {len(ours)} conv layers, the state_dict has "
                         f"{len(theirs)} ({[p for p, _ in theirs]})")
    state = {}
    for (name, m), (prefix, leaves) in zip(ours, theirs):
        spectral = hasattr(m, "parametrizations")
        want = {"bias"} | (set(_SPECTRAL_KEYS) if spectral else {"weight"})
        if set(leaves) != want:
            raise ValueError(f"{what}: {prefix!r} has {sorted(leaves)}, expected {sorted(want)} "
                             f"for {name!r}")
        for leaf, value in leaves.items():
            key = f"{name}.{_SPECTRAL_KEYS.get(leaf, leaf) if spectral else leaf}"
            state[key] = value
    module.load_state_dict(state, strict=True)


def _strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def load_dml_ct_generator(generator: DmlCtGenerator, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a DML_CT ``RRDBNet`` state_dict (``conv_first``, ``rrdb.layers.{0,1,2}.nets.*``,
    ``conv_mid``, ``conv_last``; a ``module.`` prefix is accepted) into ``generator``.

    The authors' state_dict lists the shared dense block once per application; those
    copies must be equal (ValueError otherwise, as for missing or extra keys and shapes
    that do not fit: RuntimeError of ``load_state_dict``).
    """
    sd = _strip_module_prefix(state_dict)
    groups = _layer_groups(sd)
    first = "rrdb.layers.0."
    kept = []
    for prefix, leaves in groups:
        if prefix.startswith("rrdb.layers.") and not (prefix + ".").startswith(first):
            twin = first + prefix.split(".", 3)[3]
            for leaf, value in leaves.items():
                if f"{twin}.{leaf}" not in sd:
                    raise ValueError(f"state_dict: {prefix}.{leaf} has no counterpart "
                                     f"{twin}.{leaf}")
                if not torch.equal(value, sd[f"{twin}.{leaf}"]):
                    raise ValueError(f"state_dict: {prefix}.{leaf} differs from {twin}.{leaf}; "
                                     "DML_CT's dense blocks share their weights")
            continue
        kept.append((prefix, leaves))
    _load_in_order(generator, kept, "state_dict")


def load_dml_ct_discriminator(discriminator: PatchDiscriminator,
                              state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a DML_CT ``NLayerDiscriminatorSN`` state_dict (``model.<i>.*``, squeeze-
    excitation at ``model.<i>.layer.{1,3}.*``; a ``module.`` prefix is accepted) into a
    :func:`dml_ct_discriminator`."""
    _load_in_order(discriminator, _layer_groups(_strip_module_prefix(state_dict)), "state_dict")
