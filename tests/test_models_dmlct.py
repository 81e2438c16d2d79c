"""--arch dmlct: the networks of the paper's reference code (DML_CT) at its defaults.

Parameter counts, derived by hand from DML_CT's defaults (conv weight in·out·k² + bias out):

Generator (``RRDBNet(1, 1, ngf=32, growth_rate=8, num_blocks=3, num_layers=5)``):
  conv_first  1→32, 3×3:                          1·32·9 + 32 =    320
  dense block (ONE set of weights, applied 3×):
    conv 1  32→8:   32·8·9 + 8 = 2,312
    conv 2  40→8:   40·8·9 + 8 = 2,888
    conv 3  48→8:   48·8·9 + 8 = 3,464
    conv 4  56→8:   56·8·9 + 8 = 4,040
    conv 5  64→32:  64·32·9 + 32 = 18,464              sum =  31,168
  conv_mid    32→32, 1×1:                         32·32 + 32 =   1,056
  conv_last   32→1, 3×3:                          32·9 + 1   =     289
                                                         total   32,833
  (three separate blocks would give 32,833 + 2·31,168 = 95,169.)
Discriminator (``NLayerDiscriminatorSN(1, ndf=32, n_layers=3, reduction=16)``):
  conv 1→32 s2: 320; conv 32→64 s2: 18,496; SE(64→4→64): 260 + 320 = 580;
  conv 64→128 s2: 73,856; SE(128→8→128): 1,032 + 1,152 = 2,184;
  conv 128→256 s1: 295,168; SE(256→16→256): 4,112 + 4,352 = 8,464;
  conv 256→1 s1: 2,305                                   total  401,373
Heads (``ConvF_down_pool(32, netF_down=0, nc=128)``, one per NCE layer): 32·128 + 128 +
  128·128 + 128 = 20,736 each, 41,472 for the two layers.
pdml's own networks (``--arch pdml``): generator 320 + 3·(12,704 + 18,464 + SE 552) + 1,056
  + 288 (tail without bias) = 96,824; discriminator 401,373 − 580 − 2,184 − 8,464 = 390,145.

Cross-check (outside this repository, not part of the tests): the authors' modules, built
in a throwaway script from their networks/*.py with their defaults and their init_net,
have 32,833 / 401,373 / 20,736 parameters; their state_dicts load into these networks
with :func:`load_dml_ct_generator` / :func:`load_dml_ct_discriminator` and give the same
outputs (float64, eval mode) to rounding.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pdml.cli import train_main
from pdml.inference import generator_from_checkpoint
from pdml.models import (FEATURE_LAYERS, DmlCtGenerator, PatchDiscriminator, RRDNGenerator,
                         SqueezeExcitation, dml_ct_discriminator, load_dml_ct_discriminator,
                         load_dml_ct_generator)
from pdml.models.discriminator import HighPass
from pdml.training.checkpoint import load_checkpoint
from pdml.training.config import TrainConfig, make_config
from pdml.training.networks import build_networks
from pdml.training.run import TrainingRun, train

pytestmark = pytest.mark.usefixtures("one_thread")

DMLCT_GENERATOR_PARAMS = 32_833
DMLCT_DISCRIMINATOR_PARAMS = 401_373
HEAD_PARAMS = 20_736
PDML_GENERATOR_PARAMS = 96_824
PDML_DISCRIMINATOR_PARAMS = 390_145


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _weight(conv) -> torch.Tensor:
    """The stored (un-normalised) weight of a conv, spectral-normalised or not."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight.original
    return conv.weight


# --------------------------------------------------------------------------- structure

def test_parameter_counts_of_both_archs():
    for arch, g_want, d_want in (("dmlct", DMLCT_GENERATOR_PARAMS, DMLCT_DISCRIMINATOR_PARAMS),
                                 ("pdml", PDML_GENERATOR_PARAMS, PDML_DISCRIMINATOR_PARAMS)):
        g, d, heads = build_networks(make_config("tiny", arch=arch))
        assert (_count(g), _count(d)) == (g_want, d_want), arch
        assert _count(heads) == 2 * HEAD_PARAMS and heads.layers == ("trunk", "fusion")
    # pdml's high-pass discriminator input (--d-input highpass) adds no parameters
    _, d, _ = build_networks(make_config("tiny", arch="dmlct", d_input="highpass"))
    assert isinstance(d.input_filter, HighPass) and _count(d) == DMLCT_DISCRIMINATOR_PARAMS
    # the paper preset trains the authors' networks; the others keep pdml's
    assert make_config("paper").arch == "dmlct"
    assert make_config("demo").arch == "pdml" and make_config("tiny").arch == "pdml"


