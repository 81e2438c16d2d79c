"""Backend "triton": the kernels of :mod:`pdml.kernels` as custom ops (DESIGN.md §3).

Ops (namespace ``pdml_triton``; each has a fake impl, the forward ones an autograd
formula that calls the backward op, so ``torch.compile(fullgraph=True)`` traces a loss
through them without graph breaks):

- ``nce(q, k, ids, tau, n_group, check_ids) -> (loss [R], lse [R])`` fp32; gradient to q only;
- ``metric(q, k, ids, tau, n_group, layers, check_ids) -> v [R]`` fp32, per-row
  contributions: a layer's loss is the sum of its rows' ``v``;
- ``similarity(q, k, ids, check_ids) -> [B, N, N]`` fp32;
- ``nce_backward``, ``metric_backward``, ``similarity_backward``.

``q``/``k`` are maps ``[B, C, H, W]`` with ``ids`` int64 ``[N]`` (gathered and normalised
in the kernels), or rows ``[R, C]`` with ``ids=None`` (used as given). ``n_group`` rows
form one group of negatives. ``check_ids=True`` checks the ids' values (range,
distinctness: one device synchronisation) before any kernel runs: the backend functions
below pass ``True`` only while ``torch.compile`` traces them, because :mod:`pdml.ops`
then skipped that check; in eager mode it already ran.

Multi-layer entries (one launch for all layers of equal shape, e.g. CUT's heads that all
project to 256 channels; the layers are concatenated and become consecutive groups):
:func:`patch_nce_rows_layers`, :func:`patch_metric_rows_layers` (rows form) and
:func:`patch_nce_layers`, :func:`patch_metric_layers` (map form, ids shared).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from pdml import ops

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


def _check_args(q: Tensor, k: Tensor, ids: Optional[Tensor], n_group: int, check_ids: bool) -> None:
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
    rows = _rows_of(q, ids)
    if n_group < 1 or rows % n_group != 0:
        raise ValueError(f"n_group={n_group} must divide the number of rows {rows}")
    if ids is not None:
        if ids.dtype != torch.int64 or ids.dim() != 1 or ids.device != q.device:
            raise ValueError("ids must be a 1-D int64 tensor on the features' device")
        if check_ids:
            ops.check_ids_values(ids, q.shape[2] * q.shape[3])


def _contiguous(ids: Optional[Tensor]) -> Optional[Tensor]:
    return ids.contiguous() if ids is not None else None


def _empty_rows(q: Tensor, ids: Optional[Tensor]) -> Tensor:
    return q.new_empty(_rows_of(q, ids), dtype=torch.float32)


# --------------------------------------------------------------------------- PatchNCE

@torch.library.custom_op("pdml_triton::nce", mutates_args=())
def nce(q: Tensor, k: Tensor, ids: Optional[Tensor], tau: float, n_group: int,
        check_ids: bool = True) -> tuple[Tensor, Tensor]:
    """Per-row PatchNCE ``[R]`` and its logsumexp ``[R]`` (fp32); see the module docstring."""
    _check_args(q, k, ids, n_group, check_ids)
    return _launch.nce_forward(q, k, _contiguous(ids), tau, _rows_of(q, ids) // n_group)


@nce.register_fake
def _(q, k, ids, tau, n_group, check_ids=True):
    return _empty_rows(q, ids), _empty_rows(q, ids)


@torch.library.custom_op("pdml_triton::nce_backward", mutates_args=())
def nce_backward(grad: Tensor, q: Tensor, k: Tensor, ids: Optional[Tensor], lse: Tensor,
                 tau: float, n_group: int) -> Tensor:
    """``dL/dq`` (shape and dtype of ``q``, zero off the gathered rows) from ``grad [R]``."""
    _check_args(q, k, ids, n_group, False)
    return _launch.nce_backward(grad, q, k, _contiguous(ids), lse, tau, _rows_of(q, ids) // n_group)


@nce_backward.register_fake
def _(grad, q, k, ids, lse, tau, n_group):
    return q.new_empty(q.shape)


def _nce_setup_context(ctx, inputs, output):
    q, k, ids, tau, n_group, _ = inputs
    ctx.save_for_backward(q, k, ids, output[1])
    ctx.tau, ctx.n_group = tau, n_group
    ctx.mark_non_differentiable(output[1])


def _nce_grad(ctx, grad_loss, grad_lse):
    q, k, ids, lse = ctx.saved_tensors
    dq = nce_backward(grad_loss, q, k, ids, lse, ctx.tau, ctx.n_group) if ctx.needs_input_grad[0] else None
    return dq, None, None, None, None, None  # k is detached (CUT)


nce.register_autograd(_nce_grad, setup_context=_nce_setup_context)


# --------------------------------------------------------------------------- PatchMetric

@torch.library.custom_op("pdml_triton::metric", mutates_args=())
def metric(q: Tensor, k: Tensor, ids: Optional[Tensor], tau: float, n_group: int,
           layers: int = 1, check_ids: bool = True) -> Tensor:
    """Per-row contributions ``v [R]`` (fp32) to the metric loss of ``layers`` stacked layers."""
    _check_args(q, k, ids, n_group, check_ids)
    if layers < 1 or (_rows_of(q, ids) // n_group) % layers != 0:
        raise ValueError(f"layers={layers} must divide the number of groups")
    # the launcher's v sums to the mean over all layers; a layer's loss is the sum of its rows
    return _launch.metric_forward(q, k, _contiguous(ids), tau, _rows_of(q, ids) // n_group) * layers


@metric.register_fake
def _(q, k, ids, tau, n_group, layers=1, check_ids=True):
    return _empty_rows(q, ids)


@torch.library.custom_op("pdml_triton::metric_backward", mutates_args=())
def metric_backward(grad: Tensor, q: Tensor, k: Tensor, ids: Optional[Tensor], tau: float,
                    n_group: int, layers: int = 1) -> tuple[Tensor, Tensor]:
    """``(dL/dq, dL/dk)`` (shapes and dtypes of ``q``/``k``) from ``grad [R]`` of ``v``."""
    _check_args(q, k, ids, n_group, False)
    return _launch.metric_backward(grad * layers, q, k, _contiguous(ids), tau, _rows_of(q, ids) // n_group)


@metric_backward.register_fake
def _(grad, q, k, ids, tau, n_group, layers=1):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _metric_setup_context(ctx, inputs, output):
    q, k, ids, tau, n_group, layers, _ = inputs
    ctx.save_for_backward(q, k, ids)
    ctx.tau, ctx.n_group, ctx.layers = tau, n_group, layers


def _metric_grad(ctx, grad):
    q, k, ids = ctx.saved_tensors
    dq, dk = metric_backward(grad, q, k, ids, ctx.tau, ctx.n_group, ctx.layers)
    return dq, dk, None, None, None, None, None


metric.register_autograd(_metric_grad, setup_context=_metric_setup_context)


# --------------------------------------------------------------------------- similarity

@torch.library.custom_op("pdml_triton::similarity", mutates_args=())
def similarity(q: Tensor, k: Tensor, ids: Tensor, check_ids: bool = True) -> Tensor:
    """Normalised ``q̂ k̂ᵀ`` per image of two maps ``[B, C, H, W]`` -> ``[B, N, N]`` fp32."""
    _check_args(q, k, ids, ids.shape[0], check_ids)
    return _launch.similarity_forward(q, k, ids.contiguous())


@similarity.register_fake
def _(q, k, ids, check_ids=True):
    return q.new_empty((q.shape[0], ids.shape[0], ids.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pdml_triton::similarity_backward", mutates_args=())
def similarity_backward(grad: Tensor, q: Tensor, k: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(dL/dq, dL/dk)`` of :func:`similarity` from ``grad [B, N, N]``."""
    _check_args(q, k, ids, ids.shape[0], False)
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
# Validated arguments in pdml.ops' order (see ops.Backend).

