"""Backend "triton": the kernels of :mod:`pdml.kernels` as custom ops (docs/layout.md).

Ops (namespace ``pdml_triton``; each has a fake impl, the forward ones an autograd
formula that calls the backward op, so ``torch.compile(fullgraph=True)`` traces a loss
through them without graph breaks):

- ``nce(q, k, ids, tau, groups, check_ids) -> (loss [R], lse [R])`` fp32; gradient to q only;
- ``metric(q, k, ids, tau, groups, check_ids) -> v [R]`` fp32, per-row contributions:
  ``v.sum()`` is the loss, the means running over all rows of all groups (so L stacked
  layers of equal shape, given as L·groups groups, sum to the mean of the layer losses);
- ``similarity(q, k, ids, check_ids) -> [B, N, N]`` fp32;
- ``nce_backward``, ``metric_backward``, ``similarity_backward``.

Features are maps ``[B, C, H, W]`` with ``ids`` int64 ``[N]`` (gathered and normalised
in the kernels), or rows ``[R, C]`` with ``ids=None`` (used as given). ``groups`` is the
number of groups of negatives (docs/ops.md): consecutive blocks of ``R // groups`` rows;
in the map form it divides B. ``check_ids=True`` checks the ids' values (range,
distinctness: one device synchronisation) before any kernel runs: the backend functions
below pass ``True`` only while ``torch.compile`` traces them, because :mod:`pdml.ops`
then skipped that check; in eager mode it already ran.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from pdml import _validation
from pdml.backends.registry import Backend, mark_unavailable, register_backend

try:
    from pdml.kernels import launch as _launch
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # no triton in this environment
    _launch = None
    _IMPORT_ERROR = f"triton cannot be imported ({exc})"

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- argument checks

def _rows_of(q: Tensor, ids: Optional[Tensor]) -> int:
    return q.shape[0] * ids.shape[0] if ids is not None else q.shape[0]


def _launch_group_arg(q: Tensor, ids: Optional[Tensor], groups: int) -> int:
    # MERGE: pdml/kernels/launch.py in this tree still takes the number of rows per group;
    # once it takes `groups` (the number of groups), pass `groups` through and delete this.
    return _rows_of(q, ids) // groups


def _check_args(q: Tensor, k: Tensor, ids: Optional[Tensor], groups: int, check_ids: bool) -> None:
    """What the kernels rely on, for callers that reach the ops without :mod:`pdml.ops`."""
    if _launch is None:
        raise RuntimeError(f"backend 'triton' is not available: {_IMPORT_ERROR}")
    if q.shape != k.shape or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q and k must match in shape, dtype and device, got {tuple(q.shape)} "
                         f"{q.dtype} {q.device} and {tuple(k.shape)} {k.dtype} {k.device}")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != (4 if ids is not None else 2):
        raise ValueError(f"features must be [B, C, H, W] with ids or [R, C] without, got {tuple(q.shape)}")
    if q.shape[1] > _launch.MAX_CHANNELS:
        raise ValueError(f"the Triton kernels take at most {_launch.MAX_CHANNELS} channels, got {q.shape[1]}")
    # groups never split an image of the map form
    units = q.shape[0]
    if groups < 1 or units % groups != 0:
        what = "the batch size" if ids is not None else "the number of rows"
        raise ValueError(f"groups={groups} must be >= 1 and divide {what} {units}")
    if ids is not None:
        if ids.dtype != torch.int64 or ids.dim() != 1 or ids.device != q.device:
            raise ValueError("ids must be a 1-D int64 tensor on the features' device")
        if check_ids:
            _validation.check_ids_values(ids, q.shape[2] * q.shape[3])


def _contiguous(ids: Optional[Tensor]) -> Optional[Tensor]:
    return ids.contiguous() if ids is not None else None


def _empty_rows(q: Tensor, ids: Optional[Tensor]) -> Tensor:
    return q.new_empty(_rows_of(q, ids), dtype=torch.float32)


# --------------------------------------------------------------------------- PatchNCE

@torch.library.custom_op("pdml_triton::nce", mutates_args=())
def nce(q: Tensor, k: Tensor, ids: Optional[Tensor], tau: float, groups: int,
        check_ids: bool = True) -> tuple[Tensor, Tensor]:
    """Per-row PatchNCE ``[R]`` and its logsumexp ``[R]`` (fp32); see the module docstring."""
    _check_args(q, k, ids, groups, check_ids)
    return _launch.nce_forward(q, k, _contiguous(ids), tau, _launch_group_arg(q, ids, groups))


@nce.register_fake
def _(q, k, ids, tau, groups, check_ids=True):
    return _empty_rows(q, ids), _empty_rows(q, ids)


@torch.library.custom_op("pdml_triton::nce_backward", mutates_args=())
def nce_backward(grad: Tensor, q: Tensor, k: Tensor, ids: Optional[Tensor], lse: Tensor,
                 tau: float, groups: int) -> Tensor:
    """``dL/dq`` (shape and dtype of ``q``, zero off the gathered rows) from ``grad [R]``."""
    _check_args(q, k, ids, groups, False)
    return _launch.nce_backward(grad, q, k, _contiguous(ids), lse, tau, _launch_group_arg(q, ids, groups))


@nce_backward.register_fake
def _(grad, q, k, ids, lse, tau, groups):
    return q.new_empty(q.shape)


def _nce_setup_context(ctx, inputs, output):
    q, k, ids, tau, groups, _ = inputs
    ctx.save_for_backward(q, k, ids, output[1])
    ctx.tau, ctx.groups = tau, groups
    ctx.mark_non_differentiable(output[1])


def _nce_grad(ctx, grad_loss, grad_lse):
    q, k, ids, lse = ctx.saved_tensors
    dq = nce_backward(grad_loss, q, k, ids, lse, ctx.tau, ctx.groups) if ctx.needs_input_grad[0] else None
    return dq, None, None, None, None, None  # k is detached (CUT)


nce.register_autograd(_nce_grad, setup_context=_nce_setup_context)


# --------------------------------------------------------------------------- PatchMetric

@torch.library.custom_op("pdml_triton::metric", mutates_args=())
def metric(q: Tensor, k: Tensor, ids: Optional[Tensor], tau: float, groups: int,
           check_ids: bool = True) -> Tensor:
    """Per-row contributions ``v [R]`` (fp32) to the metric loss: ``v.sum()`` is the loss."""
    _check_args(q, k, ids, groups, check_ids)
    return _launch.metric_forward(q, k, _contiguous(ids), tau, _launch_group_arg(q, ids, groups))


@metric.register_fake
def _(q, k, ids, tau, groups, check_ids=True):
    return _empty_rows(q, ids)


@torch.library.custom_op("pdml_triton::metric_backward", mutates_args=())
def metric_backward(grad: Tensor, q: Tensor, k: Tensor, ids: Optional[Tensor], tau: float,
                    groups: int) -> tuple[Tensor, Tensor]:
    """``(dL/dq, dL/dk)`` (shapes and dtypes of ``q``/``k``) from ``grad [R]`` of ``v``."""
    _check_args(q, k, ids, groups, False)
    return _launch.metric_backward(grad, q, k, _contiguous(ids), tau, _launch_group_arg(q, ids, groups))


@metric_backward.register_fake
def _(grad, q, k, ids, tau, groups):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _metric_setup_context(ctx, inputs, output):
    q, k, ids, tau, groups, _ = inputs
    ctx.save_for_backward(q, k, ids)
    ctx.tau, ctx.groups = tau, groups


def _metric_grad(ctx, grad):
    q, k, ids = ctx.saved_tensors
    dq, dk = metric_backward(grad, q, k, ids, ctx.tau, ctx.groups)
    return dq, dk, None, None, None, None


metric.register_autograd(_metric_grad, setup_context=_metric_setup_context)


# --------------------------------------------------------------------------- similarity

@torch.library.custom_op("pdml_triton::similarity", mutates_args=())
def similarity(q: Tensor, k: Tensor, ids: Tensor, check_ids: bool = True) -> Tensor:
    """Normalised ``q̂ k̂ᵀ`` per image of two maps ``[B, C, H, W]`` -> ``[B, N, N]`` fp32."""
    _check_args(q, k, ids, q.shape[0], check_ids)
    return _launch.similarity_forward(q, k, ids.contiguous())


@similarity.register_fake
def _(q, k, ids, check_ids=True):
    return q.new_empty((q.shape[0], ids.shape[0], ids.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pdml_triton::similarity_backward", mutates_args=())
def similarity_backward(grad: Tensor, q: Tensor, k: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(dL/dq, dL/dk)`` of :func:`similarity` from ``grad [B, N, N]``."""
    _check_args(q, k, ids, q.shape[0], False)
    return _launch.similarity_backward(grad, q, k, ids.contiguous())


