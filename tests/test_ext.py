"""The "ext" backend (pdml._C): CPU kernels against the float64 truth, opcheck, gradcheck,
mixed precision; the same comparisons on a GPU in the ``cuda``-marked tests.

Accuracy rule (tests/README): for loss and gradients,
``|ext − truth| ≤ 2·|same-dtype reference − truth| + tol`` elementwise, where truth is the
reference in float64 and the same-dtype reference is ``pdml.reference`` computing in the
input dtype.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from pathlib import Path

import pytest
import torch

from pdml import ops, reference
from pdml.backends import ext as ext_backend

pytestmark = pytest.mark.skipif(ext_backend.LOAD_ERROR is not None,
                                reason=f"pdml._C not loaded: {ext_backend.LOAD_ERROR}")

ODD = dict(B=3, C=123, H=11, W=13, N=97)
TINY = dict(B=2, C=5, H=4, W=4, N=6)
MODES = ("image", "batch")
TAU = {"patch_nce": 0.07, "patch_metric": 0.15}
# absolute slack of the rule, per dtype, relative to the largest |truth|
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_maps(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w, n = shape["B"], shape["C"], shape["H"], shape["W"], shape["N"]
    fq = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    fk = fq + 0.5 * torch.randn(b, c, h, w, generator=g, dtype=torch.float64)  # correlated, as q≈k
    ids = torch.randperm(h * w, generator=g)[:n]
    return fq.to(device=device, dtype=dtype), fk.to(device=device, dtype=dtype), ids.to(device)


def map_to_rows(fmap, ids):
    return reference.normalise_rows(reference.gather_rows(fmap.double(), ids)).flatten(0, 1).to(fmap.dtype)


def loss_and_grads(fn, inputs, seed=1):
    """Loss (float64 copy) and the gradients of a fixed random projection of it."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out * weights.to(out.device, out.dtype)).sum().backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    return out.detach().double(), [g.detach().double() for g in grads]


def assert_rule(impl, same_dtype, truth, dtype, what):
    tol = TOL[dtype] * max(truth.abs().max().item(), 1e-30)
    err = (impl.cpu() - truth.cpu()).abs()
    bound = 2 * (same_dtype.cpu() - truth.cpu()).abs() + tol
    worst = (err - bound).max().item()
    assert worst <= 0, (f"{what}: max |ext−truth| {err.max().item():.3e} exceeds the rule's bound "
                        f"(2·|ref({dtype})−truth| + {tol:.1e}) by {worst:.3e}")


def op_callables(op, negatives, form):
    """(ext, same-dtype reference, float64 truth) as functions of (q_input, k_input)."""
    tau = TAU.get(op)
    if form == "map":
        def ext(fq, fk, ids):
            return getattr(ops, op)(fq, fk, ids, **({} if op == "patch_similarity" else
                                                   dict(tau=tau, negatives=negatives)), backend="ext")

        def ref(fq, fk, ids, compute_dtype):
            kw = {} if op == "patch_similarity" else dict(tau=tau, negatives=negatives)
            return getattr(reference, op)(fq, fk, ids, compute_dtype=compute_dtype, **kw)
        return ext, ref

    def ext_rows(q, k, batch):
        return getattr(ops, op + "_rows")(q, k, tau=tau, batch_size=batch, negatives=negatives, backend="ext")

    def ref_rows(q, k, batch, compute_dtype):
        return getattr(reference, op + "_rows")(q, k, tau=tau, batch_size=batch, negatives=negatives,
                                                compute_dtype=compute_dtype)
    return ext_rows, ref_rows


