"""The trainer behind ``pdml-train``: the paper's unsupervised LDCT denoiser.

One job per module: :mod:`~pdml.training.config` (settings, presets, schedule),
:mod:`~pdml.training.distributed` (torchrun / DDP, device, threads),
:mod:`~pdml.training.checkpoint` (file format, the generator of a checkpoint),
:mod:`~pdml.training.rng` (RNG states), :mod:`~pdml.training.networks` (building the
networks), :mod:`~pdml.training.step` (the G+D step), :mod:`~pdml.training.data` (crops,
held-out slices, sample order), :mod:`~pdml.training.denoise` (denoising HU slices with a
generator, autocast), :mod:`~pdml.training.evaluate` (held-out metrics),
:mod:`~pdml.training.report` (figures, summary table), :mod:`~pdml.training.telemetry`
(GPU counters), :mod:`~pdml.training.guard` (stop on non-finite losses),
:mod:`~pdml.training.rundir` (output folders: writable check, the run folder's lock, a
killed run's temporary files) and :mod:`~pdml.training.run` (the run: loop, resume).

``from pdml.training import train, make_config`` is the entry point::

    summary = train(make_config("demo", steps=100, out="runs/demo"))
    summary = train(resume="runs/demo")

The names below are loaded on first use (PEP 562), so importing one submodule (as
:mod:`pdml.inference` does with :mod:`~pdml.training.denoise`) does not import the whole
trainer.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "config": ("TrainConfig", "TrainError", "NonFiniteLossError", "make_config", "PRESETS",
               "LOSSES", "PRECISIONS", "DEFAULT_TAU", "lr_factor"),
    "checkpoint": ("CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "atomic_write_bytes",
                   "save_checkpoint", "load_checkpoint"),
    "rng": ("capture_rng_state", "restore_rng_state"),
    "data": ("ValItem", "RunData", "build_data"),
    "evaluate": ("denoise_slices", "evaluate_slices"),
    "report": ("DISPLAY_WINDOW", "format_summary"),
    "run": ("TrainingRun", "train"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pdml.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pdml.training.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
