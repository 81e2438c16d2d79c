"""gather_project (the gather fused into the first linear layer of a row MLP) on every
backend against the float64 truth, for the forward and all three gradients.

``gather_project(fmap [B, F, H, W], ids [N], weight [D, F], bias [D] | None) -> [B·N, D]``,
row ``b·N + i = fmap[b, :, ids[i]] @ weight.T + bias``. Odd shapes (B=3, F=33, D=123,
N=97, H×W=11×13), contiguous / channels-last / sliced maps, bias given or not; fp32 and
fp16 everywhere, fp64 on the CPU ext kernels, bf16 of Triton on a GPU only (the
interpreter's bf16 dots are wrong). Accuracy rule: ``|impl − truth| ≤ 2·|same-dtype
reference − truth| + tol``, the truth computed in float64 by an independent gather (an
explicit loop over rows) and matmul. Also: the reference against a plain loop, the
validation of pdml.ops.gather_project, float64 gradcheck, opcheck of the custom ops,
torch.compile(fullgraph=True), and the Triton kernels' sm_80/sm_90 compilation.
"""
import pytest
import torch

from pdml import ops, reference

try:
    import pdml._C  # noqa: F401  (registers torch.ops.pdml.*)
    EXT = hasattr(torch.ops.pdml, "gather_project")
except ImportError:
    EXT = False
needs_ext = pytest.mark.skipif(not EXT, reason="pdml._C with gather_project is not built")

try:
    from pdml.kernels import gather_project_launch
except ImportError:  # triton missing
    gather_project_launch = None
needs_triton = pytest.mark.skipif(gather_project_launch is None, reason="triton cannot be imported")


# --------------------------------------------------------------------------- reference and pdml.ops validation

