"""Pure-PyTorch reference of every pdml op: the oracle of the tests.

Plain autograd, no custom kernels. It materialises the N×N similarity of every
group, so its memory is O(G·n²); the fused backends exist to avoid exactly that.

Conventions (docs/ops.md):
- map form: ``fq``/``fk`` are ``[B, C, H, W]`` feature maps, ``ids`` an int64 ``[N]``
  of distinct flat spatial indices; rows are gathered image-major (row ``b*N + i``
  is ``fq[b, :, ids[i]]``), exactly as CUT's ``PatchSampleF`` orders them, then
  L2-normalised with CUT's ``x / (‖x‖₂ + 1e-7)``.
- rows form: ``feat_q``/``feat_k`` are ``[R, C]``, already gathered and normalised
  by the caller; they are grouped as CUT's ``view(groups, -1, C)``.
- ``negatives="image"``: one group per image; ``"batch"``: all rows form one group.
  The ``map_*`` / ``rows_*`` functions (the reference backend's ops) take the number of
  groups of negatives, ``groups``, instead: consecutive blocks of ``R // groups`` rows.

Numerics: half inputs are computed in ``compute_dtype`` (default float32; float64
inputs stay float64) and the loss is returned in that dtype; gradients come back in
the input dtype through autograd. Passing ``compute_dtype=x.dtype`` gives the
"same-dtype reference" the tests use to size their tolerances.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pdml._validation import NEGATIVE_MODES, groups_of  # noqa: F401  (NEGATIVE_MODES re-exported)

NORM_EPS = 1e-7
"""CUT's ``Normalize``: ``x / (‖x‖₂ + 1e-7)``."""

DIAG_FILL = -10.0
"""CUT's and DML_CT's fill of the self-similarity entries."""