def _map_group(fq: Tensor, ids: Tensor, negatives: str) -> int:
    return ids.shape[0] if negatives == "image" else fq.shape[0] * ids.shape[0]


def _rows_group(feat_q: Tensor, batch_size: int, negatives: str) -> int:
    return feat_q.shape[0] // batch_size if negatives == "image" else feat_q.shape[0]


def patch_nce(fq: Tensor, fk: Tensor, ids: Tensor, tau: float, negatives: str) -> Tensor:
    return nce(fq, fk, ids, tau, _map_group(fq, ids, negatives), torch.compiler.is_compiling())[0]


def patch_metric(fq: Tensor, fk: Tensor, ids: Tensor, tau: float, negatives: str) -> Tensor:
    return metric(fq, fk, ids, tau, _map_group(fq, ids, negatives), 1,
                  torch.compiler.is_compiling()).sum()


def patch_similarity(fq: Tensor, fk: Tensor, ids: Tensor) -> Tensor:
    return similarity(fq, fk, ids, torch.compiler.is_compiling())


def patch_nce_rows(feat_q: Tensor, feat_k: Tensor, tau: float, batch_size: int, negatives: str) -> Tensor:
    return nce(feat_q, feat_k, None, tau, _rows_group(feat_q, batch_size, negatives), False)[0]


def patch_metric_rows(feat_q: Tensor, feat_k: Tensor, tau: float, batch_size: int, negatives: str) -> Tensor:
    return metric(feat_q, feat_k, None, tau, _rows_group(feat_q, batch_size, negatives), 1, False).sum()


# --------------------------------------------------------------------------- several layers, one launch

