"""Launch helpers of the kernels in :mod:`pdml.kernels.patch_loss`: tensors in, tensors out.

Features come in one of two forms:
- map form: ``x [B, C, H, W]`` (any strides) with ``ids`` int64 ``[N]``; rows are
  ``x[b, :, ids[i]]``, image-major (row ``b*N + i``), and are L2-normalised in the kernels;
- rows form: ``x [R, C]`` with ``ids=None``; rows are used as given (already normalised).
``groups`` is the number of groups of negatives: the ``R`` rows form ``groups`` consecutive
blocks of ``R // groups`` rows (``groups = B`` for negatives="image" in the map form, ``1``
for "batch"). The helpers trust their arguments (validated by the backend); the kernels
mask every load and store to the rows and channels that exist.

CUDA tensors run compiled kernels, under a device guard of the tensors' device; CPU
tensors run the Triton interpreter (:mod:`pdml.kernels.runtime`).
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, NamedTuple, Optional

import torch
import triton

from pdml.kernels import patch_loss
from pdml.kernels.runtime import interprets, kernel_module, launch_guard

MAX_CHANNELS = 1024
"""Largest feature dimension C the launch configurations are checked for
(``python -m pdml.kernels.aot``); wider rows would still be chunked correctly."""

MAX_GRID_X = 2 ** 31 - 1
"""CUDA's limit on grid axis 0 (axes 1 and 2: 65535; axis 1 here is at most C / 16, axis 2 at most 2)."""

LARGE_GROUP = 1024
"""Groups of at least this many rows get 64-row fp16/bf16 tiles (Hopper's wgmma needs
64-row operands; below, 32-row tiles give more programs per group)."""


class Tiles(NamedTuple):
    """One launch configuration: row tiles ``block_m × block_n``, channel chunk ``block_c`` of
    the similarity products and, for the kernels of :data:`GRADIENT_KERNELS`, ``grad_c``
    channels of the gradient per program (0 for the other kernels)."""
    block_m: int
    block_n: int
    block_c: int
    num_warps: int
    num_stages: int
    grad_c: int = 0

    def meta(self) -> dict:
        meta = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_C=self.block_c,
                    num_warps=self.num_warps, num_stages=self.num_stages)
        if self.grad_c:
            meta["GRAD_C"] = self.grad_c
        return meta


CHUNK_CHANNELS = {
    "nce_forward_kernel": (32, 16, 16, 16),
    "nce_backward_kernel": (32, 32, 32, 16),
    "metric_forward_kernel": (16, 16, 32, 16),
    "metric_backward_kernel": (32, 32, 32, 16),
    "similarity_forward_kernel": (32, 32, 32, 16),
    "similarity_backward_kernel": (32, 16, 16, 32),
    "normaliser_backward_kernel": (32, 16, 16, 16),
    "metric_positive_kernel": (32, 16, 16, 16),
}
"""Channels per chunk of each kernel on the GPU: ``(fp32, fp16/bf16 map form, fp16/bf16
rows form, fp16/bf16 64-row tiles)``."""

WARPS = {("metric_forward_kernel", False): 4}
"""Warps of a ``(kernel, half precision)`` launch where 8 (the default) spills."""

GRADIENT_KERNELS = ("nce_backward_kernel", "metric_backward_kernel")
"""The backward kernels whose programs accumulate ``grad_c`` channels of a gradient while
they recompute the similarity tiles (``GRAD_C``): each similarity tile is recomputed once
per gradient chunk, so one chunk (``grad_c >= C``) is the least work (docs/ops.md, "Work")."""

GRADIENT_CHANNELS = 256
"""The widest gradient chunk (``GRAD_C``) on the GPU: a program of :data:`GRADIENT_KERNELS`
holds the fp32 accumulator ``[32, GRAD_C]`` in registers, beside the similarity tile and
one ``[16, GRAD_C]`` tile of the other rows. Measured with ``python -m pdml.kernels.aot``
(triton 3.6 and 3.8, sm_80 and sm_90, fp32/fp16/bf16, map and rows form): 256 channels
are spill-free in both kernels, 512 spill. So C <= 256 runs in one chunk, C = 1000 in four.
The interpreter uses the same budget, so C = 300 or 1000 runs in several chunks (the last
one partial) there too."""


def gradient_channels(channels: int) -> int:
    """``GRAD_C`` of a launch of :data:`GRADIENT_KERNELS`: all ``channels`` (rounded up to a
    power of two, at least 16) when :data:`GRADIENT_CHANNELS` allows, else that budget."""
    return min(GRADIENT_CHANNELS, max(16, triton.next_power_of_2(channels)))


