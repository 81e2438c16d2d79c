"""Launch helpers of the kernels in :mod:`pdml.kernels.patch_loss`: tensors in, tensors out.

Features come in one of two forms:
- map form: ``x [B, C, H, W]`` (any strides) with ``ids`` int64 ``[N]``; rows are
  ``x[b, :, ids[i]]``, image-major (row ``b*N + i``), and are L2-normalised in the kernels;
- rows form: ``x [R, C]`` with ``ids=None``; rows are used as given (already normalised).
``n_group`` rows form one group of negatives (``N`` per image, ``B·N`` for the whole
minibatch, ``R / batch_size`` in the rows form). The helpers trust their arguments
(validated by :mod:`pdml.ops` / :mod:`pdml._ops_triton`); the kernels mask every load
and store to the rows and channels that exist.

CUDA tensors run compiled kernels; CPU tensors run the Triton interpreter.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from pdml.kernels import interpret_everywhere, kernel_module

MAX_CHANNELS = 1024
"""Largest feature dimension C: a program holds whole rows (``BLOCK_C = next_pow2(C)``)."""


def _kernels(t: torch.Tensor):
    return kernel_module(t.device.type != "cuda" or interpret_everywhere())


_FITTING: dict[tuple, tuple[int, Optional[int]]] = {}
"""(kernel, device, dtype, BLOCK_C, GATHER) -> (largest BLOCK_M, num_stages) that fit the GPU."""


def _launch(t: torch.Tensor, name: str, grid, args: tuple, meta: dict) -> None:
    """Launch kernel ``name`` of ``t``'s mode on ``grid(meta)``.

    The block sizes are a guess for the GPU's shared memory (fp32 "ieee" dots over wide
    rows stage much more than fp16: e.g. 205 KB for the metric backward at C=256 with
    32-row tiles and triton's 3 pipeline stages, more than an A100 has). When the GPU
    refuses a configuration (OutOfResources, raised before anything runs), the tiles are
    halved down to 16 rows, then pipelining is turned off; what fits is remembered.
    """
    kernel = getattr(_kernels(t), name)
    key = (name, str(t.device), t.dtype, meta["BLOCK_C"], meta.get("GATHER"))
    meta = dict(meta)
    if key in _FITTING:
        block, stages = _FITTING[key]
        meta["BLOCK_M"] = meta["BLOCK_N"] = min(meta["BLOCK_M"], block)
        if stages is not None:
            meta["num_stages"] = stages
    while True:
        try:
            kernel[grid](*args, **meta)
            return
        except OutOfResources:
            if meta["BLOCK_M"] > 16:
                meta["BLOCK_M"] = meta["BLOCK_N"] = meta["BLOCK_M"] // 2
            elif meta.get("num_stages") != 1:
                meta["num_stages"] = 1
            else:
                raise
            _FITTING[key] = (meta["BLOCK_M"], meta.get("num_stages"))


def block_sizes(n_group: int, channels: int, interpret: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_C, num_warps)`` for groups of ``n_group`` rows of ``channels``.

    Every block is >= 16 (the smallest dot a GPU accepts). On the GPU, wide rows get
    32-row tiles so the row tiles and accumulators stay in registers; the interpreter
    prefers big tiles (its cost is per operation, not per element).
    """
    block_c = max(16, triton.next_power_of_2(channels))
    block = min(128 if interpret else 64, max(16, triton.next_power_of_2(n_group)))
    if not interpret and block_c >= 256:
        block = min(block, 32)
    if not interpret and block_c >= 1024:
        block = 16
    num_warps = 8 if block_c >= 256 else 4
    return block, block, block_c, num_warps


def _geometry(x: torch.Tensor, ids: Optional[torch.Tensor]):
    """``(rows, n_img, width, channels, (s_row, s_c, s_h, s_w))`` of either feature form."""
    if ids is not None:
        batch, channels, _, width = x.shape
        n_img = ids.numel()
        return batch * n_img, n_img, width, channels, (x.stride(0), x.stride(1), x.stride(2), x.stride(3))
    rows, channels = x.shape
    return rows, 1, 1, channels, (x.stride(0), x.stride(1), 0, 0)


def _grad_buffer(x: torch.Tensor) -> torch.Tensor:
    """Zero gradient of ``x`` in its dtype (rows not gathered get exactly zero)."""
    return torch.zeros(x.shape, dtype=x.dtype, device=x.device)


