"""pdml.models: shapes, named feature layers, spectral norm, padding, independent blocks."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pdml.models import (DEFAULT_LOSS_LAYERS, FEATURE_LAYERS, PatchDiscriminator, ProjectionHeads,
                         RRDNGenerator)


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


def test_bad_inputs_are_named(generator):
    with pytest.raises(ValueError, match="unknown feature layer"):
        generator.features(torch.randn(1, 1, 8, 8), ("nope",))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        generator(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="blocks must be 3"):
        RRDNGenerator(blocks=4)
