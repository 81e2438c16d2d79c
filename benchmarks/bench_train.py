"""One full training step of pdml-train's model (generator + heads step, then
discriminator step) at the paper's shapes: batch 8, 128×128 crops, 2 loss layers ×
128 patches, with a breakdown of where the step's time goes.

The cases differ only in how the patch part (projection heads + patch loss) is computed:

- ``full-map heads + reference``: the heads run as 1×1 convs on every pixel of both
  feature maps, then the sampled rows are gathered and the reference loss runs: what
  pdml-train (and DML_CT) did before sampling came first. Kept here only as the baseline.
- ``sampled + reference``: sample, then project (the heads run on the sampled rows only);
  the gather and the loss run on the reference backend.
- ``sampled + fused``: sample, then project, with the fused gather + first linear layer and
  the fused loss of all layers in one call (auto: ext on a CPU, triton on a GPU).

Each case also records (``extra_info``): the seconds per step inside the step's profiler
ranges ("G forward", "heads+loss", "G backward", "D", "optimizer"; the heads' and the
loss's backward run inside "G backward"), the patch part alone forward + backward on
feature maps of the step's shape (``patch_part_s``, its share of the step), and on a GPU
the CUDA kernel launches of that patch part.
"""
import statistics
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness
from pdml import ops, reference
from pdml.sample import normalise_patch_rows
from pdml.training import TrainingRun, make_config
from pdml.training import step as train_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, CROP = 8, 128
RANGES = ("G forward", "heads+loss", "G backward", "D", "optimizer")
BASELINE = "full-map heads + reference (fp32)"


def project_full_maps(heads, q_maps, k_maps, ids, backend="auto"):
    """The baseline's patch rows: heads on every pixel (1×1 convs), then gather + normalise
    the sampled rows; same rows as :func:`pdml.training.step.project_patches`."""
    def rows(maps):
        projected = heads(maps)  # [B, D, H, W] per layer
        gathered = [reference.gather_rows(p, i).flatten(0, 1) for p, i in zip(projected, ids)]
        return normalise_patch_rows(torch.cat(gathered))

    return rows(q_maps), rows(k_maps)


def train_cases(device):
    """``(precision, heads, loss backend)`` of each case."""
    cases = [("fp32", "full-map", "reference"), ("fp32", "sampled", "reference"),
             ("fp32", "sampled", "auto")]
    if device == "cuda":
        cases.append(("bf16", "sampled", "auto"))
    return cases


def _label(precision, heads, backend, device):
    if heads == "full-map":
        return f"full-map heads + reference ({precision})"
    if backend == "reference":
        return f"sampled + reference ({precision})"
    fused = ops.resolve_backend("auto", torch.zeros(1, device=device), "patch_metric_rows").name
    return f"sampled + fused {fused} ({precision})"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def range_seconds(run, batch, device, steps=1):
    """Seconds per step inside each of the step's profiler ranges, and the whole step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            run.train_step(*batch)
        _sync(device)
        total = (time.perf_counter() - started) / steps
    out = {name: 0.0 for name in RANGES}
    for evt in prof.key_averages():
        if evt.key in out:
            # on a GPU the work of a range is its kernels' time, on a CPU its own wall time
            us = evt.device_time_total if device == "cuda" else evt.cpu_time_total
            out[evt.key] += us / 1e6 / steps
    return out, total


def patch_part(run, cfg, backend, project, device, reps):
    """The patch part alone (heads + loss, forward + backward into the feature maps and the
    head weights) on random feature maps of the step's shape: ``(median s, launches)``."""
    layers = len(cfg.loss_layers)
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(BATCH, cfg.features, CROP, CROP, generator=g).to(device).requires_grad_()
            for _ in range(2 * layers)]
    q_maps, k_maps = maps[:layers], maps[layers:]

    def once():
        ids = train_step.sample_patch_ids(CROP * CROP, cfg.num_patches, layers, torch.device(device))
        with run.autocast:
            q, k = project(run.heads, q_maps, k_maps, ids, backend=backend)
            loss = train_step.patch_loss(cfg, q, k, BATCH)
        loss.backward()
        for m in maps:
            m.grad = None
        run.heads.zero_grad(set_to_none=True)

    once()
    times = []
    for _ in range(reps):
        _sync(device)
        started = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - started)
    launches = None
    if device == "cuda":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            once()
            _sync(device)
        launches = sum(1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel",
                                                              "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    return statistics.median(times), launches


@pytest.mark.parametrize("precision,heads,backend", train_cases(DEVICE), ids=lambda v: v)
def test_train_step(benchmark, precision, heads, backend, device, tmp_path, monkeypatch):
    if device != DEVICE:
        pytest.skip(f"case is for {DEVICE}")
    # The networks' shapes are the paper's; the data only has to exist (the timed steps
    # get their own crops), so the smallest built-in set, built into a temporary cache.
    monkeypatch.setenv("PDML_CACHE_DIR", str(tmp_path / "cache"))
    project = project_full_maps if heads == "full-map" else train_step.project_patches
    monkeypatch.setattr(train_step, "project_patches", project)
    cfg = make_config("tiny", batch_size=BATCH, num_patches=128, precision=precision,
                      loss_backend=backend, device=device, out=str(tmp_path / "run"),
                      threads=torch.get_num_threads(), progress=False)
    run = TrainingRun(cfg, stream=open("/dev/null", "w"))
    scale = cfg.resolved_net_scale
    g = torch.Generator().manual_seed(0)
    pool = [tuple((torch.rand(BATCH, 1, CROP, CROP, generator=g) * scale).to(run.device) for _ in range(2))
            for _ in range(2)]
    state = {"i": 0}

    def step():
        x, y = pool[state["i"] % len(pool)]
        state["i"] += 1
        run.train_step(x, y)
        _sync(device)

    benchmark.group = "train step paper"
    benchmark.extra_info.update(harness.environment(device))
    benchmark.extra_info.update(kind="train", op="train_step", mode="G+D", shape=f"paper (B={BATCH}, {CROP}²)",
                                dtype=precision, backend=_label(precision, heads, backend, device),
                                baseline=BASELINE, images=BATCH, device_kind=device)
    benchmark.pedantic(step, rounds=3 if device == "cpu" else 20, warmup_rounds=1, iterations=1)
    ranges, profiled_step = range_seconds(run, pool[0], device)
    part_s, launches = patch_part(run, cfg, backend, project, device, reps=5 if device == "cpu" else 50)
    step_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        range_s=ranges, profiled_step_s=profiled_step,
        range_share={k: v / profiled_step for k, v in ranges.items()},
        patch_part_s=part_s, patch_share=part_s / step_s, patch_launches=launches)
    if device == "cuda":
        benchmark.extra_info.update(harness.nvml_telemetry())
    run.close()