def test_dmlct_generator_layer_structure():
    g = DmlCtGenerator()
    layout = [(name, c.in_channels, c.out_channels, c.kernel_size[0], c.padding_mode,
               c.bias is not None) for name, c in g.named_modules() if isinstance(c, nn.Conv2d)]
    assert layout == [
        ("head", 1, 32, 3, "replicate", True),
        ("rdb.convs.0", 32, 8, 3, "replicate", True),
        ("rdb.convs.1", 40, 8, 3, "replicate", True),
        ("rdb.convs.2", 48, 8, 3, "replicate", True),
        ("rdb.convs.3", 56, 8, 3, "replicate", True),
        ("rdb.convs.4", 64, 32, 3, "replicate", True),
        ("fusion", 32, 32, 1, "zeros", True),
        ("tail", 32, 1, 3, "replicate", True),
    ]
    assert all(parametrize.is_parametrized(c, "weight") for c in _convs(g))
    assert not any(isinstance(m, SqueezeExcitation) for m in g.modules())


def test_dmlct_discriminator_layer_structure():
    d = dml_ct_discriminator()
    main = [(c.in_channels, c.out_channels, c.stride[0]) for c in _convs(d)
            if parametrize.is_parametrized(c, "weight")]
    assert main == [(1, 32, 2), (32, 64, 2), (64, 128, 2), (128, 256, 1), (256, 1, 1)]
    se = [m for m in d.modules() if isinstance(m, SqueezeExcitation)]
    assert [(m.squeeze.in_channels, m.squeeze.out_channels) for m in se] == [
        (64, 4), (128, 8), (256, 16)]
    # attention after the LeakyReLU of every inner conv; its convs are plain (as DML_CT's)
    kinds = [type(m).__name__ for m in d.net]
    assert kinds == ["ParametrizedConv2d", "LeakyReLU"] + [
        "ParametrizedConv2d", "LeakyReLU", "SqueezeExcitation"] * 3 + ["ParametrizedConv2d"]
    assert not any(parametrize.is_parametrized(c, "weight") for m in se for c in _convs(m))
    assert d(torch.randn(2, 1, 32, 24)).shape == (2, 1, 4, 3)
    # pdml's discriminator is the same without the attention
    assert [type(m).__name__ for m in PatchDiscriminator().net].count("SqueezeExcitation") == 0


def test_the_dense_block_is_one_set_of_weights_applied_three_times():
    torch.manual_seed(0)
    g = DmlCtGenerator().eval()
    block_params = list(g.rdb.parameters())
    assert len(block_params) == 10  # 5 convs × (weight, bias), once
    names = [n for n, _ in g.named_parameters()]
    assert sum(n.startswith("rdb.") for n in names) == 10
    calls = []
    g.rdb.register_forward_hook(lambda m, inp, out: calls.append(out))
    x = torch.randn(2, 1, 12, 10)
    head, rdb1, rdb2, rdb3 = g.features(x, ("head", "rdb1", "rdb2", "rdb3"))
    assert len(calls) == 3
    torch.testing.assert_close(rdb1, g.rdb(head), rtol=0, atol=0)
    torch.testing.assert_close(rdb3, g.rdb(g.rdb(g.rdb(head))), rtol=0, atol=0)
    # one gradient per shared weight, summed over the three applications
    g.train()
    g(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block_params)


def _block_reference(block, x):
    """DML_CT's dense block written out with functional ops (float64, eval-mode weights)."""
    feats = [x]
    for conv in block.convs:
        inp = F.pad(torch.cat(feats, 1), (1, 1, 1, 1), mode="replicate")
        feats.append(F.leaky_relu(F.conv2d(inp, conv.weight, conv.bias), 0.2))
    return x + 0.1 * feats[-1]


