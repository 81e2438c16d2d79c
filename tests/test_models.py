"""pdml.models: shapes, named feature layers, spectral norm, padding, independent blocks."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pdml.models import (DEFAULT_LOSS_LAYERS, FEATURE_LAYERS, PatchDiscriminator, ProjectionHead,
                         ProjectionHeads, RRDNGenerator)
from pdml.models.heads import DML_CT_HEAD_KEYS, load_dml_ct_heads


pytestmark = pytest.mark.usefixtures("one_thread")


def _convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return RRDNGenerator().eval()


def test_generator_shapes_and_named_feature_layers(generator):
    x = torch.randn(2, 1, 24, 20)
    out = generator(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    maps = generator.features(x, FEATURE_LAYERS)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 24, 20)] * len(FEATURE_LAYERS)
    out2, loss_maps = generator.forward_with_features(x, DEFAULT_LOSS_LAYERS)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    # the early-stopping feature pass gives the same maps as the full pass
    for name, m in zip(DEFAULT_LOSS_LAYERS, loss_maps):
        torch.testing.assert_close(m, maps[FEATURE_LAYERS.index(name)], rtol=0, atol=0)
    assert DEFAULT_LOSS_LAYERS == ("trunk", "fusion")


def test_generator_paper_layout(generator):
    assert len(generator.rdbs) == 3
    for rdb in generator.rdbs:
        assert len(rdb.convs) + 1 == 5  # 5 dense 3x3 convs per block
        assert [c.out_channels for c in _convs(rdb.convs)] == [8, 8, 8, 8]
        assert hasattr(rdb, "attention")
    assert generator.fusion.kernel_size == (1, 1)
    # each block has its own weights
    w = [rdb.fuse.parametrizations.weight.original for rdb in generator.rdbs]
    assert len({t.data_ptr() for t in w}) == 3 and not torch.equal(w[0], w[1])


def test_spectral_norm_and_replicate_padding(generator):
    for conv in _convs(generator):
        assert parametrize.is_parametrized(conv, "weight")
        if conv.kernel_size != (1, 1):
            assert conv.padding_mode == "replicate"
    assert generator.tail.bias is None  # no constant offset of the predicted image
    for conv in _convs(PatchDiscriminator()):
        assert parametrize.is_parametrized(conv, "weight")
        assert conv.kernel_size == (3, 3)


def test_spectral_norm_bounds_the_weight():
    torch.manual_seed(1)
    d = PatchDiscriminator().train()
    x = torch.randn(1, 1, 32, 32)
    for _ in range(30):  # power iterations converge during training forwards
        d(x)
    d.eval()
    for conv in _convs(d):
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 0.05


def test_replicate_padding_keeps_a_constant_image_constant_inside_convs():
    # with replicate padding, a constant input gives a constant map (zeros padding would not)
    g = RRDNGenerator().eval()
    maps = g.features(torch.full((1, 1, 16, 16), 0.3), ("head",))[0]
    assert torch.allclose(maps, maps[:, :, :1, :1].expand_as(maps), atol=1e-6)


def test_discriminator_is_a_patchgan():
    d = PatchDiscriminator(ndf=32, layers=3)
    assert d(torch.randn(3, 1, 64, 48)).shape == (3, 1, 8, 6)
    assert [c.out_channels for c in _convs(d)] == [32, 64, 128, 256, 1]


def test_projection_heads_shapes_and_gradients(generator):
    heads = ProjectionHeads(DEFAULT_LOSS_LAYERS)
    g = RRDNGenerator()
    x = torch.randn(2, 1, 16, 16)
    maps = heads(g.features(x))
    assert [tuple(m.shape) for m in maps] == [(2, 128, 16, 16)] * 2
    sum(m.square().mean() for m in maps).backward()
    assert g.head.parametrizations.weight.original.grad.abs().sum() > 0
    assert all(p.grad is not None for p in heads.parameters())
    with pytest.raises(ValueError, match="expected 2 maps"):
        heads(maps[:1])


def test_projection_head_is_a_row_mlp_with_the_old_state_dict_keys():
    head = ProjectionHead(32, 128, 64)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "0.weight": (128, 32), "0.bias": (128,), "2.weight": (64, 128), "2.bias": (64,)}
    heads = ProjectionHeads(DEFAULT_LOSS_LAYERS)
    assert list(heads.state_dict()) == [f"heads.{n}.{k}" for n in DEFAULT_LOSS_LAYERS
                                        for k in ("0.weight", "0.bias", "2.weight", "2.bias")]


def _conv_head_state(in_ch, hidden, out, dtype=torch.float32):
    """A state_dict of the heads earlier pdml runs trained: 1×1 convs."""
    conv = nn.Sequential(nn.Conv2d(in_ch, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, out, 1))
    return conv.to(dtype), conv.state_dict()


def test_old_conv_head_weights_load_and_compute_the_same_function():
    torch.manual_seed(1)
    conv, state = _conv_head_state(5, 7, 6, torch.float64)
    assert state["0.weight"].shape == (7, 5, 1, 1)
    head = ProjectionHead(5, 7, 6).double()
    head.load_state_dict(state, strict=True)
    assert state["0.weight"].shape == (7, 5, 1, 1)  # the caller's dict is left as it was
    fmap = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(head.forward_map(fmap), conv(fmap), rtol=0, atol=1e-12)
    rows = fmap.permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(head(rows), conv(fmap).permute(0, 2, 3, 1).reshape(-1, 6),
                               rtol=0, atol=1e-12)
    # nested: a ProjectionHeads state_dict of old runs
    heads = ProjectionHeads(("trunk",), 5, 7, 6)
    heads.load_state_dict({f"heads.trunk.{k}": v.float() for k, v in state.items()})
    torch.testing.assert_close(heads.heads.trunk[0].weight, state["0.weight"].float()[:, :, 0, 0])
    with pytest.raises(RuntimeError, match="size mismatch"):
        ProjectionHead(5, 8, 6).load_state_dict(state)


def test_forward_sampled_projects_only_the_sampled_pixels():
    torch.manual_seed(2)
    head = ProjectionHead(6, 9, 5).double()
    fmap = torch.randn(3, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([33, 0, 17, 4, 21])
    rows = head.forward_sampled(fmap, ids, backend="reference")
    full = head.forward_map(fmap).flatten(2)[:, :, ids].transpose(1, 2).reshape(-1, 5)
    assert rows.shape == (3 * 5, 5)
    torch.testing.assert_close(rows, full, rtol=0, atol=1e-12)
    grad, = torch.autograd.grad(rows.square().sum(), fmap)
    untouched = torch.ones(35, dtype=torch.bool)
    untouched[ids] = False
    assert grad.flatten(2)[:, :, untouched].abs().max() == 0  # no dense head backward
    assert (grad.flatten(2)[:, :, ids].abs().sum(1) > 0).all()  # every sampled pixel gets one
    heads = ProjectionHeads(("trunk", "fusion"), 6, 9, 5).double()
    with pytest.raises(ValueError, match="expected 2 ids"):
        heads.forward_sampled([fmap, fmap], [ids])


def test_dml_ct_conv_f_down_pool_heads_map_onto_projection_heads():
    # DML_CT keeps one ConvF_down_pool per NCE layer; with netF_down=0 its state_dict is
    # conv.0 (1×1 conv in→nc), conv.2 (1×1 conv nc→nc); ReLU (conv.1) has no weights.
    torch.manual_seed(3)
    nc, layers = 16, ("trunk", "fusion")
    convs, states = [], []
    for i in range(len(layers)):
        conv = nn.Sequential(nn.Conv2d(32, nc, 1), nn.ReLU(), nn.Conv2d(nc, nc, 1)).double()
        convs.append(conv)
        prefix = "module." if i == 1 else ""  # a DataParallel-saved one
        states.append({f"{prefix}conv.{k}": v for k, v in conv.state_dict().items()})
    assert sorted(k.replace("module.", "") for k in states[1]) == sorted(DML_CT_HEAD_KEYS)
    heads = ProjectionHeads(layers, 32, nc, nc).double()
    load_dml_ct_heads(heads, states)
    fmap = torch.randn(2, 32, 5, 4, dtype=torch.float64)
    for name, conv in zip(layers, convs):
        torch.testing.assert_close(heads.heads[name].forward_map(fmap), conv(fmap),
                                   rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one per layer"):
        load_dml_ct_heads(heads, states[:1])
    pooled = dict(states[0], **{"conv.3.weight": torch.zeros(nc, nc, 1, 1)})
    with pytest.raises(ValueError, match="netF_down=0"):
        load_dml_ct_heads(heads, [pooled, states[1]])
    wide = dict(states[0], **{"conv.2.weight": torch.zeros(nc, nc, 2, 2)})
    with pytest.raises(ValueError, match=r"1×1 conv weight"):
        load_dml_ct_heads(heads, [wide, states[1]])
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_dml_ct_heads(ProjectionHeads(layers, 32, 8, 8), states)


def test_bad_inputs_are_named(generator):
    with pytest.raises(ValueError, match="unknown feature layer"):
        generator.features(torch.randn(1, 1, 8, 8), ("nope",))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        generator(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="blocks must be 3"):
        RRDNGenerator(blocks=4)
