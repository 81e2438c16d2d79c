"""pdml's ops: input validation, backend choice, and the backend registry.

The fused backends register their custom ops (schema, fake impl, autograd) in
:mod:`pdml._ops_triton` and :mod:`pdml._ops_ext`, imported at the end of this module.

Public functions (DESIGN.md §2):

- map form (gather + normalise + similarity + loss fused):
  ``patch_nce(fq, fk, ids, tau, negatives, backend)`` -> ``[B·N]`` float32,
  ``patch_metric(fq, fk, ids, tau, negatives, backend)`` -> scalar float32,
  ``patch_similarity(fq, fk, ids, backend)`` -> ``[B, N, N]`` float32;
- rows form (CUT drop-in, rows already gathered and normalised):
  ``patch_nce_rows(feat_q, feat_k, tau, batch_size, negatives, backend)``,
  ``patch_metric_rows(feat_q, feat_k, tau, batch_size, negatives, backend)``.

``backend``: ``"auto" | "reference" | "triton" | "ext"``; the environment variable
``PDML_BACKEND`` overrides ``"auto"``. ``"auto"`` picks, for a CUDA tensor, triton,
else ext, else reference; for a CPU tensor, ext if built, else reference; it skips a
backend that does not support the tensor's dtype and so never fails for lack of one.
A backend asked for by name that cannot run raises ``RuntimeError`` saying why.

Every input is validated before any kernel runs (``TypeError`` for a wrong type or
dtype, ``ValueError`` for a wrong shape or value, naming the argument). The checks
that need the ids' values (range, distinctness) synchronise with the device; under
``torch.compile`` they are skipped here and the fused backends run
:func:`check_ids_values` inside their op implementations instead, so no kernel ever
indexes out of bounds. NaN/inf checking of the features is off by default (it reads
every feature): turn it on with :func:`set_check_finite` or ``PDML_CHECK_FINITE=1``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pdml import reference

BACKEND_NAMES = ("auto", "reference", "triton", "ext")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_check_finite = os.environ.get("PDML_CHECK_FINITE", "0") not in ("", "0")


def set_check_finite(enabled: bool) -> None:
    """Turn the NaN/inf check of the features on or off (default: ``PDML_CHECK_FINITE``)."""
    global _check_finite
    _check_finite = bool(enabled)


# --------------------------------------------------------------------------- validation

def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_features(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if _check_finite and not _is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def _check_pair(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, "
                         f"got {a.device} and {b.device}")


def check_ids_values(ids: torch.Tensor, hw: int) -> None:
    """Raise ValueError unless every id is in ``[0, hw)`` and all are distinct.

    One host synchronisation; the details are worked out only on failure.
    """
    s = torch.sort(ids).values
    bad = (s[0] < 0) | (s[-1] >= hw)
    if s.numel() > 1:
        bad = bad | (s[1:] == s[:-1]).any()
    if not bool(bad):
        return
    lo, hi = int(s[0]), int(s[-1])
    if lo < 0 or hi >= hw:
        raise ValueError(f"ids must lie in [0, H*W) = [0, {hw}), got values in [{lo}, {hi}]")
    dup = s[1:][s[1:] == s[:-1]]
    raise ValueError(f"ids must be distinct, got repeated values {dup.unique()[:8].tolist()}")


def _check_ids(ids, fmap: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor of int64, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor (int64), got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"ids must have shape [N], got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("ids must not be empty")
    if ids.device != fmap.device:
        raise ValueError(f"ids must be on the features' device {fmap.device}, got {ids.device}")
    ids = ids.to(torch.int64)
    if not _is_compiling():
        check_ids_values(ids, fmap.shape[2] * fmap.shape[3])
    return ids


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    tau = float(tau)
    if not (tau > 0.0 and tau < float("inf")):
        raise ValueError(f"tau must be a positive finite float, got {tau}")
    return tau


def _check_negatives(negatives) -> str:
    if negatives not in reference.NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {reference.NEGATIVE_MODES}, got {negatives!r}")
    return negatives


def _check_batch_size(batch_size, rows: Optional[int] = None) -> int:
    """A positive int; when ``rows`` is given, also a divisor of it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rows is not None and rows % batch_size != 0:
        raise ValueError(f"batch_size={batch_size} must divide the number of rows of feat_q ({rows})")
    return batch_size


def _validate_map(fq, fk, ids) -> torch.Tensor:
    _check_features("fq", fq, 4, "[B, C, H, W]")
    _check_features("fk", fk, 4, "[B, C, H, W]")
    _check_pair("fq", fq, "fk", fk)
    return _check_ids(ids, fq)


def _validate_rows(feat_q, feat_k, batch_size) -> int:
    _check_features("feat_q", feat_q, 2, "[B·N, C]")
    _check_features("feat_k", feat_k, 2, "[B·N, C]")
    _check_pair("feat_q", feat_q, "feat_k", feat_k)
    return _check_batch_size(batch_size, feat_q.shape[0])


