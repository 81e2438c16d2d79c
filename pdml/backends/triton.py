"""Backend "triton": the kernels of :mod:`pdml.kernels` as custom ops (docs/layout.md).

Ops (namespace ``pdml_triton``; each has a fake impl, the forward ones an autograd
formula that calls the backward op, so ``torch.compile(fullgraph=True)`` traces a loss
through them without graph breaks):

- ``nce(q, k, ids, tau, groups, check_ids) -> (loss [R], lse [R])`` fp32; gradient to q only;
- ``metric(q, k, ids, tau, groups, check_ids) -> v [R]`` fp32, per-row contributions:
  ``v.sum()`` is the loss, the means running over all rows of all groups (so L stacked
  layers of equal shape, given as L·groups groups, sum to the mean of the layer losses);
- ``similarity(q, k, ids, check_ids) -> [B, N, N]`` fp32;
- ``nce_backward``, ``metric_backward``, ``similarity_backward``;
- ``gather_project(fmap, ids, weight, bias, check_ids) -> [B·N, D]`` in fmap's dtype (the
  gather of the sampled pixels fused with a linear layer, :mod:`pdml.kernels.gather_project`)
  and ``gather_project_backward(grad, fmap, ids, weight, bias_grad) -> (grad_fmap,
  grad_weight, grad_bias)`` (grad_fmap zero off the sampled pixels, grad_bias empty without
  bias_grad).

Features are maps ``[B, C, H, W]`` with ``ids`` int64 ``[N]`` (gathered and normalised
in the kernels), or rows ``[R, C]`` with ``ids=None`` (used as given). ``groups`` is the
number of groups of negatives (docs/ops.md): consecutive blocks of ``R // groups`` rows;
in the map form it divides B. ``check_ids=True`` checks the ids' values (range,
distinctness: one device synchronisation, the first time an ids tensor is seen,
:func:`pdml._validation.check_ids_values`) before any kernel runs, for callers of the ops
themselves; the backend functions below pass ``False``: :mod:`pdml.ops` checked the ids
already (eagerly, or inside the compiled graph).

Higher-order gradients: the backward ops are not differentiable; with ``create_graph=True``
the autograd formulas differentiate the ops' references instead
(:mod:`pdml.backends.higher_order`), so double backward is exact.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from pdml import _validation, reference
from pdml.backends.higher_order import creating_graph, reference_grads
from pdml.backends.registry import register_module_backend

try:
    from pdml.kernels import gather_project_launch, patch_loss_launch
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # no triton in this environment
    gather_project_launch = patch_loss_launch = None
    _IMPORT_ERROR = f"triton cannot be imported ({exc})"

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- argument checks

def _rows_of(q: Tensor, ids: Optional[Tensor]) -> int:
    return q.shape[0] * ids.shape[0] if ids is not None else q.shape[0]


def _check_args(q: Tensor, k: Tensor, ids: Optional[Tensor], groups: int, check_ids: bool) -> None:
    """What the kernels rely on, for callers that reach the ops without :mod:`pdml.ops`."""
    if patch_loss_launch is None:
        raise RuntimeError(f"backend 'triton' is not available: {_IMPORT_ERROR}")
    if q.shape != k.shape or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q and k must match in shape, dtype and device, got {tuple(q.shape)} "
                         f"{q.dtype} {q.device} and {tuple(k.shape)} {k.dtype} {k.device}")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != (4 if ids is not None else 2):
        raise ValueError(f"features must be [B, C, H, W] with ids or [R, C] without, got {tuple(q.shape)}")
    if q.shape[1] > patch_loss_launch.MAX_CHANNELS:
        raise ValueError(f"the Triton kernels take at most {patch_loss_launch.MAX_CHANNELS} channels, got {q.shape[1]}")
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
    return patch_loss_launch.nce_forward(q, k, _contiguous(ids), tau, groups)


@nce.register_fake
def _(q, k, ids, tau, groups, check_ids=True):
    return _empty_rows(q, ids), _empty_rows(q, ids)


@torch.library.custom_op("pdml_triton::nce_backward", mutates_args=())
def nce_backward(grad: Tensor, q: Tensor, k: Tensor, ids: Optional[Tensor], lse: Tensor,
                 tau: float, groups: int) -> Tensor:
    """``dL/dq`` (shape and dtype of ``q``, zero off the gathered rows) from ``grad [R]``."""
    _check_args(q, k, ids, groups, False)
    return patch_loss_launch.nce_backward(grad, q, k, _contiguous(ids), lse, tau, groups)


@nce_backward.register_fake
def _(grad, q, k, ids, lse, tau, groups):
    return q.new_empty(q.shape)


def _nce_setup_context(ctx, inputs, output):
    q, k, ids, tau, groups, _ = inputs
    ctx.save_for_backward(q, k, ids, output[1])
    ctx.tau, ctx.groups = tau, groups
    ctx.mark_non_differentiable(output[1])


def _reference_grads(reference_op, ctx, inputs: tuple, grad: Tensor) -> tuple:
    """:func:`~pdml.backends.higher_order.reference_grads` of an op whose first inputs are
    ``inputs`` (its last, ``check_ids``, is no input of the reference)."""
    count = len(inputs)
    grads = reference_grads(reference_op, inputs, ctx.needs_input_grad[:count], grad)
    return tuple(grads) + (None,) * (len(ctx.needs_input_grad) - count)


def _nce_reference(q, k, ids, tau, groups):
    """The reference of :func:`nce`'s loss output."""
    if ids is None:
        return reference.rows_nce(q, k, tau, groups)
    return reference.map_nce(q, k, ids, tau, groups)


