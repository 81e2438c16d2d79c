"""pdml.PatchSampleF against an independent float64 transcription of CUT's sampler
(tests/cut_sampler.py): rows, ids and gradients w.r.t. the maps and the MLP weights agree
within 1e-10, for use_mlp False/True and num_patches 0 and > 0; the same RNG state draws
the same weights and ids; CUT-named state_dicts load strictly; the fused path is used.
"""
import pytest
import torch

import pdml
from pdml import ops
from pdml.sample import PatchSampleF
from tests.cut_sampler import CutPatchSampleF

try:
    import pdml._C  # noqa: F401
    EXT = hasattr(torch.ops.pdml, "gather_project")
except ImportError:
    EXT = False

BACKENDS = ["reference"] + (["ext"] if EXT else [])
NC = 19


@pytest.fixture
def float64_default():
    """CUT builds its MLPs in the default dtype; the float64 comparison makes that float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_feats(seed=0):
    """Two float64 maps of different shapes (one channels-last), as leaves."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 7, 9, 11, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 5, 6, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    return [a.requires_grad_(True), b.requires_grad_(True)]


def run(sampler, feats, num_patches, patch_ids, seed=5):
    """Rows, ids and the gradients of a random weighting of all rows w.r.t. the maps and
    the sampler's parameters (by name)."""
    out, ids = sampler(feats, num_patches=num_patches, patch_ids=patch_ids)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in out)
    params = dict(sampler.named_parameters())
    grads = torch.autograd.grad(loss, list(feats) + list(params.values()))
    return out, ids, grads[:len(feats)], dict(zip(params, grads[len(feats):]))


def assert_close64(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err <= 1e-10, f"{what}: max |difference| {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_mlp", [False, True])
@pytest.mark.parametrize("num_patches", [0, 23, 1000])
def test_matches_cut_transcription_float64(float64_default, use_mlp, num_patches, backend):
    """Same seed -> same MLP weights and ids; then rows and all gradients within 1e-10,
    with the ids drawn by the samplers and with patch_ids given."""
    feats = make_feats()
    torch.manual_seed(11)
    ours = PatchSampleF(use_mlp=use_mlp, nc=NC, backend=backend)
    out, ids, g_feats, g_params = run(ours, feats, num_patches, None)
    torch.manual_seed(11)
    cut = CutPatchSampleF(use_mlp=use_mlp, nc=NC)
    c_out, c_ids, c_feats, c_params = run(cut, feats, num_patches, None)
    assert list(g_params) == list(c_params)
    for name in c_params:  # identical initialisation from the same RNG state
        assert torch.equal(ours.get_parameter(name), cut.get_parameter(name)), name
    for got, want in zip(ids, c_ids):
        if num_patches == 0:
            assert got == [] and want == []
        else:
            assert got.dtype == torch.int64 and torch.equal(got, want)
    for layer, (got, want) in enumerate(zip(out, c_out)):
        assert_close64(got, want, f"rows of layer {layer}")
    for layer, (got, want) in enumerate(zip(g_feats, c_feats)):
        assert_close64(got, want, f"grad of map {layer}")
    for name in c_params:
        assert_close64(g_params[name], c_params[name], f"grad of {name}")
    if num_patches > 0:  # the ids handed back in, as CUT's netF is called for the second image
        given = [torch.randperm(f.shape[2] * f.shape[3])[:min(num_patches, 17)] for f in feats]
        out, ids, g_feats, g_params = run(ours, feats, num_patches, given, seed=6)
        c_out, c_ids, c_feats, c_params = run(cut, feats, num_patches, given, seed=6)
        assert all(a is b for a, b in zip(ids, given))
        for got, want in zip(out + list(g_feats) + list(g_params.values()),
                             c_out + list(c_feats) + list(c_params.values())):
            assert_close64(got, want, "rows/gradients with patch_ids given")


