"""Backend "ext": the C++/CUDA ops of the extension ``pdml._C`` (``csrc/``).

When ``pdml._C`` loads, this module registers, for each op the library defines
(``csrc/pdml.cpp``), its fake (meta) impl and its autograd formula (one section per op,
registered as it is defined: :func:`_fake`, :func:`_autograd`), then the backend "ext";
otherwise it marks the backend unavailable with the reason
(:func:`pdml.backends.registry.register_module_backend`).

The ops (all features ``[B, C, H, W]`` or rows ``[R, C]``; "acc" = float64 for float64
inputs, float32 otherwise; ``groups`` = the number of groups of negatives, docs/ops.md:
in the map form a divisor of B, consecutive images sharing a group):

- ``pdml::patch_nce(fq, fk, ids, tau, groups) -> (loss [B·N] acc, lse [B·N] acc)``
  and ``patch_nce_backward(grad_loss, fq, fk, ids, loss, lse, tau, groups) -> grad_fq``
  (the backward recomputes the similarities tile by tile; ``fk`` gets no gradient, as in CUT).
- ``pdml::patch_nce_with_grad(fq, fk, ids, tau, groups) -> (loss, lse, d_rows [B·N, C] acc)``
  (CPU): the forward that also gives ``∂loss_r/∂q_r`` w.r.t. the gathered rows before the
  normaliser, from the same sweep; ``patch_nce_with_grad_backward(grad_loss, d_rows, fq, ids)
  -> grad_fq`` scales the rows and scatters them (no second sweep, no second gather).
- ``pdml::patch_metric(fq, fk, ids, tau, groups, compute_grad)
  -> (loss 0-dim acc, d_q [B·N, C] acc, d_k [B·N, C] acc)``: with ``compute_grad`` the
  gradient w.r.t. the normalised rows comes out of the same sweep as the loss (it needs no
  global normaliser), else ``d_q``/``d_k`` are empty; ``patch_metric_backward(grad, d_q, d_k,
  fq, fk, ids) -> (grad_fq, grad_fk)`` scales them and takes them back to the maps.
- ``pdml::patch_similarity(fq, fk, ids) -> [B, N, N] acc`` and its backward.
- rows form: ``patch_nce_rows(feat_q, feat_k, tau, groups)`` (+ backward) and
  ``patch_metric_rows(feat_q, feat_k, tau, groups, compute_grad)`` (its backward is a scale).
- ``pdml::gather_project(fmap, ids, weight, bias) -> [B·N, D]`` in fmap's dtype (the gather
  of the sampled pixels fused with a linear layer; csrc/gather_project.h) and
  ``gather_project_backward(grad, fmap, ids, weight, bias_grad) -> (grad_fmap, grad_weight,
  grad_bias)`` (grad_fmap zero off the sampled pixels; grad_bias empty without bias_grad).

Higher-order gradients: the backward ops are not differentiable; with ``create_graph=True``
each autograd formula below differentiates the op's reference instead
(:mod:`pdml.backends.higher_order`), so double backward is exact; without, nothing changes.

Mixed precision: float16/bfloat16 features (e.g. from a model under ``torch.autocast``)
are read as they are and computed in float32; the loss is float32 and the gradients come
back in the features' dtype. Gradients are linear in the upstream gradient, so a
``GradScaler``-scaled loss scales them exactly.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from pdml import reference
from pdml.backends.higher_order import creating_graph, reference_grads
from pdml.backends.registry import device_index, register_module_backend


def _load() -> Optional[str]:
    """None when ``pdml._C`` loaded with the op kernels, else why not."""
    try:
        import pdml._C  # noqa: F401  (registers the ops through TORCH_LIBRARY)
    except ImportError as err:
        return (f"pdml._C is not built or does not load ({err}); build it with "
                "`pip install --no-build-isolation -e .`")
    if not hasattr(torch.ops.pdml, "patch_nce"):
        return "pdml._C is an older build without the op kernels; rebuild it"
    return None


LOAD_ERROR = _load()


def build_info() -> Optional[str]:
    """What ``pdml._C`` contains, e.g. ``"cpu,cuda:800,900"``; None if it is not loaded."""
    return None if LOAD_ERROR else torch.ops.pdml.build_info()


def cuda_archs() -> tuple[int, ...]:
    """The CUDA architectures the kernels were compiled for, e.g. ``(800, 900)``."""
    info = build_info() or ""
    for part in info.split(",cuda:")[1:]:
        return tuple(int(a) for a in part.split(",") if a.strip().isdigit())
    return ()


@functools.lru_cache(maxsize=None)
def _why_not_cuda_device(index: int) -> Optional[str]:
    archs = cuda_archs()
    if not archs:
        return f"pdml._C was built without CUDA kernels ({build_info()})"
    major, minor = torch.cuda.get_device_capability(index)
    cc = major * 100 + minor * 10
    # A cubin for sm_XY runs on sm_XZ with Z >= Y (no PTX is embedded).
    if not any(a // 100 == major and a <= cc for a in archs):
        return f"pdml._C has CUDA code for sm {archs}, not for this GPU (sm_{major}{minor})"
    return None


def _unsupported(t: torch.Tensor) -> Optional[str]:
    if t.device.type == "cpu":
        return None  # float32/float64/float16/bfloat16
    if t.device.type == "cuda":
        if t.dtype == torch.float64:
            return "the CUDA kernels take float32, float16 or bfloat16 features, not float64"
        if not cuda_archs():
            return f"pdml._C was built without CUDA kernels ({build_info()})"
        return _why_not_cuda_device(device_index(t))
    return f"pdml._C has no kernels for {t.device.type} tensors"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _defines(op: str) -> bool:
    """Whether the loaded ``pdml._C`` defines ``pdml::<op>`` (older builds lack gather_project)."""
    return LOAD_ERROR is None and hasattr(torch.ops.pdml, op)


def _fake(op: str):
    """Decorator: the function is the fake (meta) impl of ``pdml::<op>``, registered when
    ``pdml._C`` defines the op."""
    def register(fn):
        if _defines(op):
            torch.library.register_fake(f"pdml::{op}")(fn)
        return fn
    return register


def _autograd(op: str, setup_context):
    """Decorator: the function is the autograd formula of ``pdml::<op>`` (with its
    ``setup_context``), registered when ``pdml._C`` defines the op."""
    def register(fn):
        if _defines(op):
            torch.library.register_autograd(f"pdml::{op}", fn, setup_context=setup_context)
        return fn
    return register


# ---------------------------------------------------------------------- pdml::patch_nce

@_fake("patch_nce")
def _(fq, fk, ids, tau, groups):
    rows = fq.shape[0] * ids.shape[0]
    acc = _acc_dtype(fq.dtype)
    return fq.new_empty(rows, dtype=acc), fq.new_empty(rows, dtype=acc)


@_fake("patch_nce_backward")
def _(grad_loss, fq, fk, ids, loss, lse, tau, groups):
    return fq.new_empty(fq.shape)


def _patch_nce_setup(ctx, inputs, output):
    fq, fk, ids, tau, groups = inputs
    ctx.save_for_backward(fq, fk, ids, output[0], output[1])
    ctx.tau, ctx.groups = tau, groups
    ctx.mark_non_differentiable(output[1])


@_autograd("patch_nce", _patch_nce_setup)
def _patch_nce_grad(ctx, grad_loss, _grad_lse):
    fq, fk, ids, loss, lse = ctx.saved_tensors
    if creating_graph():
        return tuple(reference_grads(reference.map_nce, (fq, fk, ids, ctx.tau, ctx.groups),
                                     ctx.needs_input_grad, grad_loss))
    grad_fq = None
    if ctx.needs_input_grad[0]:
        grad_fq = torch.ops.pdml.patch_nce_backward(grad_loss, fq, fk, ids, loss, lse, ctx.tau, ctx.groups)
    return grad_fq, None, None, None, None  # fk is detached (CUT)


# ---------------------------------------------------------------------- pdml::patch_nce_with_grad

@_fake("patch_nce_with_grad")
def _(fq, fk, ids, tau, groups):
    rows = fq.shape[0] * ids.shape[0]
    acc = _acc_dtype(fq.dtype)
    return (fq.new_empty(rows, dtype=acc), fq.new_empty(rows, dtype=acc),
            fq.new_empty((rows, fq.shape[1]), dtype=acc))


@_fake("patch_nce_with_grad_backward")
def _(grad_loss, d_rows, fq, ids):
    return fq.new_empty(fq.shape)


def _patch_nce_with_grad_setup(ctx, inputs, output):
    fq, fk, ids, tau, groups = inputs
    ctx.save_for_backward(fq, fk, ids, output[2])
    ctx.tau, ctx.groups = tau, groups
    ctx.mark_non_differentiable(output[1], output[2])


def _nce_map_grad(fq, fk, ids, d_rows, tau, groups, needs_input_grad, grad_loss) -> tuple:
    """The gradient of the map-form PatchNCE from ``d_rows`` (∂loss_r/∂q_r, [B·N, C] acc, from
    the forward's sweep): row r scaled by ``grad_loss[r]`` and scattered to ``fq``; the
    reference's with a graph under ``create_graph=True``."""
    if creating_graph():
        return tuple(reference_grads(reference.map_nce, (fq, fk, ids, tau, groups), needs_input_grad, grad_loss))
    grad_fq = None
    if needs_input_grad[0]:
        grad_fq = torch.ops.pdml.patch_nce_with_grad_backward(grad_loss, d_rows, fq, ids)
    return grad_fq, None, None, None, None  # fk is detached (CUT)


@_autograd("patch_nce_with_grad", _patch_nce_with_grad_setup)
def _patch_nce_with_grad_grad(ctx, grad_loss, _grad_lse, _grad_d_rows):
    fq, fk, ids, d_rows = ctx.saved_tensors
    return _nce_map_grad(fq, fk, ids, d_rows, ctx.tau, ctx.groups, ctx.needs_input_grad, grad_loss)


# ---------------------------------------------------------------------- pdml::patch_metric

@_fake("patch_metric")
def _(fq, fk, ids, tau, groups, compute_grad):
    acc = _acc_dtype(fq.dtype)
    shape = (fq.shape[0] * ids.shape[0], fq.shape[1]) if compute_grad else (0,)
    return fq.new_empty((), dtype=acc), fq.new_empty(shape, dtype=acc), fq.new_empty(shape, dtype=acc)


@_fake("patch_metric_backward")
def _(grad, d_q, d_k, fq, fk, ids):
    return fq.new_empty(fq.shape), fk.new_empty(fk.shape)


def _metric_setup(ctx, inputs, output):
    """setup_context of both metric ops (map and rows form): their feature inputs (and ids)
    and the gradients ``d_q``, ``d_k`` the forward kept."""
    *features, tau, groups, compute_grad = inputs
    ctx.save_for_backward(*features, output[1], output[2])
    ctx.tau, ctx.groups, ctx.compute_grad = tau, groups, compute_grad
    ctx.mark_non_differentiable(output[1], output[2])


def _check_kept_grads(ctx, op: str) -> None:
    """A metric op's backward scales the gradients its forward kept: none without compute_grad."""
    if not ctx.compute_grad:
        raise RuntimeError(f"pdml::{op} ran with compute_grad=False, so it has no "
                           "gradient to give; call it with compute_grad=True")


@_autograd("patch_metric", _metric_setup)
def _patch_metric_grad(ctx, grad, _grad_d_q, _grad_d_k):
    _check_kept_grads(ctx, "patch_metric")
    fq, fk, ids, d_q, d_k = ctx.saved_tensors
    if creating_graph():
        return tuple(reference_grads(reference.map_metric, (fq, fk, ids, ctx.tau, ctx.groups, None),
                                     ctx.needs_input_grad, grad))
    grad_fq, grad_fk = torch.ops.pdml.patch_metric_backward(grad, d_q, d_k, fq, fk, ids)
    return grad_fq, grad_fk, None, None, None, None


# ---------------------------------------------------------------------- pdml::patch_similarity

@_fake("patch_similarity")
def _(fq, fk, ids):
    n = ids.shape[0]
    return fq.new_empty((fq.shape[0], n, n), dtype=_acc_dtype(fq.dtype))


@_fake("patch_similarity_backward")
def _(grad, fq, fk, ids):
    return fq.new_empty(fq.shape), fk.new_empty(fk.shape)


def _patch_similarity_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@_autograd("patch_similarity", _patch_similarity_setup)
def _patch_similarity_grad(ctx, grad):
    fq, fk, ids = ctx.saved_tensors
    if creating_graph():
        return tuple(reference_grads(reference.patch_similarity, (fq, fk, ids), ctx.needs_input_grad, grad))
    grad_fq, grad_fk = torch.ops.pdml.patch_similarity_backward(grad, fq, fk, ids)
    return grad_fq, grad_fk, None


# ---------------------------------------------------------------------- pdml::patch_nce_rows

@_fake("patch_nce_rows")
def _(feat_q, feat_k, tau, groups):
    acc = _acc_dtype(feat_q.dtype)
    return feat_q.new_empty(feat_q.shape[0], dtype=acc), feat_q.new_empty(feat_q.shape[0], dtype=acc)


@_fake("patch_nce_rows_backward")
def _(grad_loss, feat_q, feat_k, loss, lse, tau, groups):
    return feat_q.new_empty(feat_q.shape)


def _patch_nce_rows_setup(ctx, inputs, output):
    feat_q, feat_k, tau, groups = inputs
    ctx.save_for_backward(feat_q, feat_k, output[0], output[1])
    ctx.tau, ctx.groups = tau, groups
    ctx.mark_non_differentiable(output[1])


@_autograd("patch_nce_rows", _patch_nce_rows_setup)
def _patch_nce_rows_grad(ctx, grad_loss, _grad_lse):
    feat_q, feat_k, loss, lse = ctx.saved_tensors
    if creating_graph():
        return tuple(reference_grads(reference.rows_nce, (feat_q, feat_k, ctx.tau, ctx.groups),
                                     ctx.needs_input_grad, grad_loss))
    grad_q = None
    if ctx.needs_input_grad[0]:
        grad_q = torch.ops.pdml.patch_nce_rows_backward(grad_loss, feat_q, feat_k, loss, lse, ctx.tau, ctx.groups)
    return grad_q, None, None, None


def _nce_rows_grad(feat_q, feat_k, d_q, tau, groups, needs_input_grad, grad_loss) -> tuple:
    """The gradient of the rows-form PatchNCE from ``d_q`` (∂loss_i/∂feat_q_i, [R, C] acc, from
    the forward's sweep): row i scaled by ``grad_loss[i]``; the reference's with a graph
    under ``create_graph=True``."""
    if creating_graph():
        return tuple(reference_grads(reference.rows_nce, (feat_q, feat_k, tau, groups),
                                     needs_input_grad, grad_loss))
    return (d_q * grad_loss.to(d_q.dtype).unsqueeze(1)).to(feat_q.dtype), None, None, None


@_fake("patch_nce_rows_with_grad")
def _(feat_q, feat_k, tau, groups):
    acc = _acc_dtype(feat_q.dtype)
    rows = feat_q.shape[0]
    return (feat_q.new_empty(rows, dtype=acc), feat_q.new_empty(rows, dtype=acc),
            feat_q.new_empty(feat_q.shape, dtype=acc))


def _patch_nce_rows_with_grad_setup(ctx, inputs, output):
    feat_q, feat_k, tau, groups = inputs
    ctx.save_for_backward(feat_q, feat_k, output[2])
    ctx.tau, ctx.groups = tau, groups
    ctx.mark_non_differentiable(output[1], output[2])


@_autograd("patch_nce_rows_with_grad", _patch_nce_rows_with_grad_setup)
def _patch_nce_rows_with_grad_grad(ctx, grad_loss, _grad_lse, _grad_d_q):
    feat_q, feat_k, d_q = ctx.saved_tensors
    return _nce_rows_grad(feat_q, feat_k, d_q, ctx.tau, ctx.groups, ctx.needs_input_grad, grad_loss)


# ---------------------------------------------------------------------- pdml::patch_metric_rows

@_fake("patch_metric_rows")
def _(feat_q, feat_k, tau, groups, compute_grad):
    acc = _acc_dtype(feat_q.dtype)
    shape = feat_q.shape if compute_grad else (0,)
    return feat_q.new_empty((), dtype=acc), feat_q.new_empty(shape, dtype=acc), feat_q.new_empty(shape, dtype=acc)


@_autograd("patch_metric_rows", _metric_setup)
def _patch_metric_rows_grad(ctx, grad, _grad_d_q, _grad_d_k):
    _check_kept_grads(ctx, "patch_metric_rows")
    feat_q, feat_k, d_q, d_k = ctx.saved_tensors
    if creating_graph():
        return tuple(reference_grads(reference.rows_metric, (feat_q, feat_k, ctx.tau, ctx.groups, None),
                                     ctx.needs_input_grad, grad))
    return (d_q * grad).to(feat_q.dtype), (d_k * grad).to(feat_k.dtype), None, None, None


# ---------------------------------------------------------------------- pdml::gather_project

@_fake("gather_project")
def _(fmap, ids, weight, bias):
    return fmap.new_empty(fmap.shape[0] * ids.shape[0], weight.shape[0])


@_fake("gather_project_backward")
def _(grad, fmap, ids, weight, bias_grad):
    # the kernels allocate grad_fmap with zeros_like(fmap): fmap's memory format when dense
    return (torch.empty_like(fmap), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[0] if bias_grad else 0))