def tiles_for(dtype: torch.dtype, group_rows: int, channels: int, interpret: bool, kernel: str,
              gather: bool = True) -> Tiles:
    """The tiles of kernel ``kernel`` (a name in :mod:`pdml.kernels.patch_loss`) for groups
    of ``group_rows`` rows of ``channels`` channels, of the map form (``gather``) or not.

    GPU: 8 warps (4 where :data:`WARPS` says: the fp32 metric forward, whose overflow-safe
    per-map scaling spilled 2-4 bytes at 8 warps with triton 3.6) without pipelining, 32×32
    tiles, and 64×64 tiles (wgmma) for fp16/bf16 groups of at least :data:`LARGE_GROUP`
    rows; channel chunks of :data:`CHUNK_CHANNELS`. The gradient kernels
    (:data:`GRADIENT_KERNELS`) take 32×16 tiles in every dtype and group size and
    ``grad_c`` from :func:`gradient_channels`: their ``[32, GRAD_C]`` accumulator fits
    beside 16 columns, not beside 32 (fp32 and the map form spill), and a 64-row
    accumulator spills at ``GRAD_C = 256`` (sm_90, 12-18 spills) while halving ``GRAD_C``
    would recompute every similarity tile twice at C = 256.
    Measured with ``python -m pdml.kernels.aot`` (sm_90 and sm_80, triton 3.6 and 3.8):
    no register spills in any kernel. 4 warps or 2 stages spill in the backward kernels,
    and a kernel's other chunk width may spill a few bytes on one architecture or with one
    triton version (ptxas 12.8 / 12.9); the old fp32 backward kernels at 32×256 whole
    rows spilled 10-21 KB. At most 64 KB of shared memory. The interpreter
    prefers big tiles (its cost is per operation, not per element). Every block is >= 16
    (the smallest dot a GPU accepts).
    """
    half = dtype != torch.float32
    grad_c = gradient_channels(channels) if kernel in GRADIENT_KERNELS else 0
    if interpret:
        block = min(128, max(16, triton.next_power_of_2(group_rows)))
        return Tiles(block, block, min(128, max(16, triton.next_power_of_2(channels))), 4, 1, grad_c)
    if kernel in GRADIENT_KERNELS:
        block = min(32, max(16, triton.next_power_of_2(group_rows)))
        return Tiles(block, 16, CHUNK_CHANNELS[kernel][0 if not half else 1 if gather else 2], 8, 1, grad_c)
    large = half and group_rows >= LARGE_GROUP
    block = min(64 if large else 32, max(16, triton.next_power_of_2(group_rows)))
    block_c = CHUNK_CHANNELS[kernel][0 if not half else 3 if large else 1 if gather else 2]
    return Tiles(block, block, block_c, WARPS.get((kernel, half), 8), 1)


def launch_configs(dtype: torch.dtype, group_rows: int, channels: int, kernel: str, gather: bool) -> list[Tiles]:
    """Every configuration a GPU launch for this shape can use (there is no fallback: the
    tiles need at most 64 KB of shared memory, which sm_80 and sm_90 have)."""
    return [tiles_for(dtype, group_rows, channels, interpret=False, kernel=kernel, gather=gather)]


_GPU_TILES_IN_INTERPRETER = False  # set by gpu_tiles() only


@contextlib.contextmanager
def gpu_tiles() -> Iterator[None]:
    """Within this context, interpreted launches use the GPU's tiles instead of the
    interpreter's: the GPU's launch plan run on CPU tensors, for its numerics and its work
    (:mod:`pdml.kernels.work`). Not thread-safe; meant for tests and measurements."""
    global _GPU_TILES_IN_INTERPRETER
    saved, _GPU_TILES_IN_INTERPRETER = _GPU_TILES_IN_INTERPRETER, True
    try:
        yield
    finally:
        _GPU_TILES_IN_INTERPRETER = saved


def _tiles_of(t: torch.Tensor, group_rows: int, channels: int, kernel: str, gather: bool = True) -> Tiles:
    """:func:`tiles_for` a launch of ``kernel`` on ``t``: the interpreter's tiles for an
    interpreted launch unless :func:`gpu_tiles` says otherwise, else the GPU's."""
    interpret = interprets(t) and not _GPU_TILES_IN_INTERPRETER
    return tiles_for(t.dtype, group_rows, channels, interpret, kernel, gather)


