"""pdml.training: schedule, config, checkpoints, one step per precision and loss, a full tiny
run, exact resume after SIGKILL, and a 2-process torchrun (gloo) run."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pdml
from pdml.training.checkpoint import (CHECKPOINT_FORMAT, atomic_write_bytes, load_checkpoint,
                                      save_checkpoint)
from pdml.training.config import TrainConfig, TrainError, lr_factor, make_config
from pdml.training.rng import capture_rng_state, restore_rng_state
from pdml.training.run import TrainingRun, train
from pdml.training.step import patch_loss
from pdml.cli import train_main

PDML_TRAIN = str(Path(sys.executable).with_name("pdml-train"))


pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _records(run_dir, kind):
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            out.append(rec)
    return out


def _params(ckpt):
    return {f"{m}.{k}": v for m in ("generator", "discriminator", "heads")
            for k, v in ckpt["model"][m].items()}


# --------------------------------------------------------------------------- units

def test_lr_schedule_constant_then_linear_decay():
    cfg = make_config("tiny", steps=10, decay_steps=4)
    factors = [lr_factor(s, cfg) for s in range(11)]
    assert factors[:6] == [1.0] * 6
    assert factors[6:] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_presets_and_config_validation():
    demo = make_config()
    assert (demo.preset, demo.loss, demo.lambda_gan, demo.lambda_identity, demo.lambda_metric,
            demo.resolved_tau, demo.num_patches, demo.loss_layers, demo.lr, demo.beta1,
            demo.beta2, demo.wavelet) == ("demo", "dml", 1.0, 5.0, 0.1, 0.15, 128,
                                          ("trunk", "fusion"), 2e-4, 0.5, 0.999, True)
    assert make_config(loss="patchnce").resolved_tau == 0.07
    assert TrainConfig.from_dict(demo.to_dict()) == demo
    for kwargs, match in [({"loss": "nce"}, "--loss"), ({"precision": "fp8"}, "--precision"),
                          ({"ldct": "/a"}, "--ldct and --ndct"), ({"steps": 0}, "--steps"),
                          ({"decay_steps": 10**9}, "--decay-steps"),
                          ({"loss_backend": "cuda"}, "--loss-backend"), ({"crop": 4}, "--crop")]:
        with pytest.raises(TrainError, match=match):
            make_config("tiny", **kwargs)
    with pytest.raises(TrainError, match="--preset"):
        make_config("huge")


def test_config_records_resolved_values_and_old_configs_still_load():
    """tau is stored as the value used; config.json's "resolved" record and the nulls of
    configs written before (tau, threads, lr_d) are read back."""
    cfg = make_config("tiny", loss="patchnce")
    assert cfg.tau == 0.07 and make_config("tiny").tau == 0.15
    old = dict(cfg.to_dict(), tau=None, threads=None, lr_d=None, device="auto")
    back = TrainConfig.from_dict({**old, "resolved": {"device": "cpu", "cpu_threads": 2}})
    back.validate()
    assert back.tau is None and back.resolved_tau == 0.07 and back.threads is None
    with pytest.raises(TrainError, match="unknown config keys"):
        TrainConfig.from_dict({**old, "resolvd": {}})


def test_resumed_config_changes_only_what_may_change(tmp_path):
    from pdml.training.config import resumed_config

    cfg = make_config("tiny", out=str(tmp_path))
    assert resumed_config(cfg, 4, tmp_path, steps=10, progress=False).steps == 10
    assert resumed_config(cfg, 4, tmp_path, lr=cfg.lr, preset="tiny", out=str(tmp_path)) == cfg
    assert resumed_config(cfg, 4, tmp_path, max_minutes=None).max_minutes is None
    for given, words in [({"lr": 1.0}, "--lr 1 differs from the run's 0.0002"),
                         ({"steps": 3}, "below the step the run has reached (4)"),
                         ({"steps": 5, "decay_steps": 6}, "--decay-steps"),
                         ({"out": str(tmp_path / "x")}, "--out")]:
        with pytest.raises(TrainError, match=re.escape(words)):
            resumed_config(cfg, 4, tmp_path, **given)


def test_shift_options_are_ordinary_settings():
    """--lr-d, --nd-offset-hu, --input-center-hu, --builtin-layout: TrainConfig fields,
    checked by validate() (types and ranges), stored and read back by to/from_dict."""
    cfg = make_config("tiny", lr_d=1e-4, nd_offset_hu=-50.0, input_center_hu=0.0,
                      builtin_layout="same-anatomy", features=16)
    assert (cfg.resolved_lr_d, cfg.nd_offset_hu, cfg.input_center_hu) == (1e-4, -50.0, 0.0)
    assert make_config("tiny").resolved_lr_d == make_config("tiny").lr
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()  # a run stored before these fields existed: today's behaviour
    for key in ("lr_d", "nd_offset_hu", "input_center_hu", "builtin_layout"):
        old.pop(key)
    restored = TrainConfig.from_dict(old)
    restored.validate()
    assert (restored.lr_d, restored.nd_offset_hu, restored.input_center_hu,
            restored.builtin_layout) == (None, 0.0, None, "domains")
    for kwargs, match in [({"lr_d": 0.0}, "--lr-d"), ({"lr_d": float("nan")}, "--lr-d"),
                          ({"lr_d": True}, "--lr-d"), ({"nd_offset_hu": 2000.0}, "--nd-offset-hu"),
                          ({"nd_offset_hu": "100"}, "--nd-offset-hu"),
                          ({"nd_offset_hu": float("inf")}, "--nd-offset-hu"),
                          ({"input_center_hu": -1500.0}, "--input-center-hu"),
                          ({"builtin_layout": "pooled"}, "--builtin-layout"),
                          ({"features": 1.5}, "--features")]:
        with pytest.raises(TrainError, match=match):
            make_config("tiny", **kwargs)


def test_network_scale_is_one_map_for_training_and_inference():
    """to_network / from_network: the wavelet band is centred at 0 HU, whole images at
    --input-center-hu (default: the window's low edge, the paper's [0, 1] input); the
    trainer's crops and pdml.inference.denoise_hu use the same map, so an identity
    generator returns its input and a constant output offset c is c·2000/net_scale HU."""
    from pdml.data import hu_to_unit
    from pdml.inference import denoise_hu
    from pdml.training.networks import from_network, to_network

    hu = np.array([-1000.0, 0.0, 40.0, 1000.0], dtype=np.float32)
    unit = hu_to_unit(hu, clip=False)
    cases = [(dict(), 20.0, 0.0), (dict(wavelet=False), 1.0, -1000.0),
             (dict(wavelet=False, input_center_hu=0.0), 1.0, 0.0),
             (dict(wavelet=False, input_center_hu=40.0, net_scale=4.0), 4.0, 40.0)]
    rng = np.random.default_rng(0)
    slices = rng.normal(30.0, 25.0, (2, 64, 64)).astype(np.float32)

    class Plus(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return x + self.c

    for kwargs, scale, zero_hu in cases:
        cfg = make_config("tiny", **kwargs)
        np.testing.assert_allclose(to_network(unit, cfg), (hu - zero_hu) / 2000.0 * scale,
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(from_network(to_network(unit, cfg), cfg), unit, atol=1e-7)
        same = denoise_hu(Plus(0.0), slices, cfg, torch.device("cpu"))
        np.testing.assert_allclose(same, slices, atol=0.02)
        up = denoise_hu(Plus(0.05), slices, cfg, torch.device("cpu"))
        assert float((up - slices).mean()) == pytest.approx(0.05 * 2000.0 / scale, rel=1e-4)


def test_nd_offset_and_same_anatomy_layout_reach_the_training_crops():
    """--builtin-layout same-anatomy trains LD = the pool's low dose against ND = the
    same pool's noiseless FBP; --nd-offset-hu adds the offset to ND only (soft tissue
    gets all of it, air none), never to LD or the held-out slices."""
    from pdml.data import builtin_dataset
    from pdml.training.data import build_data
    from pdml.training.distributed import DistInfo

    info = DistInfo()
    kw = dict(builtin_layout="same-anatomy", wavelet=False, builtin_size=64)
    plain = build_data(make_config("tiny", **kw), info)
    shifted = build_data(make_config("tiny", nd_offset_hu=100.0, **kw), info)
    ds = builtin_dataset(size=64, progress=False, layout="same-anatomy")
    truth, ld = ds.load("train/truth"), ds.load("train/ld")
    np.testing.assert_array_equal(plain.train.dataset.nd, truth)
    np.testing.assert_array_equal(shifted.train.dataset.ld, ld)
    diff = shifted.train.dataset.nd - truth
    tissue, air = truth > -100, truth <= -1000  # offset weight 1 and 0 (AcquisitionShift)
    assert tissue.sum() > 1000 and air.sum() > 100
    np.testing.assert_allclose(diff[tissue], 100.0, atol=1e-3)
    np.testing.assert_allclose(diff[air], 0.0, atol=1e-3)
    for a, b in zip(plain.val, shifted.val):
        assert np.array_equal(a.ld, b.ld) and np.array_equal(a.nd, b.nd)
    with pytest.raises(TrainError, match="--nd-offset-hu"):
        make_config("tiny", nd_offset_hu=-1001.0)


def test_lr_d_is_the_discriminator_learning_rate(tmp_path):
    run = TrainingRun(make_config("tiny", lr=3e-4, lr_d=5e-5, out=str(tmp_path / "run"),
                                  progress=False))
    try:
        assert run.opt_g.param_groups[0]["lr"] == pytest.approx(3e-4)
        assert run.opt_d.param_groups[0]["lr"] == pytest.approx(5e-5)
    finally:
        run.close()


def _conv_head(head, fmap):
    """The old trainer's head: 1×1 convs over every pixel of the map."""
    w0, b0, w2, b2 = head[0].weight, head[0].bias, head[2].weight, head[2].bias
    hidden = torch.nn.functional.conv2d(fmap, w0[:, :, None, None], b0).relu()
    return torch.nn.functional.conv2d(hidden, w2[:, :, None, None], b2)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("loss", ["dml", "patchnce"])
