"""Bad and extreme input through the public ops layer (pdml.ops, PatchNCELoss,
PatchMetricLoss, PatchSampleF) never hurts (issue "Bad input never hurts", the op items):

- second-order gradients are exact on every backend (double backward; gradgradcheck in
  float64 where the backend takes float64), never a silent zero;
- features scaled by 1e20 give the unscaled losses on every backend (the norm's squares
  overflow float32 although the norm does not), gradients finite; rows below the
  normalisation epsilon keep its behaviour;
- the ids are checked inside a torch.compile'd graph, on every backend;
- the metric loss refuses a τ so small that its sums overflow, PatchNCE stays finite at
  τ = 1e-4;
- a table of bad inputs: a clear exception type and a message naming the argument.

Triton runs under its interpreter (``TRITON_INTERPRET=1``, set per test): tiny shapes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pdml
from pdml import ops, reference
from pdml.backends import ext as ext_backend
from pdml.sample import PatchSampleF

try:
    import triton  # noqa: F401
    TRITON = True
except ImportError:
    TRITON = False

BACKENDS = (["reference"] + (["ext"] if ext_backend.LOAD_ERROR is None else [])
            + (["triton"] if TRITON else []))
FLOAT64_BACKENDS = [b for b in BACKENDS if b != "triton"]  # Triton's kernels take fp32/fp16/bf16


@pytest.fixture
def backend(request, monkeypatch):
    """The backend under test; Triton runs on CPU tensors under its interpreter."""
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def for_backends(names=BACKENDS):
    return pytest.mark.parametrize("backend", names, indirect=True)


@pytest.fixture
def finite_checks():
    ops.set_check_finite(True)
    yield
    ops.set_check_finite(False)


def maps(b=2, c=5, h=4, w=5, n=7, dtype=torch.float64, seed=0):
    """Correlated maps fq, fk ``[B, C, H, W]`` (as q ≈ k in training) and distinct ids ``[N]``."""
    g = torch.Generator().manual_seed(seed)
    fq = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    fk = fq + 0.7 * torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    ids = torch.randperm(h * w, generator=g)[:n]
    return fq.to(dtype), fk.to(dtype), ids


def rows(r=8, c=5, dtype=torch.float64, seed=1):
    """Rows ``[R, C]`` as the rows form takes them (normalised, q ≈ k)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(r, c, generator=g, dtype=torch.float64)
    k = q + 0.7 * torch.randn(r, c, generator=g, dtype=torch.float64)
    return F.normalize(q, dim=1).to(dtype), F.normalize(k, dim=1).to(dtype)


def op_cases(backend, dtype, small=False):
    """name -> (function of the differentiable inputs, the inputs): every op with a backward
    (``small``: 3×3 maps of 3 channels, for the numerical differentiation of gradgradcheck)."""
    fq, fk, ids = maps(c=3, h=3, w=3, n=4, dtype=dtype) if small else maps(dtype=dtype)
    q, k = rows(c=fq.shape[1], dtype=dtype)
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, fq.shape[1], generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(6, generator=g, dtype=torch.float64).to(dtype)
    # PatchNCE detaches k (CUT), so it is a function of q only: k is held fixed (the mixed
    # derivative d/dk dL/dq, which finite differences would see, is zero by that convention)
    return {
        "patch_nce": (lambda a: ops.patch_nce(a, fk, ids, 0.5, "batch", backend=backend), (fq,)),
        "patch_metric": (lambda a, b: ops.patch_metric(a, b, ids, 0.5, backend=backend), (fq, fk)),
        "patch_similarity": (lambda a, b: ops.patch_similarity(a, b, ids, backend=backend), (fq, fk)),
        "patch_nce_rows": (lambda a: ops.patch_nce_rows(a, k, 0.5, 2, backend=backend), (q,)),
        "patch_metric_rows": (lambda a, b: ops.patch_metric_rows(a, b, 0.5, 2, "batch", backend=backend), (q, k)),
        "gather_project": (lambda m, w, b: ops.gather_project(m, ids, w, b, backend=backend), (fq, weight, bias)),
    }


OPS = ("patch_nce", "patch_metric", "patch_similarity", "patch_nce_rows", "patch_metric_rows", "gather_project")


