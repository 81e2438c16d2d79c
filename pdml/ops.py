"""pdml's public ops: validate the inputs, pick a backend, call it (docs/layout.md).

The math of every op is in docs/ops.md.

- map form (gather + normalise + similarity + loss fused):
  ``patch_nce(fq, fk, ids, tau, negatives, backend)`` -> ``[B·N]`` float32,
  ``patch_metric(fq, fk, ids, tau, negatives, backend)`` -> scalar float32,
  ``patch_similarity(fq, fk, ids, backend)`` -> ``[B, N, N]`` float32;
- rows form (CUT drop-in, rows already gathered and normalised):
  ``patch_nce_rows(feat_q, feat_k, tau, batch_size, negatives, backend)``,
  ``patch_metric_rows(feat_q, feat_k, tau, batch_size, negatives, backend)``;
- several layers of equal shape in one backend call: ``patch_nce_layers``,
  ``patch_metric_layers`` (lists of maps sharing ``ids``), ``patch_nce_rows_layers``,
  ``patch_metric_rows_layers`` (the layers' rows stacked ``[L·R, C]``);
- ``gather_project(fmap, ids, weight, bias, backend)`` -> ``[B·N, D]``.

``backend``: ``"auto" | "reference" | "triton" | "ext"``; the environment variable
``PDML_BACKEND`` overrides ``"auto"``; see :func:`pdml.backends.registry.resolve_backend`.
Every input is validated before any kernel runs (:mod:`pdml._validation`: ``TypeError``
for a wrong type or dtype, ``ValueError`` for a wrong shape or value, naming the
argument; the metric loss also refuses a τ so small that its sums overflow,
:func:`pdml._validation.metric_tau_min`). NaN/inf checking of the features is off by
default: :func:`set_check_finite` or ``PDML_CHECK_FINITE=1`` turns it on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from pdml import _validation as v
from pdml._validation import set_check_finite  # noqa: F401  (public here)
from pdml.backends import (BACKEND_NAMES, auto_order, available_backends,  # noqa: F401
                           resolve_backend)

__all__ = [
    "patch_nce", "patch_metric", "patch_similarity", "patch_nce_rows", "patch_metric_rows",
    "patch_nce_layers", "patch_metric_layers", "patch_nce_rows_layers", "patch_metric_rows_layers",
    "gather_project", "set_check_finite", "BACKEND_NAMES", "available_backends", "resolve_backend",
    "auto_order",
]


# --------------------------------------------------------------------------- map form

def patch_nce(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor, tau: float = 0.07,
              negatives: str = "image", backend: str = "auto") -> torch.Tensor:
    """CUT's PatchNCE, fused: ``fq, fk [B, C, H, W]``, ``ids [N]`` -> per-row loss ``[B·N]``.

    Rows are image-major (``b*N + i``); the loss is float32 (float64 for float64
    inputs); ``fk`` gets no gradient (CUT detaches it).
    """
    ids = v.validate_map(fq, fk, ids)
    tau, groups = v.check_tau(tau), v.groups_of(negatives, fq.shape[0])
    return resolve_backend(backend, fq, "patch_nce").patch_nce(fq, fk, ids, tau, groups)


def patch_metric(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor, tau: float = 0.15,
                 negatives: str = "image", backend: str = "auto") -> torch.Tensor:
    """The paper's patch-wise metric loss, fused: ``fq, fk [B, C, H, W]``, ``ids [N]`` -> scalar.

    float32 (float64 for float64 inputs); gradients flow to both maps.
    """
    ids = v.validate_map(fq, fk, ids)
    tau, groups = v.check_metric_tau(tau, fq.dtype), v.groups_of(negatives, fq.shape[0])
    return resolve_backend(backend, fq, "patch_metric").patch_metric(fq, fk, ids, tau, groups)


def patch_similarity(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor,
                     backend: str = "auto") -> torch.Tensor:
    """Normalised ``q̂ k̂ᵀ`` per image, for inspection: -> ``[B, N, N]`` float32."""
    ids = v.validate_map(fq, fk, ids)
    return resolve_backend(backend, fq, "patch_similarity").patch_similarity(fq, fk, ids)


# --------------------------------------------------------------------------- rows form

def patch_nce_rows(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float = 0.07,
                   batch_size: int = 1, negatives: str = "image",
                   backend: str = "auto") -> torch.Tensor:
    """CUT's PatchNCELoss on rows ``[B·N, C]`` (already normalised) -> ``[B·N]``."""
    batch_size = v.validate_rows(feat_q, feat_k, batch_size)
    tau, groups = v.check_tau(tau), v.groups_of(negatives, batch_size)
    return resolve_backend(backend, feat_q, "patch_nce_rows").patch_nce_rows(feat_q, feat_k, tau, groups)


def patch_metric_rows(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float = 0.15,
                      batch_size: int = 1, negatives: str = "image",
                      backend: str = "auto") -> torch.Tensor:
    """DML_CT's PatchMetricLoss on rows ``[B·N, C]`` (already normalised) -> scalar."""
    batch_size = v.validate_rows(feat_q, feat_k, batch_size)
    tau, groups = v.check_metric_tau(tau, feat_q.dtype), v.groups_of(negatives, batch_size)
    return resolve_backend(backend, feat_q, "patch_metric_rows").patch_metric_rows(feat_q, feat_k, tau, groups)


