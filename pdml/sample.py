"""Drop-in replacement of CUT's ``networks.PatchSampleF`` that samples first and then runs
the head's first linear layer fused with the gather (:func:`pdml.ops.gather_project`).

CUT's sampler (taesungp/contrastive-unpaired-translation, ``models/networks.py``) takes the
encoder's feature maps, samples the same ``num_patches`` pixel ids for every image of the
batch, optionally runs a per-layer MLP (``Linear(C, nc) → ReLU → Linear(nc, nc)``, created
lazily on the first call) on the sampled rows, and L2-normalises them. This module has the
same constructor, the same ``forward(feats, num_patches, patch_ids)`` contract, the same
random ids for the same RNG state, the same initialisation and the same parameter names
(``mlp_0.0.weight`` …), so a CUT ``netF`` checkpoint loads into it with ``strict=True``.
The difference is the cost: with ``use_mlp`` the first linear layer reads only the sampled
pixels' channels of each map (no permuted copy of the map) and its backward writes the map
gradient only at those pixels.

The trainer (:mod:`pdml.training.step`) samples its loss rows through the same three
functions: :func:`draw_patch_ids` (the positions), :func:`sampled_rows` (gather, project by a
head, normalise) and :func:`normalise_patch_rows` (CUT's Normalize with one precision
rule: float32 at least).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import init

from pdml import _validation, reference
from pdml.models.heads import ProjectionHead

INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


def draw_patch_ids(hw: int, num_patches: int, device: torch.device,
                   rng_device: Optional[torch.device] = None) -> Tensor:
    """``min(num_patches, hw)`` distinct flat positions in ``[0, hw)``, int64 ``[N]`` on
    ``device``: the first entries of ``torch.randperm(hw)`` drawn by the RNG of
    ``rng_device`` (the CPU's by default; CUT's sampler draws on its first map's device).

    Valid by construction, so they are marked valid (:func:`pdml._validation.mark_ids_valid`):
    the ops given them skip the ids check, which on a GPU would synchronise with the host
    every step. For the same reason a copy from the CPU to a GPU goes through pinned memory
    without blocking (a blocking host-to-device copy waits for the device)."""
    ids = torch.randperm(hw, device=rng_device)[:int(min(num_patches, hw))]
    device = torch.device(device)
    if ids.device.type == "cpu" and device.type == "cuda":
        ids = ids.pin_memory().to(device, non_blocking=True)
    else:
        ids = ids.to(device)
    return _validation.mark_ids_valid(ids, hw)


def normalise_patch_rows(rows: Tensor, dim: int = -1) -> Tensor:
    """CUT's Normalize ``x / (‖x‖₂ + 1e-7)`` along ``dim`` (:func:`pdml.reference.normalise_rows`),
    computed in float32 at least (half rows from autocast are widened, float64 stays) and
    returned in the rows' dtype: the one precision rule of sampled rows."""
    wide = rows if rows.dtype == torch.float64 else rows.float()
    return reference.normalise_rows(wide, dim=dim).to(rows.dtype)


def sampled_rows(fmap: Tensor, ids: Tensor, head: Optional[ProjectionHead] = None,
                 backend: str = "auto") -> Tensor:
    """The normalised rows ``[B·N, D]`` of ``fmap [B, F, H, W]`` at the pixels ``ids [N]``,
    row ``b·N + i`` from pixel ``ids[i]`` of image ``b``: projected by ``head`` (its first
    layer fused with the gather, :meth:`ProjectionHead.forward_sampled`, run by ``backend``;
    ``D`` = its output width) or, without a head, the map's own channels (``D = F``)."""
    if head is not None:
        rows = head.forward_sampled(fmap, ids, backend=backend)
    else:
        rows = reference.gather_rows(fmap, ids).flatten(0, 1)
    return normalise_patch_rows(rows)


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> None:
    """CUT's (and pix2pix's) ``init_weights``: every Conv/Linear weight drawn by ``init_type``
    with ``init_gain`` (kaiming: fan-in, gain unused), biases zero, BatchNorm2d weights
    ~ N(1, init_gain); modules visited in ``net.apply`` order, so the same RNG state draws
    the same values as CUT."""
    if init_type not in INIT_TYPES:
        raise ValueError(f"init_type must be one of {INIT_TYPES}, got {init_type!r}")

    def init_module(m: nn.Module) -> None:
        classname = type(m).__name__
        if hasattr(m, "weight") and ("Conv" in classname or "Linear" in classname):
            if init_type == "normal":
                init.normal_(m.weight.data, 0.0, init_gain)
            elif init_type == "xavier":
                init.xavier_normal_(m.weight.data, gain=init_gain)
            elif init_type == "kaiming":
                init.kaiming_normal_(m.weight.data, a=0, mode="fan_in")
            else:
                init.orthogonal_(m.weight.data, gain=init_gain)
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias.data, 0.0)
        elif "BatchNorm2d" in classname:
            init.normal_(m.weight.data, 1.0, init_gain)
            init.constant_(m.bias.data, 0.0)

    net.apply(init_module)