def check_against_truth(op, negatives, form, dtype, shape, device="cpu"):
    fq, fk, ids = make_maps(shape, dtype, device)
    ext, ref = op_callables(op, negatives, form)
    if form == "map":
        inputs, extra = [fq, fk], (ids,)
    else:
        inputs, extra = [map_to_rows(fq, ids), map_to_rows(fk, ids)], (shape["B"],)
    got, got_g = loss_and_grads(lambda a, b: ext(a, b, *extra), inputs)
    same, same_g = loss_and_grads(lambda a, b: ref(a, b, *extra, compute_dtype=dtype), inputs)
    truth, truth_g = loss_and_grads(lambda a, b: ref(a, b, *extra, compute_dtype=torch.float64),
                                    [t.double() for t in inputs])
    expected_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = ext(*[t.detach() for t in inputs], *extra)
    assert out.dtype == expected_loss_dtype and out.device == fq.device
    assert_rule(got, same, truth, dtype, f"{op} {form} {negatives} {dtype} loss")
    for i, (g, s, t) in enumerate(zip(got_g, same_g, truth_g)):
        assert_rule(g, s, t, dtype, f"{op} {form} {negatives} {dtype} grad[{i}]")


# --------------------------------------------------------------------------- registration

def test_ext_backend_is_registered_and_auto_on_cpu():
    assert "cpu" in ext_backend.build_info()
    assert ops.available_backends(torch.zeros(1))["ext"] is None
    if os.environ.get("PDML_BACKEND", "auto") == "auto":
        assert ops.resolve_backend("auto", torch.zeros(1), "patch_nce").name == "ext"
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert ext_backend._unsupported(torch.zeros(1, dtype=dtype)) is None


def test_info_reports_build_and_auto_choice(capsys):
    from pdml import info

    info.main()
    out = capsys.readouterr().out
    assert f"pdml._C: {ext_backend.build_info()}" in out
    assert f"torch {torch.__version__}" in out
    assert "auto -> ext for CPU tensors" in out or os.environ.get("PDML_BACKEND", "auto") != "auto"
    assert "CUDA tensors" in out
    if ext_backend.cuda_archs():
        assert "sm_80" in out and "sm_90" in out


# --------------------------------------------------------------------------- accuracy (CPU)

@pytest.mark.parametrize("negatives", MODES)
@pytest.mark.parametrize("form", ("map", "rows"))
@pytest.mark.parametrize("op", ("patch_nce", "patch_metric"))
def test_cpu_float32_matches_float64_truth(op, form, negatives):
    check_against_truth(op, negatives, form, torch.float32, ODD)


def test_cpu_similarity_matches_float64_truth():
    check_against_truth("patch_similarity", "image", "map", torch.float32, ODD)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("op", ("patch_nce", "patch_metric"))
def test_cpu_half_inputs_match_float64_truth(op, dtype):
    shape = dict(B=2, C=32, H=8, W=9, N=40)
    check_against_truth(op, "image", "map", dtype, shape)
    check_against_truth(op, "batch", "rows", dtype, shape)


@pytest.mark.parametrize("op, negatives", [(op, neg) for op in ("patch_nce", "patch_metric") for neg in MODES]
                         + [("patch_similarity", None)])