def _gather_project_setup(ctx, inputs, output):
    fmap, ids, weight, bias = inputs
    ctx.save_for_backward(fmap, ids, weight, bias)
    ctx.has_bias = bias is not None


@_autograd("gather_project", _gather_project_setup)
def _gather_project_grad(ctx, grad):
    fmap, ids, weight, bias = ctx.saved_tensors
    if creating_graph():
        return tuple(reference_grads(reference.gather_project, (fmap, ids, weight, bias),
                                     ctx.needs_input_grad, grad))
    need_fmap, _, need_weight, need_bias = ctx.needs_input_grad
    bias_grad = ctx.has_bias and need_bias
    grad_fmap, grad_weight, grad_bias = torch.ops.pdml.gather_project_backward(grad, fmap, ids, weight, bias_grad)
    return (grad_fmap if need_fmap else None, None, grad_weight if need_weight else None,
            grad_bias if bias_grad else None)


# ---------------------------------------------------------------------- backend callables
# Validated arguments (pdml/_validation.py), named as registry.Backend's fields.

class _NceOneSweep(torch.autograd.Function):
    """Map-form PatchNCE on CPU from one sweep (``patch_nce_with_grad``): the forward keeps
    ∂loss_r/∂q_r, the backward scales and scatters it. A plain autograd Function, as
    :class:`_NceRowsOneSweep`, for the same reason."""

    @staticmethod
    def forward(ctx, fq, fk, ids, tau, groups):
        loss, _, d_rows = torch.ops.pdml.patch_nce_with_grad(fq, fk, ids, tau, groups)
        ctx.save_for_backward(fq, fk, ids, d_rows)
        ctx.tau, ctx.groups = tau, groups
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        fq, fk, ids, d_rows = ctx.saved_tensors
        return _nce_map_grad(fq, fk, ids, d_rows, ctx.tau, ctx.groups, ctx.needs_input_grad, grad_loss)


