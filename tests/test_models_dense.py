"""The one-buffer dense blocks (pdml.models.dense) against the concatenating ones they
replace (tests/generator_baseline.py), in float64: outputs, every named feature map, the
gradients of the input and of every parameter, and the spectral norms' power-iteration
state after a training-mode pass, for both generators."""
import copy

import pytest
import torch
import torch.nn.functional as F

from pdml.models import DmlCtGenerator, RRDNGenerator
from pdml.models.dense import dense_convs
from pdml.models.feature_generator import FEATURE_LAYERS
from tests.generator_baseline import baseline_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10


def _direct(x, weights, biases, slope, activate_last):
    """Float64 oracle written from the definition: concatenate, pad, conv, activate."""
    feats = [x]
    for i, (w, b) in enumerate(zip(weights, biases)):
        y = F.conv2d(F.pad(torch.cat(feats, 1), (1, 1, 1, 1), mode="replicate"), w, b)
        if i < len(weights) - 1 or activate_last:
            y = F.leaky_relu(y, slope)
        feats.append(y)
    return feats[-1]


@pytest.mark.parametrize("layers,activate_last,bias,shape", [
    (5, True, True, (2, 7, 9)), (5, False, True, (1, 5, 4)), (3, True, False, (3, 6, 11)),
    (1, True, True, (2, 3, 3)), (2, False, True, (1, 1, 6))])
def test_dense_convs_equal_the_direct_form_float64(layers, activate_last, bias, shape):
    g = torch.Generator().manual_seed(layers)
    feats, growth = 6, 3
    B, H, W = shape
    weights = [(0.3 * torch.randn(growth if i < layers - 1 else feats, feats + i * growth, 3, 3,
                                  generator=g, dtype=torch.float64)).requires_grad_()
               for i in range(layers)]
    biases = [torch.randn(w.shape[0], generator=g, dtype=torch.float64).requires_grad_()
              if bias else None for w in weights]
    x = torch.randn(B, feats, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(B, feats, H, W, generator=g, dtype=torch.float64)
    leaves = [x, *weights, *[b for b in biases if b is not None]]
    want = _direct(x, weights, biases, 0.2, activate_last)
    got = dense_convs(x, weights, biases, 0.2, activate_last)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    want_grads = torch.autograd.grad((want * grad).sum(), leaves)
    got_grads = torch.autograd.grad((got * grad).sum(), leaves)
    for name, a, b in zip(["x"] + [f"p{i}" for i in range(len(leaves) - 1)], got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=lambda m: f"{name}: {m}")


def _generators():
    torch.manual_seed(0)
    # pdml's own network at PyTorch's default init; DML_CT's at a larger std than its 0.01,
    # so that the dense maps are far from zero and every term of the sums matters
    return {"pdml": RRDNGenerator(), "dmlct": DmlCtGenerator(init_std=0.1)}


@pytest.mark.parametrize("arch", ["pdml", "dmlct"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_generator_equals_the_concatenating_baseline_float64(arch, train_mode):
    new = _generators()[arch].double().train(train_mode)
    old = copy.deepcopy(new)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 13, 17, generator=g, dtype=torch.float64)
    outs = {}
    for name, net in (("new", new), ("old", old)):
        xi = x.clone().requires_grad_()
        with baseline_blocks(net) if name == "old" else torch.enable_grad():
            out, maps = net.forward_with_features(xi, FEATURE_LAYERS)
            loss = out.square().sum() + sum((m * m.detach().roll(1, -1)).sum() for m in maps)
            loss.backward()
        outs[name] = (out, maps, xi.grad, {k: p.grad for k, p in net.named_parameters()},
                      net.state_dict())
    out_n, maps_n, gx_n, gp_n, sd_n = outs["new"]
    out_o, maps_o, gx_o, gp_o, sd_o = outs["old"]
    torch.testing.assert_close(out_n, out_o, rtol=0, atol=TOL)
    for layer, a, b in zip(FEATURE_LAYERS, maps_n, maps_o):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=lambda m: f"{layer}: {m}")
    torch.testing.assert_close(gx_n, gx_o, rtol=0, atol=TOL)
    assert gp_n.keys() == gp_o.keys()
    for key in gp_n:
        torch.testing.assert_close(gp_n[key], gp_o[key], rtol=0, atol=TOL, msg=lambda m: f"{key}: {m}")
    # same keys and shapes, and the same power-iteration state (u, v) after the pass
    assert list(sd_n) == list(sd_o)
    for key in sd_n:
        torch.testing.assert_close(sd_n[key], sd_o[key], rtol=0, atol=TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("arch", ["pdml", "dmlct"])
def test_compiled_generator_traces_aten_ops_and_equals_eager_float64(arch):
    """Under torch.compile the dense blocks run as ATen ops (torch.compile cannot trace the
    one-buffer autograd.Function) with the same outputs, feature maps and gradients."""
    torch._dynamo.reset()
    eager = _generators()[arch].double().train()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, backend="aot_eager")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 11, 14, generator=g, dtype=torch.float64)
    results = []
    for net, call in ((eager, eager), (compiled_net, compiled)):
        xi = x.clone().requires_grad_()
        out = call(xi)
        out.square().sum().backward()
        results.append((out, xi.grad, {k: p.grad for k, p in net.named_parameters()}))
    (out_e, gx_e, gp_e), (out_c, gx_c, gp_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=TOL)
    torch.testing.assert_close(gx_c, gx_e, rtol=0, atol=TOL)
    for key in gp_e:
        torch.testing.assert_close(gp_c[key], gp_e[key], rtol=0, atol=TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("arch", ["pdml", "dmlct"])
def test_a_state_dict_of_the_baseline_loads_and_gives_the_same_output(arch):
    old = _generators()[arch].eval()
    saved = copy.deepcopy(old.state_dict())
    new = (RRDNGenerator() if arch == "pdml" else DmlCtGenerator()).eval()
    new.load_state_dict(saved, strict=True)
    x = torch.randn(1, 1, 20, 24)
    with torch.no_grad(), baseline_blocks(old):
        want = old(x)
    with torch.no_grad():
        got = new(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["pdml", "dmlct"])
def test_bf16_autocast_matches_the_baseline_to_bf16_rounding(arch):
    new = _generators()[arch].eval()
    x = torch.randn(2, 1, 16, 20)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = new(x)
        with baseline_blocks(new):
            want = new(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    with torch.no_grad():
        fp32 = new(x)
    torch.testing.assert_close(got.float(), fp32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("arch", ["pdml", "dmlct"])
def test_float32_fused_activation_matches_the_baseline(arch):
    """fp32 on a CPU runs the activation inside oneDNN's conv (float64 runs it apart)."""
    new = _generators()[arch].train()
    old = copy.deepcopy(new)
    x = torch.randn(2, 1, 19, 15)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out_new = new(xs[0])
    with baseline_blocks(old):
        out_old = old(xs[1])
    torch.testing.assert_close(out_new, out_old, rtol=1e-4, atol=1e-5)
    out_new.square().sum().backward()
    out_old.square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-3, atol=1e-5)
    for (key, a), b in zip(new.named_parameters(), old.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_dense_convs_bad_weights_are_named():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[out, 6, 3, 3\]"):
        dense_convs(x, [torch.randn(2, 4, 3, 3), torch.randn(4, 5, 3, 3)], [None, None])
    with pytest.raises(ValueError, match="2 weights and 1 biases"):
        dense_convs(x, [torch.randn(2, 4, 3, 3), torch.randn(4, 6, 3, 3)], [None])
