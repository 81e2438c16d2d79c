"""Benchmark machinery shared by the ``bench_*.py`` files (not a benchmark itself).

- :func:`environment`: device name, torch/triton versions, git commit, date.
- :func:`interleaved_medians` (under :func:`num_threads`): a fused call against its eager
  baseline, timed alternately.
- :func:`nvml_telemetry`: GPU power, SM clock and memory through nvidia-ml-py.
- :func:`cuda_peak_extra_memory` / :func:`cpu_peak_extra_memory`: the extra memory a
  case allocates at its peak, measured for real: on CUDA by
  ``torch.cuda.max_memory_allocated``, on the CPU in a fresh subprocess as the growth
  of its peak resident set over one call (VmHWM, after a warm-up call).
- :func:`measured_rates`: this GPU's matmul and copy rates, measured in the run.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@functools.cache
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@functools.cache
def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    # PDML_COMMIT: set by benchmarks/run_gpu.sh where the tree is a copy without .git
    commit = os.environ.get("PDML_COMMIT") or git("rev-parse", "--short", "HEAD") or "unknown"
    if "PDML_COMMIT" not in os.environ and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
    }


def seconds(fn) -> float:
    """Wall-clock seconds of one call ``fn()``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def num_threads(threads: int):
    """``torch.set_num_threads(threads)`` inside the block, the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def interleaved_medians(run_eager, run_fused, rounds: int, warmup: int = 3) -> tuple[float, float]:
    """Median seconds of ``run_eager()`` and ``run_fused()`` timed alternately, call by call,
    over ``rounds`` rounds after ``warmup`` untimed ones (thread pool, allocator, first
    touch): a load change on a shared machine affects both alike."""
    for _ in range(warmup):
        run_eager(), run_fused()
    eager_times, fused_times = [], []
    for _ in range(rounds):
        eager_times.append(seconds(run_eager))
        fused_times.append(seconds(run_fused))
    return statistics.median(eager_times), statistics.median(fused_times)


def nvml_telemetry() -> dict:
    """Power (W), SM clock (MHz), memory used (MiB) of GPU 0 through nvidia-ml-py."""
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        out = {
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "memory_used_mib": pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20,
        }
        pynvml.nvmlShutdown()
        return out
    except Exception as e:  # telemetry is extra information, never a reason to fail
        return {"nvml_error": str(e)}


def cuda_peak_extra_memory(fn) -> int:
    """Bytes allocated by ``fn()`` at its peak above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


_CPU_PROBE = r"""
import ctypes, gc, json, sys
sys.path.insert(0, {repo!r})
from benchmarks import cases

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

run = cases.build_case({spec!r}, pool=1)
run()  # warm-up: thread pools, compilation, first-touch of the inputs
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident set (VmHWM) to the current one
before = status("VmRSS")
run()
print(json.dumps({{"extra_bytes": status("VmHWM") - before}}))
"""


def cpu_peak_extra_memory(spec: dict) -> int:
    """Peak resident-set growth (bytes) over one call of the case ``spec``, measured in a
    fresh process after a warm-up call (Linux: VmHWM reset through /proc/self/clear_refs):
    what the op allocates beyond its inputs and what stays allocated between calls."""
    code = _CPU_PROBE.format(repo=REPO, spec=spec)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed for {spec}: {out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"])


def measured_rates(device: str) -> dict:
    """This device's dense bf16/fp32 matmul FLOP/s and copy bytes/s, measured now."""
    if device != "cuda":
        return {}

    def best_time(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)

    rates = {}
    n = 8192
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        rates[f"matmul_flops_{str(dtype).split('.')[-1]}"] = 2 * n**3 / best_time(lambda: a @ b)
    src = torch.empty(2**28, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    rates["copy_bytes"] = 2 * src.numel() / best_time(lambda: dst.copy_(src))
    return rates
