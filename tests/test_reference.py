"""The reference backend (pdml.ops with backend="reference") against the independent
float64 oracles of tests/oracle.py: loss and gradients, map and rows forms."""
import itertools
import math

import pytest
import torch

import pdml
from tests import oracle

SHAPES = [(b, n, c) for b, n, c in itertools.product((1, 3), (1, 97, 256), (3, 123, 256))]
MODES = ("image", "batch")
# Relative to the size of the terms summed: a float32 sum of terms of size M is off by
# a few ulps of M. For a per-row NCE loss the terms are logits (≤ 1/τ in size), for the
# metric loss exp(s/τ)/C (≤ e^{1/τ}/C), for a gradient its largest entry.
REL = {torch.float64: 1e-10, torch.float32: 3e-5}


def assert_close(got, want, dtype, scale=None):
    rel = REL[dtype]
    want = want.detach().double()
    scale = float(want.abs().max()) if scale is None else scale
    torch.testing.assert_close(got.detach().double(), want, rtol=rel, atol=rel * scale + 1e-30)


def noncontiguous_maps(b, c, h, w, dtype, seed):
    """Two [B, C, H, W] maps that are views of channels-last storage (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    fq = torch.randn(b, h, w, c, generator=g, dtype=torch.float64).permute(0, 3, 1, 2)
    fk = (fq.detach() + 0.5 * torch.randn(b, h, w, c, generator=g, dtype=torch.float64).permute(0, 3, 1, 2))
    fq, fk = fq.to(dtype), fk.to(dtype)
    if c > 1:
        assert not fq.is_contiguous()
    return fq.requires_grad_(), fk.requires_grad_()


def spatial(n):
    h = max(2, int(n ** 0.5) + 1)
    return h, h + 1


def make_ids(n, hw, seed):
    return torch.randperm(hw, generator=torch.Generator().manual_seed(seed))[:n]


def grads(loss, *inputs):
    return torch.autograd.grad(loss.sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,n,c", SHAPES)
def test_map_form_matches_oracle(b, n, c, mode, dtype):
    h, w = spatial(n)
    fq, fk = noncontiguous_maps(b, c, h, w, dtype, seed=b * 1000 + n + c)
    ids = make_ids(n, h * w, seed=n)
    
    nce = pdml.ops.patch_nce(fq, fk, ids, tau=0.07, negatives=mode, backend="reference")
    nce_truth = oracle.nce_map(fq, fk, ids, 0.07, mode)
    assert nce.shape == (b * n,)
    assert nce.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(nce, nce_truth, dtype, scale=1 / 0.07)
    g_q, g_k = grads(nce, fq, fk)
    t_q, _ = grads(nce_truth, fq, fk)
    assert g_k is None or torch.count_nonzero(g_k) == 0, "PatchNCE must not send gradient to fk"
    assert g_q.dtype == dtype
    assert_close(g_q, t_q.double(), dtype, scale=1 / 0.07)

    met = pdml.ops.patch_metric(fq, fk, ids, tau=0.15, negatives=mode, backend="reference")
    met_truth = oracle.metric_map(fq, fk, ids, 0.15, mode)
    assert met.shape == ()
    assert_close(met, met_truth, dtype, scale=math.exp(1 / 0.15) / c)
    for got, want in zip(grads(met, fq, fk), grads(met_truth, fq, fk)):
        assert got.dtype == dtype
        assert_close(got, want.double(), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,n,c", [(1, 1, 3), (3, 97, 123), (1, 256, 256), (3, 256, 3)])
def test_rows_form_matches_oracle(b, n, c, mode, dtype):
    g = torch.Generator().manual_seed(7 + n)
    # Rows as a transposed view ([C, R] storage): non-contiguous, like a caller's slice.
    raw_q = torch.randn(c, b * n, generator=g, dtype=torch.float64)
    raw_k = raw_q + 0.3 * torch.randn(c, b * n, generator=g, dtype=torch.float64)
    q = oracle.cut_normalise(raw_q.T).to(dtype).requires_grad_()
    k = oracle.cut_normalise(raw_k.T).to(dtype).requires_grad_()
    qt = q.detach().T.contiguous().T.requires_grad_()   # same values, non-contiguous
    kt = k.detach().T.contiguous().T.requires_grad_()
    assert b * n == 1 or not qt.is_contiguous()
    groups = oracle.groups_of(b, mode)
    
    crit_nce = pdml.PatchNCELoss(tau=0.07, batch_size=b, all_negatives_from_minibatch=(mode == "batch"),
                                 backend="reference")
    nce = crit_nce(qt, kt)
    truth = oracle.nce_rows(q.double(), k.double(), 0.07, groups)
    assert_close(nce, truth, dtype, scale=1 / 0.07)
    (g_q,) = grads(nce, qt)
    (t_q,) = grads(truth, q)
    assert_close(g_q, t_q.double(), dtype, scale=1 / 0.07)

    crit_met = pdml.PatchMetricLoss(tau=0.15, batch_size=b, all_negatives_from_minibatch=(mode == "batch"),
                                    backend="reference")
    met = crit_met(qt, kt)
    truth = oracle.metric_rows(q.double(), k.double(), 0.15, groups)
    assert_close(met, truth, dtype, scale=math.exp(1 / 0.15) / c)
    for got, want in zip(grads(met, qt, kt), grads(truth, q, k)):
        assert_close(got, want.double(), dtype)


def test_metric_gradient_matches_closed_form():
    """docs/ops.md's ∂L/∂q̂ of the metric loss (image negatives), checked against autograd."""
    b, n, c, tau = 2, 9, 5, 0.15
    g = torch.Generator().manual_seed(3)
    q = oracle.cut_normalise(torch.randn(b * n, c, generator=g, dtype=torch.float64)).requires_grad_()
    k = oracle.cut_normalise(torch.randn(b * n, c, generator=g, dtype=torch.float64))
    loss = pdml.ops.patch_metric_rows(q, k, tau, b, "image", backend="reference")
    (got,) = torch.autograd.grad(loss, q)
    qg, kg = q.detach().reshape(b, n, c), k.reshape(b, n, c)
    s_qq = qg @ qg.transpose(1, 2)
    w = torch.exp(s_qq / tau) / tau * (1 - torch.eye(n, dtype=torch.float64))
    pos = torch.exp((qg * kg).sum(-1, keepdim=True) / tau) / tau
    want = (-(1 / (b * n)) * pos * kg + (2 / (b * n * n)) * (w @ qg)) / c
    torch.testing.assert_close(got, want.reshape(b * n, c), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    g = torch.Generator().manual_seed(11)
    fq = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fk = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 7, 3, 14, 9])
    torch.autograd.gradcheck(
        lambda a, b_: pdml.ops.patch_metric(a, b_, ids, 0.15, mode, backend="reference"), (fq, fk))
    torch.autograd.gradcheck(
        lambda a: pdml.ops.patch_nce(a, fk, ids, 0.07, mode, backend="reference"), (fq,))
    q = oracle.cut_normalise(torch.randn(10, 4, generator=g, dtype=torch.float64)).requires_grad_()
    k = oracle.cut_normalise(torch.randn(10, 4, generator=g, dtype=torch.float64)).requires_grad_()
    torch.autograd.gradcheck(
        lambda a, b_: pdml.ops.patch_metric_rows(a, b_, 0.15, 2, mode, backend="reference"), (q, k))
    torch.autograd.gradcheck(
        lambda a: pdml.ops.patch_nce_rows(a, k, 0.07, 2, mode, backend="reference"), (q,))


