"""The ext backend's CPU kernels against the reference, measured in one run.

Case: ``patch_metric`` forward + backward, B=2, N=4096, C=128 (one [2, 128, 64, 64]
pair of maps), negatives="image", float32, on this CPU. Time: pytest-benchmark rounds
of ext, the reference timed in the same test (best of its rounds, one before and one
after ext's so that a load change on the machine affects both). Peak extra memory:
``harness.cpu_peak_extra_memory`` (each case in a fresh process, growth of the peak
resident set over one call). Prints both ratios; the issue's targets are a time ratio
(reference / ext) of at least 2 and a memory ratio (ext / reference) of at most 1/10.
"""

import pytest
import torch

from benchmarks import cases, harness
from pdml import ops

SPEC = dict(op="patch_metric", mode="fwd+bwd", shape="large-cpu", dtype="fp32", device="cpu", negatives="image")
MIN_SPEEDUP, MAX_MEMORY_RATIO = 2.0, 0.1



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
