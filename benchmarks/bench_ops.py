"""Op-level throughput and memory: every backend that runs here, the shapes that matter.

Shapes (benchmarks/cases.py): the paper's (B=8, N=128, C=128, 2 layers), CUT's
(B=1 and 4, N=256, C=256, 5 layers) and a large one (GPU: B=8, N=4096, C=256; on the
CPU shrunk to B=2, N=4096, C=128 so the run finishes in minutes). Backends: reference
eager, the reference under torch.compile (and mode="reduce-overhead" on a GPU), triton
(GPU), ext; fp32, and bf16 on a GPU. The Triton interpreter is never benchmarked.
"""
import pytest
import torch

from benchmarks import cases, harness

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", cases.all_cases(DEVICE), ids=cases.case_id)
def test_op(benchmark, case, device, device_rates):
    if device != case["device"]:
        pytest.skip(f"case is for {case['device']}")
    run = cases.build_case(case)
    peak = None
    # Memory of the full step, for every backend but the compiled baselines (on the CPU
    # their probe would recompile in a fresh process; on a GPU they are measured).
    if case["mode"] == "fwd+bwd" and (device == "cuda" or "compile" not in case["backend"]):
        if device == "cuda":
            run()  # compile / autotune outside the measurement
            peak = harness.cuda_peak_extra_memory(run)
        else:
            peak = harness.cpu_peak_extra_memory(case)
    benchmark.group = f"{case['op']} {case['mode']} {case['shape']} {case['dtype']}"
    benchmark.extra_info.update(harness.environment(device))
    benchmark.extra_info.update(case, kind="op", peak_extra_bytes=peak, flops=cases.flops(case),
                                min_bytes=cases.min_bytes(case), rates=device_rates)
    benchmark.pedantic(run, rounds=cases.rounds(case), warmup_rounds=1, iterations=1)
    if device == "cuda":
        benchmark.extra_info.update(harness.nvml_telemetry())
