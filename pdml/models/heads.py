"""Projection heads of the patch-wise losses: one per generator feature layer.

Each head is a 2-layer MLP on feature rows (F = 32 -> 128 -> ReLU -> 128). The trainer
samples the patch positions first and projects only those rows
(:meth:`ProjectionHead.forward_sampled`: the gather is fused into the first linear layer by
:func:`pdml.ops.gather_project`), as CUT's ``PatchSampleF`` does. For a per-pixel MLP
this is the same function as DML_CT's ``ConvF_down_pool`` with ``netF_down=0`` (1×1
conv, ReLU, 1×1 conv on the full map, then sample), at a fraction of the work.

Weights: ``0.weight [hidden, in]``, ``0.bias``, ``2.weight [out, hidden]``, ``2.bias`` per
head. The 1×1-conv weights of earlier pdml runs (``[out, in, 1, 1]``) load unchanged (the
conv weight is the linear weight), and :func:`load_dml_ct_heads` maps the authors'
``ConvF_down_pool`` state_dicts onto the heads.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pdml import ops


def linear_weight_from_conv(weight: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv weight ``[out, in, 1, 1]`` -> the linear weight ``[out, in]`` (a view);
    any other tensor is returned as it is."""
    if weight.dim() == 4 and weight.shape[2] == weight.shape[3] == 1:
        return weight.reshape(weight.shape[0], weight.shape[1])
    return weight


class ProjectionHead(nn.Sequential):
    """Linear ``in → hidden``, ReLU, Linear ``hidden → out``, applied to rows.

    - ``forward(rows [..., in]) -> [..., out]`` (any leading dims);
    - ``forward_sampled(fmap [B, in, H, W], ids [N], backend) -> [B·N, out]``: row ``b·N+i``
      is the head applied at pixel ``ids[i]`` of image ``b`` (only those pixels are read);
    - ``forward_map(fmap [B, in, H, W]) -> [B, out, H, W]``: every pixel (the old 1×1-conv
      form; for comparisons and inspection, not for training).
    """

    def __init__(self, in_channels: int = 32, hidden: int = 128, out_channels: int = 128):
        super().__init__(nn.Linear(in_channels, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_channels))

    def forward_sampled(self, fmap: torch.Tensor, ids: torch.Tensor,
                        backend: str = "auto") -> torch.Tensor:
        first, _, second = self
        # under autocast the map arrives in half precision; the fused op takes one dtype
        weight = first.weight.to(fmap.dtype)
        bias = first.bias.to(fmap.dtype)
        hidden = ops.gather_project(fmap, ids, weight, bias, backend=backend)
        return second(F.relu(hidden))

    def forward_map(self, fmap: torch.Tensor) -> torch.Tensor:
        first, _, second = self
        hidden = F.conv2d(fmap, first.weight[:, :, None, None], first.bias)
        return F.conv2d(F.relu(hidden), second.weight[:, :, None, None], second.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Runs before the children load from this same dict: earlier pdml runs stored the
        # layers as 1×1 convs, whose [out, in, 1, 1] weight is the [out, in] linear weight.
        for index in (0, 2):
            key = f"{prefix}{index}.weight"
            if key in state_dict:
                state_dict[key] = linear_weight_from_conv(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class ProjectionHeads(nn.Module):
    """One :class:`ProjectionHead` per named layer (``heads[name]``), applied in order.

    - ``forward_sampled([map [B, F, H, W] per layer], [ids [N_l] per layer], backend)``
      -> ``[rows [B·N_l, D] per layer]`` (only the sampled pixels are projected);
    - ``forward([map [B, F, H, W] per layer]) -> [projected [B, D, H, W] per layer]``
      (every pixel; comparisons and inspection).
    """

    def __init__(self, layers: Sequence[str], in_channels: int = 32, hidden: int = 128,
                 out_channels: int = 128):
        super().__init__()
        if not layers:
            raise ValueError("layers must name at least one feature layer")
        self.layers = tuple(layers)
        self.heads = nn.ModuleDict(
            {name: ProjectionHead(in_channels, hidden, out_channels) for name in self.layers})

    def _check_count(self, what: str, items: Sequence) -> None:
        if len(items) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} {what} (layers {self.layers}), "
                             f"got {len(items)}")

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._check_count("maps", maps)
        return [self.heads[name].forward_map(m) for name, m in zip(self.layers, maps)]

    def forward_sampled(self, maps: Sequence[torch.Tensor], ids: Sequence[torch.Tensor],
                        backend: str = "auto") -> list[torch.Tensor]:
        self._check_count("maps", maps)
        self._check_count("ids", ids)
        return [self.heads[name].forward_sampled(m, i, backend=backend)
                for name, m, i in zip(self.layers, maps, ids)]


DML_CT_HEAD_KEYS = ("conv.0.weight", "conv.0.bias", "conv.2.weight", "conv.2.bias")
"""The state_dict keys of DML_CT's ``ConvF_down_pool`` with ``netF_down=0`` (1×1 conv,
ReLU, 1×1 conv: ``conv.0.weight [nc, 32, 1, 1]``, ``conv.2.weight [nc, nc, 1, 1]``)."""


def load_dml_ct_heads(heads: ProjectionHeads,
                      state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Load the authors' projection heads into ``heads``, strictly.

    ``state_dicts``: one ``ConvF_down_pool`` (``netF_down=0``) state_dict per loss layer,
    in the order of ``heads.layers`` (DML_CT keeps one netF per NCE layer, in the order of
    ``--nce_layers``); a ``module.`` prefix (DataParallel) is accepted. Raises ValueError
    naming the layer and the keys when a state_dict is not of that form (another
    ``netF_down``, another netF), and the usual RuntimeError of ``load_state_dict`` when
    the shapes do not fit.
    """
    if len(state_dicts) != len(heads.layers):
        raise ValueError(f"state_dicts: expected one per layer {heads.layers}, "
                         f"got {len(state_dicts)}")
    for name, sd in zip(heads.layers, state_dicts):
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
        if set(sd) != set(DML_CT_HEAD_KEYS):
            raise ValueError(f"state_dicts[{heads.layers.index(name)}] (layer {name!r}) is not "
                             f"a ConvF_down_pool head with netF_down=0: expected keys "
                             f"{list(DML_CT_HEAD_KEYS)}, got {sorted(sd)}")
        for key in ("conv.0.weight", "conv.2.weight"):
            if sd[key].dim() != 4 or tuple(sd[key].shape[2:]) != (1, 1):
                raise ValueError(f"state_dicts[{heads.layers.index(name)}][{key!r}] must be a "
                                 f"1×1 conv weight [out, in, 1, 1], got {tuple(sd[key].shape)}")
        heads.heads[name].load_state_dict(
            {k[len("conv."):]: v for k, v in sd.items()}, strict=True)