def patch_nce(fq, fk, ids, tau, groups):
    if fq.device.type == "cpu" and _needs_grad(fq):
        # One CPU sweep gives the loss and the rows' gradient (as patch_nce_rows below); the
        # backward then neither gathers again nor recomputes the similarities (measured at
        # the paper's shape in benchmarks/bench_ext_cpu.py). torch.compile traces the op and
        # its registered autograd; eager calls take the cheaper plain Function.
        if torch.compiler.is_compiling():
            return torch.ops.pdml.patch_nce_with_grad(fq, fk, ids, tau, groups)[0]
        return _NceOneSweep.apply(fq, fk, ids, tau, groups)
    return torch.ops.pdml.patch_nce(fq, fk, ids, tau, groups)[0]


def patch_metric(fq, fk, ids, tau, groups):
    return torch.ops.pdml.patch_metric(fq, fk, ids, tau, groups, _needs_grad(fq, fk))[0]


def patch_similarity(fq, fk, ids):
    return torch.ops.pdml.patch_similarity(fq, fk, ids)


class _NceRowsOneSweep(torch.autograd.Function):
    """Rows-form PatchNCE on CPU from one sweep (``patch_nce_rows_with_grad``): the forward
    keeps ∂loss_i/∂feat_q_i, the backward scales it row by row. A plain autograd Function:
    its call costs a fraction of the Python backward of a custom op at the paper's shape."""

    @staticmethod
    def forward(ctx, feat_q, feat_k, tau, groups):
        loss, _, d_q = torch.ops.pdml.patch_nce_rows_with_grad(feat_q, feat_k, tau, groups)
        ctx.save_for_backward(feat_q, feat_k, d_q)
        ctx.tau, ctx.groups = tau, groups
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        feat_q, feat_k, d_q = ctx.saved_tensors
        return _nce_rows_grad(feat_q, feat_k, d_q, ctx.tau, ctx.groups, ctx.needs_input_grad, grad_loss)


def patch_nce_rows(feat_q, feat_k, tau, groups):
    if feat_q.device.type == "cpu" and _needs_grad(feat_q) and not torch.compiler.is_compiling():
        # One CPU sweep gives the loss and d loss_i / d feat_q_i; the backward scales the
        # rows instead of a second sweep that recomputes the similarities. Through a plain
        # autograd.Function: measured ~10 % faster per call at the paper's shape than the
        # op's registered autograd (which opcheck and torch.compile use).
        return _NceRowsOneSweep.apply(feat_q, feat_k, tau, groups)
    return torch.ops.pdml.patch_nce_rows(feat_q, feat_k, tau, groups)[0]


def patch_metric_rows(feat_q, feat_k, tau, groups):
    return torch.ops.pdml.patch_metric_rows(feat_q, feat_k, tau, groups, _needs_grad(feat_q, feat_k))[0]


def gather_project(fmap, ids, weight, bias):
    return torch.ops.pdml.gather_project(fmap, ids, weight, bias)


register_module_backend("ext", globals(), load_error=LOAD_ERROR, unavailable=lambda: None,
                        unsupported=_unsupported, has_op=_defines)