def test_rows_shape_ids_and_normalisation():
    feats = [torch.randn(2, 4, 5, 6)]
    out, ids = PatchSampleF()(feats, num_patches=7)
    assert out[0].shape == (14, 4) and ids[0].shape == (7,) and ids[0].unique().numel() == 7
    torch.testing.assert_close(out[0][7:], feats[0][1].flatten(1)[:, ids[0]].T
                               / (feats[0][1].flatten(1)[:, ids[0]].T.norm(dim=1, keepdim=True) + 1e-7))
    out, ids = PatchSampleF(use_mlp=True, nc=8)(feats, num_patches=0)
    assert out[0].shape == (2, 8, 5, 6) and ids == [[]]


@pytest.mark.parametrize("init_type", ["normal", "xavier", "kaiming", "orthogonal"])
def test_initialisation_matches_cut(init_type, float64_default):
    feats = make_feats()
    torch.manual_seed(3)
    ours = PatchSampleF(use_mlp=True, init_type=init_type, init_gain=0.5, nc=NC)
    ours(feats, num_patches=4)
    torch.manual_seed(3)
    cut = CutPatchSampleF(use_mlp=True, init_type=init_type, init_gain=0.5, nc=NC)
    cut(feats, num_patches=4)
    for (name, got), (c_name, want) in zip(ours.state_dict().items(), cut.state_dict().items()):
        assert name == c_name and torch.equal(got, want), name


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="init_type"):
        PatchSampleF(init_type="uniform")
    with pytest.raises(ValueError, match="nc"):
        PatchSampleF(nc=0)
    with pytest.raises(ValueError, match=r"feats\[0\]"):
        PatchSampleF()([torch.randn(4, 5, 6)])


def test_cut_state_dict_loads_strictly_and_round_trips(float64_default):
    feats = make_feats()
    cut = CutPatchSampleF(use_mlp=True, nc=NC)
    cut(feats, num_patches=5)
    cut_state = cut.state_dict()
    assert "mlp_0.0.weight" in cut_state and "mlp_1.2.bias" in cut_state
    fresh = PatchSampleF(use_mlp=True, nc=NC)
    result = fresh.load_state_dict(cut_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    again = PatchSampleF(use_mlp=True, nc=NC)
    again.load_state_dict(fresh.state_dict(), strict=True)
    assert list(again.state_dict()) == list(cut_state)
    for name, value in again.state_dict().items():
        assert torch.equal(value, cut_state[name]), name
    ids = [torch.randperm(f.shape[2] * f.shape[3])[:9] for f in feats]
    got, _ = again(feats, num_patches=9, patch_ids=ids)
    want, _ = cut(feats, num_patches=9, patch_ids=ids)
    for a, b in zip(got, want):
        assert_close64(a, b, "rows after loading CUT's state_dict")
    # as a submodule (the prefix path), and the usual error for a wrong width
    holder = torch.nn.Module()
    holder.netF = PatchSampleF(use_mlp=True, nc=NC)
    holder.load_state_dict({f"netF.{k}": v for k, v in cut_state.items()}, strict=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PatchSampleF(use_mlp=True, nc=NC + 1).load_state_dict(cut_state, strict=True)


def test_first_layer_runs_fused_on_the_sampled_rows_only(monkeypatch):
    """With the MLP and num_patches > 0 the first Linear is never called as a module: its
    weight goes to ops.gather_project with the map and the ids."""
    calls = []
    real = ops.gather_project

    def spy(fmap, ids, weight, bias=None, backend="auto"):
        calls.append((fmap.shape, ids.numel(), weight.shape))
        return real(fmap, ids, weight, bias, backend=backend)

    monkeypatch.setattr(ops, "gather_project", spy)
    sampler = pdml.PatchSampleF(use_mlp=True, nc=8)
    feats = [torch.randn(2, 4, 5, 6, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)]
    sampler(feats, num_patches=0)  # creates the MLPs
    linear_calls = []
    for name in ("mlp_0", "mlp_1"):
        getattr(sampler, name)[0].register_forward_hook(lambda *a: linear_calls.append(1))
    out, ids = sampler(feats, num_patches=7)
    assert calls == [(feats[0].shape, 7, (8, 4)), (feats[1].shape, 7, (8, 3))]
    assert not linear_calls
    out[0].sum().backward()
    flat = feats[0].grad.flatten(2).clone()
    flat[:, :, ids[0]] = 0
    assert not flat.any()  # the map gradient exists only at the sampled pixels