def kernels(interpret: bool) -> types.ModuleType:
    """:mod:`pdml.kernels.patch_loss` decorated for the interpreter or for compilation
    (:func:`pdml.kernels.runtime.kernel_module`)."""
    return kernel_module(patch_loss, interpret)


def check_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid`` if CUDA can launch it, else ValueError (before anything runs)."""
    if grid[0] > MAX_GRID_X or any(axis > 65535 for axis in grid[1:]):
        raise ValueError(f"the launch grid {grid} exceeds CUDA's limits ({MAX_GRID_X}, 65535, 65535): "
                         f"too many rows for one call; split the batch")
    return grid


def loss_grid(groups: int, group_rows: int, channels: int, tiles: Tiles, backward: bool,
              sides: int = 1) -> tuple[int, int, int]:
    """``(groups · row tiles, gradient chunks, sides)`` of a loss kernel: groups are folded into
    axis 0 so their number is bounded by 2^31 - 1, not by axis 1's 65535; only the backward
    kernels split the gradient's channels (``tiles.grad_c`` each) over axis 1, and the metric
    backward its two gradients (``sides = 2``) over axis 2."""
    chunks = triton.cdiv(channels, tiles.grad_c) if backward else 1
    return check_grid((groups * triton.cdiv(group_rows, tiles.block_m), chunks, sides))


def _launch(t: torch.Tensor, name: str, grid_of, args: tuple, tiles: Tiles, meta: dict) -> None:
    """Launch kernel ``name`` of ``t``'s mode with ``tiles`` on ``grid_of(tiles)``, under
    :func:`pdml.kernels.runtime.launch_guard`."""
    kernel = getattr(kernels(interprets(t)), name)
    grid = grid_of(tiles)
    with launch_guard(t, interprets(t)):
        kernel[grid](*args, **meta, **tiles.meta())


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


def _normalised_grad_buffer(x: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Where a backward kernel writes ``dL/dx̂`` (contiguous ``[R, C]``): fp32 scratch for the
    map form (then :func:`_normaliser_backward`), the gradient itself for the rows form
    (used as given: ``x̂ = x``)."""
    if ids is None:
        return _grad_buffer(x)
    return torch.empty(x.shape[0] * ids.numel(), x.shape[1], dtype=torch.float32, device=x.device)


def scales_rows(dtype: torch.dtype) -> bool:
    """Whether the map form's rows of ``dtype`` are scaled by a power of two before squares and
    products (``SCALE`` of :mod:`pdml.kernels.patch_loss`, "Scaling"): fp32 and bf16, whose
    squares and products can overflow fp32; not fp16 (``|x| ≤ 65504``)."""
    return dtype != torch.float16


def _map_maxima(q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor],
                placeholder: torch.Tensor) -> torch.Tensor:
    """``[max|q|, max|k|]`` (fp32, on the device: no synchronisation), the ``scale_ptr`` of the
    kernels, for a map form that :func:`scales_rows`; else ``placeholder`` (an fp32 tensor
    the kernels never read)."""
    if ids is None or not scales_rows(q.dtype):
        return placeholder
    maxima = torch.empty(2, dtype=torch.float32, device=q.device)
    for i, x in enumerate((q, k)):
        torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32, out=maxima[i])
    return maxima


def _normaliser_backward(x: torch.Tensor, ids: Optional[torch.Tensor], maximum: torch.Tensor,
                         dxhat: torch.Tensor) -> torch.Tensor:
    """``dL/dx`` of the map's rows from ``dL/dx̂ [R, C]`` (fp32) through ``x̂ = x / (‖x‖ + eps)``
    (``maximum``: ``[max|x|]`` from :func:`_map_maxima`); the rows form is returned as it is."""
    if ids is None:
        return dxhat
    rows, n_img, width, channels, x_strides = _geometry(x, ids)
    dx = _grad_buffer(x)
    tiles = _tiles_of(x, rows, channels, "normaliser_backward_kernel")._replace(block_n=16)
    _launch(x, "normaliser_backward_kernel", lambda t: check_grid((triton.cdiv(rows, t.block_m),)), (
        x, ids, maximum, dxhat, dx, rows, n_img, width, channels, *x_strides, *_geometry(dx, ids)[4]),
        tiles, dict(GATHER=True, SCALE=scales_rows(x.dtype)))
    return dx


class _Setup(NamedTuple):
    rows: int
    group_rows: int
    channels: int
    shape_args: tuple  # (group_rows, n_img, width, C)
    q_strides: tuple
    tiles: Tiles
    meta: dict
    ids_arg: torch.Tensor