def _launch_setup(q: torch.Tensor, ids: Optional[torch.Tensor], n_group: int):
    rows, n_img, width, channels, q_strides = _geometry(q, ids)
    interpret = q.device.type != "cuda" or interpret_everywhere()
    block_m, block_n, block_c, num_warps = block_sizes(n_group, channels, interpret)
    groups = rows // n_group
    grid = lambda m: (triton.cdiv(n_group, m["BLOCK_M"]), groups)  # noqa: E731
    meta = dict(GATHER=ids is not None, NORMALIZE=ids is not None, IEEE=q.dtype == torch.float32,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    ids_arg = ids if ids is not None else q  # never read when GATHER is off
    return rows, n_img, width, channels, q_strides, grid, meta, ids_arg


def nce_forward(q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor], tau: float,
                n_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchNCE forward -> ``(loss [R], lse [R])``, both fp32 (lse is saved for backward)."""
    rows, n_img, width, channels, q_s, grid, meta, ids_arg = _launch_setup(q, ids, n_group)
    k_s = _geometry(k, ids)[4]
    loss = torch.empty(rows, dtype=torch.float32, device=q.device)
    lse = torch.empty(rows, dtype=torch.float32, device=q.device)
    _launch(q, "nce_forward_kernel", grid, (
        q, k, ids_arg, loss, lse, n_group, n_img, width, channels, 1.0 / tau, *q_s, *k_s), meta)
    return loss, lse


def nce_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor],
                 lse: torch.Tensor, tau: float, n_group: int) -> torch.Tensor:
    """PatchNCE backward: ``grad [R]`` of the per-row loss -> ``dq`` (shape and dtype of ``q``)."""
    rows, n_img, width, channels, q_s, grid, meta, ids_arg = _launch_setup(q, ids, n_group)
    k_s = _geometry(k, ids)[4]
    dq = _grad_buffer(q)
    _launch(q, "nce_backward_kernel", grid, (
        q, k, ids_arg, lse, grad, dq, n_group, n_img, width, channels, 1.0 / tau, grad.stride(0),
        *q_s, *k_s, *_geometry(dq, ids)[4]), meta)
    return dq


def _metric_scales(rows: int, n_group: int, channels: int, layers: int) -> tuple[float, float]:
    """``(1/(R·C), 1/(G·n²·C))`` of one layer (``rows`` counts all ``layers`` together)."""
    layer_rows = rows // layers
    layer_groups = layer_rows // n_group
    return 1.0 / (layer_rows * channels), 1.0 / (layer_groups * n_group * n_group * channels)


def metric_forward(q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor], tau: float,
                   n_group: int, layers: int = 1) -> torch.Tensor:
    """PatchMetric forward -> per-row contributions ``v [R]`` fp32; a layer's loss is its rows' sum."""
    rows, n_img, width, channels, q_s, grid, meta, ids_arg = _launch_setup(q, ids, n_group)
    k_s = _geometry(k, ids)[4]
    pos_scale, pair_scale = _metric_scales(rows, n_group, channels, layers)
    out = torch.empty(rows, dtype=torch.float32, device=q.device)
    _launch(q, "metric_forward_kernel", grid, (
        q, k, ids_arg, out, n_group, n_img, width, channels, 1.0 / tau, pos_scale, pair_scale,
        *q_s, *k_s), meta)
    return out


def metric_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor],
                    tau: float, n_group: int, layers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchMetric backward: ``grad [R]`` of the per-row contributions -> ``(dq, dk)``."""
    rows, n_img, width, channels, q_s, grid, meta, ids_arg = _launch_setup(q, ids, n_group)
    k_s = _geometry(k, ids)[4]
    pos_scale, pair_scale = _metric_scales(rows, n_group, channels, layers)
    dq, dk = _grad_buffer(q), _grad_buffer(k)
    _launch(q, "metric_backward_kernel", grid, (
        q, k, ids_arg, grad, dq, dk, n_group, n_img, width, channels, 1.0 / tau, pos_scale, pair_scale,
        grad.stride(0), *q_s, *k_s, *_geometry(dq, ids)[4], *_geometry(dk, ids)[4]), meta)
    return dq, dk


def _similarity_setup(q: torch.Tensor, ids: torch.Tensor):
    batch, channels, _, width = q.shape
    n_img = ids.numel()
    interpret = q.device.type != "cuda" or interpret_everywhere()
    block_m, block_n, block_c, num_warps = block_sizes(n_img, channels, interpret)
    return batch, channels, width, n_img, block_m, block_n, block_c, num_warps


def similarity_forward(q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``q̂ k̂ᵀ`` per image of two ``[B, C, H, W]`` maps -> ``[B, N, N]`` fp32."""
    batch, channels, width, n_img, block_m, block_n, block_c, num_warps = _similarity_setup(q, ids)
    out = torch.empty(batch, n_img, n_img, dtype=torch.float32, device=q.device)
    grid = lambda m: (triton.cdiv(n_img, m["BLOCK_M"]), triton.cdiv(n_img, m["BLOCK_N"]), batch)  # noqa: E731
    meta = dict(IEEE=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
                num_warps=num_warps)
    _launch(q, "similarity_forward_kernel", grid, (
        q, k, ids, out, n_img, width, channels, *q.stride(), *k.stride()), meta)
    return out


def similarity_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`similarity_forward`: ``grad [B, N, N]`` (any strides) -> ``(dq, dk)``."""
    batch, channels, width, n_img, block_m, block_n, block_c, num_warps = _similarity_setup(q, ids)
    dq, dk = _grad_buffer(q), _grad_buffer(k)
    grid = lambda m: (triton.cdiv(n_img, m["BLOCK_M"]), batch)  # noqa: E731
    meta = dict(IEEE=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
                num_warps=num_warps)
    _launch(q, "similarity_backward_kernel", grid, (
        q, k, ids, grad, dq, dk, n_img, width, channels, *grad.stride(),
        *q.stride(), *k.stride(), *dq.stride(), *dk.stride()), meta)
    return dq, dk