def _stack_layers(qs: Sequence[Tensor], ks: Sequence[Tensor], validate) -> tuple[Tensor, Tensor]:
    """Validate every layer with ``validate(q, k)``, check they share shape and dtype, and
    concatenate them along dim 0: the layers become consecutive groups of one launch."""
    if len(qs) == 0 or len(qs) != len(ks):
        raise ValueError(f"the q and k lists must be non-empty and of the same length, got {len(qs)} and {len(ks)}")
    for q, k in zip(qs, ks):
        validate(q, k)
        if q.shape != qs[0].shape or q.dtype != qs[0].dtype:
            raise ValueError(f"all layers must have the same shape and dtype (one launch), got "
                             f"{tuple(q.shape)} {q.dtype} and {tuple(qs[0].shape)} {qs[0].dtype}")
    ops.resolve_backend("triton", qs[0])  # raises when triton cannot run on these tensors
    return torch.cat(list(qs)), torch.cat(list(ks))


def _map_layers(fqs, fks, ids, tau, negatives):
    checked = []
    q, k = _stack_layers(fqs, fks, lambda q, k: checked.append(ops._validate_map(q, k, ids)))
    # the layers' images are consecutive images of the stacked map; with negatives="batch"
    # one layer's B·N rows are one group
    return q, k, checked[0], ops._check_tau(tau), _map_group(fqs[0], checked[0], ops._check_negatives(negatives))


def _rows_layers(feat_qs, feat_ks, tau, batch_size, negatives):
    q, k = _stack_layers(feat_qs, feat_ks, lambda q, k: ops._validate_rows(q, k, batch_size))
    return q, k, ops._check_tau(tau), _rows_group(feat_qs[0], batch_size, ops._check_negatives(negatives))


def patch_nce_layers(fqs: Sequence[Tensor], fks: Sequence[Tensor], ids: Tensor, tau: float = 0.07,
                     negatives: str = "image") -> Tensor:
    """Fused PatchNCE of L layers of equal shape ``[B, C, H, W]`` sharing ``ids``, one launch
    -> ``[L, B·N]``; row ``l`` equals ``ops.patch_nce(fqs[l], fks[l], ids, ...)``."""
    fq, fk, ids, tau, n_group = _map_layers(fqs, fks, ids, tau, negatives)
    return nce(fq, fk, ids, tau, n_group, torch.compiler.is_compiling())[0].view(len(fqs), -1)


def patch_metric_layers(fqs: Sequence[Tensor], fks: Sequence[Tensor], ids: Tensor, tau: float = 0.15,
                        negatives: str = "image") -> Tensor:
    """Fused metric loss of L layers of equal shape ``[B, C, H, W]`` sharing ``ids``, one
    launch -> ``[L]``; entry ``l`` equals ``ops.patch_metric(fqs[l], fks[l], ids, ...)``."""
    fq, fk, ids, tau, n_group = _map_layers(fqs, fks, ids, tau, negatives)
    per_row = metric(fq, fk, ids, tau, n_group, len(fqs), torch.compiler.is_compiling())
    return per_row.view(len(fqs), -1).sum(1)


def patch_nce_rows_layers(feat_qs: Sequence[Tensor], feat_ks: Sequence[Tensor], tau: float = 0.07,
                          batch_size: int = 1, negatives: str = "image") -> Tensor:
    """CUT's PatchNCELoss of L layers of equal shape ``[B·N, C]`` in one launch -> ``[L, B·N]``.

    Row ``l`` equals ``ops.patch_nce_rows(feat_qs[l], feat_ks[l], ...)``.
    """
    feat_q, feat_k, tau, n_group = _rows_layers(feat_qs, feat_ks, tau, batch_size, negatives)
    return nce(feat_q, feat_k, None, tau, n_group, False)[0].view(len(feat_qs), -1)


def patch_metric_rows_layers(feat_qs: Sequence[Tensor], feat_ks: Sequence[Tensor], tau: float = 0.15,
                             batch_size: int = 1, negatives: str = "image") -> Tensor:
    """DML_CT's PatchMetricLoss of L layers of equal shape ``[B·N, C]`` in one launch -> ``[L]``.

    Entry ``l`` equals ``ops.patch_metric_rows(feat_qs[l], feat_ks[l], ...)``.
    """
    feat_q, feat_k, tau, n_group = _rows_layers(feat_qs, feat_ks, tau, batch_size, negatives)
    per_row = metric(feat_q, feat_k, None, tau, n_group, len(feat_qs), False)
    return per_row.view(len(feat_qs), -1).sum(1)


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
    ops._UNBUILT["triton"] = _IMPORT_ERROR
else:
    ops.register_backend(ops.Backend(
        name="triton",
        unavailable=_unavailable,
        unsupported=_unsupported,
        patch_nce=patch_nce,
        patch_metric=patch_metric,
        patch_similarity=patch_similarity,
        patch_nce_rows=patch_nce_rows,
        patch_metric_rows=patch_metric_rows,
    ))
