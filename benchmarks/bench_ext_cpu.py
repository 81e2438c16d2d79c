"""The ext backend's CPU kernels against the reference, measured in one run.

1. ``patch_metric`` forward + backward, B=2, N=4096, C=128 (one [2, 128, 64, 64] pair of
   maps), negatives="image", float32, on this CPU. Time: pytest-benchmark rounds of ext,
   the reference timed in the same test (best of its rounds, one before and one after
   ext's so that a load change on the machine affects both). Peak extra memory:
   ``harness.cpu_peak_extra_memory`` (each case in a fresh process, growth of the peak
   resident set over one call). Prints both ratios; the issue's targets are a time ratio
   (reference / ext) of at least 2 and a memory ratio (ext / reference) of at most 1/10.
2. The map-form ``patch_nce`` forward + backward at the paper's shape (benchmarks/cases.py
   "paper": 2 layers of [8, 128, 64, 64] maps, 128 ids each, one op call per layer, as
   benchmarks/bench_ops.py times it), ext against eager (the reference backend), at 1 and
   2 threads: the two timed interleaved, call by call, and compared by their medians (as
   benchmarks/bench_rows_cpu.py does for the rows form); ``extra_info`` holds both medians
   and the ratio, which the summary tabulates beside the target of at least 1.5
   (recorded, not asserted: a benchmark on a shared machine measures).
"""

import pytest
import torch

from benchmarks import cases, harness
from pdml import ops

SPEC = dict(op="patch_metric", mode="fwd+bwd", shape="large-cpu", dtype="fp32", device="cpu", negatives="image")
MIN_SPEEDUP, MAX_MEMORY_RATIO = 2.0, 0.1
MAP_NCE_SPEC = dict(op="patch_nce", mode="fwd+bwd", shape="paper", dtype="fp32", device="cpu", negatives="image")
MAP_NCE_MIN_SPEEDUP = 1.5
MAP_NCE_ROUNDS = 40


@pytest.mark.skipif(ops.available_backends(torch.zeros(1))["ext"] is not None,
                    reason="the ext backend is not built")
def test_ext_vs_reference_patch_metric_fwd_bwd_cpu(benchmark):
    ext_spec, ref_spec = dict(SPEC, backend="ext"), dict(SPEC, backend="reference")
    run_ext, run_ref = cases.build_case(ext_spec, pool=1), cases.build_case(ref_spec, pool=1)
    run_ext(), run_ref()  # warm-up: thread pools, first touch of the inputs

    ref_times = [harness.seconds(run_ref)]
    benchmark.group = "patch_metric fwd+bwd B=2 N=4096 C=128 cpu: ext vs reference"
    benchmark.pedantic(run_ext, rounds=3, warmup_rounds=0, iterations=1)
    ref_times.append(harness.seconds(run_ref))
    ext_s, ref_s = benchmark.stats.stats.min, min(ref_times)

    ext_bytes, ref_bytes = harness.cpu_peak_extra_memory(ext_spec), harness.cpu_peak_extra_memory(ref_spec)
    speedup, memory_ratio = ref_s / ext_s, ext_bytes / ref_bytes
    benchmark.extra_info.update(harness.environment("cpu"))
    benchmark.extra_info.update(SPEC, kind="ext-vs-reference", ext_s=ext_s, reference_s=ref_s,
                                speedup=speedup, ext_peak_extra_bytes=ext_bytes,
                                reference_peak_extra_bytes=ref_bytes, memory_ratio=memory_ratio)
    print(f"\npatch_metric fwd+bwd, B=2 N=4096 C=128, image negatives, fp32, "
          f"{harness.device_name('cpu')}:\n"
          f"  time   ext {ext_s:.3f} s, reference {ref_s:.3f} s -> speedup {speedup:.2f}x "
          f"(target >= {MIN_SPEEDUP:g}x)\n"
          f"  memory ext {ext_bytes / 2**20:.1f} MiB, reference {ref_bytes / 2**20:.1f} MiB extra at peak "
          f"-> ratio {memory_ratio:.4f} (target <= {MAX_MEMORY_RATIO:g})")
    assert speedup >= MIN_SPEEDUP
    assert memory_ratio <= MAX_MEMORY_RATIO


@pytest.mark.skipif(ops.available_backends(torch.zeros(1))["ext"] is not None,
                    reason="the ext backend is not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_ext_map_nce_vs_eager_paper_shape_cpu(benchmark, threads):
    run_ext = cases.build_case(dict(MAP_NCE_SPEC, backend="ext"), pool=1)
    run_eager = cases.build_case(dict(MAP_NCE_SPEC, backend="reference"), pool=1)
    s, (h, w) = cases.SHAPES[MAP_NCE_SPEC["shape"]], cases.MAP_HW
    with harness.num_threads(threads):
        eager_s, ext_s = harness.interleaved_medians(run_eager, run_ext, MAP_NCE_ROUNDS)
        benchmark.group = (f"patch_nce fwd+bwd map form paper ({s['layers']} layers x [{s['B']}, {s['C']}, {h}, {w}], "
                           f"N={s['N']}) cpu: ext vs eager")
        benchmark.pedantic(run_ext, rounds=10, warmup_rounds=0, iterations=1)
    speedup = eager_s / ext_s
    benchmark.extra_info.update(MAP_NCE_SPEC, kind="map-vs-eager", form="map", backend="ext",
                                groups=s["B"], layers=s["layers"], threads=threads, rounds=MAP_NCE_ROUNDS,
                                eager_median_s=eager_s, fused_median_s=ext_s, speedup=speedup,
                                target=MAP_NCE_MIN_SPEEDUP)
    benchmark.extra_info.update(harness.environment("cpu"))  # after the spec: "device" names the CPU
    print(f"\npatch_nce fwd+bwd map form, paper shape ({s['layers']} layers x B={s['B']}, C={s['C']}, {h}x{w} "
          f"maps, N={s['N']}), image negatives, fp32, {threads} thread(s), {harness.device_name('cpu')}:\n"
          f"  median of {MAP_NCE_ROUNDS} interleaved rounds: eager {eager_s * 1e3:.2f} ms, "
          f"ext {ext_s * 1e3:.2f} ms -> speedup {speedup:.2f}x (target >= {MAP_NCE_MIN_SPEEDUP:g}x)")