def second_order(fn, inputs, seed=4):
    """``(first, second)``: the gradients of ``Σ w·fn(inputs)`` and of ``Σ v·(those gradients)``
    w.r.t. the inputs (fixed random ``w``, ``v``; zeros where there is no dependence)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    first = torch.autograd.grad((out * w).sum(), leaves, create_graph=True, allow_unused=True)
    first = [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, first)]
    vs = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype) for x in leaves]
    total = sum((d * v).sum() for d, v in zip(first, vs) if d.requires_grad)
    second = [None] * len(leaves)
    if isinstance(total, torch.Tensor):
        second = torch.autograd.grad(total, leaves, allow_unused=True)
    second = [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, second)]
    return [d.detach() for d in first], [d.detach() for d in second]


# --------------------------------------------------------------------------- double backward

@for_backends()
@pytest.mark.parametrize("op", OPS)
def test_second_order_gradients_equal_the_float64_reference(backend, op):
    """Before: the ext backend's backward ops had no autograd formula, so the second-order
    gradient was silently 0.0 (the reference's: e.g. 963.4 in the issue)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    fn, inputs = op_cases(backend, dtype)[op]
    truth_fn, truth_inputs = op_cases("reference", torch.float64)[op]
    first, second = second_order(fn, inputs)
    truth_first, truth_second = second_order(truth_fn, truth_inputs)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for got, want in zip(first + second, truth_first + truth_second):
        scale = max(want.abs().max().item(), 1e-30)
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max().item() <= tol * scale
    assert any(s.abs().max() > 0 for s in truth_second)  # the test can fail: not all zero


@for_backends(FLOAT64_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradgradcheck_float64(backend, op):
    fn, inputs = op_cases(backend, torch.float64, small=True)[op]
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    assert torch.autograd.gradgradcheck(fn, leaves, atol=1e-6, rtol=1e-4)


def test_metric_row_terms_sum_to_the_metric_loss():
    """The per-row reference of the Triton metric op (its double backward differentiates it)."""
    q, k = rows(r=12, c=5)
    for groups in (1, 3):
        torch.testing.assert_close(reference.rows_metric_terms(q, k, 0.3, groups).sum(),
                                   reference.rows_metric(q, k, 0.3, groups), rtol=1e-14, atol=0)


@pytest.mark.skipif(ext_backend.LOAD_ERROR is not None, reason="pdml._C not loaded")
@pytest.mark.parametrize("op", ["patch_nce", "patch_nce_with_grad"])
def test_gradgradcheck_ext_map_nce_ops_called_directly(op):
    """The map-form PatchNCE ops' own autograd formulas (torch.compile takes them; pdml.ops
    takes the one-sweep Function on CPU, which test_gradgradcheck_float64 covers)."""
    fq, fk, ids = maps(c=4, h=3, w=4, n=5, dtype=torch.float64, seed=2)
    assert torch.autograd.gradgradcheck(lambda a: getattr(torch.ops.pdml, op)(a, fk, ids, 0.5, 1)[0],
                                        [fq.clone().requires_grad_(True)])


@pytest.mark.skipif(ext_backend.LOAD_ERROR is not None, reason="pdml._C not loaded")
@pytest.mark.parametrize("op", ["patch_nce_rows", "patch_nce_rows_with_grad"])
def test_gradgradcheck_ext_rows_nce_ops_called_directly(op):
    """The rows-form PatchNCE ops' own autograd formulas (torch.compile and CUDA take them)."""
    q, k = rows()
    assert torch.autograd.gradgradcheck(lambda a: getattr(torch.ops.pdml, op)(a, k, 0.5, 2)[0],
                                        [q.clone().requires_grad_(True)])


@for_backends([b for b in BACKENDS if b != "reference"])
def test_first_order_path_takes_no_reference_detour(backend, monkeypatch):
    """Without create_graph the fused backward kernels run as before: no reference call."""
    import importlib

    def refuse(*args):
        raise AssertionError("the reference ran in a first-order backward")

    monkeypatch.setattr(importlib.import_module(f"pdml.backends.{backend}"), "reference_grads", refuse)
    dtype = torch.float32 if backend == "triton" else torch.float64
    for op, (fn, inputs) in op_cases(backend, dtype).items():
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        fn(*leaves).sum().backward()
        assert all(x.grad is not None for x in leaves[:1])


# --------------------------------------------------------------------------- overflow

def _loss_and_grads(fn, fq, fk):
    a, b = fq.clone().requires_grad_(True), fk.clone().requires_grad_(True)
    out = fn(a, b)
    out.sum().backward()
    return out.detach(), a.grad, b.grad


@for_backends()
@pytest.mark.parametrize("op", ["patch_nce", "patch_metric", "patch_similarity"])
def test_features_times_1e20_give_the_unscaled_loss(backend, op):
    """Before: ‖x‖² overflowed float32 (x² = 1e40): Triton NaN, reference and ext a wrong loss
    (patch_metric 0.0347 instead of 0.0739 in the issue)."""
    fq, fk, ids = maps(c=7, h=5, w=5, n=9, dtype=torch.float32, seed=5)
    kwargs = {} if op == "patch_similarity" else dict(negatives="image")
    fn = lambda a, b: getattr(ops, op)(a, b, ids, backend=backend, **kwargs)  # noqa: E731
    base, base_q, base_k = _loss_and_grads(fn, fq, fk)
    big, big_q, big_k = _loss_and_grads(fn, fq * 1e20, fk * 1e20)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, base, rtol=1e-5, atol=1e-6 * base.abs().max().item())
    for got, want in ((big_q, base_q), (big_k, base_k)):
        if want is None:
            assert got is None
            continue
        assert torch.isfinite(got).all()
        # the losses are scale-invariant: d/d(s·x) = (1/s)·d/dx
        torch.testing.assert_close(got * 1e20, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@for_backends()
@pytest.mark.parametrize("loss", [pdml.PatchNCELoss, pdml.PatchMetricLoss])
@pytest.mark.parametrize("use_mlp", [False, True])
def test_rows_form_with_sampler_normalisation_is_scale_safe(backend, loss, use_mlp):
    """PatchSampleF normalises the rows the losses take: features ×1e20 give the same loss."""
    fq, fk, ids = maps(c=6, h=5, w=5, n=9, dtype=torch.float32, seed=6)
    torch.manual_seed(0)
    # init_gain 1: rows of norm ~1, so the epsilon's share (1e-7 / ‖x‖) stays below fp32 rounding
    sampler = PatchSampleF(use_mlp=use_mlp, nc=8, init_gain=1.0, backend="reference")
    crit = loss(batch_size=2, backend=backend)

    def run(scale):
        (rq,), _ = sampler([fq * scale], num_patches=9, patch_ids=[ids])
        (rk,), _ = sampler([fk * scale], num_patches=9, patch_ids=[ids])
        return crit(rq, rk)

    base, big = run(1.0), run(1e20)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, base, rtol=1e-5, atol=1e-6 * base.abs().max().item())


@for_backends()
@pytest.mark.parametrize("op", ["patch_nce", "patch_metric"])
def test_rows_below_epsilon_keep_the_epsilon_behaviour(backend, op):
    """Rows far below the epsilon (‖x‖ ~ 1e-12) and zero rows: x / (‖x‖ + 1e-7) as before."""
    fq, fk, ids = maps(c=6, h=5, w=5, n=9, dtype=torch.float32, seed=7)
    fq, fk = fq * 1e-12, fk * 1e-12
    fq[:, :, 0, 0] = 0.0  # ids[...] may or may not hit it; make sure one sampled row is zero
    fq.flatten(2)[:, :, ids[0]] = 0.0
    got = getattr(ops, op)(fq, fk, ids, tau=0.5, backend=backend)
    truth = getattr(reference, op)(fq.double(), fk.double(), ids, tau=0.5)
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalisation_is_the_unscaled_formula_where_that_does_not_overflow(dtype):
    """Scaling by powers of two is exact: the same numbers as CUT's plain formula."""
    x = (torch.randn(50, 33, dtype=torch.float64) * torch.logspace(-6, 6, 50, dtype=torch.float64)[:, None]).to(dtype)
    plain = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + reference.NORM_EPS)
    assert torch.equal(reference.normalise_rows(x), plain)
    if dtype != torch.float64:
        return
    if ext_backend.LOAD_ERROR is None:
        fq, fk, ids = maps(c=9, h=6, w=6, n=11, seed=8)
        plain_rows = [reference.gather_rows(f, ids) for f in (fq, fk)]
        plain_rows = [r / (torch.linalg.vector_norm(r, dim=-1, keepdim=True) + reference.NORM_EPS)
                      for r in plain_rows]
        sim = ops.patch_similarity(fq, fk, ids, backend="ext")
        torch.testing.assert_close(sim, plain_rows[0] @ plain_rows[1].transpose(1, 2), rtol=1e-15, atol=1e-15)


