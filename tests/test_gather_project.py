"""gather_project: the reference against an explicit float64 loop, the validation of
pdml.ops.gather_project, and float64 gradcheck."""
import pytest
import torch

from pdml import ops, reference


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
    got = ops.gather_project(fmap, ids, weight, bias)  # auto: no fused backend has it -> reference
    assert got.dtype == dtype and got.shape == (3 * 97, 33)
    truth = loop_truth(fmap, ids, weight, bias)
    same = reference.gather_project(fmap, ids, weight, bias, compute_dtype=dtype).double()
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype] * truth.abs().max()
    assert ((got.double() - truth).abs() <= 2 * (same - truth).abs() + tol).all()


def test_gradcheck_float64():
    fmap, ids, weight, bias = make(b=2, f=3, h=3, w=4, n=5, d=2, seed=4)
    for t in (fmap, weight, bias):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, wt, bs: ops.gather_project(x, ids, wt, bs, backend="reference"), (fmap, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, wt: ops.gather_project(x, ids, wt, None, backend="reference"), (fmap, weight))


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
    assert ops.resolve_backend("auto", fmap, "gather_project").name == "reference"


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
    (dict(backend="ext"), RuntimeError, "backend 'ext' is not available for gather_project"),
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
