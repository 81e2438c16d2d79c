"""Triton kernels of pdml (the math: docs/ops.md). Kernel modules hold only ``@triton.jit``
kernels; launch modules size the grids and launch them on tensors:

- :mod:`.patch_loss` (the fused patch losses), launched by :mod:`.launch`;
- :mod:`.gather_project` (gather + first linear layer of a row MLP), launched by
  :mod:`.gather_project_launch`;
- :mod:`.aot`: the compile check of every kernel for a GPU architecture, without a GPU.

Triton decides at decoration time whether a kernel is compiled for the GPU or run by
its CPU interpreter (``TRITON_INTERPRET``). pdml keeps one copy of each kernel module
per mode (:func:`kernel_module`), so CUDA tensors always get compiled kernels and CPU
tensors the interpreter, whatever the process-wide setting was when pdml was imported.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from pathlib import Path

try:  # triton >= 3.3 reads its settings through knobs
    from triton import knobs as _knobs
except ImportError:  # older triton reads the environment directly
    _knobs = None

KERNEL_MODULES = ("patch_loss", "gather_project")
"""The modules of this package that hold ``@triton.jit`` kernels (loaded per mode)."""

_MODULES: dict[tuple[str, bool], types.ModuleType] = {}


def interpret_everywhere() -> bool:
    """Whether the process asked Triton to interpret every kernel (``TRITON_INTERPRET=1``)."""
    if _knobs is not None:
        return bool(_knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interprets(t) -> bool:
    """Whether a launch on tensor ``t`` runs in Triton's interpreter: CPU tensors always,
    CUDA tensors only when the process asked for interpretation everywhere."""
    return t.device.type != "cuda" or interpret_everywhere()


@contextlib.contextmanager
def _interpret_mode(interpret: bool):
    if _knobs is not None:
        with _knobs.runtime.scope():
            _knobs.runtime.interpret = interpret
            yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def kernel_module(interpret: bool, name: str = "patch_loss") -> types.ModuleType:
    """The kernel module ``pdml.kernels.<name>`` (one of :data:`KERNEL_MODULES`), decorated
    for the interpreter (``interpret=True``) or for compilation (``False``); each copy is
    loaded once."""
    if name not in KERNEL_MODULES:
        raise ValueError(f"name must be one of {KERNEL_MODULES}, got {name!r}")
    module = _MODULES.get((name, interpret))
    if module is None:
        qualified = f"pdml.kernels._{name}_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(qualified, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        with _interpret_mode(interpret):
            sys.modules[qualified] = module
            spec.loader.exec_module(module)
        _MODULES[(name, interpret)] = module
    return module


def _language_objects() -> tuple:
    """The objects of ``triton.language`` whose attributes Triton's interpreter replaces."""
    import triton.language as tl
    return (tl, tl.core, tl.math, tl.standard, tl.core.tensor, tl.core.dtype)


@contextlib.contextmanager
def _language_restored():
    """Undo what an interpreted launch leaves patched in ``triton.language``.

    Why: the interpreter restores the builtins it patches for a kernel, but a call of a
    ``@triton.jit`` helper from inside the kernel patches them again (for the helper's
    module globals) and never restores them (triton 3.8's ``InterpretedFunction.__call__``).
    Left so, ``tl.arange`` and friends stay interpreter lambdas, and every later compilation
    of a kernel in the same process fails ("Unsupported function referenced: <lambda>").
    """
    objects = _language_objects()
    saved = [dict(vars(obj)) for obj in objects]
    try:
        yield
    finally:
        # Only replaced values are put back: names the interpreter adds (e.g. its
        # ``interpreter_semantic`` global, which its cached rewritten helpers read) stay.
        for obj, before in zip(objects, saved):
            for name, value in before.items():
                if vars(obj).get(name, value) is not value:
                    setattr(obj, name, value)


def launch_guard(t, interpret: bool):
    """The context every launch runs in: ``torch.cuda.device(t.device)`` for a compiled
    launch on a CUDA tensor (a launch goes to the current device, not the tensors'), the
    undoing of the interpreter's leftovers for an interpreted one."""
    if interpret:
        return _language_restored()
    if t.device.type == "cuda":
        import torch
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
