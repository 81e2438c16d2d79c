"""Triton kernels of pdml (the math: docs/ops.md), one job per module:

- kernel modules hold only ``@triton.jit`` kernels: :mod:`.patch_loss` (the fused patch
  losses) and :mod:`.gather_project` (gather + first linear layer of a row MLP);
- launchers size the grids and launch them on tensors, one per kernel module:
  :mod:`.patch_loss_launch` and :mod:`.gather_project_launch`;
- :mod:`.runtime`: the interpreter or the compiler for a launch, the module copy of each
  mode, the context every launch runs in (device guard);
- :mod:`.work`: the dot FLOPs a launch plan issues and the minimum the math needs;
- :mod:`.aot`: the compile check of every kernel for a GPU architecture, without a GPU,
  and the table of :mod:`.work` for the named shapes.

Imports point down this list: aot → work → launchers → runtime and kernel modules.
"""
