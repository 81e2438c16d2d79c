"""A run's values: its held-out evaluations, the endpoint window, the plateau check.

A run (a pdml-train run folder) evaluated the held-out slices every ``eval_every`` steps
(``metrics.jsonl`` records of kind "eval"). Its value of each metric is the mean over the
last :data:`~pdml.experiments.design.WINDOW_FRACTION` of those evaluations; its HU shift's
movement across that window (the least-squares line from the window's first evaluation
to its last) decides whether it plateaued (:data:`~pdml.experiments.design.PLATEAU_HU`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from pdml.experiments.design import PLATEAU_HU, WINDOW_FRACTION

EVAL_KEYS = ("psnr", "ssim", "noise_std", "hu_shift")
"""The metrics the trainer's held-out evaluation records (:func:`pdml.training.evaluate_slices`)."""


def eval_records(run_dir: Path) -> list[dict]:
    """The held-out evaluations of a run, in step order: ``step``, ``slices``, the
    :data:`EVAL_KEYS` of the output and, prefixed ``ld_``, of the LD input."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    keep = ("step", "slices") + EVAL_KEYS + tuple("ld_" + k for k in EVAL_KEYS)
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of a killed run
            continue
        if rec.get("kind") == "eval":
            records.append({k: rec.get(k) for k in keep})
    return sorted(records, key=lambda r: r["step"])


def endpoint_window(evals: Sequence[dict]) -> list[dict]:
    """The last ``ceil(WINDOW_FRACTION · n)`` of ``n`` evaluations (at least one)."""
    if not evals:
        raise ValueError("evals: the run recorded no held-out evaluation")
    count = max(1, math.ceil(WINDOW_FRACTION * len(evals)))
    return list(evals[-count:])


def movement(window: Sequence[dict], key: str = "hu_shift") -> float:
    """How far ``key`` moves across ``window``: the least-squares line's rise from the
    window's first step to its last (0 for a single evaluation)."""
    if len(window) < 2:
        return 0.0
    steps = np.array([r["step"] for r in window], dtype=np.float64)
    values = np.array([r[key] for r in window], dtype=np.float64)
    slope = np.polyfit(steps, values, 1)[0]
    return float(slope * (steps[-1] - steps[0]))


def run_values(evals: Sequence[dict]) -> dict:
    """A run's endpoint: ``{metric: mean over the window}`` for :data:`EVAL_KEYS` and the
    LD input's (``ld_*``), plus ``window_steps``, ``hu_shift_movement`` and ``plateaued``."""
    window = endpoint_window(evals)
    values = {k: float(np.mean([r[k] for r in window]))
              for k in EVAL_KEYS + tuple("ld_" + k for k in EVAL_KEYS)}
    moved = movement(window)
    values.update(window_steps=[r["step"] for r in window], hu_shift_movement=moved,
                  plateaued=bool(abs(moved) <= PLATEAU_HU))
    return values