def make(b=3, f=7, h=5, w=6, n=11, d=4, dtype=torch.float64, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:  # channels-last storage seen as [B, F, H, W]
        fmap = torch.randn(b, h, w, f, generator=g, dtype=torch.float64).permute(0, 3, 1, 2)
    else:
        fmap = torch.randn(b, f, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(d, f, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64)
    ids = torch.randperm(h * w, generator=g)[:n]
    return fmap.to(dtype), ids, weight.to(dtype), bias.to(dtype)


def loop_truth(fmap, ids, weight, bias):
    """Row b*N + i = fmap[b, :, ids[i]] @ weight.T + bias, written as plain loops in float64."""
    b, f = fmap.shape[:2]
    flat = fmap.double().reshape(b, f, -1)
    rows = []
    for bi in range(b):
        for i in ids.tolist():
            x = flat[bi, :, i]
            y = weight.double() @ x
            rows.append(y if bias is None else y + bias.double())
    return torch.stack(rows)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_reference_matches_loop(with_bias, noncontiguous):
    fmap, ids, weight, bias = make(noncontiguous=noncontiguous)
    bias = bias if with_bias else None
    got = ops.gather_project(fmap, ids, weight, bias, backend="reference")
    assert got.shape == (3 * 11, 4) and got.dtype == torch.float64
    torch.testing.assert_close(got, loop_truth(fmap, ids, weight, bias), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.gather_project(fmap, ids, weight, bias), got, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_half_inputs_accumulate_in_float32(dtype):
    fmap, ids, weight, bias = make(b=3, f=123, h=10, w=11, n=97, d=33, dtype=dtype, seed=3)
    got = ops.gather_project(fmap, ids, weight, bias, backend="reference")
    assert got.dtype == dtype and got.shape == (3 * 97, 33)
    truth = loop_truth(fmap, ids, weight, bias)
    same = reference.gather_project(fmap, ids, weight, bias, compute_dtype=dtype).double()
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype] * truth.abs().max()
    assert ((got.double() - truth).abs() <= 2 * (same - truth).abs() + tol).all()


@pytest.mark.parametrize("backend,noncontiguous", [
    ("reference", False), pytest.param("ext", True, marks=needs_ext)])
def test_gradcheck_float64(backend, noncontiguous):
    fmap, ids, weight, bias = make(b=2, f=5, h=3, w=4, n=5, d=3, seed=6, noncontiguous=noncontiguous)
    for t in (fmap, weight, bias):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, wt, bs: ops.gather_project(x, ids, wt, bs, backend=backend), (fmap, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, wt: ops.gather_project(x, ids, wt, None, backend=backend), (fmap, weight))


def test_fmap_gradient_is_zero_off_the_sampled_pixels():
    fmap, ids, weight, bias = make(seed=5)
    fmap.requires_grad_(True)
    ops.gather_project(fmap, ids, weight, bias).sum().backward()
    mask = torch.zeros(fmap.shape[2] * fmap.shape[3], dtype=torch.bool)
    mask[ids] = True
    grad = fmap.grad.flatten(2)
    assert (grad[:, :, ~mask] == 0).all() and (grad[:, :, mask] != 0).any()


def test_auto_picks_a_backend_that_has_the_op():
    fmap, *_ = make()
    assert ops.resolve_backend("auto", fmap, "gather_project").name == ("ext" if EXT else "reference")


@pytest.mark.parametrize("change,exc,words", [
    (dict(fmap="rank3"), ValueError, "fmap must have shape [B, F, H, W]"),
    (dict(fmap="int"), TypeError, "fmap must be float32"),
    (dict(ids=torch.tensor([0, 30])), ValueError, "ids must lie in [0, H*W) = [0, 30)"),
    (dict(ids=torch.tensor([1, 1])), ValueError, "ids must be distinct"),
    (dict(ids=torch.tensor([1.0])), TypeError, "ids must be an integer tensor"),
    (dict(weight="rank1"), ValueError, "weight must have shape [D, F]"),
    (dict(weight="wrong_f"), ValueError, "weight must have shape [D, F] with F = fmap.shape[1] = 7"),
    (dict(weight="float32"), TypeError, "weight must have fmap's dtype"),
    (dict(weight="list"), TypeError, "weight must be a torch.Tensor"),
    (dict(bias="rank2"), ValueError, "bias must have shape [D]"),
    (dict(bias="wrong_d"), ValueError, "bias must have shape [D] with D = weight.shape[0] = 4"),
    (dict(bias="float32"), TypeError, "bias must have fmap's dtype"),
    (dict(backend="triton"), RuntimeError, "backend 'triton' is not available for gather_project"),
])
def test_ops_validation_names_the_argument(change, exc, words):
    fmap, ids, weight, bias = make(b=2, f=7, h=5, w=6, n=4, d=4)
    variants = {
        "fmap": {"rank3": fmap[0], "int": fmap.long()},
        "weight": {"rank1": weight[0], "wrong_f": weight[:, :5], "float32": weight.float(),
                   "list": weight.tolist()},
        "bias": {"rank2": bias[None], "wrong_d": bias[:3], "float32": bias.float()},
    }
    args = dict(fmap=fmap, ids=ids, weight=weight, bias=bias, backend="auto")
    for key, value in change.items():
        args[key] = variants[key][value] if isinstance(value, str) and key in variants else value
    with pytest.raises(exc) as info:
        ops.gather_project(**args)
    assert words in str(info.value)


# --------------------------------------------------------------------------- every backend, odd shapes

B, F_IN, H, W, D, N = 3, 33, 11, 13, 123, 97
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
"""``tol`` of the accuracy rule, relative to the largest magnitude of the truth."""
LAYOUTS = ("contiguous", "channels_last", "slice")


def make_inputs(dtype, layout, with_bias, seed=0, device="cpu"):
    """``(fmap, ids, weight, bias, grad)``; ``layout`` "slice" is a channel-and-column
    slice of a bigger map (no dense memory format at all)."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.randn(B, F_IN + 5, H, W + 4, generator=gen).to(device=device, dtype=dtype)
    ids = torch.randperm(H * W, generator=gen)[:N]
    weight = torch.randn(D, F_IN, generator=gen) / F_IN ** 0.5
    bias = torch.randn(D, generator=gen) if with_bias else None
    grad = torch.randn(B * N, D, generator=gen)
    fmap = big[:, 3:3 + F_IN, :, 1:1 + W]
    if layout == "contiguous":
        fmap = fmap.contiguous()
    elif layout == "channels_last":
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    assert (layout == "contiguous") == fmap.is_contiguous()
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return fmap, ids.to(device), cast(weight), cast(bias), cast(grad)


def truth(fmap, ids, weight, bias, grad):
    """float64 ``(out, grad_fmap, grad_weight, grad_bias)`` by explicit per-row loops."""
    fmap, weight, grad = fmap.double(), weight.double(), grad.double()
    n = ids.numel()
    rows = torch.stack([fmap[b, :, int(p) // fmap.shape[3], int(p) % fmap.shape[3]]
                        for b in range(fmap.shape[0]) for p in ids])
    out = rows @ weight.T + (bias.double() if bias is not None else 0)
    d_rows = grad @ weight
    grad_fmap = torch.zeros_like(fmap)
    for r in range(rows.shape[0]):
        p = int(ids[r % n])
        grad_fmap[r // n, :, p // fmap.shape[3], p % fmap.shape[3]] = d_rows[r]
    return out, grad_fmap, grad.T @ rows, grad.sum(0) if bias is not None else None


def same_dtype_reference(fmap, ids, weight, bias, grad):
    """index_select + F.linear in the inputs' dtype, gradients by autograd."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (fmap, weight, bias)]
    rows = leaves[0].flatten(2).index_select(2, ids).transpose(1, 2).flatten(0, 1)
    out = torch.nn.functional.linear(rows, leaves[1], leaves[2])
    out.backward(grad)
    return out.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad if bias is not None else None


def assert_rule(name, impl, same, true, dtype):
    impl, same, true = (x.detach().double().cpu() for x in (impl, same, true))
    assert impl.shape == true.shape, f"{name}: shape {tuple(impl.shape)} != {tuple(true.shape)}"
    tol = TOL[dtype] * max(true.abs().max().item(), 1e-12)
    err = (impl - true).abs()
    excess = (err - (2 * (same - true).abs() + tol)).max().item()
    assert torch.isfinite(impl).all(), f"{name}: non-finite values"
    assert excess <= 0, f"{name}: exceeds the bound by {excess:.3g} (max err {err.max().item():.3g}, tol {tol:.3g})"


def check_against_truth(impl_out, impl_grads, inputs, dtype):
    """impl_out [B·N, D]; impl_grads (grad_fmap, grad_weight, grad_bias or None)."""
    fmap, ids, weight, bias, grad = inputs
    true = truth(*inputs)
    same = same_dtype_reference(*inputs)
    assert impl_out.dtype == dtype
    assert_rule("out", impl_out, same[0], true[0], dtype)
    grad_fmap, grad_weight, grad_bias = impl_grads
    assert grad_fmap.dtype == dtype and grad_weight.dtype == dtype
    assert_rule("grad_fmap", grad_fmap, same[1], true[1], dtype)
    assert_rule("grad_weight", grad_weight, same[2], true[2], dtype)
    if bias is not None:
        assert grad_bias.dtype == dtype
        assert_rule("grad_bias", grad_bias, same[3], true[3], dtype)
    # pixels that were not sampled get exactly zero
    flat = grad_fmap.detach().flatten(2).clone()
    flat[:, :, ids] = 0
    assert not flat.any()


CASES = [(dtype, layout, with_bias)
         for dtype in (torch.float64, torch.float32, torch.float16)
         for layout in LAYOUTS for with_bias in (False, True)]


def case_id(case):
    dtype, layout, with_bias = case
    return f"{str(dtype)[6:]}-{layout}-{'bias' if with_bias else 'nobias'}"


# --------------------------------------------------------------------------- kernels, called directly

@needs_ext
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ext_cpu_kernels_match_float64_truth(case):
    dtype, layout, with_bias = case
    inputs = make_inputs(dtype, layout, with_bias)
    fmap, ids, weight, bias, grad = inputs
    out = torch.ops.pdml.gather_project(fmap, ids, weight, bias)
    grads = torch.ops.pdml.gather_project_backward(grad, fmap, ids, weight, with_bias)
    if not with_bias:
        assert grads[2].numel() == 0
    check_against_truth(out, (grads[0], grads[1], grads[2] if with_bias else None), inputs, dtype)
    assert grads[0].stride() == torch.zeros_like(fmap).stride()  # fmap's memory format when dense


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ext_cpu_gradient_map_of_fresh_pages(layout):
    """A map of >= 2 MiB: its gradient comes from fresh zeroed pages (csrc/cpu/zeroed_pages.h)
    in fmap's memory format; the same rule, exact zeros off the sampled pixels."""
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(2, 70, 64, 66, generator=gen)
    fmap = big[:, 3:67, :, 1:65]  # [2, 64, 64, 64] float32: 2 MiB
    fmap = {"contiguous": fmap.contiguous(), "slice": fmap,
            "channels_last": fmap.contiguous(memory_format=torch.channels_last)}[layout]
    ids = torch.randperm(64 * 64, generator=gen)[:97]
    weight = torch.randn(D, 64, generator=gen) / 8
    grad = torch.randn(2 * 97, D, generator=gen)
    inputs = (fmap, ids, weight, None, grad)
    out = torch.ops.pdml.gather_project(fmap, ids, weight, None)
    grads = torch.ops.pdml.gather_project_backward(grad, fmap, ids, weight, False)
    check_against_truth(out, (grads[0], grads[1], None), inputs, torch.float32)
    assert grads[0].stride() == torch.zeros_like(fmap).stride()


@needs_ext
def test_ext_bfloat16_cpu_kernels():
    inputs = make_inputs(torch.bfloat16, "channels_last", True)
    fmap, ids, weight, bias, grad = inputs
    out = torch.ops.pdml.gather_project(fmap, ids, weight, bias)
    grads = torch.ops.pdml.gather_project_backward(grad, fmap, ids, weight, True)
    check_against_truth(out, grads, inputs, torch.bfloat16)


@needs_ext
def test_ext_rejects_bad_arguments_before_any_kernel():
    fmap, ids, weight, bias, grad = make_inputs(torch.float32, "contiguous", True)
    op = torch.ops.pdml.gather_project
    bad_ids = ids.clone()
    bad_ids[3] = H * W
    with pytest.raises(RuntimeError, match="ids must lie in"):
        op(fmap, bad_ids, weight, bias)
    bad_ids[3] = ids[0]
    with pytest.raises(RuntimeError, match="ids must be distinct"):
        op(fmap, bad_ids, weight, bias)
    with pytest.raises(RuntimeError, match="ids must be int64"):
        op(fmap, ids.int(), weight, bias)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(fmap, ids, weight[:, 1:], bias)
    with pytest.raises(RuntimeError, match="weight must have fmap's dtype"):
        op(fmap, ids, weight.double(), bias)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(fmap, ids, weight, bias[1:])
    with pytest.raises(RuntimeError, match="fmap must have shape"):
        op(fmap[0], ids, weight, bias)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.pdml.gather_project_backward(grad[1:], fmap, ids, weight, True)


@needs_triton
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != torch.float64], ids=case_id)
def test_triton_kernels_match_float64_truth_interpreted(case):
    """The launch helpers on CPU tensors run the kernels in the Triton interpreter."""
    dtype, layout, with_bias = case
    inputs = make_inputs(dtype, layout, with_bias)
    fmap, ids, weight, bias, grad = inputs
    out = gather_project_launch.gather_project_forward(fmap, ids, weight, bias)
    grads = gather_project_launch.gather_project_backward(grad, fmap, ids, weight, with_bias)
    assert (grads[2] is None) == (not with_bias)
    check_against_truth(out, grads, inputs, dtype)


