"""The ext backend's rows-form losses against eager at the paper shape, on this CPU.

Case: the trainer's loss over all its loss layers in one call — 2 layers × B=8 images ×
128 patches = 2048 rows of 128 dims, negatives="image" (16 groups of 128 rows), float32,
forward + backward (both rows tensors are leaves that require grad; PatchNCE's feat_k is
detached by the loss itself). Eager = ``pdml.reference.patch_nce_rows`` /
``patch_metric_rows``; fused = ``pdml.ops`` with ``backend="ext"``, the call a user makes.
At 1 and 2 threads (``torch.set_num_threads``): the two are timed interleaved, call by
call, over many rounds, and compared by their medians, so that a load change on a shared
machine affects both alike. pytest-benchmark records the fused rounds; ``extra_info``
holds both medians and the ratio (eager / fused), which the summary tabulates beside
the target of at least 1.5 for both losses (recorded, not asserted: a benchmark on a
shared machine measures, it does not pass or fail).
"""
import pytest
import torch

from benchmarks import harness
from pdml import ops, reference

LAYERS, BATCH, PATCHES, DIMS = 2, 8, 128, 128
ROWS, GROUPS = LAYERS * BATCH * PATCHES, LAYERS * BATCH
TAU = {"patch_nce_rows": 0.07, "patch_metric_rows": 0.15}
MIN_SPEEDUP = 1.5
ROUNDS = 60


def _rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feat_q = torch.nn.functional.normalize(torch.randn(ROWS, DIMS, generator=gen), dim=1)
    feat_k = torch.nn.functional.normalize(feat_q + 0.5 * torch.randn(ROWS, DIMS, generator=gen), dim=1)
    return feat_q, feat_k


def _fwd_bwd(loss_fn, op: str, feat_q: torch.Tensor, feat_k: torch.Tensor):
    def run():
        q, k = feat_q.clone().requires_grad_(True), feat_k.clone().requires_grad_(True)
        loss = loss_fn(q, k, TAU[op], batch_size=GROUPS)
        (loss.mean() if op == "patch_nce_rows" else loss).backward()
    return run



@pytest.mark.skipif(ops.available_backends(torch.zeros(1))["ext"] is not None,
                    reason="the ext backend is not built")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("op", ["patch_nce_rows", "patch_metric_rows"])
def test_ext_rows_vs_eager_paper_shape_cpu(benchmark, op, threads):
    feat_q, feat_k = _rows(0)
    run_eager = _fwd_bwd(getattr(reference, op), op, feat_q, feat_k)
    run_fused = _fwd_bwd(lambda q, k, tau, batch_size: getattr(ops, op)(q, k, tau, batch_size=batch_size,
                                                                         backend="ext"),
                         op, feat_q, feat_k)
    with harness.num_threads(threads):
        eager_s, fused_s = harness.interleaved_medians(run_eager, run_fused, ROUNDS)
        benchmark.group = f"{op} fwd+bwd rows [{ROWS}, {DIMS}] groups={GROUPS} cpu: ext vs eager"
        benchmark.pedantic(run_fused, rounds=10, warmup_rounds=0, iterations=1)
    speedup = eager_s / fused_s
    benchmark.extra_info.update(harness.environment("cpu"))
    benchmark.extra_info.update(kind="rows-vs-eager", form="rows", op=op, mode="fwd+bwd", shape=f"rows {ROWS}x{DIMS}",
                                groups=GROUPS, layers=LAYERS, dtype="fp32", device="cpu", backend="ext",
                                threads=threads, rounds=ROUNDS, eager_median_s=eager_s,
                                fused_median_s=fused_s, speedup=speedup, target=MIN_SPEEDUP)
    print(f"\n{op} fwd+bwd, rows [{ROWS}, {DIMS}] ({LAYERS} layers x B={BATCH} x {PATCHES} patches), "
          f"{GROUPS} groups, fp32, {threads} thread(s), {harness.device_name('cpu')}:\n"
          f"  median of {ROUNDS} interleaved rounds: eager {eager_s * 1e3:.2f} ms, ext {fused_s * 1e3:.2f} ms "
          f"-> speedup {speedup:.2f}x (target >= {MIN_SPEEDUP:g}x)")