class PatchSampleF(nn.Module):
    """CUT's ``PatchSampleF`` with the sampled-first, fused first layer.

    Args:
        use_mlp: run a per-layer MLP ``Linear(C_l, nc) → ReLU → Linear(nc, nc)`` on the rows.
        init_type, init_gain: the MLPs' initialisation (:func:`init_weights`).
        nc: the MLPs' width.
        gpu_ids: accepted for CUT compatibility; the MLPs are created on the device of the
            features they first see.
        backend: the :func:`pdml.ops.gather_project` backend ("auto", "reference", "ext",
            "triton").

    ``forward(feats, num_patches=64, patch_ids=None) -> (return_feats, return_ids)``, for a
    list of maps ``feats[l]`` of shape ``[B, C_l, H_l, W_l]``:

    - ``num_patches > 0``: ``return_ids[l]`` is ``patch_ids[l]`` if given, else the first
      ``min(num_patches, H_l·W_l)`` entries of ``torch.randperm(H_l·W_l)`` on ``feats[0]``'s
      device (int64, the same for every image); ``return_feats[l]`` is ``[B·N_l, D]``, row
      ``b·N_l + i`` from pixel ``ids[i]`` of image ``b`` (``D = nc`` with the MLP, else
      ``C_l``), L2-normalised per row (in float32 at least, :func:`normalise_patch_rows`).
    - ``num_patches == 0``: every pixel, ``return_ids[l] = []``, ``return_feats[l]`` is
      ``[B, D, H_l, W_l]`` normalised as CUT does it (over dim 1 of the ``[B, H·W, D]``
      pixel rows, i.e. over the pixels).

    The MLPs (parameters in the default dtype) are created on the first call with
    ``use_mlp``, or from the shapes in a state_dict loaded before that call.
    """

    def __init__(self, use_mlp: bool = False, init_type: str = "normal", init_gain: float = 0.02,
                 nc: int = 256, gpu_ids: Sequence[int] = (), backend: str = "auto"):
        super().__init__()
        if init_type not in INIT_TYPES:
            raise ValueError(f"init_type must be one of {INIT_TYPES}, got {init_type!r}")
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise ValueError(f"nc must be a positive int, got {nc!r}")
        self.use_mlp = bool(use_mlp)
        self.nc = nc
        self.mlp_init = False
        self.init_type = init_type
        self.init_gain = init_gain
        self.gpu_ids = list(gpu_ids)
        self.backend = backend

    def _new_mlp(self, input_nc: int, device) -> ProjectionHead:
        """CUT's head of one layer: ``Linear(input_nc, nc) → ReLU → Linear(nc, nc)`` (the
        trainer's :class:`~pdml.models.heads.ProjectionHead`: same layers, same keys)."""
        return ProjectionHead(input_nc, self.nc, self.nc).to(device)

    def create_mlp(self, feats: Sequence[Tensor]) -> None:
        """One MLP per feature map (``mlp_<l>``) on the maps' devices, initialised as CUT's
        ``init_net`` does (all Linear layers are built first, then all are initialised)."""
        for mlp_id, feat in enumerate(feats):
            setattr(self, f"mlp_{mlp_id}", self._new_mlp(feat.shape[1], feat.device))
        init_weights(self, self.init_type, self.init_gain)
        self.mlp_init = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint saved after the MLPs existed: create them (from the stored first-layer
        # shapes) before the state is copied in, so a fresh module loads it strictly.
        if self.use_mlp and not self.mlp_init:
            pattern = re.compile(re.escape(prefix) + r"mlp_(\d+)\.0\.weight")
            first = {int(m.group(1)): state_dict[key] for key in state_dict if (m := pattern.fullmatch(key))}
            if first and sorted(first) == list(range(len(first))):
                for mlp_id, weight in sorted(first.items()):
                    setattr(self, f"mlp_{mlp_id}", self._new_mlp(weight.shape[1], weight.device))
                self.mlp_init = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, feats: Sequence[Tensor], num_patches: int = 64,
                patch_ids: Optional[Sequence] = None) -> tuple[list[Tensor], list]:
        return_feats, return_ids = [], []
        if self.use_mlp and not self.mlp_init:
            self.create_mlp(feats)
        for feat_id, feat in enumerate(feats):
            if feat.dim() != 4:
                raise ValueError(f"feats[{feat_id}] must have shape [B, C, H, W], got {tuple(feat.shape)}")
            batch, _, height, width = feat.shape
            mlp = getattr(self, f"mlp_{feat_id}") if self.use_mlp else None
            if num_patches > 0:
                if patch_ids is not None:
                    patch_id = patch_ids[feat_id]
                    # CUT passes the ids of an earlier call (int64 tensors) or lists of ints;
                    # float ids would be truncated silently. gather_project checks the values.
                    ids = _validation.check_ids(torch.as_tensor(patch_id, device=feat.device), feat,
                                                name=f"patch_ids[{feat_id}]", values=mlp is None)
                else:
                    # CUT draws on (and hands back ids on) its first map's device
                    patch_id = draw_patch_ids(height * width, num_patches, feats[0].device, rng_device=feats[0].device)
                    ids = patch_id.to(feat.device)
                x_sample = sampled_rows(feat, ids, mlp, self.backend)
            else:
                patch_id = []
                pixels = feat.permute(0, 2, 3, 1).flatten(1, 2)  # [B, H·W, C]
                if mlp is not None:
                    pixels = mlp(pixels)
                pixels = normalise_patch_rows(pixels, dim=1)  # CUT normalises dim 1 here: the pixels
                x_sample = pixels.permute(0, 2, 1).reshape(batch, pixels.shape[-1], height, width)
            return_ids.append(patch_id)
            return_feats.append(x_sample)
        return return_feats, return_ids

    def extra_repr(self) -> str:
        return (f"use_mlp={self.use_mlp}, nc={self.nc}, init_type={self.init_type!r}, "
                f"init_gain={self.init_gain}, backend={self.backend!r}")