@needs_triton
def test_triton_grad_weight_is_deterministic_and_reads_strided_grad():
    """A column-major upstream gradient (as some autograd graphs hand it over) gives
    bit-identical results run after run, and the same as a contiguous one."""
    fmap, ids, weight, bias, grad = make_inputs(torch.float32, "channels_last", True, seed=3)
    col_major = grad.t().contiguous().t()
    first = gather_project_launch.gather_project_backward(col_major, fmap, ids, weight, True)
    again = gather_project_launch.gather_project_backward(col_major, fmap, ids, weight, True)
    dense = gather_project_launch.gather_project_backward(grad, fmap, ids, weight, True)
    for a, b, c in zip(first, again, dense):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# --------------------------------------------------------------------------- through pdml.ops, with autograd

@pytest.fixture
def interpreter(monkeypatch):
    """CPU tensors may use backend "triton" (the interpreter) inside the test only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def use_backend(backend, monkeypatch):
    """Skip when ``backend``'s gather_project is not here; for "triton" on CPU tensors, the
    interpreter inside the test only."""
    if backend == "ext" and not EXT:
        pytest.skip("pdml._C with gather_project is not built")
    if backend == "triton":
        if gather_project_launch is None:
            pytest.skip("triton cannot be imported")
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def run_public(backend, inputs):
    """``pdml.ops.gather_project`` forward and autograd gradients for upstream ``grad``."""
    fmap, ids, weight, bias, grad = inputs
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (fmap, weight, bias)]
    out = ops.gather_project(leaves[0], ids, leaves[1], leaves[2], backend=backend)
    out.backward(grad)
    return out.detach(), (leaves[0].grad, leaves[1].grad, leaves[2].grad if bias is not None else None)


PUBLIC_CASES = [("reference", c) for c in CASES if c[1] != "slice" or c[2]]
PUBLIC_CASES += [("ext", c) for c in CASES if c[1] != "contiguous" or not c[2]]
PUBLIC_CASES += [("triton", c) for c in CASES if c[0] == torch.float32 or (c[0] == torch.float16 and c[2])]


@pytest.mark.parametrize("backend,case", PUBLIC_CASES, ids=[f"{b}-{case_id(c)}" for b, c in PUBLIC_CASES])
def test_public_op_and_gradients_match_float64_truth(backend, case, monkeypatch):
    use_backend(backend, monkeypatch)
    dtype, layout, with_bias = case
    inputs = make_inputs(dtype, layout, with_bias, seed=1)
    out, grads = run_public(backend, inputs)
    check_against_truth(out, grads, inputs, dtype)


def test_auto_resolves_to_the_fused_backend_of_the_device(monkeypatch):
    fmap = make_inputs(torch.float32, "contiguous", True)[0]
    assert ops.resolve_backend("auto", fmap, "gather_project").name == ("ext" if EXT else "reference")
    if gather_project_launch is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert ops.resolve_backend("triton", fmap, "gather_project").name == "triton"


def opcheck_samples(dtype, device="cpu"):
    """Arguments of the forward op (with and without bias, as leaves or not) and of the
    backward op, on a channels-last map."""
    fmap, ids, weight, bias = make(b=2, f=6, h=4, w=5, n=7, d=5, dtype=dtype, seed=8, noncontiguous=True)
    fmap, ids, weight, bias = (t.to(device) for t in (fmap, ids, weight, bias))
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    grad = torch.randn(2 * 7, 5, dtype=dtype, device=device)
    return {
        "forward": [(leaf(fmap), ids, leaf(weight), leaf(bias)), (fmap, ids, weight, None),
                    (leaf(fmap), ids, leaf(weight), None)],
        "backward": [(grad, fmap, ids, weight, True), (grad, fmap, ids, weight, False)],
    }


@needs_ext
def test_opcheck_ext():
    samples = opcheck_samples(torch.float64)
    for args in samples["forward"]:
        torch.library.opcheck(torch.ops.pdml.gather_project.default, args)
    for args in samples["backward"]:
        torch.library.opcheck(torch.ops.pdml.gather_project_backward.default, args)


@needs_triton
def test_opcheck_triton(interpreter):
    samples = opcheck_samples(torch.float32)
    for args in samples["forward"]:
        torch.library.opcheck(torch.ops.pdml_triton.gather_project.default, args + (True,))
    for args in samples["backward"]:
        torch.library.opcheck(torch.ops.pdml_triton.gather_project_backward.default, args)


@pytest.mark.parametrize("backend", ["reference", "ext", "triton"])
def test_torch_compile_fullgraph_through_ops(backend, monkeypatch):
    """Dynamo + AOTAutograd trace ops.gather_project → ReLU → Linear with no graph break
    (aot_eager: at run time the graph calls the CPU kernels / the interpreter)."""
    use_backend(backend, monkeypatch)
    torch._dynamo.reset()
    fmap, ids, weight, bias, _ = make_inputs(torch.float32, "channels_last", True, seed=9)
    second = torch.randn(7, D, generator=torch.Generator().manual_seed(2))

    def head(x, w, b):
        return torch.nn.functional.linear(torch.relu(ops.gather_project(x, ids, w, b, backend=backend)), second)

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (head, compiled):
        leaves = [t.detach().clone().requires_grad_(True) for t in (fmap, weight, bias)]
        out = fn(*leaves)
        out.square().sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- Triton compilation

def _paper_compile_jobs():
    """The compilations (:mod:`pdml.kernels.aot`) the launcher needs for the paper's head:
    B=8 images × 128 patches, 32 → 128 channels; every kernel × dtype × bias or not."""
    if gather_project_launch is None:
        return []
    from pdml.kernels import aot
    return [job for job, shapes in aot.gather_project_jobs().items()
            if any(shape.startswith("paper:") for shape in shapes)]


@needs_triton
def test_aot_enumerates_every_kernel_dtype_and_bias_form():
    from pdml.kernels import aot
    jobs = aot.jobs_for()
    for kernel in gather_project_launch.KERNELS:
        for dtype in aot.DTYPES:
            biases = {job.has_bias for job in jobs if job.kernel == kernel and job.dtype == dtype}
            assert biases == ({False} if kernel == "gather_project_grad_fmap_kernel" else {False, True})


@needs_triton
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("job", _paper_compile_jobs(), ids=lambda job: f"{job.kernel}-{job.dtype}-{job.config}")
def test_triton_kernel_compiles_without_spills(job, arch):
    """No compile error, register spill or shared memory over the limit; fp32 dots exact
    (input_precision='ieee', no mma), fp16/bf16 dots on tensor cores (mma.sync / wgmma)."""
    from pdml.kernels import aot
    if not aot.library_compiles():
        pytest.skip("triton was imported with TRITON_INTERPRET=1: it cannot compile in this process")
    record = aot.compile_job(job, arch)
    assert record.error is None, record.error
    assert aot.problems(record, arch) == [], aot.format_table([record], arch)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", ["ext", "triton"])
def test_cuda_kernels_match_float64_truth(impl, dtype):
    if impl == "ext" and not (EXT and "cuda" in torch.ops.pdml.build_info()):
        pytest.skip("pdml._C has no CUDA kernels")
    if impl == "triton" and gather_project_launch is None:
        pytest.skip("triton cannot be imported")
    for layout in LAYOUTS:
        for with_bias in (False, True):
            inputs = make_inputs(dtype, layout, with_bias, device="cuda")
            fmap, ids, weight, bias, grad = inputs
            if impl == "ext":
                out = torch.ops.pdml.gather_project(fmap, ids, weight, bias)
                grads = torch.ops.pdml.gather_project_backward(grad, fmap, ids, weight, with_bias)
            else:
                out = gather_project_launch.gather_project_forward(fmap, ids, weight, bias)
                grads = gather_project_launch.gather_project_backward(grad, fmap, ids, weight, with_bias)
            check_against_truth(out, (grads[0], grads[1], grads[2] if with_bias else None), inputs, dtype)