def test_feature_maps_and_the_authors_forward():
    torch.manual_seed(1)
    g = DmlCtGenerator().double().eval()
    # trained-like weights: the init's tiny weights would make every check trivially close
    with torch.no_grad():
        for conv in _convs(g):
            conv.bias.normal_(0, 0.1)
    x = torch.randn(3, 1, 17, 13, dtype=torch.float64)
    maps = g.features(x, FEATURE_LAYERS)
    assert [tuple(m.shape) for m in maps] == [(3, 32, 17, 13)] * len(FEATURE_LAYERS)
    head, rdb1, rdb2, rdb3, trunk, fusion = maps
    torch.testing.assert_close(rdb1, _block_reference(g.rdb, head), rtol=1e-12, atol=1e-12)
    # no skip but the trunk's own: trunk = head + 0.1·blocks, fusion = conv_mid(trunk)
    torch.testing.assert_close(trunk, head + 0.1 * rdb3, rtol=0, atol=0)
    torch.testing.assert_close(fusion, F.conv2d(trunk, g.fusion.weight, g.fusion.bias),
                               rtol=1e-12, atol=1e-12)
    # output = conv_last(LeakyReLU(fusion)), no input residual
    want = F.conv2d(F.pad(F.leaky_relu(fusion, 0.2), (1, 1, 1, 1), mode="replicate"),
                    g.tail.weight, g.tail.bias)
    out, (t, f) = g.forward_with_features(x, ("trunk", "fusion"))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g(x), out, rtol=0, atol=0)
    torch.testing.assert_close(t, trunk, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown feature layer"):
        g.features(x, ("conv_mid",))
    with pytest.raises(ValueError, match="x must have shape"):
        g(x[:, 0])


def test_init_is_normal_001_with_zero_biases_on_all_three_networks():
    torch.manual_seed(2)
    g, d, heads = build_networks(make_config("tiny", arch="dmlct"))
    for net in (g, d, heads):
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        weights = torch.cat([_weight(m).detach().flatten() for m in layers])
        assert weights.numel() > 20_000
        assert abs(float(weights.std()) - 0.01) < 0.0005, type(net).__name__
        assert abs(float(weights.mean())) < 0.0005
        assert all(float(m.bias.detach().abs().max()) == 0.0 for m in layers if m.bias is not None)
    # the spectral norm is estimated from the final weights: σ(W_effective) ≈ 1 at once
    conv = g.rdb.convs[4]
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert abs(float(sigma) - 1.0) < 0.05
    # pdml's networks keep PyTorch's default initialisation
    gp, _, hp = build_networks(make_config("tiny", arch="pdml"))
    assert float(_weight(gp.head).detach().std()) > 0.1
    assert float(hp.heads["trunk"][0].bias.detach().abs().max()) > 0


# --------------------------------------------------------------------------- the authors' weights

def _authors_generator_state(g: DmlCtGenerator) -> dict:
    """``g``'s weights under DML_CT's keys (torch.nn.utils.spectral_norm, the shared block
    listed once per application, as their state_dict does)."""
    ours = g.state_dict()
    out = {}

    def put(theirs, mine):
        out[f"{theirs}.bias"] = ours[f"{mine}.bias"]
        out[f"{theirs}.weight_orig"] = ours[f"{mine}.parametrizations.weight.original"]
        out[f"{theirs}.weight_u"] = ours[f"{mine}.parametrizations.weight.0._u"]
        out[f"{theirs}.weight_v"] = ours[f"{mine}.parametrizations.weight.0._v"]

    put("conv_first", "head")
    for rep in range(3):
        for i in range(5):
            put(f"rrdb.layers.{rep}.nets.{i}", f"rdb.convs.{i}")
    put("conv_mid", "fusion")
    put("conv_last", "tail")
    return out


def test_the_authors_state_dicts_load():
    torch.manual_seed(3)
    src = DmlCtGenerator().eval()
    with torch.no_grad():
        for conv in _convs(src):
            conv.bias.normal_(0, 0.1)
    theirs = _authors_generator_state(src)
    dst = DmlCtGenerator().eval()
    load_dml_ct_generator(dst, {"module." + k: v for k, v in theirs.items()})
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    bad = dict(theirs)
    bad["rrdb.layers.2.nets.3.bias"] = bad["rrdb.layers.2.nets.3.bias"] + 1
    with pytest.raises(ValueError, match="share their weights"):
        load_dml_ct_generator(dst, bad)
    with pytest.raises(ValueError, match="conv layers"):
        load_dml_ct_generator(dst, {k: v for k, v in theirs.items() if "conv_last" not in k})

    d_src = dml_ct_discriminator().eval()
    their_d = {}
    for j, (name, conv) in enumerate(n_c for n_c in d_src.named_modules()
                                     if isinstance(n_c[1], nn.Conv2d)):
        for key, value in conv.state_dict().items():
            key = {"parametrizations.weight.original": "weight_orig",
                   "parametrizations.weight.0._u": "weight_u",
                   "parametrizations.weight.0._v": "weight_v"}.get(key, key)
            their_d[f"model.{j}.{key}"] = value
    d_dst = dml_ct_discriminator().eval()
    load_dml_ct_discriminator(d_dst, their_d)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(d_dst(x), d_src(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- training

def _stop_after(monkeypatch, step):
    """Make the next run stop (evaluate, checkpoint, summarise) once it reached ``step``."""
    monkeypatch.setattr(TrainingRun, "_stop_now", lambda self, started: self.step >= step)


@pytest.mark.usefixtures("private_cache")
def test_tiny_dmlct_run_trains_and_resumes_exactly(tmp_path, monkeypatch):
    args = ["--preset", "tiny", "--arch", "dmlct", "--ckpt-every", "2", "--eval-every", "2",
            "--no-progress"]
    assert train_main([*args, "--out", str(tmp_path / "straight")]) == 0
    straight = load_checkpoint(tmp_path / "straight")
    assert straight["config"]["arch"] == "dmlct" and straight["step"] == 4
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        assert train_main([*args, "--out", str(tmp_path / "split")]) == 0
    assert load_checkpoint(tmp_path / "split")["step"] == 2
    run = TrainingRun(None, resume=str(tmp_path / "split"))
    assert isinstance(run.generator, DmlCtGenerator)
    run.run()
    resumed = load_checkpoint(tmp_path / "split")
    assert resumed["step"] == 4
    for net in ("generator", "discriminator", "heads"):
        a, b = straight["model"][net], resumed["model"][net]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), net
    generator, cfg = generator_from_checkpoint(resumed, torch.device("cpu"))
    assert isinstance(generator, DmlCtGenerator) and cfg.arch == "dmlct"


@pytest.mark.usefixtures("private_cache")
def test_a_run_from_before_the_arch_option_resumes_as_pdml(tmp_path, monkeypatch):
    out = tmp_path / "old"
    cfg = make_config("tiny", out=str(out), progress=False, eval_every=10, ckpt_every=10)
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        train(cfg)
    # rewrite the run as the trainer wrote it before: no "arch" in either config
    last = out / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["config"]["arch"]
    torch.save(ckpt, last)
    saved = json.loads((out / "config.json").read_text())
    del saved["arch"]
    (out / "config.json").write_text(json.dumps(saved))
    assert TrainConfig.from_dict(ckpt["config"]).arch == "pdml"
    generator, _ = generator_from_checkpoint(load_checkpoint(out), torch.device("cpu"))
    assert isinstance(generator, RRDNGenerator)
    assert train_main(["--resume", str(out)]) == 0
    done = load_checkpoint(out)
    assert done["step"] == 4 and done["config"]["arch"] == "pdml"
    assert json.loads((out / "config.json").read_text())["arch"] == "pdml"
    # a dmlct checkpoint's weights do not pass for pdml's generator (and back)
    done["config"]["arch"] = "dmlct"
    from pdml.training.config import TrainError

    with pytest.raises(TrainError, match="'dmlct' generator"):
        generator_from_checkpoint(done, torch.device("cpu"))


def test_arch_option_is_validated():
    from pdml.training.config import TrainError

    with pytest.raises(TrainError, match="--arch"):
        make_config("tiny", arch="esrgan")
    with pytest.raises(SystemExit) as e:  # argparse's choices: usage line, exit 2
        train_main(["--preset", "tiny", "--arch", "esrgan"])
    assert e.value.code == 2