@similarity_backward.register_fake
def _(grad, q, k, ids):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _similarity_setup_context(ctx, inputs, output):
    q, k, ids, _ = inputs
    ctx.save_for_backward(q, k, ids)


def _similarity_grad(ctx, grad):
    q, k, ids = ctx.saved_tensors
    dq, dk = similarity_backward(grad, q, k, ids)
    return dq, dk, None, None


similarity.register_autograd(_similarity_grad, setup_context=_similarity_setup_context)


# --------------------------------------------------------------------------- backend functions
# Validated arguments (pdml/_validation.py), in the order of registry.Backend's fields.

def patch_nce(fq: Tensor, fk: Tensor, ids: Tensor, tau: float, groups: int) -> Tensor:
    return nce(fq, fk, ids, tau, groups, torch.compiler.is_compiling())[0]


def patch_metric(fq: Tensor, fk: Tensor, ids: Tensor, tau: float, groups: int) -> Tensor:
    return metric(fq, fk, ids, tau, groups, torch.compiler.is_compiling()).sum()


def patch_similarity(fq: Tensor, fk: Tensor, ids: Tensor) -> Tensor:
    return similarity(fq, fk, ids, torch.compiler.is_compiling())


def patch_nce_rows(feat_q: Tensor, feat_k: Tensor, tau: float, groups: int) -> Tensor:
    return nce(feat_q, feat_k, None, tau, groups, False)[0]


