"""Distributed setup: join the torchrun job (DDP), pick the device and the CPU threads."""
from __future__ import annotations

import os
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


def cpu_threads(requested: Optional[int]) -> int:
    """Intra-op threads for CPU training: ``requested``, else torch's default unless the
    machine is already busy (1-minute load average + our threads > cores), then 1.

    Why: OpenMP worker threads spin while they wait; on an oversubscribed machine two
    spinning threads per process run several times slower than one thread.
    """
    if requested is not None:
        return requested
    current = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # platforms without them: keep torch's choice
        return current
    return 1 if current > 1 and load + current > cores + 0.5 else current


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