def test_cpu_float64_gradcheck_map(op, negatives):
    fq, fk, ids = make_maps(TINY, torch.float64)
    ext, _ = op_callables(op, negatives, "map")
    fq.requires_grad_(True)
    fk.requires_grad_(op != "patch_nce")  # PatchNCE detaches k (CUT): no gradient to check
    assert torch.autograd.gradcheck(lambda a, b: ext(a, b, ids), (fq, fk), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("negatives", MODES)
@pytest.mark.parametrize("op", ("patch_nce", "patch_metric"))
def test_cpu_float64_gradcheck_rows(op, negatives):
    fq, fk, ids = make_maps(TINY, torch.float64)
    q, k = (map_to_rows(t, ids) for t in (fq, fk))
    q.requires_grad_(True)
    k.requires_grad_(op != "patch_nce")  # PatchNCE detaches k (CUT)
    ext, _ = op_callables(op, negatives, "rows")
    assert torch.autograd.gradcheck(lambda a, b: ext(a, b, TINY["B"]), (q, k), atol=1e-7, rtol=1e-5)


def test_cpu_multi_tile_shapes_match_truth():
    """More than one 128-row tile per group, a ragged last tile, an odd tile count (the
    round-robin schedule's dummy tile) and the batch mode's single large group."""
    shape = dict(B=2, C=16, H=20, W=20, N=300)
    for op in ("patch_nce", "patch_metric"):
        for negatives in MODES:
            check_against_truth(op, negatives, "map", torch.float32, shape)


def test_cpu_noncontiguous_inputs():
    fq, fk, ids = make_maps(ODD, torch.float32)
    fq_cl, fk_cl = fq.to(memory_format=torch.channels_last), fk.to(memory_format=torch.channels_last)
    wide = torch.cat([fq, fk], dim=1)
    fq_slice, fk_slice = wide[:, :ODD["C"]], wide[:, ODD["C"]:]  # channel slices of one tensor
    assert not fq_cl.is_contiguous() and not fq_slice.is_contiguous()
    for op in ("patch_nce", "patch_metric", "patch_similarity"):
        ext, _ = op_callables(op, "image", "map")
        base, base_g = loss_and_grads(lambda a, b: ext(a, b, ids), [fq, fk])
        for a, b in ((fq_cl, fk_cl), (fq_slice, fk_slice)):
            out, grads = loss_and_grads(lambda x, y: ext(x, y, ids), [a, b])
            torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-7)
            for g, gb in zip(grads, base_g):
                torch.testing.assert_close(g, gb, rtol=1e-5, atol=1e-8)
    rows_q = map_to_rows(fq, ids)
    strided = torch.cat([rows_q, rows_q], dim=1)[:, ::2]
    ext, _ = op_callables("patch_metric", "image", "rows")
    torch.testing.assert_close(ext(strided, rows_q, ODD["B"]), ext(strided.contiguous(), rows_q, ODD["B"]))


def test_cpu_nce_gives_fk_no_gradient():
    fq, fk, ids = make_maps(TINY, torch.float32)
    fq.requires_grad_(True)
    fk.requires_grad_(True)
    ops.patch_nce(fq, fk, ids, backend="ext").sum().backward()
    assert fq.grad is not None and fk.grad is None


def test_cpu_metric_without_grad_returns_no_gradient_rows():
    fq, fk, ids = make_maps(TINY, torch.float32)
    loss, d_q, d_k = torch.ops.pdml.patch_metric(fq, fk, ids, 0.15, fq.shape[0], False)
    assert loss.dim() == 0 and d_q.numel() == 0 and d_k.numel() == 0
    with torch.no_grad():
        fq.requires_grad_(True)
        torch.testing.assert_close(ops.patch_metric(fq, fk, ids, backend="ext"), loss)


