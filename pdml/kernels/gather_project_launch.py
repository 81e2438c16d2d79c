"""Launch helpers of the kernels in :mod:`pdml.kernels.gather_project`: tensors in, tensors out.

``gather_project(fmap [B, F, H, W], ids [N], weight [D, F], bias [D] | None) -> [B·N, D]``,
row ``b·N + i`` = ``fmap[b, :, ids[i]] @ weight.T + bias``, and its backward. The helpers
trust their arguments (validated by the caller: ids int64, in range, distinct; weight and
bias in fmap's dtype, fp32/fp16/bf16, on its device); the kernels mask every load and
store to the rows and columns that exist.

CUDA tensors run compiled kernels (under a device guard of the tensors' GPU); CPU tensors
run the Triton interpreter (:mod:`pdml.kernels.runtime`).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import triton

from pdml.kernels import gather_project
from pdml.kernels.runtime import interprets, kernel_module, launch_guard


def kernels(interpret: bool) -> types.ModuleType:
    """:mod:`pdml.kernels.gather_project` decorated for the interpreter or for compilation
    (:func:`pdml.kernels.runtime.kernel_module`)."""
    return kernel_module(gather_project, interpret)


def _kernel(t: torch.Tensor, name: str):
    return getattr(kernels(interprets(t)), name)


def _block(size: int, cap: int) -> int:
    """Power-of-two block covering ``size``, between 16 and ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def block_sizes(rows: int, out_cols: int, inner: int, dtype: torch.dtype,
                interpret: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_rows, BLOCK_out, BLOCK_inner, num_warps)`` of a ``[rows, out_cols]`` product
    summed over ``inner``, for operands of ``dtype``.

    On the GPU the tiles are the largest that compile without register spills on sm_80 and
    sm_90 for all three kernels (``python -m pdml.kernels.aot`` checks every configuration):
    fp32 "ieee" dots unroll into FMAs over register-resident operands, so fp32 gets 32×32
    tiles with 16-wide inner chunks; fp16/bf16 (tensor cores) 64×32 with 32-wide chunks.
    The interpreter's cost is per operation, not per element: big tiles.
    """
    if interpret:
        return _block(rows, 128), _block(out_cols, 128), _block(inner, 128), 4
    if dtype == torch.float32:
        return _block(rows, 32), _block(out_cols, 32), _block(inner, 16), 4
    return _block(rows, 64), _block(out_cols, 32), _block(inner, 32), 4


KERNELS = ("gather_project_forward_kernel", "gather_project_grad_fmap_kernel", "gather_project_grad_weight_kernel")
"""The kernels of :mod:`pdml.kernels.gather_project`, in the order forward, backward."""


def kernel_blocks(kernel: str, rows: int, channels: int, out_dim: int, dtype: torch.dtype,
                  interpret: bool) -> dict:
    """Launch meta-parameters ``{BLOCK_R, BLOCK_D, BLOCK_F, num_warps}`` of ``kernel`` (one of
    :data:`KERNELS`) for ``rows`` gathered rows of ``channels`` channels projected to
    ``out_dim``, operands of ``dtype``: each kernel's output tile and summed axis through
    :func:`block_sizes`."""
    if kernel == "gather_project_forward_kernel":  # [R, D] summed over F
        block_r, block_d, block_f, num_warps = block_sizes(rows, out_dim, channels, dtype, interpret)
    elif kernel == "gather_project_grad_fmap_kernel":  # [R, F] summed over D
        block_r, block_f, block_d, num_warps = block_sizes(rows, channels, out_dim, dtype, interpret)
    elif kernel == "gather_project_grad_weight_kernel":  # [D, F] summed over R
        block_d, block_f, block_r, num_warps = block_sizes(out_dim, channels, rows, dtype, interpret)
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return dict(BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_F=block_f, num_warps=num_warps)


def _map_geometry(fmap: torch.Tensor, ids: torch.Tensor) -> tuple[int, int, int, int]:
    """``(rows, n_img, width, channels)`` of the gathered rows."""
    batch, channels, _, width = fmap.shape
    return batch * ids.numel(), ids.numel(), width, channels


def gather_project_forward(fmap: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, F, H, W]``, ``[N]``, ``[D, F]``, ``[D]`` or None -> ``[B·N, D]`` in fmap's dtype."""
    rows, n_img, width, channels = _map_geometry(fmap, ids)
    out_dim = weight.shape[0]
    out = torch.empty(rows, out_dim, dtype=fmap.dtype, device=fmap.device)
    meta = kernel_blocks(KERNELS[0], rows, channels, out_dim, fmap.dtype, interprets(fmap))
    grid = (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(out_dim, meta["BLOCK_D"]))
    with launch_guard(fmap, interprets(fmap)):
        _kernel(fmap, "gather_project_forward_kernel")[grid](
            fmap, ids, weight, bias if bias is not None else weight, out,
            rows, n_img, width, channels, out_dim,
            *fmap.stride(), *weight.stride(), out.stride(0),
            HAS_BIAS=bias is not None, IEEE=fmap.dtype == torch.float32, **meta)
    return out


def gather_project_backward(grad: torch.Tensor, fmap: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                            bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Backward of :func:`gather_project_forward` for ``grad [B·N, D]`` (any strides, fmap's
    dtype) -> ``(grad_fmap, grad_weight, grad_bias or None)``.

    ``grad_fmap`` is zero except at the sampled pixels, in fmap's dtype and memory format
    when fmap is dense; ``grad_weight [D, F]`` and ``grad_bias [D]`` are in weight's dtype.
    """
    rows, n_img, width, channels = _map_geometry(fmap, ids)
    out_dim = weight.shape[0]
    interpret = interprets(fmap)
    grad_fmap = torch.zeros_like(fmap)
    grad_weight = torch.empty(out_dim, channels, dtype=weight.dtype, device=weight.device)
    grad_bias = torch.empty(out_dim, dtype=weight.dtype, device=weight.device) if bias_grad else None
    with launch_guard(fmap, interprets(fmap)):
        meta = kernel_blocks(KERNELS[1], rows, channels, out_dim, fmap.dtype, interpret)
        grid = (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(channels, meta["BLOCK_F"]))
        _kernel(fmap, "gather_project_grad_fmap_kernel")[grid](
            grad, weight, ids, grad_fmap,
            rows, n_img, width, channels, out_dim,
            *grad.stride(), *weight.stride(), *grad_fmap.stride(),
            IEEE=fmap.dtype == torch.float32, **meta)
        meta = kernel_blocks(KERNELS[2], rows, channels, out_dim, fmap.dtype, interpret)
        grid = (triton.cdiv(out_dim, meta["BLOCK_D"]), triton.cdiv(channels, meta["BLOCK_F"]))
        _kernel(fmap, "gather_project_grad_weight_kernel")[grid](
            grad, fmap, ids, grad_weight, grad_bias if bias_grad else grad_weight,
            rows, n_img, width, channels, out_dim,
            *grad.stride(), *fmap.stride(),
            HAS_BIAS=bias_grad, IEEE=fmap.dtype == torch.float32, **meta)
    return grad_fmap, grad_weight, grad_bias
