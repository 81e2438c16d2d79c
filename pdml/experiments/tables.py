"""The experiment's rows: an arm's runs summarised over seeds, the LD input's row, the
classical baselines' rows. Every metric of an arm is its runs' endpoint values
(:func:`pdml.experiments.endpoints.run_values`) per seed, with their mean, sd and
confidence interval (:func:`pdml.experiments.statistics.mean_ci`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pdml.experiments.design import Arm
from pdml.experiments.endpoints import EVAL_KEYS
from pdml.experiments.statistics import mean_ci

ROW_KEYS = EVAL_KEYS + ("abs_hu_shift",)
"""The metrics of a row (``abs_hu_shift``: |HU shift| of each run, then averaged)."""


def summarize_arm(arm: Arm, records: Sequence[dict]) -> dict:
    """One arm's row from its runs' records (:func:`pdml.experiments.runner.run_record`).

    Runs stopped before their planned steps (a time cap) are left out and listed in
    ``excluded``; ``not_plateaued`` lists the seeds whose HU shift moved more than the
    plateau bound across the window (they count). Per metric of :data:`ROW_KEYS`:
    ``{"per_seed", "n", "mean", "sd", "lo", "hi"}`` (absent without included runs).
    """
    mine = sorted(records, key=lambda r: r["seed"])
    used = [r for r in mine if not r["stopped_early"] and r["values"] is not None]
    row = {"key": arm.key, "title": arm.title, "role": arm.role, "setting": arm.setting,
           "loss": arm.loss, "lambda_metric": arm.lambda_metric,
           "nd_offset_hu": arm.nd_offset_hu, "supervised": arm.supervised,
           "seeds": [r["seed"] for r in used],
           "excluded": [r["seed"] for r in mine if r not in used],
           "not_plateaued": [r["seed"] for r in used if not r["values"]["plateaued"]],
           "hu_shift_movement": [r["values"]["hu_shift_movement"] for r in used],
           "train_s": float(sum(r["train_s"] for r in mine)),
           "steps": sorted({r["steps"] for r in mine}),
           "commits": sorted({s.get("commit") or "unknown"
                              for r in mine for s in r["provenance"].get("sessions", [])})}
    if used:
        for key in ROW_KEYS:
            values = [abs(r["values"]["hu_shift"]) if key == "abs_hu_shift"
                      else r["values"][key] for r in used]
            row[key] = {"per_seed": values, **mean_ci(values)}
    return row


def per_seed(row: dict, key: str) -> dict:
    """``{seed: value}`` of ``key`` in an arm's row."""
    return dict(zip(row["seeds"], row[key]["per_seed"])) if key in row else {}


def ld_row(records: Sequence[dict]) -> dict:
    """The untouched LD input's row: its held-out metrics (the same slices in every run of
    a setting; taken from the runs' own evaluations, averaged over their windows)."""
    used = [r for r in records if r["values"] is not None]
    if not used:
        raise ValueError("records: no run with held-out evaluations")
    row = {"key": "ld", "title": "LD input (untouched)"}
    for key in EVAL_KEYS:
        row[key] = {"mean": float(np.mean([r["values"]["ld_" + key] for r in used]))}
    row["abs_hu_shift"] = {"mean": abs(row["hu_shift"]["mean"])}
    return row


def classical_table_rows(classical: Sequence[dict]) -> list[dict]:
    """Rows of the classical baselines (:func:`pdml.training.evaluate.classical_rows`'s
    rows: one deterministic value per metric, no seeds)."""
    rows = []
    for c in classical:
        row = {"key": c["method"], "title": c["name"]}
        for key in EVAL_KEYS:
            row[key] = {"mean": c[key]}
        row["abs_hu_shift"] = {"mean": abs(c["hu_shift"])}
        rows.append(row)
    return rows