# --------------------------------------------------------------------------- several layers, one call
# The layers' rows are stacked; each layer's groups become consecutive groups of the one
# call, so its number of groups is layers × the groups of one layer (docs/ops.md).

def patch_nce_rows_layers(feat_q: torch.Tensor, feat_k: torch.Tensor, layers: int, tau: float = 0.07,
                          batch_size: int = 1, negatives: str = "image",
                          backend: str = "auto") -> torch.Tensor:
    """CUT's PatchNCELoss of ``layers`` layers of rows ``[R, C]`` stacked ``[L·R, C]`` -> ``[L, R]``.

    Layer ``l`` is rows ``l·R .. (l+1)·R - 1``; row ``l`` of the result equals
    ``patch_nce_rows(feat_q[l·R:(l+1)·R], feat_k[l·R:(l+1)·R], tau, batch_size, negatives)``.
    """
    layers, batch_size = v.validate_rows_layers(feat_q, feat_k, layers, batch_size)
    tau, groups = v.check_tau(tau), layers * v.groups_of(negatives, batch_size)
    run = resolve_backend(backend, feat_q, "patch_nce_rows").patch_nce_rows
    return run(feat_q, feat_k, tau, groups).view(layers, -1)


def patch_metric_rows_layers(feat_q: torch.Tensor, feat_k: torch.Tensor, layers: int, tau: float = 0.15,
                             batch_size: int = 1, negatives: str = "image",
                             backend: str = "auto") -> torch.Tensor:
    """DML_CT's PatchMetricLoss of ``layers`` layers of rows stacked ``[L·R, C]`` -> scalar:
    the mean over the layers of ``patch_metric_rows`` of each layer's ``R`` rows."""
    layers, batch_size = v.validate_rows_layers(feat_q, feat_k, layers, batch_size)
    tau, groups = v.check_metric_tau(tau, feat_q.dtype), layers * v.groups_of(negatives, batch_size)
    run = resolve_backend(backend, feat_q, "patch_metric_rows").patch_metric_rows
    return run(feat_q, feat_k, tau, groups)


def _stack_maps(fqs: Sequence[torch.Tensor], fks: Sequence[torch.Tensor], ids, negatives):
    ids = v.validate_map_layers(fqs, fks, ids)
    groups = len(fqs) * v.groups_of(negatives, fqs[0].shape[0])
    fq = fqs[0] if len(fqs) == 1 else torch.cat(list(fqs))
    fk = fks[0] if len(fks) == 1 else torch.cat(list(fks))
    return fq, fk, ids, groups


def patch_nce_layers(fqs: Sequence[torch.Tensor], fks: Sequence[torch.Tensor], ids: torch.Tensor,
                     tau: float = 0.07, negatives: str = "image", backend: str = "auto") -> torch.Tensor:
    """PatchNCE of L layers' maps of equal shape ``[B, C, H, W]`` sharing ``ids`` -> ``[L, B·N]``.

    One backend call on the maps stacked along the batch dim; row ``l`` equals
    ``patch_nce(fqs[l], fks[l], ids, tau, negatives)``.
    """
    fq, fk, ids, groups = _stack_maps(fqs, fks, ids, negatives)
    tau = v.check_tau(tau)
    return resolve_backend(backend, fq, "patch_nce").patch_nce(fq, fk, ids, tau, groups).view(len(fqs), -1)


def patch_metric_layers(fqs: Sequence[torch.Tensor], fks: Sequence[torch.Tensor], ids: torch.Tensor,
                        tau: float = 0.15, negatives: str = "image", backend: str = "auto") -> torch.Tensor:
    """Metric loss of L layers' maps of equal shape ``[B, C, H, W]`` sharing ``ids`` -> scalar:
    the mean over the layers of ``patch_metric(fqs[l], fks[l], ids, tau, negatives)``.
    One backend call on the maps stacked along the batch dim."""
    fq, fk, ids, groups = _stack_maps(fqs, fks, ids, negatives)
    tau = v.check_metric_tau(tau, fq.dtype)
    return resolve_backend(backend, fq, "patch_metric").patch_metric(fq, fk, ids, tau, groups)


# --------------------------------------------------------------------------- projection

def gather_project(fmap: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Gather the pixels ``ids`` of ``fmap [B, F, H, W]`` and project them by a linear layer
    ``weight [D, F]``, ``bias [D]`` or None -> ``[B·N, D]`` in fmap's dtype.

    Row ``b*N + i`` is ``fmap[b, :, ids[i]] @ weight.T + bias`` (image-major). Gradients
    flow to ``fmap`` (zero off the sampled pixels), ``weight`` and ``bias``.
    """
    ids = v.validate_gather_project(fmap, ids, weight, bias)
    return resolve_backend(backend, fmap, "gather_project").gather_project(fmap, ids, weight, bias)
