"""Training many runs: each trained once, reused or resumed by later invocations, several
at a time, each with the commit and the full config it was trained at.

A run is a pdml-train run folder (:func:`pdml.training.train`). :func:`train_or_reuse`
trains it, reuses it when it finished with the same settings (from its records alone: the
checkpoints are not needed), resumes it exactly when it was interrupted or stopped by its
time limit, and refuses a folder that holds other settings. ``provenance.json`` in the
folder records the source commit (and whether ``pdml/`` was modified) of every invocation
that trained or resumed it. :class:`RunPool` trains ``jobs`` runs at a time in worker
processes (one CPU thread each unless the config says otherwise) and hands back each
run's record as it finishes.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional

from pdml._files import atomic_write_bytes
from pdml.experiments.endpoints import eval_records, run_values
from pdml.experiments.provenance import source_commit

EXECUTION_ONLY = ("out", "progress", "threads", "device", "max_minutes", "eval_figures",
                  "compare_classical")
"""Config keys that may differ between a run and its reuse: they do not change what a
finished run computed (a results folder may have been moved; a run stopped by its time
limit is excluded by the experiment; figures and the summary's classical row are not
training)."""


def _comparable(config: dict) -> dict:
    """A run's settings that decide what it computed, from ``config.json`` or a new
    config alike: read as :class:`pdml.training.TrainConfig` reads it (a setting added
    since the run was trained takes its default, which is how the run behaved; what "auto"
    resolved to is left out), an unset τ the loss's default."""
    from pdml.training.config import DEFAULT_TAU, TrainConfig

    d = {k: v for k, v in TrainConfig.from_dict(config).to_dict().items()
         if k not in EXECUTION_ONLY}
    if d.get("tau") is None:
        d["tau"] = DEFAULT_TAU.get(d.get("loss"))
    return d


def _other_settings(saved: dict, cfg) -> list[str]:
    """The settings in which a run's saved config (``config.json``, or the record an
    ``ablation.json`` kept) differs from ``cfg`` as :func:`_comparable` reads both, sorted;
    [] for the same run."""
    saved, wanted = _comparable(saved), _comparable(cfg.to_dict())
    return sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))


def _provenance(run_dir: Path) -> dict:
    """``run_dir/provenance.json``, or an empty record (``{"sessions": []}``)."""
    path = run_dir / "provenance.json"
    return json.loads(path.read_text()) if path.exists() else {"sessions": []}