def patch_metric_rows(feat_q: Tensor, feat_k: Tensor, tau: float, groups: int) -> Tensor:
    return metric(feat_q, feat_k, None, tau, groups, False).sum()


# --------------------------------------------------------------------------- registration

def _unavailable() -> Optional[str]:
    return _IMPORT_ERROR


def _unsupported(t: Tensor) -> Optional[str]:
    if t.dtype not in KERNEL_DTYPES:
        return f"its kernels take float32, float16 or bfloat16 tensors, got {t.dtype}"
    if t.device.type == "cuda":
        if t.dtype == torch.bfloat16 and torch.cuda.get_device_capability(t.device)[0] < 8:
            return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    elif t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1)"
        if t.dtype == torch.bfloat16:
            return "the Triton interpreter computes bfloat16 dots wrongly; bfloat16 needs a GPU"
    else:
        return f"it runs on CUDA tensors (CPU under TRITON_INTERPRET=1), got a {t.device.type} tensor"
    if t.dim() >= 2 and t.shape[1] > _launch.MAX_CHANNELS:
        return f"its kernels take at most {_launch.MAX_CHANNELS} channels, got {t.shape[1]}"
    return None


if _launch is None:
    mark_unavailable("triton", _IMPORT_ERROR)
else:
    register_backend(Backend(
        name="triton",
        unavailable=_unavailable,
        unsupported=_unsupported,
        patch_nce=patch_nce,
        patch_metric=patch_metric,
        patch_similarity=patch_similarity,
        patch_nce_rows=patch_nce_rows,
        patch_metric_rows=patch_metric_rows,
        gather_project=None,  # no fused kernel yet: "auto" falls through to the next backend
    ))