def _map_nce_paths(groups, tau=0.07):
    """The CPU map-form PatchNCE's three gradient paths, as ``(fq, fk, ids) -> loss [B·N]``:
    the one-sweep Function pdml.ops takes with grad, the one-sweep op's registered autograd
    (torch.compile's), and the two-sweep op (forward, then a backward that recomputes)."""
    return {
        "ops (one sweep)": lambda a, b, i: ext_backend.patch_nce(a, b, i, tau, groups),
        "patch_nce_with_grad": lambda a, b, i: torch.ops.pdml.patch_nce_with_grad(a, b, i, tau, groups)[0],
        "patch_nce": lambda a, b, i: torch.ops.pdml.patch_nce(a, b, i, tau, groups)[0],
    }


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "channel_slice"))
def test_cpu_map_nce_one_sweep_matches_float64_truth(dtype, layout):
    """The one-sweep map form (loss and ∂loss/∂q_r from one sweep, the backward a scale and a
    scatter) against the float64 truth, on odd shapes, every layout the gather reads
    differently, both groupings; and the two-sweep op agrees with it."""
    fq, fk, ids = make_maps(ODD, dtype)
    if layout == "channels_last":
        fq, fk = fq.to(memory_format=torch.channels_last), fk.to(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        wide = torch.cat([fq, fk], dim=1)
        fq, fk = wide[:, :ODD["C"]], wide[:, ODD["C"]:]
        assert not fq.is_contiguous()
    for groups, negatives in ((ODD["B"], "image"), (1, "batch")):
        truth, truth_g = loss_and_grads(lambda a, b: reference.patch_nce(a, b, ids, 0.07, negatives,
                                                                         compute_dtype=torch.float64),
                                        [fq.double(), fk.double()])
        same, same_g = loss_and_grads(lambda a, b: reference.patch_nce(a, b, ids, 0.07, negatives,
                                                                       compute_dtype=dtype), [fq, fk])
        for name, fn in _map_nce_paths(groups).items():
            got, got_g = loss_and_grads(lambda a, b: fn(a, b, ids), [fq, fk])
            assert_rule(got, same, truth, dtype, f"{name} {layout} groups={groups} loss")
            assert_rule(got_g[0], same_g[0], truth_g[0], dtype, f"{name} {layout} groups={groups} grad fq")
            assert not got_g[1].any()  # fk detached (CUT)


BIG = dict(B=2, C=64, H=64, W=64, N=97)
"""A 2 MiB float32 map: its gradient comes from fresh zeroed pages (csrc/cpu/zeroed_pages.h)."""


def _resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("op", ("patch_nce", "patch_metric"))
def test_cpu_gradient_maps_of_fresh_pages_are_exact_zero_elsewhere_and_freed(op):
    """Gradient maps of >= 2 MiB come from anonymous (huge) pages, not the heap: the same
    rule against the float64 truth, exact zeros at every pixel not sampled, usable like any
    tensor (accumulated into, written in place), and given back when freed."""
    check_against_truth(op, "image", "map", torch.float32, BIG)
    fq, fk, ids = make_maps(BIG, torch.float32)
    leaf = fq.clone().requires_grad_(True)
    fn = getattr(ops, op)
    for _ in range(2):  # the second backward accumulates into the first's map
        fn(leaf, fk, ids, backend="ext").sum().backward()
    once = leaf.grad.clone() / 2
    unsampled = torch.ones(BIG["H"] * BIG["W"], dtype=torch.bool)
    unsampled[ids] = False
    assert once.flatten(2)[:, :, ids].abs().max() > 0
    assert not once.flatten(2)[:, :, unsampled].any()
    leaf.grad.mul_(0.5)
    torch.testing.assert_close(leaf.grad, once, rtol=0, atol=0)
    if not Path("/proc/self/status").exists():
        return
    leaf.grad = None
    before = _resident_mib()
    for _ in range(40):  # 80 MiB of gradient maps if they were never unmapped
        grad, = torch.autograd.grad(fn(leaf, fk, ids, backend="ext").sum(), leaf)
        del grad
    assert _resident_mib() - before < 24


def test_cpu_map_nce_with_grad_takes_the_one_sweep_path():
    """pdml.ops' map-form PatchNCE on CPU with grad runs the one-sweep op (what
    benchmarks/bench_ext_cpu.py measures), and the forward-only call the plain op."""
    fq, fk, ids = make_maps(TINY, torch.float32)
    leaf = fq.clone().requires_grad_(True)
    assert type(ops.patch_nce(leaf, fk, ids, backend="ext").grad_fn).__name__ == "_NceOneSweepBackward"
    torch.testing.assert_close(ops.patch_nce(fq, fk, ids, backend="ext"),
                               ops.patch_nce(leaf, fk, ids, backend="ext").detach(), rtol=0, atol=0)
    assert ops.patch_nce(fq, fk, ids, backend="ext").grad_fn is None


# --------------------------------------------------------------------------- the C++ checks

def test_cpp_ops_reject_bad_ids_themselves():
    """The C++ ops check the ids on their own (as under torch.compile, where pdml.ops skips
    its value checks), so a kernel never reads out of bounds."""
    fq, fk, ids = make_maps(TINY, torch.float32)
    hw = TINY["H"] * TINY["W"]
    for bad, msg in ((torch.tensor([0, hw]), "ids must lie in"), (torch.tensor([-1, 2]), "ids must lie in"),
                     (torch.tensor([3, 3]), "ids must be distinct")):
        for call in (lambda: torch.ops.pdml.patch_nce(fq, fk, bad, 0.07, 2),
                     lambda: torch.ops.pdml.patch_nce_with_grad(fq, fk, bad, 0.07, 2),
                     lambda: torch.ops.pdml.patch_nce_with_grad_backward(torch.ones(4), torch.ones(4, 5), fq, bad),
                     lambda: torch.ops.pdml.patch_metric(fq, fk, bad, 0.15, 2, True),
                     lambda: torch.ops.pdml.patch_similarity(fq, fk, bad)):
            with pytest.raises(RuntimeError, match=msg):
                call()
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.pdml.patch_nce_rows(torch.randn(10, 4), torch.randn(10, 4), 0.07, 3)
    rows = fq.shape[0] * ids.numel()
    for d_rows in (torch.ones(rows, 4), torch.ones(rows - 1, 5), torch.ones(rows, 5, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match=r"d_rows must be the \[B·N, C\] rows"):
            torch.ops.pdml.patch_nce_with_grad_backward(torch.ones(rows), d_rows, fq, ids)
    with pytest.raises(RuntimeError, match="grad_loss must have B·N"):
        torch.ops.pdml.patch_nce_with_grad_backward(torch.ones(rows + 1), torch.ones(rows, 5), fq, ids)
    for groups in (0, 3):  # the map form's groups must divide B = 2
        for call in (lambda: torch.ops.pdml.patch_nce(fq, fk, ids, 0.07, groups),
                     lambda: torch.ops.pdml.patch_metric(fq, fk, ids, 0.15, groups, True)):
            with pytest.raises(RuntimeError, match="groups"):
                call()


# --------------------------------------------------------------------------- opcheck

def opcheck_samples(device="cpu", dtype=torch.float32):
    fq, fk, ids = make_maps(dict(B=2, C=6, H=5, W=7, N=9), dtype, device)
    q, k = map_to_rows(fq, ids), map_to_rows(fk, ids)
    samples = []
    for groups in (2, 1):  # negatives "image" (B = 2 groups), "batch" (1)
        fq_g, fk_g = fq.clone().requires_grad_(True), fk.clone().requires_grad_(True)
        q_g, k_g = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        loss, lse = torch.ops.pdml.patch_nce(fq, fk, ids, 0.07, groups)
        _, d_q, d_k = torch.ops.pdml.patch_metric(fq, fk, ids, 0.15, groups, True)
        loss_rows, lse_rows = torch.ops.pdml.patch_nce_rows(q, k, 0.07, groups)
        grad0 = torch.tensor(1.5, device=device)
        samples += [
            ("patch_nce", (fq_g, fk_g, ids, 0.07, groups)),
            ("patch_nce", (fq, fk, ids, 0.07, groups)),
            ("patch_nce_backward", (torch.randn_like(loss), fq, fk, ids, loss, lse, 0.07, groups)),
            ("patch_metric", (fq_g, fk_g, ids, 0.15, groups, True)),
            ("patch_metric", (fq, fk, ids, 0.15, groups, False)),
            ("patch_metric_backward", (grad0, d_q, d_k, fq, fk, ids)),
            ("patch_nce_rows", (q_g, k_g, 0.07, groups)),
            ("patch_nce_rows_backward", (torch.randn_like(lse_rows), q, k, loss_rows, lse_rows, 0.07, groups)),
            ("patch_metric_rows", (q_g, k_g, 0.15, groups, True)),
            ("patch_metric_rows", (q, k, 0.15, groups, False)),
        ]
        if device == "cpu":  # the one-sweep forward + gradient has CPU kernels only
            _, _, d_rows = torch.ops.pdml.patch_nce_with_grad(fq, fk, ids, 0.07, groups)
            samples += [
                ("patch_nce_rows_with_grad", (q_g, k_g, 0.07, groups)),
                ("patch_nce_with_grad", (fq_g, fk_g, ids, 0.07, groups)),
                ("patch_nce_with_grad", (fq, fk, ids, 0.07, groups)),
                ("patch_nce_with_grad_backward", (torch.randn_like(loss), d_rows, fq, ids)),
            ]
    n = ids.numel()
    samples += [
        ("patch_similarity", (fq.clone().requires_grad_(True), fk.clone().requires_grad_(True), ids)),
        ("patch_similarity_backward", (torch.randn(2, n, n, device=device), fq, fk, ids)),
    ]
    return samples


OP_NAMES = ("patch_nce", "patch_nce_backward", "patch_metric", "patch_metric_backward", "patch_similarity",
            "patch_similarity_backward", "patch_nce_rows", "patch_nce_rows_backward", "patch_metric_rows",
            "patch_nce_rows_with_grad", "patch_nce_with_grad", "patch_nce_with_grad_backward")


def test_opcheck_covers_every_op():
    assert {name for name, _ in opcheck_samples()} == set(OP_NAMES)


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck_cpu(name):
    for sample_name, args in opcheck_samples():
        if sample_name == name:
            torch.library.opcheck(getattr(torch.ops.pdml, name), args)


def test_torch_compile_fullgraph_cpu():
    fq, fk, ids = make_maps(dict(B=2, C=8, H=6, W=6, N=10), torch.float32)
    fq.requires_grad_(True)
    fk.requires_grad_(True)

    def step(a, b, i):
        return (ops.patch_metric(a, b, i, backend="ext")
                + ops.patch_nce(a, b, i, backend="ext").mean())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_g = loss_and_grads(lambda a, b: compiled(a, b, ids), [fq, fk])
    want, want_g = loss_and_grads(lambda a, b: step(a, b, ids), [fq, fk])
    torch.testing.assert_close(got, want)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w)


# --------------------------------------------------------------------------- mixed precision (CPU)

def test_autocast_bf16_features_give_float32_loss_cpu():
    torch.manual_seed(0)
    head = torch.nn.Conv2d(4, 16, 1)
    x = torch.randn(2, 4, 8, 8)
    ids = torch.randperm(64)[:20]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fq, fk = head(x), head(x + 0.1 * torch.randn_like(x))
        assert fq.dtype == torch.bfloat16
        metric = ops.patch_metric(fq, fk, ids, backend="ext")
        nce = ops.patch_nce(fq, fk, ids, backend="ext")
    assert metric.dtype == torch.float32 and nce.dtype == torch.float32
    (metric + nce.mean()).backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    # the same numbers as the reference computing in float32 from the same bf16 features
    want = reference.patch_metric(fq.detach(), fk.detach(), ids)
    torch.testing.assert_close(metric.detach(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ("patch_metric", "patch_nce"))
def test_gradscaler_fp16_cpu(op):
    """fp16 features, GradScaler-scaled backward: the unscaled gradients equal the float32
    reference's from the same fp16 features (to fp16 rounding), and the step is taken."""
    fq32, fk32, ids = make_maps(dict(B=2, C=32, H=8, W=8, N=30), torch.float32)
    params = [fq32.clone().requires_grad_(True), fk32.clone().requires_grad_(True)]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)

    def loss_of(fn, a, b):
        out = fn(a.half(), b.half(), ids)
        return out if out.dim() == 0 else out.mean()

    loss = loss_of(lambda a, b, i: getattr(ops, op)(a, b, i, backend="ext"), *params)
    assert loss.dtype == torch.float32
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    ref_leaves = [p.detach().clone().requires_grad_(True) for p in params]
    loss_of(lambda a, b, i: getattr(reference, op)(a, b, i), *ref_leaves).backward()
    for g, leaf in zip(got, ref_leaves):
        want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        torch.testing.assert_close(g, want, rtol=2e-2, atol=2e-3 * want.abs().max().item())
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 12  # no inf/nan found: the scale stays
    assert not torch.equal(params[0].detach(), before[0])


# --------------------------------------------------------------------------- GPU

cuda = pytest.mark.cuda


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def require_cuda_build():
    """On a GPU, pdml._C must carry CUDA kernels. A build without them is a failure only
    where nvcc could have built them; without nvcc (or with PDML_SKIP_CUDA=1) the build is
    CPU-only by design (setup.py), so the test skips and says why."""
    assert torch.cuda.is_available()
    if ext_backend.cuda_archs():
        return
    if os.environ.get("PDML_SKIP_CUDA", "0") not in ("", "0"):
        pytest.skip(f"PDML_SKIP_CUDA set: pdml._C is CPU-only ({ext_backend.build_info()})")
    if _nvcc() is None:
        pytest.skip(f"nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): pdml._C was built "
                    f"without CUDA kernels ({ext_backend.build_info()})")
    pytest.fail(f"pdml._C has no CUDA kernels although nvcc is at {_nvcc()}: {ext_backend.build_info()}")


@cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("negatives", MODES)
@pytest.mark.parametrize("form", ("map", "rows"))
@pytest.mark.parametrize("op", ("patch_nce", "patch_metric"))
def test_cuda_matches_float64_truth(op, form, negatives, dtype):
    require_cuda_build()
    check_against_truth(op, negatives, form, dtype, ODD, device="cuda")
    check_against_truth(op, negatives, form, dtype, dict(B=2, C=64, H=20, W=20, N=300), device="cuda")


@cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_cuda_similarity_and_noncontiguous(dtype):
    require_cuda_build()
    check_against_truth("patch_similarity", "image", "map", dtype, ODD, device="cuda")
    fq, fk, ids = make_maps(ODD, dtype, "cuda")
    ext, _ = op_callables("patch_metric", "image", "map")
    base = ext(fq, fk, ids)
    torch.testing.assert_close(ext(fq.to(memory_format=torch.channels_last),
                                   fk.to(memory_format=torch.channels_last), ids), base)


@cuda
def test_cuda_auto_and_opcheck():
    require_cuda_build()
    assert ext_backend._unsupported(torch.zeros(1, device="cuda")) is None
    for name, args in opcheck_samples("cuda"):
        torch.library.opcheck(getattr(torch.ops.pdml, name), args)


@cuda
@pytest.mark.parametrize("op", ("patch_metric", "patch_nce"))
def test_cuda_gradscaler_fp16(op):
    require_cuda_build()
    fq32, fk32, ids = make_maps(dict(B=2, C=64, H=16, W=16, N=200), torch.float32, "cuda")
    params = [fq32.clone().requires_grad_(True), fk32.clone().requires_grad_(True)]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
    with torch.autocast("cuda", dtype=torch.float16):
        out = getattr(ops, op)(params[0].half(), params[1].half(), ids, backend="ext")
        loss = out if out.dim() == 0 else out.mean()
    assert loss.dtype == torch.float32
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    ref = getattr(reference, op)(leaves[0].half(), leaves[1].half(), ids)
    (ref if ref.dim() == 0 else ref.mean()).backward()
    for p, leaf in zip(params, leaves):
        if leaf.grad is None:
            assert p.grad is None or not p.grad.any()
            continue
        torch.testing.assert_close(p.grad, leaf.grad, rtol=2e-2, atol=2e-3 * leaf.grad.abs().max().item())
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 12


SANITIZER_SCRIPT = r"""
import torch, pdml
from pdml import ops
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for negatives in ("image", "batch"):
        fq = torch.randn(2, 40, 9, 11, device="cuda", dtype=dtype, requires_grad=True)
        fk = torch.randn(2, 40, 9, 11, device="cuda", dtype=dtype, requires_grad=True)
        ids = torch.randperm(99, device="cuda")[:70]
        loss = ops.patch_metric(fq, fk, ids, negatives=negatives, backend="ext")
        loss = loss + ops.patch_nce(fq, fk, ids, negatives=negatives, backend="ext").mean()
        loss = loss + ops.patch_similarity(fq, fk, ids, backend="ext").mean()
        loss.backward()
        q = torch.randn(140, 40, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(140, 40, device="cuda", dtype=dtype, requires_grad=True)
        (ops.patch_metric_rows(q, k, batch_size=2, negatives=negatives, backend="ext")
         + ops.patch_nce_rows(q, k, batch_size=2, negatives=negatives, backend="ext").mean()).backward()
torch.cuda.synchronize()
print("ok")
"""


@cuda
@pytest.mark.parametrize("tool", ("memcheck", "racecheck"))
def test_cuda_kernels_under_compute_sanitizer(tool):
    sanitizer = shutil.which("compute-sanitizer") or (
        "/usr/local/cuda/bin/compute-sanitizer" if os.path.exists("/usr/local/cuda/bin/compute-sanitizer") else None)
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed")
    require_cuda_build()
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # exact bounds for memcheck
    out = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, "-c",
                          SANITIZER_SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]

