"""What every generator offers the trainer: the output and its named feature maps.

Both generators (:class:`pdml.models.RRDNGenerator`, pdml's; :class:`pdml.models.DmlCtGenerator`,
the paper's reference code's) share one layout of named maps, each ``[B, F, H, W]``:

- ``head``: the first 3×3 conv's output;
- ``rdb1``, ``rdb2``, ``rdb3``: after each residual dense block;
- ``trunk``: the residual-in-residual group's output (``head + β·blocks(head)``);
  DML_CT's NCE layer 1 (``encode_only`` returns it first);
- ``fusion``: the 1×1 conv after the trunk; DML_CT's NCE layer 2.

The patch losses read ``trunk`` and ``fusion`` by default, as DML_CT's ``--nce_layers 1,2``.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

FEATURE_LAYERS = ("head", "rdb1", "rdb2", "rdb3", "trunk", "fusion")
"""Names of the layers whose ``[B, F, H, W]`` maps :meth:`FeatureGenerator.features` returns."""

DEFAULT_LOSS_LAYERS = ("trunk", "fusion")
"""The layers the paper's metric loss uses (DML_CT's NCE layers 1 and 2)."""


class FeatureTap:
    """Collects the maps of the wanted layers during one pass.

    ``tap(name, map) -> bool``: keeps ``map`` when ``name`` is wanted; True when the pass
    may stop (``stop_early`` and every wanted map seen). ``maps()``: the maps in the order
    the layers were asked for.
    """

    def __init__(self, layers: Sequence[str], stop_early: bool):
        self.layers, self.stop_early = tuple(layers), stop_early
        self.wanted = set(self.layers)
        self.kept: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, t: torch.Tensor) -> bool:
        if name in self.wanted:
            self.kept[name] = t
        return self.stop_early and len(self.kept) == len(self.wanted)

    def maps(self) -> list[torch.Tensor]:
        return [self.kept[n] for n in self.layers]


class FeatureGenerator(nn.Module):
    """Base class of both generators: the residual-in-residual skeleton and its named maps.

    ``head(x)``, then three dense blocks (``blocks()``: the modules applied in order),
    ``trunk = head + trunk_scale · blocks(head)``, ``fusion(trunk)``, then the subclass's
    ``_output(x, head, fusion) -> [B, channels, H, W]``. A subclass sets ``channels``,
    ``num_features``, ``trunk_scale`` and the modules ``head`` and ``fusion``.
    ``forward``, ``forward_with_features`` and ``features`` run :meth:`_run`, which hands
    every map of :data:`FEATURE_LAYERS` to a :class:`FeatureTap` and stops when it may.
    """

    channels: int
    num_features: int
    trunk_scale: float

    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def receptive_radius(self) -> Optional[int]:
        """How far (pixels) the inputs of an output pixel reach; None when the network has
        a global operation (every output depends on the whole image, as with pdml's
        squeeze-excitation means). :func:`pdml.training.denoise.forward_tiled` uses it."""
        return None

    def _output(self, x: torch.Tensor, head: torch.Tensor, fusion: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, x: torch.Tensor, tap: FeatureTap,
             block_dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        # channels-last from here on: the layout of the dense blocks' buffer
        # (pdml.models.dense), so that the sums and the 1×1 fusion conv between them do
        # not convert layouts (oneDNN's convs are several times slower on NCHW). Not under
        # torch.compile: the dense blocks run as ATen ops there, and inductor's replicate
        # padding backward assumes contiguous inputs (docs/training.md, "--compile").
        head = self.head(x)
        if not torch.compiler.is_compiling():
            head = head.contiguous(memory_format=torch.channels_last)
        if tap("head", head):
            return None
        h = head
        for i, block in enumerate(self.blocks(), start=1):
            with (torch.autocast(x.device.type, dtype=block_dtype) if block_dtype is not None
                  else contextlib.nullcontext()):
                h = block(h)
            if tap(f"rdb{i}", h):
                return None
        trunk = head + self.trunk_scale * h
        if tap("trunk", trunk):
            return None
        fusion = self.fusion(trunk)
        if tap("fusion", fusion):
            return None
        return self._output(x, head, fusion)

    def _collect(self, x: torch.Tensor, layers: Sequence[str], stop_early: bool,
                 block_dtype: Optional[torch.dtype] = None):
        unknown = [name for name in layers if name not in FEATURE_LAYERS]
        if unknown:
            raise ValueError(f"unknown feature layer(s) {unknown}; choose from {FEATURE_LAYERS}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        tap = FeatureTap(layers, stop_early)
        out = self._run(x, tap, block_dtype)
        return out, tap.maps()

    def forward(self, x: torch.Tensor, block_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``x [B, channels, H, W] -> [B, channels, H, W]`` (input dtype / autocast).

        ``block_dtype``: run only the dense blocks (nearly all of the FLOPs) under autocast
        to this dtype, the head, fusion and tail convs and the residual sums in ``x``'s:
        a bf16 forward then keeps the input's and the output's fp32 resolution (what
        ``pdml-denoise`` does, :func:`pdml.training.denoise.denoise_hu`)."""
        return self._collect(x, (), stop_early=False, block_dtype=block_dtype)[0]

    def forward_with_features(self, x: torch.Tensor, layers: Sequence[str] = DEFAULT_LOSS_LAYERS):
        """``-> (out [B, channels, H, W], [map [B, F, H, W] for each name in layers])`` in one pass."""
        return self._collect(x, tuple(layers), stop_early=False)

    def features(self, x: torch.Tensor, layers: Sequence[str] = DEFAULT_LOSS_LAYERS) -> list[torch.Tensor]:
        """The maps ``[B, F, H, W]`` of ``layers`` (in that order); stops after the deepest one."""
        if not layers:
            raise ValueError("layers must name at least one feature layer")
        return self._collect(x, tuple(layers), stop_early=True)[1]