def _loss_setup(q: torch.Tensor, ids: Optional[torch.Tensor], groups: int, kernel: str) -> _Setup:
    rows, n_img, width, channels, q_strides = _geometry(q, ids)
    group_rows = rows // groups
    tiles = _tiles_of(q, group_rows, channels, kernel, ids is not None)
    meta = dict(GATHER=ids is not None, NORMALISE=ids is not None, SCALE=ids is not None and scales_rows(q.dtype),
                IEEE=q.dtype == torch.float32)
    ids_arg = ids if ids is not None else q  # never read when GATHER is off
    return _Setup(rows, group_rows, channels, (group_rows, n_img, width, channels), q_strides, tiles, meta, ids_arg)


def _grid_of(s: _Setup, groups: int, backward: bool, sides: int = 1):
    return lambda tiles: loss_grid(groups, s.group_rows, s.channels, tiles, backward, sides)


def nce_forward(q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor], tau: float,
                groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchNCE forward -> ``(loss [R], lse [R])``, both fp32 (lse is saved for backward)."""
    s = _loss_setup(q, ids, groups, "nce_forward_kernel")
    loss = torch.empty(s.rows, dtype=torch.float32, device=q.device)
    lse = torch.empty(s.rows, dtype=torch.float32, device=q.device)
    _launch(q, "nce_forward_kernel", _grid_of(s, groups, False), (
        q, k, s.ids_arg, _map_maxima(q, k, ids, loss), loss, lse, *s.shape_args, 1.0 / tau, *s.q_strides, *_geometry(k, ids)[4]),
        s.tiles, s.meta)
    return loss, lse


def nce_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor],
                 lse: torch.Tensor, tau: float, groups: int) -> torch.Tensor:
    """PatchNCE backward: ``grad [R]`` of the per-row loss -> ``dq`` (shape and dtype of ``q``)."""
    s = _loss_setup(q, ids, groups, "nce_backward_kernel")
    dq_hat = _normalised_grad_buffer(q, ids)
    maxima = _map_maxima(q, k, ids, lse)
    _launch(q, "nce_backward_kernel", _grid_of(s, groups, True), (
        q, k, s.ids_arg, maxima, lse, grad, dq_hat, *s.shape_args, 1.0 / tau, grad.stride(0),
        *s.q_strides, *_geometry(k, ids)[4]), s.tiles, s.meta)
    return _normaliser_backward(q, ids, maxima[:1], dq_hat)


def metric_scales(rows: int, groups: int, channels: int) -> tuple[float, float]:
    """``(1/(R·C), 1/(G·n²·C))`` with ``n = R / G``: the weights of the positive and the pair
    terms, so that the per-row contributions sum to the mean over all rows and groups."""
    group_rows = rows // groups
    return 1.0 / (rows * channels), 1.0 / (groups * group_rows * group_rows * channels)


def metric_forward(q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor], tau: float,
                   groups: int) -> torch.Tensor:
    """PatchMetric forward -> per-row contributions ``v [R]`` fp32; ``v.sum()`` is the loss
    (the mean over all rows of all groups: L stacked layers given as L·G groups -> the
    mean of the L layer losses)."""
    s = _loss_setup(q, ids, groups, "metric_forward_kernel")
    out = torch.empty(s.rows, dtype=torch.float32, device=q.device)
    _launch(q, "metric_forward_kernel", _grid_of(s, groups, False), (
        q, k, s.ids_arg, _map_maxima(q, k, ids, out), out, *s.shape_args, 1.0 / tau, *metric_scales(s.rows, groups, s.channels),
        *s.q_strides, *_geometry(k, ids)[4]), s.tiles, s.meta)
    return out


def metric_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor],
                    tau: float, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchMetric backward: ``grad [R]`` of the per-row contributions -> ``(dq, dk)``.

    Two launches: the pair terms (each similarity matrix recomputed once per gradient
    chunk) into fp32 scratch, then :func:`_metric_positive` adds the positive terms."""
    s = _loss_setup(q, ids, groups, "metric_backward_kernel")
    dq_hat, dk_hat = (torch.empty(s.rows, s.channels, dtype=torch.float32, device=q.device) for _ in range(2))
    maxima = _map_maxima(q, k, ids, grad)
    pos_scale, pair_scale = metric_scales(s.rows, groups, s.channels)
    _launch(q, "metric_backward_kernel", _grid_of(s, groups, True, sides=2), (
        q, k, s.ids_arg, maxima, grad, dq_hat, dk_hat, *s.shape_args, 1.0 / tau, pair_scale, grad.stride(0),
        *s.q_strides, *_geometry(k, ids)[4]), s.tiles, s.meta)
    dq_hat, dk_hat = _metric_positive(grad, q, k, ids, maxima, dq_hat, dk_hat, tau, pos_scale)
    return _normaliser_backward(q, ids, maxima[:1], dq_hat), _normaliser_backward(k, ids, maxima[1:], dk_hat)


