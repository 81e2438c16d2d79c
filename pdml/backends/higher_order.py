"""Double backward of the fused backends' ops, through the reference (docs/ops.md,
"Higher-order gradients").

The fused backward kernels compute a gradient but are not differentiable themselves. Every
autograd formula of a fused op therefore asks :func:`creating_graph` first: inside a
backward, grad mode is on only when the caller asked for ``create_graph=True``. Then, and
only then, the formula returns :func:`reference_grads`, the same gradient computed by
differentiating the reference (``pdml.reference``) of the op with ``create_graph=True``,
which is differentiable to any order. The first-order path does no extra work.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def creating_graph() -> bool:
    """Inside an autograd formula: whether the backward records a graph (``create_graph=True``)."""
    return torch.is_grad_enabled()


def reference_grads(reference_op: Callable[..., torch.Tensor], inputs: Sequence,
                    needs_input_grad: Sequence[bool], grad_output: torch.Tensor) -> list[Optional[torch.Tensor]]:
    """Gradients of ``reference_op(*inputs)`` (one output) weighted by ``grad_output``, w.r.t.
    each tensor input ``i`` with ``needs_input_grad[i]`` (None for the others, and for an
    input the output does not depend on), with a graph: differentiable w.r.t. the inputs and
    ``grad_output``. ``inputs`` are the op's own inputs as its formula saved them, so the
    graph continues into theirs."""
    wanted = [i for i, need in enumerate(needs_input_grad)
              if need and isinstance(inputs[i], torch.Tensor)]
    grads: list[Optional[torch.Tensor]] = [None] * len(needs_input_grad)
    if not wanted:
        return grads
    with torch.enable_grad():
        output = reference_op(*inputs)
    found = torch.autograd.grad(output, [inputs[i] for i in wanted], grad_output.to(output.dtype),
                                create_graph=True, allow_unused=True)
    for i, grad in zip(wanted, found):
        grads[i] = grad
    return grads
