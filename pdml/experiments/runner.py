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
import os
import signal
import sys
import threading
import time
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
    t0 = time.time()
    if log_path is None:
        summary, how, provenance = train_or_reuse(cfg, sys.stdout)
    else:
        with open(log_path, "a") as log:
            summary, how, provenance = train_or_reuse(cfg, log)
    return summary, how, provenance, time.time() - t0


def _worker_main(cfg, log_path: str, send, pool_pid: int) -> None:
    """A worker process of :class:`RunPool`: trains ``cfg`` (:func:`_train_in_worker`) and
    sends the result through ``send`` (the exception instead when it failed). It
    leaves the pool's process group first, so that a terminal's Ctrl-C reaches only the
    pool, which stops each worker once (a second signal would stop a run at once, without
    the checkpoint of its step); and it is stopped like that when the pool's process dies,
    however it died (:func:`_stop_with_the_pool`)."""
    os.setpgrp()
    _stop_with_the_pool(pool_pid)
    try:
        outcome = _train_in_worker(cfg, log_path)
    except BaseException as e:  # noqa: BLE001 - handed to the pool, raised there
        outcome = e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}")
    try:
        send.send(outcome)
    except BrokenPipeError:  # the pool stopped waiting for it
        pass
    send.close()


def _stop_with_the_pool(pool_pid: int) -> None:
    """On Linux: SIGTERM to this process when its parent, the pool (``pool_pid``), dies,
    even by SIGKILL (``prctl(PR_SET_PDEATHSIG)``), so that no run outlives the experiment;
    a pool already gone means exit now. Elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    from pdml.training.interrupt import exit_status

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != pool_pid:  # the pool died before the request took effect
        os._exit(exit_status(signal.SIGTERM))


def _picklable(error: BaseException) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any failure: the pool gets a plain copy
        return False
    return True


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _name(cfg) -> str:
    """A run's name for logs: its folder and the one above (``<setting>-<arm>-seed<k>``)."""
    return "-".join(Path(cfg.out).parts[-2:])


class RunPool:
    """Runs trained ``jobs`` at a time: ``submit(key, cfg)``, then ``next_done() -> (key,
    record)`` as each finishes (:func:`run_record`). ``jobs == 1`` trains in this process,
    one run per :meth:`next_done`, in the order submitted; more jobs train each run in a
    process of its own (spawned; its terminal output to
    ``log_dir/<setting>-<run folder>.log``), started only when a place is free. A failed
    run raises its error from :meth:`next_done`. Use as a context manager.

    Stopping: inside the block SIGTERM raises KeyboardInterrupt here, as Ctrl-C does. The
    workers run in process groups of their own, so a terminal's Ctrl-C reaches only this
    process; leaving the block on an error sends each running worker one SIGTERM, which
    stops its run after the current step with a checkpoint (resumed next time), and waits
    for them. No new run starts after that."""

    STOP_WAIT_S = 300.0
    """How long leaving on an error waits for the workers' checkpoints before killing them
    (every file a run writes is atomic: a kill loses at most the steps since the last)."""

    def __init__(self, jobs: int, log_dir: Path, stream):
        self.jobs, self.log_dir, self.stream = jobs, Path(log_dir), stream
        self._queue: list[tuple[Any, Any]] = []
        self._running: dict[Any, tuple[Any, Any, Any]] = {}  # result pipe -> (key, cfg, process)
        self._context = self._previous_sigterm = None

    def __enter__(self) -> "RunPool":
        if self.jobs > 1:
            import multiprocessing

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._context = multiprocessing.get_context("spawn")
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._running:
                self._stop_workers()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._running)

    def submit(self, key, cfg) -> None:
        self._queue.append((key, cfg))

    def next_done(self) -> tuple[Any, dict]:
        if self.jobs == 1:
            key, cfg = self._queue.pop(0)
            summary, how, provenance, wall = _train_in_worker(cfg, None)
        else:
            while self._queue and len(self._running) < self.jobs:
                self._start(*self._queue.pop(0))
            key, cfg, outcome = self._next_outcome()
            if isinstance(outcome, BaseException):
                raise outcome
            summary, how, provenance, wall = outcome
        if summary.get("interrupted"):  # a stop signal reached the run: resumed next time
            raise KeyboardInterrupt(f"{_name(cfg)} stopped at step {summary['steps']}")
        print(f"[hu-shift] {_name(cfg)}: {how}, {summary['steps']} steps, {wall:.0f} s",
              file=self.stream, flush=True)
        return key, run_record(cfg, summary, how, provenance, wall)

    def _start(self, key, cfg) -> None:
        receive, send = self._context.Pipe(duplex=False)
        log = str(self.log_dir / (_name(cfg) + ".log"))
        process = self._context.Process(target=_worker_main, name=_name(cfg),
                                        args=(cfg, log, send, os.getpid()))
        process.start()
        send.close()  # the worker holds the only sending end: its exit ends the pipe
        self._running[receive] = (key, cfg, process)

    def _next_outcome(self) -> tuple[Any, Any, Any]:
        """The first worker to finish -> (key, cfg, its result or error); a worker that
        ended without one (killed, crashed) gives a TrainError with its exit code."""
        from multiprocessing.connection import wait

        from pdml.training import TrainError

        receive = wait(list(self._running))[0]
        key, cfg, process = self._running.pop(receive)
        try:
            outcome = receive.recv()
        except EOFError:
            process.join()
            outcome = TrainError(f"the worker training {_name(cfg)} ended without a result "
                                 f"(exit code {process.exitcode}); run the same command "
                                 f"again to resume it")
        finally:
            receive.close()
        process.join()
        return key, cfg, outcome

    def _stop_workers(self) -> None:
        """One SIGTERM to every running worker, then wait for each (killed after
        :attr:`STOP_WAIT_S`, or at once on another KeyboardInterrupt)."""
        running, self._running = self._running, {}
        processes = [process for _, _, process in running.values()]
        self._queue.clear()
        print(f"[hu-shift] stopping {len(processes)} running run(s) after their current step",
              file=self.stream, flush=True)
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.STOP_WAIT_S
        try:
            for process in processes:
                process.join(max(0.0, deadline - time.monotonic()))
        finally:  # also on a second Ctrl-C: no worker outlives the pool
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        for receive in running:  # after the joins: a result (a few kB) fits the pipe
            receive.close()