def _metric_positive(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, ids: Optional[torch.Tensor],
                     maxima: torch.Tensor, dq_pair: torch.Tensor, dk_pair: torch.Tensor, tau: float,
                     pos_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The metric gradients ``dL/dq̂, dL/dk̂`` from their pair terms (fp32 ``[R, C]``): the
    positive terms added in place in the map form (fp32, for :func:`_normaliser_backward`),
    into new ``[R, C]`` gradients of the input dtype in the rows form (``x̂ = x``)."""
    rows, n_img, width, channels, q_strides = _geometry(q, ids)
    if ids is None and q.dtype != torch.float32:
        dq, dk = (torch.empty(rows, channels, dtype=q.dtype, device=q.device) for _ in range(2))
    else:
        dq, dk = dq_pair, dk_pair
    tiles = _tiles_of(q, rows, channels, "metric_positive_kernel", ids is not None)._replace(block_n=16)
    meta = dict(GATHER=ids is not None, NORMALISE=ids is not None, SCALE=ids is not None and scales_rows(q.dtype))
    _launch(q, "metric_positive_kernel", lambda t: check_grid((triton.cdiv(rows, t.block_m), 2)), (
        q, k, ids if ids is not None else q, maxima, grad, dq_pair, dk_pair, dq, dk, rows, n_img, width, channels,
        1.0 / tau, pos_scale, grad.stride(0), *q_strides, *_geometry(k, ids)[4]), tiles, meta)
    return dq, dk


def similarity_grid(batch: int, n_img: int, channels: int, tiles: Tiles, backward: bool) -> tuple[int, int]:
    """Forward: ``(B · row tiles · column tiles, 1)``; backward: ``(B · row tiles, channel chunks)``."""
    tiles_m = triton.cdiv(n_img, tiles.block_m)
    if backward:
        return check_grid((batch * tiles_m, triton.cdiv(channels, tiles.block_c)))
    return check_grid((batch * tiles_m * triton.cdiv(n_img, tiles.block_n), 1))


def _similarity_tiles(q: torch.Tensor, ids: torch.Tensor, kernel: str) -> Tiles:
    return _tiles_of(q, ids.numel(), q.shape[1], kernel)


def similarity_forward(q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``q̂ k̂ᵀ`` per image of two ``[B, C, H, W]`` maps -> ``[B, N, N]`` fp32."""
    batch, channels, _, width = q.shape
    n_img = ids.numel()
    out = torch.empty(batch, n_img, n_img, dtype=torch.float32, device=q.device)
    _launch(q, "similarity_forward_kernel", lambda t: similarity_grid(batch, n_img, channels, t, False), (
        q, k, ids, _map_maxima(q, k, ids, out), out, n_img, width, channels, *q.stride(), *k.stride()),
        _similarity_tiles(q, ids, "similarity_forward_kernel"),
        dict(SCALE=scales_rows(q.dtype), IEEE=q.dtype == torch.float32))
    return out


def similarity_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`similarity_forward`: ``grad [B, N, N]`` (any strides) -> ``(dq, dk)``."""
    batch, channels, _, width = q.shape
    n_img = ids.numel()
    dq_hat, dk_hat = _normalised_grad_buffer(q, ids), _normalised_grad_buffer(k, ids)
    maxima = _map_maxima(q, k, ids, dq_hat)
    _launch(q, "similarity_backward_kernel", lambda t: similarity_grid(batch, n_img, channels, t, True), (
        q, k, ids, maxima, grad, dq_hat, dk_hat, n_img, width, channels, *grad.stride(), *q.stride(), *k.stride()),
        _similarity_tiles(q, ids, "similarity_backward_kernel"),
        dict(SCALE=scales_rows(q.dtype), IEEE=q.dtype == torch.float32))
    return _normaliser_backward(q, ids, maxima[:1], dq_hat), _normaliser_backward(k, ids, maxima[1:], dk_hat)