def _compute_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gather_rows(fmap: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` map, ``[N]`` int64 ids -> ``[B, N, C]`` rows (input dtype)."""
    return fmap.flatten(2).index_select(2, ids).transpose(1, 2)


def row_norms(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``‖x‖₂`` along ``dim`` (kept as a size-1 dim), safe from overflow: ``2^e·‖x·2^-e‖₂``
    with ``2^e`` the power of two just above ``max|x|`` (1 for a zero row), so ``Σx²`` never
    overflows while ``‖x‖`` is representable (fp32 features of magnitude 1e20 have
    ``x² = 1e40``; docs/ops.md, step 2). Scaling by a power of two is exact: where the
    plain ``‖x‖₂`` does not overflow, this is the same number.

    The scale is a constant (from detached values): the norm does not depend on it, so
    every derivative (double backward included) is the norm's own.
    """
    absmax = x.detach().abs().amax(dim=dim, keepdim=True)
    limit = int(math.log2(torch.finfo(x.dtype).max)) - 1  # 2^±limit are normal numbers
    exponent = torch.frexp(absmax).exponent.clamp(-limit, limit)  # absmax = f·2^e, f in [0.5, 1)
    one = torch.ones_like(absmax)
    return torch.linalg.vector_norm(x * torch.ldexp(one, -exponent), dim=dim, keepdim=True) * torch.ldexp(one, exponent)


def normalise_rows(x: torch.Tensor, eps: float = NORM_EPS, dim: int = -1) -> torch.Tensor:
    """CUT's Normalize along ``dim`` (default: the last, the rows' channels):
    ``x / (‖x‖₂ + eps)`` with the overflow-safe norm of :func:`row_norms`; same shape and dtype."""
    return x / (row_norms(x, dim) + eps)


def _group(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[R, C]`` -> ``[groups, R // groups, C]`` (CUT's ``view(groups, -1, C)``)."""
    return x.reshape(groups, -1, x.shape[-1])


def _fill_diagonal(s: torch.Tensor) -> torch.Tensor:
    n = s.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    return s.masked_fill(eye, DIAG_FILL)


def nce_grouped(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """PatchNCE of normalised rows ``[G, n, C]`` -> per-row loss ``[G·n]``.

    ``k`` is detached (CUT): the gradient flows to ``q`` only.
    """
    k = k.detach()
    pos = (q * k).sum(-1, keepdim=True)                      # [G, n, 1]
    neg = _fill_diagonal(torch.matmul(q, k.transpose(1, 2)))  # [G, n, n]
    logits = torch.cat([pos, neg], dim=-1) / tau
    return (torch.logsumexp(logits, dim=-1) - logits[..., 0]).reshape(-1)


def _metric_exps(q: torch.Tensor, k: torch.Tensor, tau: float):
    """The metric loss's terms of normalised rows ``[G, n, C]``: ``exp(S_qk[i,i]/τ)`` ``[G, n]``,
    ``exp(S̃_kk/τ)`` and ``exp(S̃_qq/τ)`` ``[G, n, n]`` (diagonals filled with -10)."""
    pos = (q * k).sum(-1)
    s_kk = _fill_diagonal(torch.matmul(k, k.transpose(1, 2)))
    s_qq = _fill_diagonal(torch.matmul(q, q.transpose(1, 2)))
    return torch.exp(pos / tau), torch.exp(s_kk / tau), torch.exp(s_qq / tau)


def metric_grouped(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's patch-wise metric loss of normalised rows ``[G, n, C]`` -> scalar.

    ``(-mean exp(S_qk[i,i]/τ) + mean exp(S̃_kk/τ) + mean exp(S̃_qq/τ)) / C``, the
    means over every entry (the filled diagonal included). No detach.
    """
    e_pos, e_kk, e_qq = _metric_exps(q, k, tau)
    return (-e_pos.mean() + e_kk.mean() + e_qq.mean()) / q.shape[-1]


def metric_row_terms(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """The metric loss of normalised rows ``[G, n, C]`` split into per-row contributions
    ``v [G·n]`` whose sum is :func:`metric_grouped`: row i's positive term and its row of each
    pair mean, ``v_i = (−e^{S_qk[i,i]/τ}/(G·n) + Σ_j (e^{S̃_kk[i,j]/τ} + e^{S̃_qq[i,j]/τ})/(G·n²)) / C``
    (the Triton backend's per-row output)."""
    groups, n, dim = q.shape
    e_pos, e_kk, e_qq = _metric_exps(q, k, tau)
    return ((-e_pos / (groups * n) + (e_kk + e_qq).sum(-1) / (groups * n * n)) / dim).reshape(-1)


def _map_rows(fq, fk, ids, compute_dtype):
    """Gather + normalise both maps -> two ``[B, N, C]`` row tensors in compute dtype."""
    cdt = _compute_dtype(fq, compute_dtype)
    q = normalise_rows(gather_rows(fq, ids).to(cdt))
    k = normalise_rows(gather_rows(fk, ids).to(cdt))
    return q, k


def patch_similarity(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor,
                     compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Normalised ``q̂ k̂ᵀ`` per image: ``[B, C, H, W]`` ×2, ``[N]`` -> ``[B, N, N]``."""
    q, k = _map_rows(fq, fk, ids, compute_dtype)
    return torch.matmul(q, k.transpose(1, 2))


def map_nce(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor, tau: float, groups: int,
            compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """PatchNCE of maps ``[B, C, H, W]`` in ``groups`` groups of negatives -> ``[B·N]``."""
    q, k = _map_rows(fq, fk, ids, compute_dtype)
    return nce_grouped(_group(q.flatten(0, 1), groups), _group(k.flatten(0, 1), groups), tau)


def map_metric(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor, tau: float, groups: int,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Metric loss of maps ``[B, C, H, W]`` in ``groups`` groups of negatives -> scalar."""
    q, k = _map_rows(fq, fk, ids, compute_dtype)
    return metric_grouped(_group(q.flatten(0, 1), groups), _group(k.flatten(0, 1), groups), tau)


def map_metric_terms(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor, tau: float, groups: int,
                     compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`map_metric` as per-row contributions ``[B·N]`` (:func:`metric_row_terms`)."""
    q, k = _map_rows(fq, fk, ids, compute_dtype)
    return metric_row_terms(_group(q.flatten(0, 1), groups), _group(k.flatten(0, 1), groups), tau)


def rows_nce(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float, groups: int,
             compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """PatchNCE of normalised rows ``[R, C]`` in ``groups`` groups of negatives -> ``[R]``."""
    cdt = _compute_dtype(feat_q, compute_dtype)
    return nce_grouped(_group(feat_q.to(cdt), groups), _group(feat_k.to(cdt), groups), tau)


def rows_metric(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float, groups: int,
                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Metric loss of normalised rows ``[R, C]`` in ``groups`` groups of negatives -> scalar
    (the mean over all groups' entries)."""
    cdt = _compute_dtype(feat_q, compute_dtype)
    return metric_grouped(_group(feat_q.to(cdt), groups), _group(feat_k.to(cdt), groups), tau)


def rows_metric_terms(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float, groups: int,
                      compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`rows_metric` as per-row contributions ``[R]`` (:func:`metric_row_terms`)."""
    cdt = _compute_dtype(feat_q, compute_dtype)
    return metric_row_terms(_group(feat_q.to(cdt), groups), _group(feat_k.to(cdt), groups), tau)


def patch_nce(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor, tau: float = 0.07,
              negatives: str = "image", compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused-form PatchNCE: maps ``[B, C, H, W]``, ids ``[N]`` -> per-row loss ``[B·N]``."""
    return map_nce(fq, fk, ids, tau, groups_of(negatives, fq.shape[0]), compute_dtype)


def patch_metric(fq: torch.Tensor, fk: torch.Tensor, ids: torch.Tensor, tau: float = 0.15,
                 negatives: str = "image", compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused-form patch-wise metric loss: maps ``[B, C, H, W]``, ids ``[N]`` -> scalar."""
    return map_metric(fq, fk, ids, tau, groups_of(negatives, fq.shape[0]), compute_dtype)


def patch_nce_rows(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float = 0.07,
                   batch_size: int = 1, negatives: str = "image",
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """CUT's PatchNCELoss on normalised rows ``[B·N, C]`` -> per-row loss ``[B·N]``."""
    return rows_nce(feat_q, feat_k, tau, groups_of(negatives, batch_size), compute_dtype)


def patch_metric_rows(feat_q: torch.Tensor, feat_k: torch.Tensor, tau: float = 0.15,
                      batch_size: int = 1, negatives: str = "image",
                      compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """DML_CT's PatchMetricLoss on normalised rows ``[B·N, C]`` -> scalar."""
    return rows_metric(feat_q, feat_k, tau, groups_of(negatives, batch_size), compute_dtype)


def gather_project(fmap: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gather + linear projection: ``fmap [B, F, H, W]``, ``ids [N]``, ``weight [D, F]``,
    ``bias [D]`` or None -> ``[B·N, D]`` in fmap's dtype.

    Row ``b*N + i`` is ``fmap[b, :, ids[i]] @ weight.T + bias`` (image-major, as
    :func:`gather_rows`), computed in ``compute_dtype`` (float32 for half inputs).
    """
    cdt = _compute_dtype(fmap, compute_dtype)
    rows = gather_rows(fmap, ids).flatten(0, 1).to(cdt)
    out = F.linear(rows, weight.to(cdt), None if bias is None else bias.to(cdt))
    return out.to(fmap.dtype)
