"""Backend "triton" (pdml/kernels, pdml/backends/triton.py): numerics, gradients, custom-op
registration, torch.compile, memory, determinism.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 is set per test by
the ``interpreter`` fixture; the interpreter is slow, so shapes are small and the grid of
the issue — B ∈ {1,3}, N ∈ {16,97,256}, C ∈ {16,123,256}, both ops, both negative modes,
map and rows forms, fp32 and fp16 — is covered by a reduced cross-product in which every
value of every factor appears for each (op, form)). bf16 and real-GPU numerics are the
``cuda``-marked tests; kernel compilation for sm_80/sm_90 is tests/test_triton_compile.py.

Accuracy rule (COMMON): ``|impl − truth| ≤ 2·|same-dtype reference − truth| + tol``, truth
the float64 reference, for the loss and every gradient.
"""
import math

import pytest

pytest.importorskip("triton", reason="triton cannot be imported")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from pdml import ops, reference  # noqa: E402
from pdml.kernels.patch_loss_launch import kernels as kernel_module  # noqa: E402

CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
"""``tol`` of the accuracy rule, relative to the largest magnitude of the truth."""


@pytest.fixture
def interpreter(monkeypatch):
    """CPU tensors may use backend "triton" (the interpreter) inside the test only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------- helpers

def _side(n):
    """Side of a square map with at least n + a few pixels (so ids skip some)."""
    return math.isqrt(n) + 2


def _make_inputs(form, batch, n, channels, dtype, seed, device="cpu", strided=False):
    """Map form: (fq, fk, ids) with fq/fk [B, C, H, W]; rows form: (feat_q, feat_k) [B·N, C]
    already normalised (as CUT's head gives them). ``strided`` makes the features
    non-contiguous (channels-last maps, column-major rows)."""
    gen = torch.Generator().manual_seed(seed)
    if form == "map":
        side = _side(n)
        fq = torch.randn(batch, channels, side, side, generator=gen)
        fk = fq * 0.6 + 0.8 * torch.randn(batch, channels, side, side, generator=gen)
        ids = torch.randperm(side * side, generator=gen)[:n].to(device)
        fq, fk = (x.to(device=device, dtype=dtype) for x in (fq, fk))
        if strided:
            fq, fk = (x.contiguous(memory_format=torch.channels_last) for x in (fq, fk))
        return fq, fk, ids
    q = torch.randn(batch * n, channels, generator=gen)
    k = q * 0.6 + 0.8 * torch.randn(batch * n, channels, generator=gen)
    feat_q, feat_k = (F.normalize(x, dim=1).to(device=device, dtype=dtype) for x in (q, k))
    if strided:
        feat_q, feat_k = (x.t().contiguous().t() for x in (feat_q, feat_k))
    return feat_q, feat_k


def _leaf(x, dtype=None):
    return x.detach().to(dtype or x.dtype).requires_grad_(True)


def _run(fn, inputs, weight):
    """Loss and gradients of ``(weight * fn(*inputs)).sum()`` w.r.t. the feature inputs."""
    feats = [_leaf(x) for x in inputs[:2]]
    out = fn(*feats, *inputs[2:])
    (out * weight.to(out.dtype)).sum().backward()
    return out.detach(), [f.grad for f in feats]


def _assert_rule(name, impl, same, truth, dtype):
    """The accuracy rule, elementwise. ``tol`` is at least the same-dtype reference's worst
    error: where a small result comes from large terms (NCE rows whose positive dominates:
    loss ~0.01 from logits ~1/tau) rounding is set by the terms, and the reference can be
    exact by luck at the very element where the kernel, summing in another order, is not."""
    impl, same, truth = (x.detach().double().cpu() for x in (impl, same, truth))
    same_err = (same - truth).abs()
    tol = max(TOL[dtype] * truth.abs().max().item(), same_err.max().item(), 1e-12)
    err = (impl - truth).abs()
    bound = 2 * same_err + tol
    assert torch.isfinite(impl).all(), f"{name}: non-finite values"
    excess = (err - bound).max().item()
    assert excess <= 0, (f"{name}: |impl - truth| exceeds the bound by {excess:.3g} "
                         f"(max err {err.max().item():.3g}, tol {tol:.3g})")


def _check_against_reference(op, form, inputs, dtype, negatives, tau, batch, backend="triton"):
    """Loss and gradients of the triton backend vs the float64 and same-dtype references."""
    is_nce = op == "nce"
    rows = inputs[0].shape[0] * (inputs[2].numel() if form == "map" else 1)
    gen = torch.Generator().manual_seed(7)
    weight = torch.rand(rows, generator=gen) + 0.5 if is_nce else torch.tensor(1.0)
    weight = weight.to(inputs[0].device)
    if form == "map":
        fq, fk, ids = inputs
        public = ops.patch_nce if is_nce else ops.patch_metric
        ref = reference.patch_nce if is_nce else reference.patch_metric
        impl = _run(lambda q, k: public(q, k, ids, tau, negatives, backend=backend), (fq, fk), weight)
        truth = _run(lambda q, k: ref(q, k, ids, tau, negatives), (fq.double(), fk.double()), weight)
        same = _run(lambda q, k: ref(q, k, ids, tau, negatives, compute_dtype=dtype), (fq, fk), weight)
    else:
        feat_q, feat_k = inputs
        public = ops.patch_nce_rows if is_nce else ops.patch_metric_rows
        ref = reference.patch_nce_rows if is_nce else reference.patch_metric_rows
        impl = _run(lambda q, k: public(q, k, tau, batch, negatives, backend=backend), (feat_q, feat_k), weight)
        truth = _run(lambda q, k: ref(q, k, tau, batch, negatives), (feat_q.double(), feat_k.double()), weight)
        same = _run(lambda q, k: ref(q, k, tau, batch, negatives, compute_dtype=dtype), (feat_q, feat_k), weight)
    assert impl[0].dtype == torch.float32 and impl[0].shape == truth[0].shape
    _assert_rule(f"{op} {form} loss", impl[0], same[0], truth[0], dtype)
    assert impl[1][0].dtype == dtype and impl[1][0].shape == inputs[0].shape
    _assert_rule(f"{op} {form} grad q", impl[1][0], same[1][0], truth[1][0], dtype)
    if is_nce:  # CUT detaches k: no gradient at all
        assert impl[1][1] is None or not impl[1][1].any()
    else:
        _assert_rule(f"{op} {form} grad k", impl[1][1], same[1][1], truth[1][1], dtype)
    if form == "map":  # pixels that were not sampled get exactly zero
        for grad in impl[1]:
            if grad is not None:
                flat = grad.flatten(2).clone()
                flat[:, :, inputs[2]] = 0
                assert not flat.any()


# (op, form, B, N, C, negatives, dtype, strided): per (op, form) every B, N, C, mode and dtype
CASES = [
    ("nce", "map", 1, 16, 16, "image", torch.float32, False),
    ("nce", "map", 3, 97, 123, "batch", torch.float16, True),
    ("nce", "map", 3, 256, 256, "image", torch.float32, False),
    ("nce", "rows", 3, 16, 256, "batch", torch.float32, True),
    ("nce", "rows", 1, 97, 16, "image", torch.float16, False),
    ("nce", "rows", 1, 256, 123, "batch", torch.float16, False),
    ("metric", "map", 3, 16, 123, "image", torch.float16, False),
    ("metric", "map", 1, 97, 256, "batch", torch.float32, False),
    ("metric", "map", 1, 256, 16, "image", torch.float16, True),
    ("metric", "rows", 3, 97, 16, "image", torch.float32, False),
    ("metric", "rows", 3, 256, 123, "batch", torch.float16, False),
    ("metric", "rows", 1, 16, 256, "batch", torch.float32, True),
]


def _case_id(case):
    op, form, b, n, c, neg, dtype, strided = case
    return f"{op}-{form}-B{b}-N{n}-C{c}-{neg}-{str(dtype)[6:]}{'-strided' if strided else ''}"


# --------------------------------------------------------------------------- numerics (interpreter)

@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_losses_and_grads_match_float64_reference(case, interpreter):
    op, form, batch, n, channels, negatives, dtype, strided = case
    inputs = _make_inputs(form, batch, n, channels, dtype, seed=n + channels, strided=strided)
    tau = 0.07 if op == "nce" else 0.15
    _check_against_reference(op, form, inputs, dtype, negatives, tau, batch)


@pytest.mark.parametrize("batch,n,channels,dtype", [(3, 97, 123, torch.float32), (1, 16, 256, torch.float16)])
def test_similarity_and_grads_match_float64_reference(batch, n, channels, dtype, interpreter):
    fq, fk, ids = _make_inputs("map", batch, n, channels, dtype, seed=3)
    upstream = torch.randn(batch, n, n, generator=torch.Generator().manual_seed(1))
    impl = _run(lambda q, k: ops.patch_similarity(q, k, ids, backend="triton"), (fq, fk), upstream)
    truth = _run(lambda q, k: reference.patch_similarity(q, k, ids), (fq.double(), fk.double()), upstream)
    same = _run(lambda q, k: reference.patch_similarity(q, k, ids, compute_dtype=dtype), (fq, fk), upstream)
    assert impl[0].dtype == torch.float32 and impl[0].shape == (batch, n, n)
    _assert_rule("similarity", impl[0], same[0], truth[0], dtype)
    _assert_rule("similarity grad q", impl[1][0], same[1][0], truth[1][0], dtype)
    _assert_rule("similarity grad k", impl[1][1], same[1][1], truth[1][1], dtype)


def test_gradients_are_deterministic(interpreter):
    fq, fk, ids = _make_inputs("map", 3, 40, 16, torch.float32, seed=5)
    grads = []
    for _ in range(2):
        q, k = _leaf(fq), _leaf(fk)
        (ops.patch_metric(q, k, ids, negatives="batch", backend="triton")
         + ops.patch_nce(q, k, ids, negatives="batch", backend="triton").mean()).backward()
        grads.append((q.grad, k.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# --------------------------------------------------------------------------- backend choice

def test_backend_choice_rules(monkeypatch):
    x32 = torch.randn(2, 16, 5, 5)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in ops.available_backends(x32)["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.available_backends(x32)["triton"] is None
    assert ops.resolve_backend("auto", x32, "patch_nce").name != "triton"  # auto never picks it on CPU
    assert "float64" in ops.available_backends(x32.double())["triton"]
    with pytest.raises(RuntimeError, match="triton"):
        ops.patch_nce(x32.double(), x32.double(), torch.arange(4), backend="triton")
    assert ops.available_backends(x32.bfloat16())["triton"] is not None  # interpreter bf16 dots are wrong
    assert ops.available_backends(torch.randn(4, 2048))["triton"] is not None  # C > MAX_CHANNELS


def test_direct_op_call_checks_ids_before_any_kernel(interpreter):
    fq, fk, ids = _make_inputs("map", 1, 16, 16, torch.float32, seed=1)
    bad = ids.clone()
    bad[3] = fq.shape[2] * fq.shape[3]  # one past the end
    with pytest.raises(ValueError, match="ids"):
        torch.ops.pdml_triton.nce(fq, fk, bad, 0.07, 1)
    bad[3] = bad[4]
    with pytest.raises(ValueError, match="distinct"):
        torch.ops.pdml_triton.metric(fq, fk, bad, 0.15, 1)


# --------------------------------------------------------------------------- several layers, one launch

def _count_launches(monkeypatch, kernel):
    calls = []
    original = kernel.run

    def counting_run(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", counting_run)
    return calls


@pytest.mark.parametrize("form", ["map", "rows"])
@pytest.mark.parametrize("op", ["nce", "metric"])
def test_layers_entry_is_one_launch_and_matches_per_layer(op, form, interpreter, monkeypatch):
    negatives = "batch" if form == "map" else "image"
    layers = [_make_inputs(form, 2, 24, 32, torch.float32, seed=s) for s in range(3)]
    ids = layers[0][2] if form == "map" else None
    is_nce = op == "nce"
    if form == "map":
        single_fn = ops.patch_nce if is_nce else ops.patch_metric
        per_layer = lambda q, k: single_fn(q, k, ids, negatives=negatives, backend="triton")  # noqa: E731
        fused_fn = ops.patch_nce_layers if is_nce else ops.patch_metric_layers
        fused_call = lambda qs, ks: fused_fn(qs, ks, ids, negatives=negatives, backend="triton")  # noqa: E731
    else:
        single_fn = ops.patch_nce_rows if is_nce else ops.patch_metric_rows
        per_layer = lambda q, k: single_fn(q, k, batch_size=2, negatives=negatives, backend="triton")  # noqa: E731
        fused_fn = ops.patch_nce_rows_layers if is_nce else ops.patch_metric_rows_layers
        fused_call = lambda qs, ks: fused_fn(torch.cat(qs), torch.cat(ks), len(qs), batch_size=2,  # noqa: E731
                                             negatives=negatives, backend="triton")

    singles, single_grads = [], []
    for layer in layers:
        q, k = _leaf(layer[0]), _leaf(layer[1])
        out = per_layer(q, k)
        out.sum().backward()
        singles.append(out.detach())
        single_grads.append((q.grad, k.grad))

    kernels = kernel_module(True)
    forward_calls = _count_launches(monkeypatch, kernels.nce_forward_kernel if is_nce else kernels.metric_forward_kernel)
    backward_calls = _count_launches(monkeypatch, kernels.nce_backward_kernel if is_nce else kernels.metric_backward_kernel)
    qs = [_leaf(layer[0]) for layer in layers]
    ks = [_leaf(layer[1]) for layer in layers]
    fused = fused_call(qs, ks)
    fused.sum().backward()
    assert len(forward_calls) == 1 and len(backward_calls) == 1
    assert fused.shape == ((3, 48) if is_nce else ())
    want = torch.stack(singles) if is_nce else torch.stack(singles).mean()
    torch.testing.assert_close(fused.detach(), want, rtol=1e-6, atol=1e-7)
    scale = 1.0 if is_nce else 1.0 / 3  # the metric entries return the mean over the layers
    for layer in range(3):
        torch.testing.assert_close(qs[layer].grad, single_grads[layer][0] * scale, rtol=1e-6, atol=1e-8)
        if not is_nce:
            torch.testing.assert_close(ks[layer].grad, single_grads[layer][1] * scale, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- launch helpers

def test_launch_runs_under_the_tensors_device_guard(interpreter, monkeypatch):
    """Every launch enters ``launch_guard`` of its tensors; for a compiled launch on cuda:1
    that is ``torch.cuda.device(cuda:1)`` (mocked: no GPU needed), for CPU tensors nothing."""
    from pdml.kernels import patch_loss_launch as launch
    from pdml.kernels import runtime as kernels

    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    with kernels.launch_guard(OnSecondGpu(), interpret=False):
        pass
    assert entered == [torch.device("cuda", 1)]
    with kernels.launch_guard(torch.zeros(1), interpret=False):
        pass
    assert entered == [torch.device("cuda", 1)]  # CPU: no CUDA guard

    guarded = []
    real_guard = kernels.launch_guard

    def spy(t, interpret):
        guarded.append(t.device)
        return real_guard(t, interpret)

    monkeypatch.setattr(launch, "launch_guard", spy)
    fq, fk, ids = _make_inputs("map", 1, 16, 16, torch.float32, seed=3, strided=False)
    q, k = _leaf(fq), _leaf(fk)
    (ops.patch_metric(q, k, ids, backend="triton") + ops.patch_nce(q, k, ids, backend="triton").sum()
     + ops.patch_similarity(q, k, ids, backend="triton").sum()).backward()
    # 3 forward launches; backward: nce 1 + metric 2 (pair terms, positive terms) + similarity 1, and 5
    # normaliser launches (dq; dq, dk; dq, dk)
    assert len(guarded) == 12 and all(d == fq.device for d in guarded)


def test_interpreted_launches_leave_triton_language_as_they_found_it(interpreter):
    """Triton's interpreter patches ``triton.language`` for a jitted helper called from a
    kernel and does not restore it; the launch guard does, so kernels still compile in the
    same process afterwards (the compile tests run after the interpreter tests)."""
    import triton.language as tl

    before = {name: value for name, value in vars(tl.core).items()}
    fq, fk, ids = _make_inputs("map", 1, 16, 16, torch.float32, seed=4, strided=False)
    q, k = _leaf(fq), _leaf(fk)
    ops.patch_metric(q, k, ids, backend="triton").backward()
    after = vars(tl.core)
    changed = [name for name, value in before.items() if after.get(name) is not value]
    assert changed == []


def test_grid_folds_groups_and_checks_cuda_limits():
    """Groups are folded into grid axis 0 (limit 2^31 - 1), so 10^6 groups (far more than
    axis 1's 65535) launch; beyond axis 0's limit a ValueError comes before any launch."""
    from pdml.kernels import patch_loss_launch as launch

    tiles = launch.Tiles(32, 32, 32, 8, 1)
    gradient_tiles = launch.Tiles(32, 16, 32, 8, 1, grad_c=256)  # the gradient kernels' chunks: 1000 -> 4
    assert launch.loss_grid(10 ** 6, 128, 1000, gradient_tiles, backward=True) == (4 * 10 ** 6, 4, 1)
    assert launch.loss_grid(10 ** 6, 128, 1000, gradient_tiles, backward=True, sides=2) == (4 * 10 ** 6, 4, 2)
    assert launch.loss_grid(10 ** 6, 128, 1000, tiles, backward=False) == (4 * 10 ** 6, 1, 1)
    assert launch.similarity_grid(10 ** 5, 97, 256, tiles, backward=False) == (10 ** 5 * 16, 1)
    assert launch.similarity_grid(10 ** 5, 97, 256, tiles, backward=True) == (10 ** 5 * 4, 8)
    with pytest.raises(ValueError, match="grid"):
        launch.loss_grid(2 ** 30, 128, 256, gradient_tiles, backward=True)
    with pytest.raises(ValueError, match="grid"):
        launch.check_grid((1, 70000))


@pytest.mark.parametrize("form", ["map", "rows"])
def test_metric_launch_groups_average_stacked_layers(form, interpreter):
    """``metric_forward(..., groups)``: ``v.sum()`` is the mean over all rows of all groups,
    so two layers stacked as 2·G groups give the mean of the two layers' losses."""
    from pdml.kernels import patch_loss_launch as launch

    layers = [_make_inputs(form, 3, 19, 24, torch.float32, seed=60 + s) for s in range(2)]
    q = torch.cat([layer[0] for layer in layers])
    k = torch.cat([layer[1] for layer in layers])
    ids = layers[0][2] if form == "map" else None
    if form == "map":
        truths = [reference.patch_metric(layer[0].double(), layer[1].double(), ids, 0.15, "image")
                  for layer in layers]
    else:
        truths = [reference.patch_metric_rows(layer[0].double(), layer[1].double(), 0.15, 3, "image")
                  for layer in layers]
    v = launch.metric_forward(q, k, ids, 0.15, groups=6)
    assert v.shape == (2 * 3 * 19,) and v.dtype == torch.float32
    torch.testing.assert_close(v.sum().double(), (truths[0] + truths[1]) / 2, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("op", ["nce", "metric", "similarity"])
def test_channels_in_several_chunks_match_float64_reference(op, interpreter):
    """C = 300 runs in 128-channel chunks (the interpreter's chunk; 3 chunks, the last one
    partial): norms from the pre-pass, similarities summed over chunks, gradients written
    chunk by chunk; q and k in different memory layouts."""
    from pdml.kernels import patch_loss_launch as launch

    assert launch.tiles_for(torch.float32, 37, 300, True, f"{op}_forward_kernel").block_c == 128
    fq, fk, ids = _make_inputs("map", 2, 37, 300, torch.float32, seed=300, strided=True)
    inputs = (fq, fk.contiguous(), ids)  # q channels-last, k contiguous: each its own strides
    if op == "similarity":
        fq, fk, ids = inputs
        upstream = torch.randn(2, 37, 37, generator=torch.Generator().manual_seed(5))
        impl = _run(lambda q, k: ops.patch_similarity(q, k, ids, backend="triton"), (fq, fk), upstream)
        truth = _run(lambda q, k: reference.patch_similarity(q, k, ids), (fq.double(), fk.double()), upstream)
        same = _run(lambda q, k: reference.patch_similarity(q, k, ids), (fq, fk), upstream)
        for got, s, t, name in zip([impl[0], *impl[1]], [same[0], *same[1]], [truth[0], *truth[1]], "sqk"):
            _assert_rule(f"similarity {name}", got, s, t, torch.float32)
    else:
        _check_against_reference(op, "map", inputs, torch.float32, "image", 0.07 if op == "nce" else 0.15, 2)


# (op, form, B, N, C, negatives, dtype) run with the GPU's tiles: 32×16 gradient tiles, one
# gradient chunk up to C = 256, two at C = 300, four at C = 1000
GPU_PLAN_CASES = [
    ("nce", "map", 2, 97, 123, "batch", torch.float16),
    ("nce", "rows", 1, 97, 123, "image", torch.float32),
    ("metric", "map", 1, 97, 123, "image", torch.float32),
    ("metric", "rows", 2, 97, 123, "batch", torch.float16),
    ("nce", "map", 1, 37, 300, "image", torch.float32),
    ("metric", "map", 2, 37, 300, "batch", torch.float16),
    ("nce", "rows", 2, 20, 1000, "batch", torch.float16),
    ("metric", "map", 1, 20, 1000, "image", torch.float32),
    ("metric", "rows", 1, 20, 1000, "batch", torch.float16),
]


@pytest.mark.parametrize("case", GPU_PLAN_CASES, ids=lambda c: _case_id((*c, False)))
def test_gpu_launch_plan_matches_float64_reference(case, interpreter):
    """The GPU's launch plan (``gpu_tiles``: its tiles, gradient chunks and grids) run by the
    interpreter: the same accuracy rule, odd shapes, C in one and in several gradient chunks."""
    from pdml.kernels import patch_loss_launch as launch

    op, form, batch, n, channels, negatives, dtype = case
    kernel = f"{op}_backward_kernel"
    assert launch.tiles_for(dtype, n, channels, False, kernel, form == "map").grad_c == min(256, 2 ** math.ceil(
        math.log2(channels)))
    inputs = _make_inputs(form, batch, n, channels, dtype, seed=n + channels, strided=batch == 2)
    with launch.gpu_tiles():
        _check_against_reference(op, form, inputs, dtype, negatives, 0.07 if op == "nce" else 0.15, batch)


GRAD_SCALE = 2.0 ** 16
"""GradScaler's initial scale."""


@pytest.mark.parametrize("negatives", ["image", "batch"])
@pytest.mark.parametrize("op", ["nce", "metric"])
def test_fp16_gradients_stay_finite_under_grad_scaler_scale(op, negatives, interpreter):
    """fp16 training with GradScaler multiplies the loss by 2^16: the backward kernels must
    give finite gradients equal to 2^16 × the unscaled ones (fp16 tolerance), i.e. no
    operand of an fp16 dot and no intermediate may carry the scale before the final store.
    The features share a strong common component, as neighbouring patches of a CNN feature
    map do: pairs of similarity > 0.9 give the metric's pair weights e^{(S-1)/τ} > 0.5,
    which times (g_i + g_j) = 2^17 exceeds fp16's range."""
    gen = torch.Generator().manual_seed(16)
    common = torch.randn(2, 48, 1, 1, generator=gen)
    fq = (common + 0.25 * torch.randn(2, 48, 8, 8, generator=gen)).half()
    fk = (common + 0.25 * torch.randn(2, 48, 8, 8, generator=gen)).half()
    ids = torch.randperm(64, generator=gen)[:37]

    def grads(scale, dtype=torch.float16, backend="triton"):
        q, k = _leaf(fq, dtype), _leaf(fk, dtype)
        if op == "nce":  # training takes the mean over rows
            loss = ops.patch_nce(q, k, ids, 0.07, negatives, backend=backend).mean()
        else:
            loss = ops.patch_metric(q, k, ids, 0.15, negatives, backend=backend)
        (loss * scale).backward()
        return [g for g in (q.grad, k.grad) if g is not None and (op == "metric" or g is q.grad)]

    scaled = grads(GRAD_SCALE)
    unscaled = grads(1.0)
    truth = grads(GRAD_SCALE, torch.float64, "reference")
    for name, got, plain, true in zip("qk", scaled, unscaled, truth):
        assert torch.isfinite(got).all(), f"d{name}: inf/NaN at scale 2^16"
        biggest = true.abs().max().item()
        assert biggest > 1.0, "the scaled gradient must be well inside fp16's normal range"
        torch.testing.assert_close(got.double() / GRAD_SCALE, plain.double(), rtol=2e-3,
                                   atol=2e-3 * biggest / GRAD_SCALE)
        torch.testing.assert_close(got.double(), true, rtol=2e-2, atol=2e-3 * biggest)


# --------------------------------------------------------------------------- custom-op registration

def _opcheck_cases():
    fq, fk, ids = _make_inputs("map", 2, 16, 16, torch.float32, seed=11)
    feat_q, feat_k = _make_inputs("rows", 2, 16, 16, torch.float32, seed=12)
    grad_rows = torch.rand(32, generator=torch.Generator().manual_seed(2))
    lse = torch.ops.pdml_triton.nce(fq, fk, ids, 0.07, 1)[1]
    lse_rows = torch.ops.pdml_triton.nce(feat_q, feat_k, None, 0.07, 2)[1]
    req = _leaf
    return {
        "nce-map": ("nce", (req(fq), fk, ids, 0.07, 1, True)),
        "nce-rows": ("nce", (req(feat_q), feat_k, None, 0.07, 2, False)),
        "metric-map": ("metric", (req(fq), req(fk), ids, 0.15, 2, True)),
        "metric-rows": ("metric", (req(feat_q), req(feat_k), None, 0.15, 1, False)),
        "similarity": ("similarity", (req(fq), req(fk), ids, True)),
        "nce_backward": ("nce_backward", (grad_rows, fq, fk, ids, lse, 0.07, 1)),
        "nce_backward-rows": ("nce_backward", (grad_rows, feat_q, feat_k, None, lse_rows, 0.07, 2)),
        "metric_backward": ("metric_backward", (grad_rows, fq, fk, ids, 0.15, 2)),
        "similarity_backward": ("similarity_backward", (torch.randn(2, 16, 16), fq, fk, ids)),
    }


@pytest.mark.parametrize("name", ["nce-map", "nce-rows", "metric-map", "metric-rows", "similarity",
                                  "nce_backward", "nce_backward-rows", "metric_backward",
                                  "similarity_backward"])
def test_opcheck(name, interpreter):
    op_name, args = _opcheck_cases()[name]
    torch.library.opcheck(getattr(torch.ops.pdml_triton, op_name).default, args)


def _compiled_loss(fq, fk, ids, feat_q, feat_k):
    return (ops.patch_nce(fq, fk, ids, negatives="batch", backend="triton").mean()
            + ops.patch_metric(fq, fk, ids, backend="triton")
            + ops.patch_nce_rows(feat_q, feat_k, batch_size=2, backend="triton").mean()
            + ops.patch_metric_rows(feat_q, feat_k, batch_size=2, backend="triton")
            + ops.patch_similarity(fq, fk, ids, backend="triton").square().mean())


def test_torch_compile_fullgraph_aot_eager(interpreter):
    """fullgraph tracing through Dynamo + AOTAutograd (fake impls, autograd formulas,
    backward ops); at run time the graph calls the interpreter kernels. Inductor's
    codegen around the ops is exercised by the cuda test below."""
    torch._dynamo.reset()
    fq, fk, ids = _make_inputs("map", 2, 20, 16, torch.float32, seed=21)
    feat_q, feat_k = _make_inputs("rows", 2, 20, 16, torch.float32, seed=22)
    compiled = torch.compile(_compiled_loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (_compiled_loss, compiled):
        leaves = [_leaf(x) for x in (fq, fk, feat_q, feat_k)]
        loss = fn(leaves[0], leaves[1], ids, leaves[2], leaves[3])
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for eager_grad, compiled_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(compiled_grad, eager_grad)
    # pdml.ops skips the ids check while compiling; the op runs it: no out-of-bounds kernel
    bad = ids.clone()
    bad[0] = fq.shape[2] * fq.shape[3] + 5
    with pytest.raises(ValueError, match="ids"):
        compiled(fq, fk, bad, feat_q, feat_k)


# --------------------------------------------------------------------------- memory

def _largest_allocation(fn):
    """Bytes of the largest single allocation of the torch CPU allocator while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_no_bnn_sized_buffer_is_allocated(negatives, interpreter):
    """Every tensor the triton path allocates (forward + backward of both losses, map and
    rows form), measured at the allocator, is far below one B·N·N fp32 buffer; the
    reference path, measured the same way, does allocate one (so the probe works)."""
    batch, n, channels = 3, 256, 16
    fq, fk, ids = _make_inputs("map", batch, n, channels, torch.float32, seed=31)
    feat_q, feat_k = _make_inputs("rows", batch, n, channels, torch.float32, seed=32)
    bnn_bytes = batch * n * n * 4

    def losses(backend):
        q, k, rq, rk = (_leaf(x) for x in (fq, fk, feat_q, feat_k))
        (ops.patch_nce(q, k, ids, negatives=negatives, backend=backend).mean()
         + ops.patch_metric(q, k, ids, negatives=negatives, backend=backend)
         + ops.patch_nce_rows(rq, rk, batch_size=batch, negatives=negatives, backend=backend).mean()
         + ops.patch_metric_rows(rq, rk, batch_size=batch, negatives=negatives, backend=backend)).backward()

    assert _largest_allocation(lambda: losses("reference")) >= bnn_bytes
    largest = _largest_allocation(lambda: losses("triton"))
    map_bytes = fq.numel() * 4
    assert largest <= 2 * map_bytes < bnn_bytes / 4, (largest, map_bytes, bnn_bytes)


# --------------------------------------------------------------------------- real GPU

GPU_CASES = [
    ("nce", "map", 3, 256, 256, "batch"), ("nce", "rows", 1, 97, 123, "image"),
    ("metric", "map", 3, 97, 256, "image"), ("metric", "rows", 3, 256, 16, "batch"),
    ("nce", "map", 1, 16, 16, "image"), ("metric", "map", 1, 1024, 256, "batch"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_numerics(case, dtype):
    op, form, batch, n, channels, negatives = case
    inputs = _make_inputs(form, batch, n, channels, dtype, seed=n, device="cuda", strided=batch == 3)
    tau = 0.07 if op == "nce" else 0.15
    _check_against_reference(op, form, inputs, dtype, negatives, tau, batch)
    # auto picks triton for CUDA tensors
    assert ops.resolve_backend("auto", inputs[0], "patch_nce").name == "triton"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_similarity(dtype):
    fq, fk, ids = _make_inputs("map", 3, 97, 123, dtype, seed=4, device="cuda")
    upstream = torch.randn(3, 97, 97, device="cuda")
    impl = _run(lambda q, k: ops.patch_similarity(q, k, ids, backend="triton"), (fq, fk), upstream)
    truth = _run(lambda q, k: reference.patch_similarity(q, k, ids), (fq.double(), fk.double()), upstream)
    same = _run(lambda q, k: reference.patch_similarity(q, k, ids, compute_dtype=dtype), (fq, fk), upstream)
    for got, s, t, name in zip([impl[0], *impl[1]], [same[0], *same[1]], [truth[0], *truth[1]], "sqk"):
        _assert_rule(f"similarity {name}", got, s, t, dtype)


@pytest.mark.cuda
def test_cuda_peak_memory_has_no_bnn_buffer():
    batch, n, channels = 4, 1024, 64
    fq, fk, ids = _make_inputs("map", batch, n, channels, torch.float16, seed=2, device="cuda")
    q, k = _leaf(fq), _leaf(fk)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (ops.patch_nce(q, k, ids, backend="triton").mean() + ops.patch_metric(q, k, ids, backend="triton")).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < batch * n * n * 4 / 4, extra


@pytest.mark.cuda
def test_cuda_deterministic_and_compiled_inductor():
    torch._dynamo.reset()
    fq, fk, ids = _make_inputs("map", 2, 256, 256, torch.float16, seed=8, device="cuda")
    feat_q, feat_k = _make_inputs("rows", 2, 256, 256, torch.float16, seed=9, device="cuda")
    compiled = torch.compile(_compiled_loss, fullgraph=True)
    results = []
    for fn in (_compiled_loss, _compiled_loss, compiled):
        leaves = [_leaf(x) for x in (fq, fk, feat_q, feat_k)]
        loss = fn(leaves[0], leaves[1], ids, leaves[2], leaves[3])
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    torch.testing.assert_close(results[2][0], results[0][0], rtol=1e-3, atol=1e-4)
    for eager_grad, compiled_grad in zip(results[0][1], results[2][1]):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-2, atol=1e-3)