# --------------------------------------------------------------------------- torch.compile

@for_backends()
def test_compiled_graph_checks_ids_when_it_runs(backend):
    """Before: with the reference backend a compiled graph accepted repeated ids silently
    (pdml.ops skips value checks while tracing)."""
    torch._dynamo.reset()
    fq, fk, ids = maps(dtype=torch.float32)

    def loss(a, b, i):
        return ops.patch_nce(a, b, i, backend=backend).sum() + ops.patch_metric(a, b, i, backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(fq, fk, ids), loss(fq, fk, ids))
    repeated = ids.clone()
    repeated[1] = repeated[0]
    with pytest.raises(ValueError, match=r"ids must be distinct, got repeated values \["):
        compiled(fq, fk, repeated)
    outside = ids.clone()
    outside[2] = fq.shape[2] * fq.shape[3]
    with pytest.raises(ValueError, match=r"ids must lie in \[0, H\*W\)"):
        compiled(fq, fk, outside)


@pytest.mark.parametrize("what", ["meta", "fake"])
def test_meta_and_fake_tensors_skip_value_checks(what, finite_checks):
    """Shape-only tensors: no value is read (the NaN/inf check, the ids' values), shapes come out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        fq = torch.empty(2, 4, 3, 3, device=device)
        ids = torch.arange(4, device=device)
        q = torch.empty(8, 4, device=device)
        assert ops.patch_nce(fq, fq, ids, backend="reference").shape == (8,)
        assert ops.patch_metric(fq, fq, ids, backend="reference").shape == ()
        assert ops.patch_nce_rows(q, q, batch_size=2, backend="reference").shape == (8,)
        assert ops.patch_metric_rows(q, q, batch_size=2, backend="reference").shape == ()

    if what == "meta":
        device = "meta"
        run()
    else:
        device = "cpu"
        with FakeTensorMode():
            run()


# --------------------------------------------------------------------------- tau

def test_metric_tau_bound_values():
    from pdml._validation import metric_tau_min

    assert metric_tau_min(torch.float32) == pytest.approx(1 / (math.log(torch.finfo(torch.float32).max) - 32 * math.log(2)))
    assert 0.0150 < metric_tau_min(torch.float32) < 0.0151
    assert metric_tau_min(torch.float16) == metric_tau_min(torch.bfloat16) == metric_tau_min(torch.float32)
    assert 0.00145 < metric_tau_min(torch.float64) < 0.00146


@for_backends()
def test_metric_loss_refuses_a_tau_whose_sums_overflow(backend):
    """Before: τ = 0.005 in float32 gave NaN (exp(1/τ) = inf, inf − inf)."""
    fq, fk, ids = maps(dtype=torch.float32)
    q, k = rows(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"tau=0.005 is too small for the metric loss .*tau >= 0.01503"):
        ops.patch_metric(fq, fk, ids, tau=0.005, backend=backend)
    with pytest.raises(ValueError, match="tau=0.01 is too small for the metric loss"):
        ops.patch_metric_rows(q, k, tau=0.01, batch_size=2, backend=backend)
    with pytest.raises(ValueError, match="tau=0.01 is too small"):
        pdml.PatchMetricLoss(tau=0.01, batch_size=2, backend=backend)(q, k)
    # just above the bound, q ≈ k (the positives' exp(1/τ) terms at their largest): finite
    same = ops.patch_metric(fq, fq, ids, tau=0.0151, backend=backend)
    a = fq.clone().requires_grad_(True)
    ops.patch_metric(a, fk, ids, tau=0.0151, backend=backend).backward()
    assert torch.isfinite(same) and torch.isfinite(a.grad).all()


def test_metric_tau_bound_depends_on_the_dtype():
    with pytest.raises(ValueError, match=r"tau=0.0001 is too small .*tau >= 0.001454"):
        pdml.PatchMetricLoss(tau=1e-4)  # too small for every dtype: refused when built
    fq, fk, ids = maps()
    got = ops.patch_metric(fq, fk, ids, tau=0.005, backend="reference")  # float64: fine
    assert torch.isfinite(got)


@for_backends()
@pytest.mark.parametrize("form", ["map", "rows"])
def test_patch_nce_is_finite_at_tiny_tau(backend, form):
    fq, fk, ids = maps(dtype=torch.float32, seed=9)
    q, k = rows(dtype=torch.float32, seed=9)
    tau = 1e-4
    if form == "map":
        got = ops.patch_nce(fq, fk, ids, tau, backend=backend)
        same = reference.patch_nce(fq, fk, ids, tau)
        truth = reference.patch_nce(fq.double(), fk.double(), ids, tau)
    else:
        got = ops.patch_nce_rows(q, k, tau, batch_size=2, backend=backend)
        same = reference.patch_nce_rows(q, k, tau, batch_size=2)
        truth = reference.patch_nce_rows(q.double(), k.double(), tau, batch_size=2)
    assert torch.isfinite(got).all()
    err, bound = (got.double() - truth).abs(), 2 * (same.double() - truth).abs() + 1e-5 * truth.abs().max()
    assert (err <= bound).all(), (err - bound).max()


# --------------------------------------------------------------------------- the table

FQ, FK, IDS = maps(b=2, c=4, h=3, w=5, n=4, dtype=torch.float32, seed=10)
Q, K = rows(r=8, c=4, dtype=torch.float32, seed=11)
W = torch.randn(6, 4)
HW = 15


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


BAD_MAP_INPUTS = [  # (name, fq, fk, ids, exception, words)
    ("fq rank 3", FQ[0], FK[0], IDS, ValueError, "fq must have shape [B, C, H, W]"),
    ("fk shape", FQ, FK[:, :, :2], IDS, ValueError, "fq and fk must have the same shape"),
    ("fk dtype", FQ, FK.double(), IDS, TypeError, "fq and fk must have the same dtype"),
    ("fq int", FQ.long(), FK, IDS, TypeError, "fq must be float32"),
    ("fq complex", FQ.to(torch.complex64), FK, IDS, TypeError, "fq must be float32"),
    ("fq bool", FQ > 0, FK, IDS, TypeError, "fq must be float32"),
    ("fq list", FQ.tolist(), FK, IDS, TypeError, "fq must be a torch.Tensor"),
    ("fq numpy", FQ.numpy(), FK, IDS, TypeError, "fq must be a torch.Tensor"),
    ("fq empty", FQ[:0], FK[:0], IDS, ValueError, "fq must not be empty"),
    ("ids out of range", FQ, FK, _with(IDS, 0, HW), ValueError, "ids must lie in [0, H*W) = [0, 15)"),
    ("ids negative", FQ, FK, _with(IDS, 1, -1), ValueError, "ids must lie in [0, H*W)"),
    ("ids huge", FQ, FK, _with(IDS, 1, 2 ** 62), ValueError, "ids must lie in [0, H*W)"),
    ("ids repeated", FQ, FK, _with(IDS, 1, int(IDS[0])), ValueError, "ids must be distinct"),
    ("ids float", FQ, FK, IDS.float(), TypeError, "ids must be an integer tensor"),
    ("ids bool", FQ, FK, IDS > 3, TypeError, "ids must be an integer tensor"),
    ("ids complex", FQ, FK, IDS.to(torch.complex64), TypeError, "ids must be an integer tensor"),
    ("ids 2-D", FQ, FK, IDS[None], ValueError, "ids must have shape [N]"),
    ("ids empty", FQ, FK, IDS[:0], ValueError, "ids must not be empty"),
    ("ids list", FQ, FK, IDS.tolist(), TypeError, "ids must be a torch.Tensor"),
    ("ids meta", FQ, FK, IDS.to("meta"), ValueError, "ids must be on the features' device"),
    ("fq meta", FQ.to("meta"), FK, IDS, ValueError, "fq and fk must be on the same device"),
]


@pytest.mark.parametrize("op", ["patch_nce", "patch_metric", "patch_similarity"])
@pytest.mark.parametrize("case", BAD_MAP_INPUTS, ids=[c[0] for c in BAD_MAP_INPUTS])
def test_map_ops_reject(op, case):
    _, fq, fk, ids, exc, words = case
    with pytest.raises(exc) as info:
        getattr(ops, op)(fq, fk, ids)
    assert words in str(info.value)


@pytest.mark.parametrize("op", ["patch_nce", "patch_metric", "patch_similarity"])
def test_nonfinite_features_rejected_when_checking(op, finite_checks):
    for name, fq, fk in (("fq", _with(FQ, (0, 1, 2, 3), float("nan")), FK),
                         ("fk", FQ, _with(FK, (1, 0, 0, 0), float("inf"))),
                         ("fk", FQ, _with(FK, (1, 3, 2, 4), -float("inf")))):
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            getattr(ops, op)(fq, fk, IDS)


BAD_TAUS = [(float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError),
            (0.0, ValueError), (-0.07, ValueError), (0, ValueError), ("0.07", TypeError),
            (True, TypeError), (None, TypeError), (torch.tensor(0.07), TypeError)]


@pytest.mark.parametrize("op", ["patch_nce", "patch_metric", "patch_nce_rows", "patch_metric_rows"])
@pytest.mark.parametrize("tau,exc", BAD_TAUS, ids=[repr(t) for t, _ in BAD_TAUS])
def test_bad_tau_rejected(op, tau, exc):
    args = (FQ, FK, IDS) if op in ("patch_nce", "patch_metric") else (Q, K)
    with pytest.raises(exc, match="tau must be a"):
        getattr(ops, op)(*args, tau=tau)


@pytest.mark.parametrize("loss", [pdml.PatchNCELoss, pdml.PatchMetricLoss])
@pytest.mark.parametrize("tau,exc", BAD_TAUS, ids=[repr(t) for t, _ in BAD_TAUS])
def test_loss_modules_reject_bad_tau(loss, tau, exc):
    with pytest.raises(exc, match="tau must be a"):
        loss(tau=tau)


BAD_ROWS_CALLS = [  # (name, kwargs of patch_*_rows, exception, words)
    ("batch_size not dividing", dict(batch_size=3), ValueError,
     "batch_size=3 must divide the number of rows of feat_q (8)"),
    ("batch_size 0", dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    ("batch_size negative", dict(batch_size=-2), ValueError, "batch_size must be >= 1"),
    ("batch_size float", dict(batch_size=2.0), TypeError, "batch_size must be an int"),
    ("batch_size bool", dict(batch_size=True), TypeError, "batch_size must be an int"),
    ("negatives", dict(negatives="all"), ValueError, "negatives must be one of"),
    ("backend", dict(backend="gpu"), ValueError, "backend must be one of"),
    ("feat_q rank 3", dict(feat_q=Q[None]), ValueError, "feat_q must have shape [B·N, C]"),
    ("feat_k rows", dict(feat_k=K[:6]), ValueError, "feat_q and feat_k must have the same shape"),
    ("feat_q complex", dict(feat_q=Q.to(torch.complex64)), TypeError, "feat_q must be float32"),
    ("feat_k int", dict(feat_k=K.int()), TypeError, "feat_k must be float32"),
    ("feat_q list", dict(feat_q=Q.tolist()), TypeError, "feat_q must be a torch.Tensor"),
]


@pytest.mark.parametrize("op", ["patch_nce_rows", "patch_metric_rows"])
@pytest.mark.parametrize("case", BAD_ROWS_CALLS, ids=[c[0] for c in BAD_ROWS_CALLS])
def test_rows_ops_reject(op, case):
    _, kwargs, exc, words = case
    kwargs = dict(dict(feat_q=Q, feat_k=K), **kwargs)
    with pytest.raises(exc) as info:
        getattr(ops, op)(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("loss", [pdml.PatchNCELoss, pdml.PatchMetricLoss])
def test_loss_modules_reject(loss, finite_checks):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        loss(batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        loss(batch_size="2")
    with pytest.raises(ValueError, match="backend must be one of"):
        loss(backend="cuda")
    crit = loss(batch_size=3)
    with pytest.raises(ValueError, match=r"batch_size=3 must divide the number of rows of feat_q \(8\)"):
        crit(Q, K)
    with pytest.raises(ValueError, match="feat_q contains NaN or inf"):
        loss(batch_size=2)(_with(Q, (0, 0), float("nan")), K)
    with pytest.raises(TypeError, match="feat_q must be float32"):
        loss()(Q.to(torch.complex64), K.to(torch.complex64))


@pytest.mark.parametrize("op", ["patch_nce_rows_layers", "patch_metric_rows_layers"])
def test_rows_layers_reject(op):
    with pytest.raises(ValueError, match=r"layers=3 must divide the number of rows of feat_q \(8\)"):
        getattr(ops, op)(Q, K, layers=3)
    with pytest.raises(ValueError, match="layers must be >= 1"):
        getattr(ops, op)(Q, K, layers=0)
    with pytest.raises(ValueError, match=r"batch_size=3 must divide the number of rows of one layer \(4\)"):
        getattr(ops, op)(Q, K, layers=2, batch_size=3)


@pytest.mark.parametrize("op", ["patch_nce_layers", "patch_metric_layers"])
def test_map_layers_reject(op):
    with pytest.raises(TypeError, match="fqs must be a list"):
        getattr(ops, op)(FQ, [FK], IDS)
    with pytest.raises(ValueError, match="fqs and fks must be non-empty and of the same length"):
        getattr(ops, op)([FQ, FQ], [FK], IDS)
    with pytest.raises(ValueError, match=r"fqs\[1\] and fqs\[0\] must have the same shape"):
        getattr(ops, op)([FQ, FQ[:, :2]], [FK, FK[:, :2]], IDS)
    with pytest.raises(ValueError, match="ids must be distinct"):
        getattr(ops, op)([FQ], [FK], _with(IDS, 1, int(IDS[0])))


def test_gather_project_rejects():
    with pytest.raises(ValueError, match=r"weight must have shape \[D, F\] with F = fmap.shape\[1\] = 4"):
        ops.gather_project(FQ, IDS, torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"bias must have shape \[D\] with D = weight.shape\[0\] = 6"):
        ops.gather_project(FQ, IDS, W, torch.randn(5))
    with pytest.raises(TypeError, match="weight must have fmap's dtype"):
        ops.gather_project(FQ, IDS, W.double())
    with pytest.raises(ValueError, match="ids must be distinct"):
        ops.gather_project(FQ, _with(IDS, 1, int(IDS[0])), W)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        ops.gather_project(FQ, IDS, W.tolist())


def test_patch_sample_f_rejects():
    with pytest.raises(ValueError, match="init_type must be one of"):
        PatchSampleF(init_type="uniform")
    with pytest.raises(ValueError, match="nc must be a positive int"):
        PatchSampleF(nc=0)
    sampler = PatchSampleF(use_mlp=False)
    with pytest.raises(ValueError, match=r"feats\[0\] must have shape \[B, C, H, W\]"):
        sampler([FQ[0]], num_patches=4)
    with pytest.raises(TypeError, match=r"patch_ids\[0\] must be an integer tensor"):
        sampler([FQ], num_patches=4, patch_ids=[IDS.float() + 0.5])
    with pytest.raises(ValueError, match=r"patch_ids\[0\] must lie in \[0, H\*W\) = \[0, 15\)"):
        sampler([FQ], num_patches=4, patch_ids=[_with(IDS, 0, HW)])
    with pytest.raises(ValueError, match=r"patch_ids\[0\] must be distinct"):
        sampler([FQ], num_patches=4, patch_ids=[_with(IDS, 1, int(IDS[0]))])
    with_mlp = PatchSampleF(use_mlp=True, nc=8)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, H\*W\)"):
        with_mlp([FQ], num_patches=4, patch_ids=[_with(IDS, 0, HW)])
    out, ids = sampler([FQ], num_patches=4, patch_ids=[IDS.tolist()])  # CUT passes lists or tensors
    assert out[0].shape == (8, 4) and ids[0] == IDS.tolist()
