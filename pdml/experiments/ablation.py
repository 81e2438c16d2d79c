"""The HU-shift experiment end to end (docs/hu-shift.md): train every arm of the declared
design (:mod:`pdml.experiments.design`), choose λ on the sweep seeds, confirm on fresh
seeds, and write the result as the runs finish.

Phases, one pool of runs (:class:`pdml.experiments.runner.RunPool`): the λ sweep and
every arm that does not depend on it are submitted first (sweep first); as soon as the
sweep's runs are done the declared rule chooses λ for metric learning and for PatchNCE
(:func:`pdml.experiments.verdicts.choose_lambda`) and the arms at those λ join the pool.
After every finished run ``ablation.json`` is rewritten (atomically) with every record so
far (``"complete": false``); at the end it holds the tables, the validity check, the
verdicts and the figures, and ``ablation.md`` the report (:mod:`pdml.experiments.report`).

An invocation repeated after an interruption reuses the finished runs and resumes the
interrupted ones (:func:`pdml.experiments.runner.train_or_reuse`); a run whose folder no
longer holds its records is restored from the record the earlier ``ablation.json`` kept
(:func:`pdml.experiments.runner.restored_record`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from pdml._files import atomic_write_bytes
from pdml.classical import METHODS as CLASSICAL_METHODS
from pdml.experiments import design, report
from pdml.experiments.design import Arm
from pdml.experiments.provenance import environment
from pdml.experiments.runner import RunPool, restored_record
from pdml.experiments.tables import classical_table_rows, ld_row, summarize_arm
from pdml.experiments.verdicts import choose_lambda, validity, verdict

FORMAT = "pdml-hu-shift-experiment"
VERSION = 2


def _config(arm: Arm, seed: int, out: Path, overrides: dict):
    from pdml.training import make_config

    values = dict(arm.overrides(seed))
    values.update(overrides)
    values["out"] = str(out / "runs" / arm.setting / f"{arm.key}-seed{seed}")
    cfg = make_config("demo", **values)
    cfg.max_minutes = values.get("max_minutes")  # None is "no limit", not "the demo's"
    return cfg


def held_out_items(cfg) -> list:
    """The held-out slices every run evaluates (the built-in test split at the run's size,
    all of them), as :class:`pdml.training.ValItem`; builds the built-in data once."""
    from pdml.data import builtin_dataset
    from pdml.training import ValItem

    ds = builtin_dataset(size=cfg.builtin_size, progress=cfg.progress, layout=cfg.builtin_layout)
    ld, truth = ds.load("test/ld"), ds.load("test/truth")
    return [ValItem(ld[i], truth[i], f"builtin test {i}") for i in range(len(ld))]


def checked_classical(methods: Sequence[str]) -> list[str]:
    """``methods`` without repeats; TrainError for an unknown one, or for BM3D without its
    optional package (checked before any training)."""
    import importlib.util

    from pdml.training import TrainError

    methods = list(dict.fromkeys(methods))
    if any(m not in CLASSICAL_METHODS for m in methods):
        raise TrainError(f"--classical must be a subset of {CLASSICAL_METHODS}, got {methods}")
    if "bm3d" in methods and importlib.util.find_spec("bm3d") is None:
        raise TrainError("--classical bm3d needs the optional bm3d package (non-commercial "
                         "licence): pip install 'pdml[classical]', or leave it out "
                         "(--classical tv nlm)")
    return methods


class Experiment:
    """The records of one invocation and what follows from them."""

    def __init__(self, preset: str, out: Path, overrides: dict, command: str):
        self.preset, self.out, self.overrides, self.command = preset, out, overrides, command
        self.plan = design.PLANS[preset]
        self.records: dict[Arm, list[dict]] = {}
        self.arms: list[Arm] = self.plan.first_arms()
        self.choice: dict[str, dict] = {}
        self.classical: list[dict] = []
        self.started = time.time()
        self.earlier_s = 0.0  # wall time of the invocations before this one, same folder

    def config(self, arm: Arm, seed: int):
        return _config(arm, seed, self.out, self.overrides)

    def add(self, arm: Arm, record: dict) -> None:
        self.records.setdefault(arm, []).append(record)

    def sweep_done(self) -> bool:
        return all(len(self.records.get(a, [])) == len(a.seeds)
                   for a in self.arms if a.role == "sweep")

    def rows(self, role: str) -> list[dict]:
        return [summarize_arm(a, self.records[a]) for a in self.arms
                if a.role == role and a in self.records]

    def ld(self, setting: str) -> dict:
        return ld_row([r for a, rs in self.records.items() if a.setting == setting for r in rs])

    def choose(self) -> list[Arm]:
        """Apply the λ rule to the sweep; -> the arms at the chosen λ (new ones only)."""
        sweep, ld = self.rows("sweep"), self.ld("shift")
        for loss in ("dml", "patchnce"):
            self.choice[loss] = choose_lambda([r for r in sweep if r["loss"] == loss], ld)
        new = [a for a in self.plan.chosen_arms(self.choice["dml"]["lambda"],
                                                self.choice["patchnce"]["lambda"])
               if a not in self.arms]
        self.arms += new
        return new

    def _table(self, role: str, setting: str) -> dict:
        rows = self.rows(role)
        ld = self.ld(setting)
        gan = next((r for r in rows if r["key"] == "none"), None)
        control = next((r for r in rows if r["key"] == "none-0hu"), None)
        check = validity(gan, control, ld) if gan and control else None
        classical = classical_table_rows(self.classical) if role == "main" else []
        verdicts = []
        if gan is not None:
            for row in rows:
                if row["loss"] == "dml" and row["nd_offset_hu"] != 0 and "hu_shift" in row:
                    verdicts.append(verdict(row, gan, ld, classical,
                                            bool(check and check["valid"])))
        return {"role": role, "setting": setting, "ld": ld, "rows": rows,
                "classical": classical, "validity": check, "verdicts": verdicts}

    def _portable(self, record: dict) -> dict:
        """``record`` with its run folder relative to the experiment's folder (results
        move with their folder)."""
        where = os.path.relpath(record["run_dir"], self.out)
        return {**record, "run_dir": where, "config": {**record["config"], "out": where}}

    def result(self, complete: bool) -> dict:
        runs = [{"arm": a.key, "role": a.role, "setting": a.setting, **self._portable(r)}
                for a, rs in self.records.items() for r in rs]
        doc = {
            "format": FORMAT, "version": VERSION, "complete": complete,
            "settings": {"command": self.command, "preset": self.preset,
                         "plan": {k: list(v) for k, v in vars(self.plan).items()},
                         "arm_settings": design.SETTINGS, "overrides": self.overrides,
                         "nd_offset_hu": design.ND_OFFSET_HU,
                         "paper_lambda": design.PAPER_LAMBDA,
                         "rules": {"window_fraction": design.WINDOW_FRACTION,
                                   "plateau_hu": design.PLATEAU_HU,
                                   "lambda_choice": design.LAMBDA_RULE,
                                   **design.VERDICT_RULES}},
            "environment": environment(_device(self.overrides)),
            "elapsed_s": time.time() - self.started, "earlier_elapsed_s": self.earlier_s,
            "classical": self.classical, "lambda_choice": self.choice, "runs": runs,
        }
        if complete:
            doc["tables"] = {"main": self._table("main", "shift"),
                             "sweep": {"rows": self.rows("sweep"), "ld": self.ld("shift")},
                             "paper": self._table("paper", "paper")}
        return doc

    def write(self, doc: dict) -> None:
        atomic_write_bytes(self.out / "ablation.json", (json.dumps(doc, indent=1) + "\n").encode())


def _earlier(out: Path) -> tuple[dict, float]:
    """What an earlier ``out/ablation.json`` of this format kept: its run records by
    ``(setting, role, arm, seed)`` (their folders under ``out``) and the wall time of every
    invocation that wrote it; ``({}, 0.0)`` when there is none."""
    from pdml.training import TrainError

    path = out / "ablation.json"
    if not path.exists():
        return {}, 0.0
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"{path} cannot be read as an experiment's result ({e}); move it "
                         f"away or choose another --out") from None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        return {}, 0.0
    runs = {(r["setting"], r["role"], r["arm"], r["seed"]):
            {**r, "run_dir": str(out / r["run_dir"])} for r in doc["runs"]}
    return runs, doc.get("earlier_elapsed_s", 0.0) + doc["elapsed_s"]


def _device(overrides: dict):
    import torch

    name = overrides.get("device") or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_experiment(preset: str = "shift", out=None, jobs: Optional[int] = None,
                   classical: Sequence[str] = CLASSICAL_METHODS, stream=None,
                   command: Optional[str] = None, **overrides) -> dict:
    """Run the experiment of ``preset`` (a key of :data:`~pdml.experiments.design.PLANS`)
    into ``out``; ``overrides``: pdml-train settings for every run (device, threads,
    progress, ...; None = the preset's). -> the final ``ablation.json`` document."""
    from pdml.training import TrainError

    stream = stream if stream is not None else sys.stdout
    if preset not in design.PLANS:
        raise TrainError(f"--preset must be one of {sorted(design.PLANS)}, got {preset!r}")
    jobs = design.PRESET_JOBS[preset] if jobs is None else jobs
    if jobs < 1:
        raise TrainError(f"--jobs must be >= 1, got {jobs}")
    classical = checked_classical(classical)
    out = Path(out) if out is not None else Path("runs") / (
        time.strftime("%Y%m%d-%H%M%S") + "-hu-shift")
    values = dict(design.PRESET_OVERRIDES[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    exp = Experiment(preset, out, values, command or f"python -m pdml.experiments.hu_shift "
                                                     f"--preset {preset}")
    probe = exp.config(exp.arms[0], exp.arms[0].seeds[0])  # validates the settings
    items = held_out_items(probe)  # builds the built-in data before any worker reads it
    exp.overrides["val_slices"] = len(items)  # every run evaluates every held-out slice
    out.mkdir(parents=True, exist_ok=True)
    if classical:
        from pdml.training.evaluate import classical_rows

        t0 = time.time()
        exp.classical = [row for row, _ in classical_rows(items, classical)]
        print(f"[hu-shift] classical baselines {', '.join(classical)}: tuned and scored in "
              f"{time.time() - t0:.0f} s", file=stream, flush=True)
    kept, exp.earlier_s = _earlier(out)
    with RunPool(jobs, out / "logs", stream) as pool:

        def start(arm: Arm) -> None:
            for seed in arm.seeds:
                cfg = exp.config(arm, seed)
                record = restored_record(cfg, kept.get((arm.setting, arm.role, arm.key, seed)))
                if record is None:
                    pool.submit((arm, seed), cfg)
                else:
                    exp.add(arm, record)

        def choose_when_swept() -> None:
            if exp.choice or not exp.sweep_done():
                return
            for new in exp.choose():
                start(new)
            print(f"[hu-shift] λ chosen on the sweep seeds: metric learning "
                  f"{exp.choice['dml']['statement']}; PatchNCE "
                  f"{exp.choice['patchnce']['statement']}", file=stream, flush=True)

        for arm in list(exp.arms):
            start(arm)
        choose_when_swept()  # a sweep restored whole: the chosen arms start (or restore) now
        restored = sum(len(rs) for rs in exp.records.values())
        if restored:
            print(f"[hu-shift] {restored} runs restored from {out / 'ablation.json'} (their "
                  f"folders no longer hold them)", file=stream, flush=True)
        while pool.pending:
            (arm, seed), record = pool.next_done()
            exp.add(arm, record)
            choose_when_swept()
            exp.write(exp.result(complete=False))
    doc = exp.result(complete=True)
    doc["figures"] = report.write_report(doc, items, out)
    exp.write(doc)
    print(f"[hu-shift] wrote {out / 'ablation.md'} and {out / 'ablation.json'}",
          file=stream, flush=True)
    return doc