def _record_session(run_dir: Path, how: str) -> dict:
    """Append this session's commit to ``run_dir/provenance.json``; -> the whole record."""
    path = run_dir / "provenance.json"
    record = _provenance(run_dir)
    record["sessions"].append({"how": how, **source_commit(),
                               "utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
    return record


def _summary(run_dir: Path) -> Optional[dict]:
    """``run_dir/summary.json`` (written when a run ends, however it ends), else None."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def train_or_reuse(cfg, stream) -> tuple[dict, str, dict]:
    """Train ``cfg`` into ``cfg.out``; a finished run there with the same settings is
    reused (its records suffice: ``config.json``, ``summary.json``, ``metrics.jsonl``,
    ``provenance.json``; the checkpoints may have been removed to share or keep the results
    without the weights); a run interrupted or stopped by its time limit is resumed exactly
    from its last checkpoint (one stopped by the limit whose checkpoints are gone is reused
    as it is: the experiment excludes it). -> ``(summary, "trained" | "reused" |
    "resumed", provenance)``; TrainError for a folder holding other settings. A folder that
    lost its records may still be restored from ``ablation.json``: :func:`restored_record`."""
    from pdml.training import TrainError, train

    run_dir = Path(cfg.out)
    summary = _summary(run_dir)
    finished = summary is not None and summary.get("steps") == cfg.steps
    capped = summary is not None and bool(summary.get("stopped_early"))
    checkpoint = (run_dir / "checkpoints" / "last.pt").exists()
    if not (finished or capped or checkpoint):
        provenance = _record_session(run_dir, "trained")
        return train(cfg, stream=stream), "trained", provenance
    differ = _other_settings(json.loads((run_dir / "config.json").read_text()), cfg)
    if differ:
        raise TrainError(f"{run_dir} holds a run with other settings ({', '.join(differ)}); "
                         f"choose another --out")
    if finished or not checkpoint:
        return summary, "reused", _provenance(run_dir)
    provenance = _record_session(run_dir, "resumed")
    return train(resume=str(run_dir), stream=stream), "resumed", provenance


def restored_record(cfg, kept: Optional[dict]) -> Optional[dict]:
    """The record of run ``cfg`` that an earlier ``ablation.json`` kept (``kept``, one of
    its ``runs``; None when it kept none), for a run whose folder no longer holds it (no
    ``summary.json``, no checkpoint: the results were moved or shared without ``runs/``).
    -> that record, ``how`` "restored", its folder at ``cfg.out``; None when the folder
    holds the run (:func:`train_or_reuse` reads it there) or nothing was kept; TrainError
    when the kept record holds other settings."""
    from pdml.training import TrainError

    run_dir = Path(cfg.out)
    if kept is None or _summary(run_dir) is not None or \
            (run_dir / "checkpoints" / "last.pt").exists():
        return None
    differ = _other_settings(kept["config"], cfg)
    if differ:
        raise TrainError(f"the earlier ablation.json kept the run {run_dir} with other "
                         f"settings ({', '.join(differ)}); choose another --out")
    return {**kept, "how": "restored", "run_dir": str(run_dir),
            "config": {**kept["config"], "out": str(run_dir)}}


def run_record(cfg, summary: dict, how: str, provenance: dict, wall_s: float) -> dict:
    """What the experiment keeps of a finished run: settings, steps, times, provenance, its
    held-out evaluations (:func:`pdml.experiments.endpoints.eval_records`) and endpoint
    values (:func:`pdml.experiments.endpoints.run_values`; None without evaluations)."""
    evals = eval_records(Path(cfg.out))
    return {
        "seed": cfg.seed, "run_dir": str(cfg.out), "how": how, "steps": summary["steps"],
        "planned_steps": summary["planned_steps"],
        "stopped_early": bool(summary["stopped_early"]),
        "train_s": float(summary.get("total_elapsed_s", summary["elapsed_s"])),
        "wall_s": wall_s, "cpu_threads": summary.get("cpu_threads"),
        "provenance": provenance, "config": cfg.to_dict(), "evals": evals,
        "values": run_values(evals) if evals else None,
    }


def _train_in_worker(cfg, log_path: Optional[str]) -> tuple[dict, str, dict, float]:
    """:func:`train_or_reuse` (in a worker process: its output to ``log_path``)."""
    import sys

    t0 = time.time()
    if log_path is None:
        summary, how, provenance = train_or_reuse(cfg, sys.stdout)
    else:
        with open(log_path, "a") as log:
            summary, how, provenance = train_or_reuse(cfg, log)
    return summary, how, provenance, time.time() - t0


def _name(cfg) -> str:
    """A run's name for logs: its folder and the one above (``<setting>-<arm>-seed<k>``)."""
    return "-".join(Path(cfg.out).parts[-2:])


class RunPool:
    """Runs trained ``jobs`` at a time: ``submit(key, cfg)``, then ``next_done() -> (key,
    record)`` as each finishes (:func:`run_record`). ``jobs == 1`` trains in this process,
    one run per :meth:`next_done`, in the order submitted; more jobs use worker processes
    (spawned; each run's terminal output to ``log_dir/<setting>-<run folder>.log``). A failed run raises
    its error from :meth:`next_done`. Use as a context manager."""

    def __init__(self, jobs: int, log_dir: Path, stream):
        self.jobs, self.log_dir, self.stream = jobs, Path(log_dir), stream
        self._queue: list[tuple[Any, Any]] = []
        self._futures: dict[Future, tuple[Any, Any]] = {}
        self._executor: Optional[ProcessPoolExecutor] = None

    def __enter__(self) -> "RunPool":
        if self.jobs > 1:
            import multiprocessing

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._executor = ProcessPoolExecutor(
                self.jobs, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=exc[0] is None, cancel_futures=exc[0] is not None)

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._futures)

    def submit(self, key, cfg) -> None:
        if self._executor is None:
            self._queue.append((key, cfg))
            return
        log = str(self.log_dir / (_name(cfg) + ".log"))
        self._futures[self._executor.submit(_train_in_worker, cfg, log)] = (key, cfg)

    def next_done(self) -> tuple[Any, dict]:
        if self._executor is None:
            key, cfg = self._queue.pop(0)
            summary, how, provenance, wall = _train_in_worker(cfg, None)
        else:
            done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
            future = next(iter(done))
            key, cfg = self._futures.pop(future)
            summary, how, provenance, wall = future.result()
        if summary.get("interrupted"):  # a stop signal reached the run: resumed next time
            raise KeyboardInterrupt(f"{_name(cfg)} stopped at step {summary['steps']}")
        print(f"[hu-shift] {_name(cfg)}: {how}, {summary['steps']} steps, {wall:.0f} s",
              file=self.stream, flush=True)
        return key, run_record(cfg, summary, how, provenance, wall)
