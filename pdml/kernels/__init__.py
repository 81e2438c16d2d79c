"""Triton kernels of pdml: :mod:`.patch_loss` holds the ``@triton.jit``
kernels, :mod:`.launch` the helpers that size the grids and launch them on tensors,
:mod:`.aot` the compile check for a GPU architecture without a GPU.

Triton decides at decoration time whether a kernel is compiled for the GPU or run by
its CPU interpreter (``TRITON_INTERPRET``). pdml keeps one copy of the kernel module
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

_SOURCE = Path(__file__).with_name("patch_loss.py")
_MODULES: dict[bool, types.ModuleType] = {}


def interpret_everywhere() -> bool:
    """Whether the process asked Triton to interpret every kernel (``TRITON_INTERPRET=1``)."""
    if _knobs is not None:
        return bool(_knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def kernel_module(interpret: bool) -> types.ModuleType:
    """The kernels of :mod:`pdml.kernels.patch_loss`, decorated for the interpreter
    (``interpret=True``) or for compilation (``False``); each copy is loaded once."""
    module = _MODULES.get(interpret)
    if module is None:
        name = f"pdml.kernels._patch_loss_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, _SOURCE)
        module = importlib.util.module_from_spec(spec)
        with _interpret_mode(interpret):
            sys.modules[name] = module
            spec.loader.exec_module(module)
        _MODULES[interpret] = module
    return module
