"""Distributed setup: join the torchrun job (DDP), pick the device and the CPU threads, and
say whether the device computes bf16 natively."""
from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from pdml.training.config import TrainError, check_device_name


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """The device of a ``--device`` request: "auto" (CUDA when visible, else CPU), "cpu",
    "cuda" (GPU ``local_rank``) or "cuda:N"; TrainError for another name or a GPU that is
    not there. The one place a device request becomes a device (trainer and pdml-denoise)."""
    check_device_name(request)
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError(f"--device {request} was asked for but no CUDA GPU is visible")
    index = local_rank if request == "cuda" else int(request.split(":")[1])
    if index >= torch.cuda.device_count():
        raise TrainError(f"--device {request}: GPU {index} does not exist "
                         f"({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


def launch_rank() -> int:
    """This process's rank in the torchrun job (0 without torchrun), known before joining."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_request: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job if there is one (gloo on CPU, NCCL on CUDA); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launch_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        info.initialized_here = True
    return info, device


BUSY_SAMPLE_S = 0.25
"""How long :func:`busy_cpus` watches /proc/stat."""


def _proc_stat_times(cpus: Optional[set] = None) -> Optional[tuple[float, float]]:
    """``(busy, total)`` jiffies summed over ``cpus`` (indices; None: all) from /proc/stat,
    None where it cannot be read (not Linux)."""
    busy = total = 0.0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if cpus is not None and int(name[3:]) not in cpus:
                    continue
                values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(values)
                busy += sum(values) - values[3] - values[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total > 0 else None


def busy_cpus(cpus: Optional[set] = None, interval: float = BUSY_SAMPLE_S) -> Optional[float]:
    """How many of ``cpus`` are busy now: the busy share of their time over ``interval``
    seconds of /proc/stat, times their number; None where /proc/stat cannot be read."""
    first = _proc_stat_times(cpus)
    if first is None:
        return None
    time.sleep(interval)
    second = _proc_stat_times(cpus)
    if second is None or second[1] <= first[1]:
        return None
    count = len(cpus) if cpus is not None else os.cpu_count() or 1
    return count * (second[0] - first[0]) / (second[1] - first[1])


@dataclass
class ThreadChoice:
    """The intra-op threads a CPU run uses and why: ``requested`` (None: chosen),
    ``cores`` this process may run on, ``busy``: how many of them other work kept busy
    when it started (None: not measured)."""

    threads: int
    requested: Optional[int]
    cores: Optional[int] = None
    busy: Optional[float] = None

    def describe(self) -> str:
        if self.requested is not None:
            return f"{self.threads} CPU thread(s) (--threads)"
        if self.busy is None:
            return f"{self.threads} CPU thread(s) (torch's default)"
        return (f"{self.threads} CPU thread(s) ({self.busy:.1f} of {self.cores} core(s) "
                "busy at start)")


def choose_cpu_threads(requested: Optional[int]) -> ThreadChoice:
    """Intra-op threads for a CPU run: ``requested``, else torch's default unless other
    work keeps the cores busy now, then the cores left free (at least 1).

    "Now" is a :data:`BUSY_SAMPLE_S` sample of /proc/stat at start, not the 1-minute load
    average, which a job that just finished (a compile, a previous run) leaves high for a
    minute. Why fewer threads on a busy machine: OpenMP worker threads spin while they
    wait; on an oversubscribed machine two spinning threads per process run several times
    slower than one thread.
    """
    if requested is not None:
        return ThreadChoice(requested, requested)
    current = torch.get_num_threads()
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # platforms without it: keep torch's choice
        return ThreadChoice(current, None)
    busy = busy_cpus(cpus)
    if busy is None:
        return ThreadChoice(current, None)
    free = len(cpus) - busy
    threads = current if current <= free + 0.5 else max(1, int(free + 0.5))
    return ThreadChoice(threads, None, len(cpus), busy)


def cpu_threads(requested: Optional[int]) -> int:
    """The thread count of :func:`choose_cpu_threads`."""
    return choose_cpu_threads(requested).threads


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large tensors from its heap and keep freed memory for the
    next ones (mmap threshold 1 GiB, no trimming); True when it took effect.

    Why: by default each tensor over 32 MiB is a fresh mmap, zero-filled page by page on
    first touch and unmapped when freed; denoising 512² slices allocates such maps for
    every op, and the page faults made its elementwise ops ~5× slower than their memory
    traffic. The process keeps its peak memory instead of returning it between batches.
    A no-op (False) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))
                    and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
    except (OSError, AttributeError):
        return False


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 support, or a CPU
    with AVX512-BF16 or AMX-BF16 (the ``avx512_bf16`` / ``amx_bf16`` flags of
    /proc/cpuinfo); elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_flags() -> set:
    """The flags of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without DDP); a collective."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """The element-wise maximum of ``values`` over the ranks (``values`` without DDP), so
    that every rank takes the same decision (stop or go on); a collective on ``device``
    (the rank's own: NCCL reduces CUDA tensors only)."""
    if not info.enabled:
        return list(values)
    flags = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def ranks_hold_same_parameters(modules, info: DistInfo) -> Optional[bool]:
    """True when every rank holds bit-identical parameters in ``modules`` (None entries
    passed over); None without DDP. A collective."""
    if not info.enabled:
        return None
    flat = torch.cat([p.detach().float().flatten() for m in modules if m is not None
                      for p in m.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(info.world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])
