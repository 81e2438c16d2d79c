"""The work counter of the patch-loss kernels: the dot-product FLOPs a launch issues, and
the least the math needs (docs/ops.md, "Work").

A kernel's dot FLOPs follow from its launch plan (:mod:`pdml.kernels.patch_loss_launch`:
tiles and grid) and its loops: every program runs the same loops over full tiles (masked
rows and channels still go through the tensor cores), so the issued count is the number
of programs times the dots of one program, padding included. :func:`issued_flops` writes
that down per kernel; :func:`counting_dots` counts what the interpreter really issues, so
the tests can hold the formulas to the kernels (run them under
:func:`pdml.kernels.patch_loss_launch.gpu_tiles` to count the GPU's plan).

A dot of ``[M, K] @ [K, N]`` is ``2·M·N·K`` FLOPs. The minimum (:func:`minimum_flops`) of
``G`` groups of ``n`` rows of ``C`` channels:

- forward: each similarity matrix of a group once, ``2·n²·C`` each (PatchNCE: ``S_qk``;
  metric: ``S_qq`` and ``S_kk``; similarity: ``S_qk`` per image);
- backward: each similarity matrix the gradient needs recomputed once, plus one
  ``n × n`` by ``n × C`` product per operand gradient (PatchNCE: ``S_qk`` and ``dq̂``, k
  is detached; metric: ``S_qq``, ``S_kk``, ``dq̂``, ``dk̂``; similarity: ``dq̂`` and
  ``dk̂`` from the given ``dS``, nothing recomputed).

Kernels without dots (the metric's positive terms, the normaliser's backward) issue 0
and need 0.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import triton

from pdml.kernels import patch_loss_launch as launch

OP_KERNELS = {
    "nce": ("nce_forward_kernel", "nce_backward_kernel"),
    "metric": ("metric_forward_kernel", "metric_backward_kernel"),
    "similarity": ("similarity_forward_kernel", "similarity_backward_kernel"),
}
"""The forward and backward kernel with dots of each op."""

_SIMILARITIES = {  # similarity matrices (n × n over C channels) each kernel needs once
    "nce_forward_kernel": 1, "nce_backward_kernel": 1, "metric_forward_kernel": 2, "metric_backward_kernel": 2,
    "similarity_forward_kernel": 1, "similarity_backward_kernel": 0,
}
_GRADIENT_PRODUCTS = {  # n × n by n × C products, one per operand gradient
    "nce_forward_kernel": 0, "nce_backward_kernel": 1, "metric_forward_kernel": 0, "metric_backward_kernel": 2,
    "similarity_forward_kernel": 0, "similarity_backward_kernel": 2,
}


class Work(NamedTuple):
    """Dot FLOPs of one kernel for one shape: issued by its launch plan, and the minimum."""
    kernel: str
    issued: int
    minimum: int

    @property
    def ratio(self) -> float:
        """Issued / minimum (1.0 is no work beyond the math's)."""
        return self.issued / self.minimum


def minimum_flops(kernel: str, groups: int, group_rows: int, channels: int) -> int:
    """The dot FLOPs ``kernel``'s math needs for ``groups`` groups of ``group_rows`` rows of
    ``channels`` channels (the module docstring)."""
    per_matrix = 2 * group_rows * group_rows * channels
    return groups * per_matrix * (_SIMILARITIES[kernel] + _GRADIENT_PRODUCTS[kernel])


def issued_flops(kernel: str, tiles: launch.Tiles, groups: int, group_rows: int, channels: int) -> int:
    """The dot FLOPs a launch of ``kernel`` with ``tiles`` issues for ``groups`` groups of
    ``group_rows`` rows of ``channels`` channels (full tiles, padding included).

    Every program of a loss kernel takes ``block_m`` rows and loops over the group's
    ``block_n``-row column tiles; a similarity tile is the sum of ``cdiv(C, block_c)``
    chunk dots. The gradient kernels run one program per gradient chunk of ``grad_c``
    channels (grid axis 1; the metric's two sides on axis 2), each recomputing its
    similarity tiles and adding one ``[block_m, block_n] @ [block_n, grad_c]`` product per
    column tile. The similarity backward runs one program per ``block_c`` chunk with two
    products per column tile and nothing recomputed.
    """
    m, n, c = tiles.block_m, tiles.block_n, tiles.block_c
    row_tiles = groups * triton.cdiv(group_rows, m)
    column_tiles = triton.cdiv(group_rows, n)
    similarity_tile = 2 * m * n * c * triton.cdiv(channels, c)
    if kernel in ("nce_forward_kernel", "similarity_forward_kernel"):
        return row_tiles * column_tiles * similarity_tile
    if kernel == "metric_forward_kernel":
        return row_tiles * column_tiles * 2 * similarity_tile
    if kernel in launch.GRADIENT_KERNELS:
        sides = 2 if kernel == "metric_backward_kernel" else 1
        per_column_tile = similarity_tile + 2 * m * n * tiles.grad_c
        return sides * row_tiles * triton.cdiv(channels, tiles.grad_c) * column_tiles * per_column_tile
    if kernel == "similarity_backward_kernel":
        return row_tiles * triton.cdiv(channels, c) * column_tiles * 2 * (2 * m * n * c)
    raise ValueError(f"no dot count for kernel {kernel!r}")


def gpu_work(kernel: str, dtype: torch.dtype, group_rows: int, channels: int, gather: bool = True,
             groups: int = 1) -> Work:
    """:class:`Work` of ``kernel`` with the tiles a GPU launch takes (the ratio does not
    depend on ``groups``)."""
    tiles = launch.tiles_for(dtype, group_rows, channels, interpret=False, kernel=kernel, gather=gather)
    return Work(kernel, issued_flops(kernel, tiles, groups, group_rows, channels),
                minimum_flops(kernel, groups, group_rows, channels))


class DotCount:
    """What :func:`counting_dots` saw: ``flops`` (``2·M·N·K`` summed) and ``dots`` (calls)."""

    def __init__(self) -> None:
        self.flops = 0
        self.dots = 0


@contextlib.contextmanager
def counting_dots() -> Iterator[DotCount]:
    """Counts every ``tl.dot`` the Triton interpreter runs inside the context (each program's
    dots, masked tiles included). Only interpreted launches are seen."""
    from triton.runtime.interpreter import InterpreterBuilder

    count = DotCount()
    original = InterpreterBuilder.create_dot

    def create_dot(self, a, b, *args, **kwargs):
        rows, inner = a.data.shape[-2:]
        count.flops += 2 * rows * inner * b.data.shape[-1]
        count.dots += 1
        return original(self, a, b, *args, **kwargs)

    InterpreterBuilder.create_dot = create_dot
    try:
        yield count
    finally:
        InterpreterBuilder.create_dot = original
