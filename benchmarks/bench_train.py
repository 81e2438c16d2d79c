"""One full training step of pdml-train's model (generator + heads step, then
discriminator step) at the paper's shapes: batch 8, 128×128 crops, 2 loss layers ×
128 patches. Compares the loss paths a user can choose: on the CPU fp32 + reference
vs fp32 + ext; on a GPU fp32 + reference vs bf16 + the fused loss (auto: triton)."""
import pytest
import torch

from benchmarks import harness
from pdml import ops
from pdml.training import TrainingRun, make_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, CROP = 8, 128


def train_cases(device):
    if device == "cuda":
        return [("fp32", "reference"), ("bf16", "auto")]
    cases = [("fp32", "reference")]
    if ops.available_backends(torch.zeros(1))["ext"] is None:
        cases.append(("fp32", "ext"))
    return cases


@pytest.mark.parametrize("precision,backend", train_cases(DEVICE), ids=lambda v: v)
def test_train_step(benchmark, precision, backend, device, tmp_path, monkeypatch):
    if device != DEVICE:
        pytest.skip(f"case is for {DEVICE}")
    # The networks' shapes are the paper's; the data only has to exist (the timed steps
    # get their own crops), so the smallest built-in set, built into a temporary cache.
    monkeypatch.setenv("PDML_CACHE_DIR", str(tmp_path / "cache"))
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
        if device == "cuda":
            torch.cuda.synchronize()

    label = f"{precision}+{ops.resolve_backend(backend, pool[0][0], 'patch_metric').name}"
    benchmark.group = "train step paper"
    benchmark.extra_info.update(harness.environment(device))
    benchmark.extra_info.update(kind="train", op="train_step", mode="G+D", shape=f"paper (B={BATCH}, {CROP}²)",
                                dtype=precision, backend=label, baseline="fp32+reference",
                                images=BATCH, device_kind=device)
    benchmark.pedantic(step, rounds=2 if device == "cpu" else 20, warmup_rounds=1, iterations=1)
    if device == "cuda":
        benchmark.extra_info.update(harness.nvml_telemetry())
    run.close()
