"""Stop a run whose losses are not finite: :class:`NonFiniteGuard`, :func:`modules_finite`."""
from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

NONFINITE_PATIENCE = 3
"""Consecutive steps with a non-finite loss after which a run stops."""

CUDA_LAG = 2
"""Steps the guard reads behind on a GPU, so that reading never stalls the GPU's queue."""


class NonFiniteGuard:
    """Counts the consecutive training steps whose losses are not all finite.

    ``update(step, losses)`` after every step updates the count on the losses' device (0
    after a step with finite losses) and queues a copy of ``[count, *losses]`` to host
    memory. On a GPU the copy is asynchronous (pinned memory, an event); the guard reads
    the record of the step ``CUDA_LAG`` steps back, waiting for its event, which the GPU
    has almost always passed already: no host sync per step beyond what the step itself
    does. On the CPU it reads the step just done. ``problem()`` -> a message when the count
    read has reached ``patience`` (a run then stops at most ``patience + CUDA_LAG`` steps
    after its losses went non-finite), else None. Under DDP the count is the maximum over
    the ranks (an async all-reduce), and every rank reads the same step, so all decide alike.

    Only the losses are looked at: an fp16 step that the GradScaler skipped for inf/NaN
    gradients has finite losses and does not count; a non-finite loss counts in every
    precision (lowering the scale cannot undo a forward overflow).
    """

    def __init__(self, names: Sequence[str], device: torch.device,
                 patience: int = NONFINITE_PATIENCE, distributed: bool = False):
        self.names, self.device, self.patience = tuple(names), device, patience
        self.distributed = distributed
        self.lag = CUDA_LAG if device.type == "cuda" else 0
        self._count = torch.zeros((), dtype=torch.float32, device=device)
        self._pending: deque = deque()
        self._latest: Optional[tuple[int, torch.Tensor]] = None

    def update(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        """Record step ``step``'s losses (float32 scalars on the device, keys ``names``)."""
        values = torch.stack([losses[k].detach().float() for k in self.names])
        bad = ~torch.isfinite(values).all()
        self._count = torch.where(bad, self._count + 1, torch.zeros_like(self._count))
        if self.distributed:
            dist.all_reduce(self._count, op=dist.ReduceOp.MAX)
        record = torch.cat([self._count[None], values])
        event = None
        if record.device.type == "cuda":
            host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
            host.copy_(record, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            record = host
        self._pending.append((step, record, event))
        while len(self._pending) > self.lag:
            self._take_oldest()

    def flush(self) -> None:
        """Read every step recorded so far (waits for the device)."""
        while self._pending:
            self._take_oldest()

    def _take_oldest(self) -> None:
        step, record, event = self._pending.popleft()
        if event is not None:
            event.synchronize()
        self._latest = (step, record)

    @property
    def count(self) -> int:
        """The consecutive non-finite steps up to the newest step read."""
        return 0 if self._latest is None else int(self._latest[1][0])

    def problem(self) -> Optional[str]:
        """A message naming the steps and the loss terms once ``patience`` is reached."""
        if self.count < self.patience:
            return None
        step = self._latest[0]
        return (f"the losses were not finite for {self.count} consecutive steps "
                f"(steps {step - self.count + 1}-{step}; {self.last_losses()})")

    def state_problem(self, modules: Sequence[Optional[nn.Module]], step: int) -> Optional[str]:
        """After reading every step so far (waits for the device): :meth:`problem`, else a
        message when ``modules`` hold NaN/inf after ``step``, else None."""
        self.flush()
        problem = self.problem()
        if problem is None and not modules_finite(modules):
            problem = f"the network weights hold NaN or inf after step {step} ({self.last_losses()})"
        return problem

    def last_losses(self) -> str:
        """The loss terms of the newest step read, for a message."""
        if self._latest is None:
            return "no step recorded"
        step, record = self._latest
        return f"at step {step}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in zip(self.names, record[1:].tolist()))


def modules_finite(modules: Sequence[Optional[nn.Module]]) -> bool:
    """Whether every floating parameter and buffer of ``modules`` is finite (one sync)."""
    flags = [torch.isfinite(t).all() for m in modules if m is not None
             for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True