def _nce_grad(ctx, grad_loss, grad_lse):
    q, k, ids, lse = ctx.saved_tensors
    if creating_graph():
        return _reference_grads(_nce_reference, ctx, (q, k, ids, ctx.tau, ctx.groups), grad_loss)
    dq = nce_backward(grad_loss, q, k, ids, lse, ctx.tau, ctx.groups) if ctx.needs_input_grad[0] else None
    return dq, None, None, None, None, None  # k is detached (CUT)


nce.register_autograd(_nce_grad, setup_context=_nce_setup_context)


# --------------------------------------------------------------------------- PatchMetric

@torch.library.custom_op("pdml_triton::metric", mutates_args=())
def metric(q: Tensor, k: Tensor, ids: Optional[Tensor], tau: float, groups: int,
           check_ids: bool = True) -> Tensor:
    """Per-row contributions ``v [R]`` (fp32) to the metric loss: ``v.sum()`` is the loss."""
    _check_args(q, k, ids, groups, check_ids)
    return patch_loss_launch.metric_forward(q, k, _contiguous(ids), tau, groups)


@metric.register_fake
def _(q, k, ids, tau, groups, check_ids=True):
    return _empty_rows(q, ids)


@torch.library.custom_op("pdml_triton::metric_backward", mutates_args=())
def metric_backward(grad: Tensor, q: Tensor, k: Tensor, ids: Optional[Tensor], tau: float,
                    groups: int) -> tuple[Tensor, Tensor]:
    """``(dL/dq, dL/dk)`` (shapes and dtypes of ``q``/``k``) from ``grad [R]`` of ``v``."""
    _check_args(q, k, ids, groups, False)
    return patch_loss_launch.metric_backward(grad, q, k, _contiguous(ids), tau, groups)


@metric_backward.register_fake
def _(grad, q, k, ids, tau, groups):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _metric_setup_context(ctx, inputs, output):
    q, k, ids, tau, groups, _ = inputs
    ctx.save_for_backward(q, k, ids)
    ctx.tau, ctx.groups = tau, groups


def _metric_reference(q, k, ids, tau, groups):
    """The reference of :func:`metric`'s per-row contributions ``v [R]``."""
    if ids is None:
        return reference.rows_metric_terms(q, k, tau, groups)
    return reference.map_metric_terms(q, k, ids, tau, groups)


def _metric_grad(ctx, grad):
    q, k, ids = ctx.saved_tensors
    if creating_graph():
        return _reference_grads(_metric_reference, ctx, (q, k, ids, ctx.tau, ctx.groups), grad)
    dq, dk = metric_backward(grad, q, k, ids, ctx.tau, ctx.groups)
    return dq, dk, None, None, None, None


metric.register_autograd(_metric_grad, setup_context=_metric_setup_context)


# --------------------------------------------------------------------------- similarity