def test_similarity_matches_oracle():
    fq, fk = noncontiguous_maps(3, 123, 10, 11, torch.float64, seed=5)
    ids = make_ids(97, 110, seed=5)
    sim = pdml.ops.patch_similarity(fq, fk, ids, backend="reference")
    assert sim.shape == (3, 97, 97)
    torch.testing.assert_close(sim, oracle.similarity_map(fq, fk, ids), rtol=1e-12, atol=1e-12)


def test_map_form_equals_rows_form():
    """Gather + CUT-normalise + rows loss == the fused map op (the CUT pipeline)."""
    fq, fk = noncontiguous_maps(3, 16, 6, 7, torch.float32, seed=9)
    ids = make_ids(20, 42, seed=9)
    q = oracle.cut_normalise(oracle.gather_map(fq.double(), ids)).float()
    k = oracle.cut_normalise(oracle.gather_map(fk.double(), ids)).float()
    for mode in MODES:
        torch.testing.assert_close(
            pdml.ops.patch_nce(fq, fk, ids, 0.07, mode, backend="reference"),
            pdml.ops.patch_nce_rows(q, k, 0.07, 3, mode, backend="reference"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            pdml.ops.patch_metric(fq, fk, ids, 0.15, mode, backend="reference"),
            pdml.ops.patch_metric_rows(q, k, 0.15, 3, mode, backend="reference"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    fq, fk = noncontiguous_maps(2, 32, 8, 8, dtype, seed=1)
    ids = make_ids(40, 64, seed=1)
    loss = pdml.ops.patch_metric(fq, fk, ids, backend="reference")
    assert loss.dtype == torch.float32
    g_q, g_k = grads(loss, fq, fk)
    assert g_q.dtype == dtype and g_k.dtype == dtype
    truth = oracle.metric_map(fq, fk, ids, 0.15, "image")
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-7)
    nce = pdml.ops.patch_nce(fq, fk, ids, backend="reference")
    assert nce.dtype == torch.float32
    torch.testing.assert_close(nce.double(), oracle.nce_map(fq, fk, ids, 0.07, "image"), rtol=1e-5, atol=1e-5)
