"""How pdml runs its Triton kernels: which mode a launch uses, the module copy of each mode,
and the context every launch runs in.

Triton decides when ``@triton.jit`` decorates a function whether the kernel is compiled for
the GPU or run by its CPU interpreter (``TRITON_INTERPRET``, read at decoration time). A
process may need both: CUDA tensors always get compiled kernels, CPU tensors the
interpreter, whatever the process-wide setting was when pdml was imported. So a kernel
module (:mod:`pdml.kernels.patch_loss`, :mod:`pdml.kernels.gather_project`) is imported
normally by its launcher, which serves the mode it was decorated in, and
:func:`kernel_module` executes the same source once more, under the other mode, as a
second module (``pdml.kernels._<name>_interpreted`` or ``_compiled``) when a launch needs it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types

import torch
from triton.runtime.jit import JITFunction

try:  # triton >= 3.3 reads its settings through knobs
    from triton import knobs as _knobs
except ImportError:  # older triton reads the environment directly
    _knobs = None

_COPIES: dict[tuple[str, bool], types.ModuleType] = {}


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


def decorated_for_interpreter(module: types.ModuleType) -> bool:
    """Whether the ``@triton.jit`` functions of kernel module ``module`` were decorated for
    the interpreter: for compilation they are :class:`triton.runtime.jit.JITFunction`."""
    return not any(isinstance(value, JITFunction) for value in vars(module).values())


def kernel_module(module: types.ModuleType, interpret: bool) -> types.ModuleType:
    """Kernel module ``module`` (imported normally) decorated for the interpreter
    (``interpret=True``) or for compilation (``False``): ``module`` itself when it was
    decorated so, else its copy of that mode, executed once from the same source."""
    if decorated_for_interpreter(module) == interpret:
        return module
    key = (module.__name__, interpret)
    copy = _COPIES.get(key)
    if copy is None:
        package, _, name = module.__name__.rpartition(".")
        qualified = f"{package}._{name}_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(qualified, module.__spec__.origin)
        copy = importlib.util.module_from_spec(spec)
        with _interpret_mode(interpret):
            sys.modules[qualified] = copy
            spec.loader.exec_module(copy)
        _COPIES[key] = copy
    return copy


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
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