@torch.library.custom_op("pdml_triton::similarity", mutates_args=())
def similarity(q: Tensor, k: Tensor, ids: Tensor, check_ids: bool = True) -> Tensor:
    """Normalised ``q̂ k̂ᵀ`` per image of two maps ``[B, C, H, W]`` -> ``[B, N, N]`` fp32."""
    _check_args(q, k, ids, q.shape[0], check_ids)
    return patch_loss_launch.similarity_forward(q, k, ids.contiguous())


@similarity.register_fake
def _(q, k, ids, check_ids=True):
    return q.new_empty((q.shape[0], ids.shape[0], ids.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pdml_triton::similarity_backward", mutates_args=())
def similarity_backward(grad: Tensor, q: Tensor, k: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(dL/dq, dL/dk)`` of :func:`similarity` from ``grad [B, N, N]``."""
    _check_args(q, k, ids, q.shape[0], False)
    return patch_loss_launch.similarity_backward(grad, q, k, ids.contiguous())


@similarity_backward.register_fake
def _(grad, q, k, ids):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _similarity_setup_context(ctx, inputs, output):
    q, k, ids, _ = inputs
    ctx.save_for_backward(q, k, ids)


def _similarity_grad(ctx, grad):
    q, k, ids = ctx.saved_tensors
    if creating_graph():
        return _reference_grads(reference.patch_similarity, ctx, (q, k, ids), grad)
    dq, dk = similarity_backward(grad, q, k, ids)
    return dq, dk, None, None


similarity.register_autograd(_similarity_grad, setup_context=_similarity_setup_context)


# --------------------------------------------------------------------------- gather + projection

def _check_gather_args(fmap: Tensor, ids: Tensor, weight: Tensor, bias: Optional[Tensor], check_ids: bool) -> None:
    """What the gather_project kernels rely on, for callers that reach the ops without :mod:`pdml.ops`."""
    if gather_project_launch is None:
        raise RuntimeError(f"backend 'triton' is not available: {_IMPORT_ERROR}")
    if fmap.dim() != 4:
        raise ValueError(f"fmap must have shape [B, F, H, W], got {tuple(fmap.shape)}")
    if fmap.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16, got {fmap.dtype}")
    if weight.dim() != 2 or weight.shape[1] != fmap.shape[1]:
        raise ValueError(f"weight must have shape [D, F] with F = {fmap.shape[1]}, got {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape [D] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != fmap.dtype or t.device != fmap.device):
            raise TypeError(f"{name} must have fmap's dtype and device, got {t.dtype} on {t.device}")
    if ids.dtype != torch.int64 or ids.dim() != 1 or ids.device != fmap.device:
        raise ValueError("ids must be a 1-D int64 tensor on fmap's device")
    if check_ids:
        _validation.check_ids_values(ids, fmap.shape[2] * fmap.shape[3])


@torch.library.custom_op("pdml_triton::gather_project", mutates_args=())
def gather_project_op(fmap: Tensor, ids: Tensor, weight: Tensor, bias: Optional[Tensor],
                      check_ids: bool = True) -> Tensor:
    """``[B·N, D]`` rows ``fmap[b, :, ids[i]] @ weight.T + bias`` in fmap's dtype."""
    _check_gather_args(fmap, ids, weight, bias, check_ids)
    return gather_project_launch.gather_project_forward(fmap, ids.contiguous(), weight, bias)


@gather_project_op.register_fake
def _(fmap, ids, weight, bias, check_ids=True):
    return fmap.new_empty(fmap.shape[0] * ids.shape[0], weight.shape[0])


@torch.library.custom_op("pdml_triton::gather_project_backward", mutates_args=())
def gather_project_backward(grad: Tensor, fmap: Tensor, ids: Tensor, weight: Tensor,
                            bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_fmap, grad_weight [D, F], grad_bias [D] or [0])`` from ``grad [B·N, D]``."""
    _check_gather_args(fmap, ids, weight, None, False)
    grad_fmap, grad_weight, grad_bias = gather_project_launch.gather_project_backward(
        grad.to(fmap.dtype), fmap, ids.contiguous(), weight, bias_grad)
    return grad_fmap, grad_weight, grad_bias if bias_grad else weight.new_empty(0)


@gather_project_backward.register_fake
def _(grad, fmap, ids, weight, bias_grad):
    # the launcher allocates grad_fmap with zeros_like(fmap): fmap's memory format when dense
    return (torch.empty_like(fmap), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[0] if bias_grad else 0))


def _gather_project_setup_context(ctx, inputs, output):
    fmap, ids, weight, bias = inputs[:4]  # check_ids may be left at its default
    ctx.save_for_backward(fmap, ids, weight, bias)
    ctx.has_bias = bias is not None


def _gather_project_grad(ctx, grad):
    fmap, ids, weight, bias = ctx.saved_tensors
    if creating_graph():
        return _reference_grads(reference.gather_project, ctx, (fmap, ids, weight, bias), grad)
    need_fmap, _, need_weight, need_bias = ctx.needs_input_grad[:4]
    bias_grad = ctx.has_bias and need_bias
    grad_fmap, grad_weight, grad_bias = gather_project_backward(grad, fmap, ids, weight, bias_grad)
    grads = (grad_fmap if need_fmap else None, None, grad_weight if need_weight else None,
             grad_bias if bias_grad else None, None)
    return grads[:len(ctx.needs_input_grad)]


gather_project_op.register_autograd(_gather_project_grad, setup_context=_gather_project_setup_context)


# --------------------------------------------------------------------------- backend callables
# Validated arguments (pdml/_validation.py), named as registry.Backend's fields.

def patch_nce(fq: Tensor, fk: Tensor, ids: Tensor, tau: float, groups: int) -> Tensor:
    return nce(fq, fk, ids, tau, groups, False)[0]


def patch_metric(fq: Tensor, fk: Tensor, ids: Tensor, tau: float, groups: int) -> Tensor:
    return metric(fq, fk, ids, tau, groups, False).sum()


def patch_similarity(fq: Tensor, fk: Tensor, ids: Tensor) -> Tensor:
    return similarity(fq, fk, ids, False)


def patch_nce_rows(feat_q: Tensor, feat_k: Tensor, tau: float, groups: int) -> Tensor:
    return nce(feat_q, feat_k, None, tau, groups, False)[0]


def patch_metric_rows(feat_q: Tensor, feat_k: Tensor, tau: float, groups: int) -> Tensor:
    return metric(feat_q, feat_k, None, tau, groups, False).sum()


def gather_project(fmap: Tensor, ids: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return gather_project_op(fmap, ids, weight, bias, False)


# --------------------------------------------------------------------------- registration

def _interpreter_asked() -> bool:
    """``TRITON_INTERPRET=1``, read from the environment rather than through
    :func:`pdml.kernels.runtime.interpret_everywhere`: torch.compile traces this check
    (``resolve_backend`` runs inside a compiled loss) and cannot trace triton's knobs."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unavailable() -> Optional[str]:
    """Why Triton cannot run here at all: not importable, or no CUDA GPU and no interpreter."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not torch.cuda.is_available() and not _interpreter_asked():
        return ("no CUDA GPU is visible (on a CPU Triton runs only under its interpreter: "
                "set TRITON_INTERPRET=1)")
    return None


def _unsupported(t: Tensor) -> Optional[str]:
    if t.dtype not in KERNEL_DTYPES:
        return f"its kernels take float32, float16 or bfloat16 tensors, got {t.dtype}"
    if t.device.type == "cuda":
        if t.dtype == torch.bfloat16 and torch.cuda.get_device_capability(t.device)[0] < 8:
            return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    elif t.device.type == "cpu":
        if not _interpreter_asked():
            return "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1)"
        if t.dtype == torch.bfloat16:
            return "the Triton interpreter computes bfloat16 dots wrongly; bfloat16 needs a GPU"
    else:
        return f"it runs on CUDA tensors (CPU under TRITON_INTERPRET=1), got a {t.device.type} tensor"
    if t.dim() >= 2 and t.shape[1] > patch_loss_launch.MAX_CHANNELS:
        return f"its kernels take at most {patch_loss_launch.MAX_CHANNELS} channels, got {t.shape[1]}"
    return None


register_module_backend("triton", globals(), load_error=_IMPORT_ERROR, unavailable=_unavailable,
                        unsupported=_unsupported)
