"""The registry of pdml's backends and the choice of one for an op (docs/layout.md).

A :class:`Backend` holds one callable per op (``None`` for an op it lacks). The backend
modules register themselves (:func:`register_backend`) or record why they cannot run
(:func:`mark_unavailable`). :func:`resolve_backend` picks the backend for an op:

``"auto"`` (or the name in ``PDML_BACKEND``, which overrides ``"auto"``) tries, for a CUDA
tensor, triton, then ext, then reference; for a CPU tensor, ext, then reference. It skips a
backend that cannot run on the tensor (device, dtype, build) or lacks the op, so it never
fails for lack of one. A backend asked for by name that cannot run the op raises
``RuntimeError`` saying why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional

import torch

BACKEND_NAMES = ("auto", "reference", "triton", "ext")


@dataclass(frozen=True)
class Backend:
    """One implementation of pdml's ops; validated arguments in, tensors out.

    ``unavailable()`` -> why the backend cannot run at all (None when it can);
    ``unsupported(t)`` -> why it cannot run on tensor ``t`` (device, dtype), or None.
    The op callables (``groups`` = the number of groups of negatives, docs/ops.md):

    - ``patch_nce(fq, fk, ids, tau, groups) -> [B·N]`` (float32; float64 for float64)
    - ``patch_metric(fq, fk, ids, tau, groups) -> scalar``
    - ``patch_similarity(fq, fk, ids) -> [B, N, N]``
    - ``patch_nce_rows(feat_q, feat_k, tau, groups) -> [R]``
    - ``patch_metric_rows(feat_q, feat_k, tau, groups) -> scalar`` (mean over all groups)
    - ``gather_project(fmap, ids, weight, bias) -> [B·N, D]``

    An op the backend lacks is ``None``: "auto" then skips the backend for that op.
    """
    name: str
    unavailable: Callable[[], Optional[str]]
    unsupported: Callable[[torch.Tensor], Optional[str]]
    patch_nce: Optional[Callable[..., torch.Tensor]] = None
    patch_metric: Optional[Callable[..., torch.Tensor]] = None
    patch_similarity: Optional[Callable[..., torch.Tensor]] = None
    patch_nce_rows: Optional[Callable[..., torch.Tensor]] = None
    patch_metric_rows: Optional[Callable[..., torch.Tensor]] = None
    gather_project: Optional[Callable[..., torch.Tensor]] = None


OP_NAMES = tuple(f.name for f in fields(Backend) if f.name not in ("name", "unavailable", "unsupported"))

_REGISTRY: dict[str, Backend] = {}
_UNAVAILABLE: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    """Make ``backend`` available under ``backend.name`` (one of :data:`BACKEND_NAMES`)."""
    if backend.name not in BACKEND_NAMES[1:]:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {backend.name!r}")
    _REGISTRY[backend.name] = backend
    _UNAVAILABLE.pop(backend.name, None)


def mark_unavailable(name: str, reason: str) -> None:
    """Record why backend ``name`` is not part of this process (e.g. its module failed to load)."""
    _REGISTRY.pop(name, None)
    _UNAVAILABLE[name] = reason


def register_module_backend(name: str, namespace: Mapping[str, Any], *, load_error: Optional[str],
                            unavailable: Callable[[], Optional[str]],
                            unsupported: Callable[[torch.Tensor], Optional[str]],
                            has_op: Callable[[str], bool] = lambda op: True) -> None:
    """The last statement of a backend module: register backend ``name`` whose op callables
    are the functions of ``namespace`` (the module's ``globals()``) named as the ops of
    :data:`OP_NAMES` (an op with no such function, or for which ``has_op(op)`` is false,
    is None) -- or, given ``load_error`` (why the module's kernels cannot load at all),
    :func:`mark_unavailable` it with that reason. Naming the callables as the registry's
    fields keeps one name per op across the layers (docs/layout.md, "Vocabulary")."""
    if load_error is not None:
        mark_unavailable(name, load_error)
        return
    callables = {op: namespace.get(op) if has_op(op) else None for op in OP_NAMES}
    register_backend(Backend(name=name, unavailable=unavailable, unsupported=unsupported, **callables))


def device_index(t) -> int:
    """The CUDA device index of a CUDA tensor or ``torch.device`` (the current device when
    the device carries no index). The one place pdml resolves a device index."""
    device = t if isinstance(t, torch.device) else t.device
    if device.type != "cuda":
        raise ValueError(f"expected a CUDA tensor or device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def _why_not(name: str, t: Optional[torch.Tensor], op: Optional[str]) -> Optional[str]:
    backend = _REGISTRY.get(name)
    if backend is None:
        return _UNAVAILABLE.get(name, "it is not part of this build of pdml")
    if op is not None and getattr(backend, op) is None:
        return f"it has no {op} op"
    reason = backend.unavailable()
    if reason is None and t is not None:
        reason = backend.unsupported(t)
    return reason


def _check_op(op) -> str:
    if op not in OP_NAMES:
        raise ValueError(f"op must be one of {OP_NAMES}, got {op!r}")
    return op


def available_backends(t: Optional[torch.Tensor] = None, op: Optional[str] = None) -> dict[str, Optional[str]]:
    """``{name: None if it can run (on ``t`` / the op ``op`` when given) else the reason}``."""
    if op is not None:
        _check_op(op)
    return {name: _why_not(name, t, op) for name in BACKEND_NAMES[1:]}


def auto_order(t) -> tuple[str, ...]:
    """The backends "auto" tries for tensor ``t``, in order."""
    return ("triton", "ext", "reference") if t.device.type == "cuda" else ("ext", "reference")


def resolve_backend(name: str, t: torch.Tensor, op: str) -> Backend:
    """The backend that runs op ``op`` (one of :data:`OP_NAMES`) on tensor ``t``."""
    _check_op(op)
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        env = os.environ.get("PDML_BACKEND", "auto") or "auto"
        if env not in BACKEND_NAMES:
            raise ValueError(f"PDML_BACKEND must be one of {BACKEND_NAMES}, got {env!r}")
        name = env
    if name == "auto":
        for candidate in auto_order(t):
            if _why_not(candidate, t, op) is None:
                return _REGISTRY[candidate]
        raise RuntimeError(f"no backend can run {op} on this tensor: {available_backends(t, op)}")
    reason = _why_not(name, t, op)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available for {op}: {reason}")
    return _REGISTRY[name]