def test_sampled_first_patch_loss_equals_heads_on_full_maps(loss, backend):
    """The trainer's path (sample, project the rows, one rows-form call for all layers)
    against the old one (heads as 1×1 convs on the full maps, then the map-form reference
    loss per layer at the same ids, averaged): loss and gradients w.r.t. the generator's
    feature maps and the heads' weights, float64, within 1e-10."""
    from pdml.models import ProjectionHeads
    from pdml.training.step import project_patches, sample_patch_ids

    cfg = make_config("tiny", loss=loss, num_patches=13, loss_backend=backend)
    layers, b, f, h, w = len(cfg.loss_layers), 3, 6, 7, 9
    torch.manual_seed(0)
    heads = ProjectionHeads(cfg.loss_layers, in_channels=f, hidden=11, out_channels=10).double()
    q_maps = [torch.randn(b, f, h, w, dtype=torch.float64, requires_grad=True)
              for _ in range(layers)]
    k_maps = [torch.randn(b, f, h, w, dtype=torch.float64, requires_grad=True)
              for _ in range(layers)]
    leaves = q_maps + k_maps + list(heads.parameters())
    ids = sample_patch_ids(h * w, cfg.num_patches, layers, torch.device("cpu"))
    assert all(len(set(i.tolist())) == 13 for i in ids) and not torch.equal(ids[0], ids[1])

    q, k = project_patches(heads, q_maps, k_maps, ids, backend=backend)
    assert q.shape == k.shape == (layers * b * 13, 10) and q.dtype == torch.float64
    new = patch_loss(cfg, q, k, b)
    old = 0.0
    for name, qm, km, i in zip(cfg.loss_layers, q_maps, k_maps, ids):
        head = heads.heads[name]
        if loss == "dml":
            old = old + pdml.reference.patch_metric(_conv_head(head, qm), _conv_head(head, km),
                                                    i, tau=0.15)
        else:
            old = old + pdml.reference.patch_nce(_conv_head(head, qm), _conv_head(head, km),
                                                 i, tau=0.07).mean()
    old = old / layers
    grads_new = torch.autograd.grad(new, leaves, allow_unused=True, materialize_grads=True)
    grads_old = torch.autograd.grad(old, leaves, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-10)
    for g_new, g_old in zip(grads_new, grads_old):
        torch.testing.assert_close(g_new, g_old, rtol=0, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in grads_new[:layers] + grads_new[2 * layers:])
    if loss == "patchnce":  # CUT detaches the keys
        assert all(g.abs().sum() == 0 for g in grads_new[layers:2 * layers])


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    import random

    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint({"rng": state}, tmp_path / "s.pt")
    restore_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_load_checkpoint_rejects_foreign_and_corrupt_files(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(TrainError, match="not a pdml-train checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TrainError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "torn.pt")
    with pytest.raises(TrainError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_atomic_write_leaves_old_or_new_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no tmp file left behind


def _pdml_imports(path: Path) -> set[str]:
    """The pdml modules a source file imports (module level and inside functions)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdml"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pdml"))
    return out


def test_training_package_has_one_job_per_file_and_imports_point_down():
    root = Path(pdml.__file__).parent
    files = sorted((root / "training").glob("*.py"))
    assert {f.stem for f in files} >= {"config", "distributed", "checkpoint", "rng", "step",
                                       "data", "evaluate", "report", "telemetry", "run"}
    assert not (root / "train.py").exists()
    for f in files:
        assert len(f.read_text().splitlines()) <= 400, f"{f.name} is over 400 lines"
        if f.stem not in ("run", "__init__"):
            assert "pdml.training.run" not in _pdml_imports(f), f"{f.name} imports run.py back"
    assert not any(m.startswith("pdml.training.run") or m in ("pdml.training.train",
                                                              "pdml.training.TrainingRun")
                   for m in _pdml_imports(root / "inference.py"))
    # the public names README and the tests use
    import pdml.training as training

    for name in ("train", "TrainingRun", "TrainConfig", "make_config", "TrainError", "PRESETS",
                 "load_checkpoint", "evaluate_slices", "denoise_slices", "ValItem"):
        assert getattr(training, name) is not None
    assert set(training.__all__) <= set(dir(training))
    with pytest.raises(AttributeError):
        training.no_such_name


def test_evaluate_slices_returns_metrics_only():
    from pdml.training.data import ValItem
    from pdml.training.evaluate import evaluate_slices

    rng = np.random.default_rng(0)
    nd = rng.normal(40.0, 5.0, (48, 48)).astype(np.float32)
    paired = [ValItem(nd + rng.normal(0, 20, nd.shape).astype(np.float32), nd, "a")]
    got = evaluate_slices(paired, [nd + 1.0])
    assert set(got) == {"psnr", "ssim", "noise_std", "hu_shift", "ld_psnr", "ld_ssim",
                        "ld_noise_std", "ld_hu_shift", "slices"}
    assert got["slices"] == 1 and got["hu_shift"] == pytest.approx(1.0, abs=1e-3)
    assert got["psnr"] > got["ld_psnr"]
    unpaired = evaluate_slices([ValItem(nd, None)], [nd])
    assert unpaired["psnr"] is None and unpaired["hu_shift"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="denoised"):
        evaluate_slices(paired, [])


# --------------------------------------------------------------------------- training

def test_figures_carry_psnr_and_hu_shift(tmp_path, monkeypatch):
    """The eval figure titles its LD and denoised panels with the numbers the run records
    (PSNR, noise, HU shift); losses.png has a PSNR and an HU-shift panel per evaluation."""
    from pdml.training import report
    from pdml.training.data import ValItem

    figures = []
    monkeypatch.setattr(report, "_write_figure", lambda fig, path: figures.append(fig))
    rng = np.random.default_rng(0)
    nd = np.full((64, 64), 40.0, np.float32)
    ld = nd + rng.normal(0, 20, nd.shape).astype(np.float32)
    report.save_eval_figure(ValItem(ld, nd), ld * 0.5 + nd * 0.5, tmp_path / "e.png", step=7)
    titles = [ax.get_title() for ax in figures[-1].axes]
    assert "PSNR" in titles[0] and "HU shift" in titles[0] and "noise" in titles[0]
    assert "step 7" in titles[1] and "PSNR" in titles[1] and "HU shift" in titles[1]
    metrics = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        report.append_metrics(metrics, {"kind": "train", "step": step, "loss_G": 1.0,
                                        "loss_D": 0.2, "loss_gan": 0.5, "loss_idt": 0.1,
                                        "loss_patch": 2.0})
    report.append_metrics(metrics, {"kind": "eval", "step": 2, "psnr": 40.0, "ld_psnr": 38.0,
                                    "hu_shift": 1.5, "ld_hu_shift": -0.5})
    report.save_loss_figure(metrics, tmp_path / "losses.png")
    assert [ax.get_ylabel() for ax in figures[-1].axes] == ["loss", "PSNR (dB)", "HU shift (HU)"]
    psnr_lines = figures[-1].axes[1].get_lines()
    assert [list(line.get_ydata()) for line in psnr_lines] == [[40.0], [38.0]]


def test_compiled_step_trains_as_the_eager_step(tmp_path):
    """``--compile`` (inductor) on the paper's network: the first two steps give the losses
    and weights of the eager steps (float32 rounding apart)."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        cfg = make_config("tiny", arch="dmlct", compile=compiled, progress=False,
                          out=str(tmp_path / f"run-{compiled}"))
        run = TrainingRun(cfg)
        try:
            batch = run._batch(0)
            losses = [run.train_step(*batch) for _ in range(2)]
            weights = {k: v.detach().clone() for k, v in run.generator.named_parameters()}
        finally:
            run.close()
        results.append((losses, weights))
    (eager_losses, eager_w), (comp_losses, comp_w) = results
    for eager, comp in zip(eager_losses, comp_losses):
        assert eager.keys() == comp.keys()
        for key in eager:
            torch.testing.assert_close(comp[key], eager[key], rtol=1e-3, atol=1e-4,
                                       msg=lambda m: f"{key}: {m}")
    for key in eager_w:
        torch.testing.assert_close(comp_w[key], eager_w[key], rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("precision,loss,backend", [
    ("fp32", "dml", "auto"), ("fp32", "patchnce", "auto"), ("fp32", "none", "auto"),
    ("bf16", "dml", "auto"), ("fp16", "dml", "auto"), ("fp32", "dml", "ext")])
def test_one_training_step(tmp_path, monkeypatch, precision, loss, backend):
    from pdml.models.heads import ProjectionHead

    seen, head_rows = [], []
    for name in ("patch_metric_rows_layers", "patch_nce_rows_layers"):
        real = getattr(pdml.ops, name)

        def spy(q, k, *a, _real=real, _name=name, **kw):
            seen.append((_name, q.dtype, k.dtype, tuple(q.shape), kw.get("layers"),
                         kw.get("batch_size"), kw.get("backend")))
            return _real(q, k, *a, **kw)
        monkeypatch.setattr(pdml.ops, name, spy)
    real_gather = pdml.ops.gather_project

    def gather_spy(fmap, ids, weight, bias, **kw):
        out = real_gather(fmap, ids, weight, bias, **kw)
        head_rows.append(out.shape[0])  # rows entering a head: one per sampled pixel
        return out
    monkeypatch.setattr(pdml.ops, "gather_project", gather_spy)

    def full_map(*a, **kw):
        raise AssertionError("a head ran on a full map")
    monkeypatch.setattr(ProjectionHead, "forward_map", full_map)
    if backend != "auto" and pdml.ops.available_backends(torch.zeros(1))[backend]:
        pytest.skip(f"the {backend} backend is not built here")
    cfg = make_config("tiny", precision=precision, loss=loss, out=str(tmp_path / "run"),
                      progress=False, loss_backend=backend)
    run = TrainingRun(cfg)
    second_rows = []
    if run.heads is not None:
        for head in run.heads.heads.values():
            head[2].register_forward_hook(lambda m, inp, out: second_rows.append(inp[0].shape[0]))
    try:
        before = {k: v.detach().clone() for k, v in run.generator.named_parameters()}
        d_before = {k: v.detach().clone() for k, v in run.discriminator.named_parameters()}
        x, y = run._batch(0)
        assert x.shape == y.shape == (2, 1, 32, 32) and x.dtype == torch.float32
        losses = run.train_step(x, y)
    finally:
        run.close()
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    # both optimizers stepped (fp16: the scaler did not skip the step)
    assert any(not torch.equal(before[k], v) for k, v in run.generator.named_parameters())
    assert any(not torch.equal(d_before[k], v) for k, v in run.discriminator.named_parameters())
    if loss == "none":
        assert seen == [] and head_rows == [] and run.heads is None
        assert float(losses["loss_patch"]) == 0.0
    else:
        op = "patch_metric_rows_layers" if loss == "dml" else "patch_nce_rows_layers"
        half = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        layers, b, n = len(cfg.loss_layers), cfg.batch_size, cfg.num_patches
        # ONE loss call for all layers, on half-precision rows under autocast
        assert seen == [(op, half, half, (layers * b * n, cfg.head_dim), layers, b, backend)]
        # the heads never run on pixels no loss reads: layers × (q, k) × B × num_patches
        assert sum(head_rows) == sum(second_rows) == layers * 2 * b * n == 256
        assert float(losses["loss_patch"]) != 0.0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in run.heads.parameters())
    assert run.scaler.is_enabled() == (precision == "fp16")


def test_tiny_run_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pdml-train summary" in printed and "denoised" in printed and "LD input" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "tiny" and cfg["loss"] == "dml" and cfg["tau"] == 0.15
    assert cfg["resolved"] == {"device": "cpu", "world_size": 1, "cpu_threads": 1,
                               "loss_backend": pdml.ops.resolve_backend(
                                   "auto", torch.zeros(1), "patch_metric_rows").name}
    train_recs, eval_recs = _records(out, "train"), _records(out, "eval")
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert all(r["img_per_s"] > 0 and np.isfinite(r["loss_G"]) for r in train_recs)
    assert [r["step"] for r in eval_recs] == [2, 4]
    for key in ("psnr", "ssim", "noise_std", "hu_shift", "ld_psnr", "ld_noise_std"):
        assert np.isfinite(eval_recs[-1][key])
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / "checkpoints" / name, weights_only=True)
        assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["config"]["preset"] == "tiny"
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    for fig in ("eval_step0000002.png", "eval_step0000004.png", "losses.png"):
        assert (out / "figures" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_eval"]["step"] == 4
    # a second run into the same folder is refused (resume it instead)
    assert train_main(["--preset", "tiny", "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    steps = 8
    args = ["--preset", "tiny", "--steps", str(steps), "--decay-steps", "3", "--ckpt-every", "1",
            "--eval-every", "3", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([PDML_TRAIN, *args, "--out", str(killed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 180
    try:  # kill it right after step 2 is logged: mid-run, a checkpoint at step >= 1 exists
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and '"step": 2,' in metrics.read_text():
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = killed / "checkpoints" / "last.pt"
    step_killed = torch.load(last, weights_only=True)["step"]
    assert 1 <= step_killed < steps
    with open(killed / "metrics.jsonl", "a") as f:  # a record torn by the kill
        f.write('{"kind": "train", "step": 99, "loss')
    assert train_main(["--resume", str(killed)]) == 0

    straight = tmp_path / "straight"
    assert train_main([*args, "--out", str(straight)]) == 0
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["step"] == b["step"] == steps
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa), "resumed run diverged"
    for group in ("generator", "discriminator"):
        sa, sb = a["optimizer"][group]["state"], b["optimizer"][group]["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert [r["step"] for r in _records(killed, "train")] == list(range(1, steps + 1))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_ends_the_step_saves_it_and_resume_matches_an_uninterrupted_run(
        tmp_path, signum):
    """Ctrl-C (SIGINT) or SIGTERM: one line, status 128 + signal, last.pt at the step the
    line names (not a checkpoint step), summary.json marked; --resume then ends with the
    numbers of an uninterrupted run."""
    steps = 8
    args = ["--preset", "tiny", "--steps", str(steps), "--decay-steps", "3", "--ckpt-every", "7",
            "--eval-every", "3", "--no-progress"]
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([PDML_TRAIN, *args, "--out", str(run)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    try:  # signal it right after step 1 is logged: mid-run, before its first checkpoint
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and '"step": 1,' in metrics.read_text():
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    found = re.fullmatch(r"pdml-train: interrupted at step (\d+); continue with pdml-train "
                         r"--resume (.+)\n", err)
    assert found and found.group(2) == str(run), err
    step = int(found.group(1))
    assert 1 <= step < 7  # a step no --ckpt-every checkpoint falls on
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == step
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] == signal.Signals(signum).name
    assert summary["steps"] == summary["checkpoint_step"] == step
    assert not summary["stopped_early"]
    if signum != signal.SIGINT:
        return
    assert train_main(["--resume", str(run), "--no-progress"]) == 0
    straight = tmp_path / "straight"
    assert train_main([*args, "--out", str(straight)]) == 0
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [r["step"] for r in _records(run, "train")] == list(range(1, steps + 1))
    assert json.loads((run / "summary.json").read_text())["interrupted"] is None


def test_a_second_stop_signal_raises_at_once_and_handlers_come_back():
    from pdml.training.interrupt import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT  # the first only asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_with_more_steps_extends_a_finished_run(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    finished = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert finished["step"] == 4 and _records(out, "train")[-1]["lr"] == 0.0  # decayed to 0
    assert train_main(["--resume", str(out), "--steps", "7", "--no-progress"]) == 0
    extended = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert extended["step"] == 7 and extended["config"]["steps"] == 7
    assert json.loads((out / "config.json").read_text())["steps"] == 7
    records = _records(out, "train")
    assert [r["step"] for r in records] == list(range(1, 8))
    # the 7-step schedule (decay over the last 2 steps): the LR after steps 5, 6, 7
    lr = make_config("tiny").lr
    assert [r["lr"] for r in records[4:]] == pytest.approx([lr, lr / 2, 0.0])
    moved = _params(extended)
    assert any(not torch.equal(moved[k], v) for k, v in _params(finished).items())
    assert json.loads((out / "summary.json").read_text())["planned_steps"] == 7


def test_no_progress_on_resume_and_no_bar_after_the_summary(tmp_path):
    import contextlib
    import io

    out = tmp_path / "run"
    both = io.StringIO()  # stdout and stderr in the order written
    with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
        assert train_main(["--preset", "tiny", "--steps", "2", "--decay-steps", "1",
                           "--out", str(out)]) == 0
    text = both.getvalue()
    assert "step/s" in text or "s/step" in text  # the bar was drawn
    after = text[text.index("pdml-train summary"):]
    assert "step/s" not in after and "s/step" not in after and "pdml-train:" not in after
    quiet = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(quiet):
        assert train_main(["--resume", str(out), "--steps", "3", "--no-progress"]) == 0
    assert quiet.getvalue() == ""


def _write_version_1_run(run_dir: Path, cfg) -> dict:
    """A run folder as the trainer wrote it before the heads became row MLPs (checkpoint
    version 1): 1×1-conv heads ``[o, i, 1, 1]``, Adam state of those shapes, one step in."""
    from torch import nn

    from pdml.training.networks import build_networks

    torch.manual_seed(0)
    generator, discriminator, _ = build_networks(cfg)
    old_heads = nn.Module()
    old_heads.heads = nn.ModuleDict({name: nn.Sequential(
        nn.Conv2d(cfg.features, cfg.head_dim, 1), nn.ReLU(), nn.Conv2d(cfg.head_dim, cfg.head_dim, 1))
        for name in cfg.loss_layers})
    betas = (cfg.beta1, cfg.beta2)
    opt_g = torch.optim.Adam(list(generator.parameters()) + list(old_heads.parameters()),
                             lr=cfg.lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=betas)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, cfg)) for o in (opt_g, opt_d)]
    for opt, sched in zip((opt_g, opt_d), scheds):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    ckpt = {
        "format": CHECKPOINT_FORMAT, "version": 1, "pdml_version": pdml.__version__,
        "step": 1, "world_size": 1, "elapsed_s": 1.0, "config": cfg.to_dict(),
        "model": {"generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                  "heads": old_heads.state_dict()},
        "optimizer": {"generator": opt_g.state_dict(), "discriminator": opt_d.state_dict()},
        "scheduler": {"generator": scheds[0].state_dict(), "discriminator": scheds[1].state_dict()},
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "rng": [capture_rng_state()], "best": {"step": -1, "psnr": None},
    }
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run_dir / "checkpoints" / "last.pt")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    return ckpt


def test_resume_of_a_version_1_run_with_conv_heads(tmp_path):
    cfg = make_config("tiny", steps=3, decay_steps=1, eval_every=10, ckpt_every=10,
                      out=str(tmp_path / "old"), progress=False)
    old = _write_version_1_run(tmp_path / "old", cfg)
    head_keys = list(old["model"]["heads"])
    n_gen = len(old["optimizer"]["generator"]["param_groups"][0]["params"]) - len(head_keys)
    old_state = old["optimizer"]["generator"]["state"]
    assert old["model"]["heads"]["heads.trunk.0.weight"].shape == (128, 32, 1, 1)
    assert old_state[n_gen + 2]["exp_avg"].shape == (128, 128, 1, 1)  # heads.trunk.2.weight

    # the migration: heads and their Adam state become linear-shaped, values unchanged
    migrated = load_checkpoint(tmp_path / "old")
    assert migrated["version"] == 2
    for j, key in enumerate(head_keys):
        want = old["model"]["heads"][key]
        got = migrated["model"]["heads"][key]
        assert torch.equal(got, want.reshape(want.shape[:2]) if want.dim() == 4 else want)
        for name in ("exp_avg", "exp_avg_sq"):
            want = old_state[n_gen + j][name]
            got = migrated["optimizer"]["generator"]["state"][n_gen + j][name]
            assert torch.equal(got, want.reshape(want.shape[:2]) if want.dim() == 4 else want)
    for i in range(n_gen):  # the generator's own state (1×1 convs included) is untouched
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(migrated["optimizer"]["generator"]["state"][i][name],
                               old_state[i][name])

    # pdml-train --resume continues the old run and trains its heads
    assert train_main(["--resume", str(tmp_path / "old")]) == 0
    done = torch.load(tmp_path / "old" / "checkpoints" / "last.pt", weights_only=True)
    assert done["version"] == 2 and done["step"] == 3
    assert [r["step"] for r in _records(tmp_path / "old", "train")] == [2, 3]
    for key in head_keys:
        assert done["model"]["heads"][key].shape == migrated["model"]["heads"][key].shape
        assert not torch.equal(done["model"]["heads"][key], migrated["model"]["heads"][key])

    # the same state written by hand in version 2 resumes to bit-identical weights
    by_hand = tmp_path / "by_hand"
    (by_hand / "checkpoints").mkdir(parents=True)
    v2 = dict(old, version=2)
    v2["model"] = dict(old["model"], heads={k: v.flatten(1) if v.dim() == 4 else v
                                            for k, v in old["model"]["heads"].items()})
    v2_opt = dict(old["optimizer"]["generator"])
    v2_opt["state"] = {i: {n: (t.flatten(1) if i >= n_gen and t.dim() == 4 else t)
                           for n, t in st.items()} for i, st in old_state.items()}
    v2["optimizer"] = dict(old["optimizer"], generator=v2_opt)
    v2["config"] = dict(old["config"], out=str(by_hand))
    torch.save(v2, by_hand / "checkpoints" / "last.pt")
    train(resume=str(by_hand))
    again = torch.load(by_hand / "checkpoints" / "last.pt", weights_only=True)
    pa, pb = _params(done), _params(again)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_parameters(tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2",
           "--standalone", PDML_TRAIN, "--preset", "tiny", "--steps", "3",
           "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert res.stdout.count("pdml-train summary") == 1  # rank 0 alone prints and writes
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