# --------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Backend:
    """One implementation of every op.

    ``unavailable()`` -> why it cannot run at all (None when it can);
    ``unsupported(t)`` -> why it cannot run on tensor ``t`` (device, dtype), or None.
    The op callables take validated arguments, in the public functions' order.
    """
    name: str
    unavailable: Callable[[], Optional[str]]
    unsupported: Callable[[torch.Tensor], Optional[str]]
    patch_nce: Callable[..., torch.Tensor]
    patch_metric: Callable[..., torch.Tensor]
    patch_similarity: Callable[..., torch.Tensor]
    patch_nce_rows: Callable[..., torch.Tensor]
    patch_metric_rows: Callable[..., torch.Tensor]


_REGISTRY: dict[str, Backend] = {}
_UNBUILT: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


_REGISTRY["reference"] = Backend(
    name="reference",
    unavailable=lambda: None,
    unsupported=lambda t: None,
    patch_nce=reference.patch_nce,
    patch_metric=reference.patch_metric,
    patch_similarity=reference.patch_similarity,
    patch_nce_rows=reference.patch_nce_rows,
    patch_metric_rows=reference.patch_metric_rows,
)


def _why_not(name: str, t: Optional[torch.Tensor]) -> Optional[str]:
    backend = _REGISTRY.get(name)
    if backend is None:
        return _UNBUILT.get(name, "it is not part of this build of pdml")
    reason = backend.unavailable()
    if reason is None and t is not None:
        reason = backend.unsupported(t)
    return reason


def available_backends(t: Optional[torch.Tensor] = None) -> dict[str, Optional[str]]:
    """``{name: None if it can run (on ``t`` when given) else the reason}``."""
    return {name: _why_not(name, t) for name in BACKEND_NAMES[1:]}


def auto_order(t: torch.Tensor) -> tuple[str, ...]:
    return ("triton", "ext", "reference") if t.device.type == "cuda" else ("ext", "reference")


def resolve_backend(backend: str, t: torch.Tensor) -> Backend:
    """The backend that runs an op on tensor ``t`` (see the module docstring)."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("PDML_BACKEND", "auto") or "auto"
        if env not in BACKEND_NAMES:
            raise ValueError(f"PDML_BACKEND must be one of {BACKEND_NAMES}, got {env!r}")
        backend = env
    if backend == "auto":
        for name in auto_order(t):
            if _why_not(name, t) is None:
                return _REGISTRY[name]
        raise AssertionError("the reference backend always runs")  # pragma: no cover
    reason = _why_not(backend, t)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return _REGISTRY[backend]


# --------------------------------------------------------------------------- public ops

def patch_nce(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor, tau: float = 0.07,
              negatives: str = "image", backend: str = "auto") -> torch.Tensor:
    """CUT's PatchNCE, fused: ``fq, fk [B, C, H, W]``, ``ids [N]`` -> per-row loss ``[B·N]``.

    Rows are image-major (``b*N + i``); the loss is float32 (float64 for float64
    inputs); ``fk`` gets no gradient (CUT detaches it).
    """
    ids = _validate_map(fq, fk, ids)
    tau, negatives = _check_tau(tau), _check_negatives(negatives)
    return resolve_backend(backend, fq).patch_nce(fq, fk, ids, tau, negatives)


def patch_metric(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor, tau: float = 0.15,
                 negatives: str = "image", backend: str = "auto") -> torch.Tensor:
    """The paper's patch-wise metric loss, fused: ``fq, fk [B, C, H, W]``, ``ids [N]`` -> scalar.

    float32 (float64 for float64 inputs); gradients flow to both maps.
    """
    ids = _validate_map(fq, fk, ids)
    tau, negatives = _check_tau(tau), _check_negatives(negatives)
    return resolve_backend(backend, fq).patch_metric(fq, fk, ids, tau, negatives)


def patch_similarity(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor,
                     backend: str = "auto") -> torch.Tensor:
    """Normalised ``q̂ k̂ᵀ`` per image, for inspection: -> ``[B, N, N]`` float32."""
    ids = _validate_map(fq, fk, ids)
    return resolve_backend(backend, fq).patch_similarity(fq, fk, ids)


def patch_nce_rows(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float = 0.07,
                   batch_size: int = 1, negatives: str = "image",
                   backend: str = "auto") -> torch.Tensor:
    """CUT's PatchNCELoss on rows ``[B·N, C]`` (already normalised) -> ``[B·N]``."""
    batch_size = _validate_rows(feat_q, feat_k, batch_size)
    tau, negatives = _check_tau(tau), _check_negatives(negatives)
    return resolve_backend(backend, feat_q).patch_nce_rows(feat_q, feat_k, tau, batch_size, negatives)


def patch_metric_rows(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float = 0.15,
                      batch_size: int = 1, negatives: str = "image",
                      backend: str = "auto") -> torch.Tensor:
    """DML_CT's PatchMetricLoss on rows ``[B·N, C]`` (already normalised) -> scalar."""
    batch_size = _validate_rows(feat_q, feat_k, batch_size)
    tau, negatives = _check_tau(tau), _check_negatives(negatives)
    return resolve_backend(backend, feat_q).patch_metric_rows(feat_q, feat_k, tau, batch_size, negatives)


# --------------------------------------------------------------------------- backends
# Each fused backend registers its custom ops (schema, fake impl, autograd) and calls
# register_backend() from its own module, or records in _UNBUILT why it cannot.
from pdml import _ops_ext, _ops_triton  # noqa: E402,F401
