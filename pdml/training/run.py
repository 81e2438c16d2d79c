"""A training run of ``pdml-train``: set up, loop over steps, evaluate, checkpoint, resume.

Everything a run writes goes to its run folder (rank 0 only): ``config.json``,
``metrics.jsonl``, ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (atomic: tmp file,
fsync, ``os.replace``), ``figures/*.png`` and ``summary.json``. Rank 0 locks the folder
while the run lives (:mod:`pdml.training.rundir`). Losses that stay non-finite stop the run
(:mod:`pdml.training.guard`); only finite networks after a finite step are saved.
"""
from __future__ import annotations

import random
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from pdml.training.checkpoint import (checkpoint_config, checkpoint_dict, load_checkpoint,
                                      load_training_state, save_checkpoint)
from pdml.training.config import (NonFiniteLossError, TrainConfig, TrainError, lr_factor,
                                  resumed_config)
from pdml.training.data import IndexStream, build_data
from pdml.training.denoise import autocast
from pdml.training.distributed import (any_rank, barrier, choose_cpu_threads, gather_objects,
                                       init_distributed, launch_rank, ranks_hold_same_parameters)
from pdml.training.evaluate import denoise_slices, evaluate_slices
from pdml.training.guard import NonFiniteGuard
from pdml.training.interrupt import StopRequest, signal_name
from pdml.training.networks import build_networks
from pdml.training.report import (append_metrics, classical_comparison, save_eval_figure,
                                  trim_metrics, write_config, write_report)
from pdml.training.rng import capture_rng_state, restore_rng_state
from pdml.training.rundir import RunLock, check_writable_folder, remove_stale_temp_files
from pdml.training.step import build_step, loss_backend_used
from pdml.training.telemetry import GpuTelemetry


class TrainingRun:
    """One run of ``pdml-train`` (all ranks construct one; rank 0 alone writes).

    ``TrainingRun(cfg).run() -> summary dict``; ``TrainingRun(None, resume=RUN_DIR)``
    continues a run from ``RUN_DIR/checkpoints/last.pt`` with the run's own config, where
    ``changes`` may set what :data:`pdml.training.config.RESUME_SETTINGS` names (``steps``
    extends a finished or interrupted run) and repeat the others
    (:func:`pdml.training.config.resumed_config`).
    A first SIGINT / SIGTERM during :meth:`run` stops it after the current step with
    ``last.pt`` of that step (:mod:`pdml.training.interrupt`).
    """

    def __init__(self, cfg: Optional[TrainConfig], resume: Optional[str] = None,
                 stream=None, changes: Optional[dict] = None):
        self.stream = stream if stream is not None else sys.stdout
        self.lock: Optional[RunLock] = None
        self.info = None
        if resume is not None:
            flag = "--resume"
            run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent.parent
            if not Path(resume).exists():
                raise TrainError(f"--resume {resume}: no such run folder or checkpoint")
        else:
            if cfg is None:
                raise TrainError("a config or --resume RUN_DIR is needed")
            cfg.validate()
            flag = "--out"
            run_dir = Path(cfg.out) if cfg.out else Path("runs") / (
                time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.loss}")
        self.run_dir = run_dir
        try:
            if launch_rank() == 0:  # rank 0 alone writes the run folder, so it alone locks it
                check_writable_folder(run_dir, flag)
                self.lock = RunLock.acquire(run_dir, flag)
            ckpt = None
            if resume is not None:  # read under the lock: no other trainer writes it now
                ckpt = load_checkpoint(Path(resume) / "checkpoints" / "last.pt"
                                       if Path(resume).is_dir() else resume)
                cfg = resumed_config(checkpoint_config(ckpt, f"--resume {resume}"),
                                     int(ckpt["step"]), run_dir, **(changes or {}))
            self.cfg = cfg
            self.info, self.device = init_distributed(cfg.device)
            self._setup(ckpt)
        except BaseException:
            self.close(failed_setup=True)
            raise

    # ---------------------------------------------------------------- setup
    def _setup(self, ckpt: Optional[dict]) -> None:
        cfg, info, device = self.cfg, self.info, self.device
        if info.is_main and ckpt is None and (self.run_dir / "checkpoints" / "last.pt").exists():
            raise TrainError(f"{self.run_dir} already holds a run; continue it with "
                             f"--resume {self.run_dir} or choose another --out")
        if info.is_main:
            remove_stale_temp_files(self.run_dir)  # a killed run's leftovers (we hold the lock)
        if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainError("--precision bf16 needs a GPU with bfloat16 support")
        self.loss_backend = loss_backend_used(cfg, device)
        if device.type == "cpu":
            self.thread_choice = choose_cpu_threads(cfg.threads)
            torch.set_num_threads(self.thread_choice.threads)
            if info.is_main and cfg.progress:   # --no-progress keeps stdout quiet
                print(f"pdml-train: {self.thread_choice.describe()}", file=self.stream, flush=True)
        # identical initial weights on every rank (DDP also broadcasts rank 0's)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.data = build_data(cfg, info)
        self.generator, self.discriminator, self.heads = build_networks(cfg)
        for m in (self.generator, self.discriminator, self.heads):
            if m is not None:
                m.to(device)
        g_params = list(self.generator.parameters())
        if self.heads is not None:
            g_params += list(self.heads.parameters())
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(g_params, lr=cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.resolved_lr_d,
                                      betas=betas)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda s: lr_factor(s, cfg))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lambda s: lr_factor(s, cfg))
        # fp16: start at 2**10, not torch's 2**16, which overflows the first steps' gradients
        # (the metric loss's exp(s/τ) terms are up to e^{1/0.15}) and so skips them.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10,
                                           enabled=cfg.precision == "fp16")
        self.autocast = autocast(device, cfg.precision)

        self.step_fn = build_step(cfg, generator=self.generator, discriminator=self.discriminator,
                                  heads=self.heads, opt_g=self.opt_g, opt_d=self.opt_d,
                                  sched_g=self.sched_g, sched_d=self.sched_d, scaler=self.scaler,
                                  autocast=self.autocast, device=device, distributed=info.enabled)

        self.step = 0
        self.saved_step: Optional[int] = None
        self.best = {"step": -1, "psnr": None}
        self.last_eval: Optional[dict] = None
        self.elapsed_before = 0.0
        # each rank draws its own crops and patch positions
        torch.manual_seed(cfg.seed + 1_000_003 * (info.rank + 1))
        np.random.seed((cfg.seed + 7919 * (info.rank + 1)) % 2**32)
        random.seed(cfg.seed + 104_729 * (info.rank + 1))
        if ckpt is not None:
            self._load_state(ckpt)
        self.samples = IndexStream(len(self.data.train), info, cfg.seed)
        self.telemetry = GpuTelemetry(device)
        self.guard = NonFiniteGuard(("loss_G", "loss_D", "loss_gan", "loss_idt", "loss_patch"),
                                    device, distributed=info.enabled)
        if info.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "figures").mkdir(exist_ok=True)
            write_config(self.run_dir, cfg, {"device": str(device), "world_size": info.world,
                                             "cpu_threads": torch.get_num_threads(),
                                             "loss_backend": self.loss_backend,
                                             **({"patients": self.data.patients,
                                                 "data_cache": self.data.cache}
                                                if self.data.cache else {})})
            trim_metrics(self.run_dir / "metrics.jsonl", self.step)

    def _load_state(self, ckpt: dict) -> None:
        load_training_state(ckpt, self._networks(), {"generator": self.opt_g, "discriminator": self.opt_d},
                            {"generator": self.sched_g, "discriminator": self.sched_d}, self.scaler)
        self.step = int(ckpt["step"])
        self.saved_step = self.step
        # The LR of this step under this run's schedule: the stored one unless --resume
        # changed --steps or --decay-steps (LambdaLR computes the same product).
        for opt, sched in ((self.opt_g, self.sched_g), (self.opt_d, self.sched_d)):
            for group, base in zip(opt.param_groups, sched.base_lrs):
                group["lr"] = base * lr_factor(self.step, self.cfg)
        self.best = dict(ckpt["best"])
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        states = ckpt["rng"]
        if len(states) == self.info.world:
            restore_rng_state(states[self.info.rank])
        elif self.info.is_main:
            warnings.warn(f"the checkpoint was written by {len(states)} ranks, this run has "
                          f"{self.info.world}: random streams restart (not bit-exact)")

    # ---------------------------------------------------------------- one step
    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s crops of this rank: LD ``x`` and ND ``y`` ``[B, 1, crop, crop]``
        float32, in the networks' scale (:func:`pdml.training.networks.to_network`), on
        the device."""
        b = self.cfg.batch_size
        pairs = [self.data.train.get(e, i) for e, i in self.samples.positions(step * b, b)]
        x = torch.stack([p[0] for p in pairs])
        y = torch.stack([p[1] for p in pairs])
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One generator step then one discriminator step; -> detached float32 losses."""
        return self.step_fn(x, y)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, step: int) -> Optional[dict]:
        """Denoise the held-out slices (rank 0): metrics record, figure; None elsewhere."""
        if not self.info.is_main or not self.data.val:
            return None
        denoised = denoise_slices(self.generator, self.data.val, self.cfg, self.device)
        self.generator.train()
        record = {"kind": "eval", "step": step, "slices_from": self.data.val_source,
                  **evaluate_slices(self.data.val, denoised)}
        self._log(record)
        if self.cfg.eval_figures:
            try:
                save_eval_figure(self.data.val[0], denoised[0],
                                 self.run_dir / "figures" / f"eval_step{step:07d}.png", step)
            except Exception as e:  # a figure must never stop training
                warnings.warn(f"eval figure not written: {e}")
        return record

    # ---------------------------------------------------------------- checkpoint
    def _checkpoint_obj(self, step: int, elapsed: float) -> dict:
        return checkpoint_dict(
            step=step, world_size=self.info.world, elapsed_s=elapsed, config=self.cfg.to_dict(),
            model={k: v.state_dict() for k, v in self._networks().items()},
            optimizer={"generator": self.opt_g.state_dict(), "discriminator": self.opt_d.state_dict()},
            scheduler={"generator": self.sched_g.state_dict(),
                       "discriminator": self.sched_d.state_dict()},
            scaler=self.scaler.state_dict(), best=dict(self.best),
            rng=gather_objects(capture_rng_state(), self.info))  # one state per rank

    def _networks(self) -> dict[str, nn.Module]:
        """The networks a checkpoint holds (heads: an empty module without a patch loss)."""
        return {"generator": self.generator, "discriminator": self.discriminator,
                "heads": self.heads if self.heads is not None else nn.Module()}

    def checkpoint(self, step: int, elapsed: float, is_best: bool) -> None:
        obj = self._checkpoint_obj(step, elapsed)  # collective: every rank takes part
        if self.info.is_main:
            save_checkpoint(obj, self.run_dir / "checkpoints" / "last.pt")
            if is_best:
                save_checkpoint(obj, self.run_dir / "checkpoints" / "best.pt")
        self.saved_step = step
        barrier(self.info)

    def _state_is_finite(self) -> bool:
        """Stop on non-finite weights or losses (a sync); False when the last step's losses
        were not finite (that state is not saved: the next save follows a finite step)."""
        self._stop_if_nonfinite(self.guard.state_problem(
            [self.generator, self.discriminator, self.heads], self.step))
        return self.guard.count == 0

    def _stop_if_nonfinite(self, problem: Optional[str]) -> None:
        if problem is None:
            return
        kept = (f"checkpoints/last.pt of step {self.saved_step} is kept"
                if self.saved_step is not None else "no checkpoint was written")
        self._log({"kind": "stopped", "step": self.step, "reason": problem})
        raise NonFiniteLossError(f"stopped: {problem}; {kept} in {self.run_dir}")

    def _log(self, record: dict) -> None:
        if self.info.is_main:
            append_metrics(self.run_dir / "metrics.jsonl", record)

    def _stop_now(self, started: float) -> bool:
        """This rank's time budget used up?"""
        return self.cfg.max_minutes is not None and time.time() - started > 60 * self.cfg.max_minutes

    def _stop_reason(self, started: float, stop: StopRequest) -> Optional[str]:
        """"time" (the budget is used up), the name of a stop signal ("SIGINT",
        "SIGTERM") or None; with DDP every rank gets the same answer (any rank's reason)."""
        timed_out, signum = any_rank([float(self._stop_now(started)), float(stop.signum or 0)],
                                     self.info, self.device)
        if signum:
            return signal_name(int(signum))
        return "time" if timed_out else None

    # ---------------------------------------------------------------- main loop
    def run(self) -> dict:
        """Train to ``cfg.steps`` (or the time budget, or a stop signal); -> the summary."""
        start_step, started = self.step, time.time()
        bar = tqdm(total=self.cfg.steps, initial=start_step, desc="pdml-train", unit="step",
                   dynamic_ncols=True, disable=not (self.info.is_main and self.cfg.progress),
                   file=sys.stderr)
        try:
            with StopRequest() as stop:  # a second signal raises KeyboardInterrupt
                reason = self._loop(bar, started, stop)
                bar.close()  # before the summary: the bar is not drawn again after it
                if reason == "time" and self.step > start_step:
                    self._maybe_eval_and_checkpoint(started, force=True)
                elif reason not in (None, "time") and self.step != self.saved_step:
                    self._maybe_eval_and_checkpoint(started, force=True, evaluate=False)
                return self._summary(start_step, started, reason)
        finally:
            bar.close()
            self.close()

    def _loop(self, bar, started: float, stop: StopRequest) -> Optional[str]:
        """The steps; -> why they stopped before ``cfg.steps`` (:meth:`_stop_reason`) or None."""
        cfg, info = self.cfg, self.info
        sums: dict[str, torch.Tensor] = {}
        window_steps, window_start = 0, time.time()
        while self.step < cfg.steps:
            reason = self._stop_reason(started, stop)
            if reason is not None:
                return reason
            x, y = self._batch(self.step)
            losses = self.train_step(x, y)
            self.step += 1
            window_steps += 1
            self.guard.update(self.step, losses)
            self._stop_if_nonfinite(self.guard.problem())
            for k, v in losses.items():
                sums[k] = sums[k] + v if k in sums else v
            bar.update(1)
            last_step = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last_step:
                dt = max(time.time() - window_start, 1e-9)
                rec = {"kind": "train", "step": self.step,
                       **{k: float(v) / window_steps for k, v in sums.items()},
                       "lr": self.opt_g.param_groups[0]["lr"],
                       "img_per_s": window_steps * cfg.batch_size * info.world / dt,
                       **self.telemetry.sample()}
                self._log(rec)
                bar.set_postfix(G=f"{rec['loss_G']:.3f}", D=f"{rec['loss_D']:.3f}",
                                P=f"{rec['loss_patch']:.3f}", img_s=f"{rec['img_per_s']:.1f}")
                sums, window_steps, window_start = {}, 0, time.time()
            paused = time.time()
            if self._maybe_eval_and_checkpoint(started, force=last_step):
                window_start += time.time() - paused  # img/s counts training time only
        return None

    def _maybe_eval_and_checkpoint(self, started: float, force: bool,
                                   evaluate: bool = True) -> bool:
        """Evaluate and/or checkpoint when due (``force``: both now; without ``evaluate``
        only the checkpoint); -> whether anything ran."""
        cfg = self.cfg
        is_best, ran = False, False
        due_eval = evaluate and (self.step % cfg.eval_every == 0 or force)
        if not (due_eval or force or self.step % cfg.ckpt_every == 0):
            return False
        if not self._state_is_finite():  # never evaluate or save a step of non-finite losses
            return False
        if due_eval:
            rec = self.evaluate(self.step)
            if rec is not None and rec["psnr"] is not None and (
                    self.best["psnr"] is None or rec["psnr"] > self.best["psnr"]):
                self.best = {"step": self.step, "psnr": rec["psnr"]}
                is_best = True
            if self.info.enabled:  # every rank tracks the same best
                box = [self.best, is_best]
                dist.broadcast_object_list(box, 0)
                self.best, is_best = box
            self.last_eval = rec
            ran = True
        if self.step % cfg.ckpt_every == 0 or force or is_best:
            self.checkpoint(self.step, self.elapsed_before + time.time() - started, is_best)
            ran = True
        return ran

    def _summary(self, start_step: int, started: float, reason: Optional[str]) -> dict:
        """summary.json (``interrupted``: the stop signal or None; ``checkpoint_step``: the
        step of ``last.pt``) and, unless a signal stopped the run, the table on ``stream``."""
        elapsed = time.time() - started
        summary = {
            "run_dir": str(self.run_dir), "steps": self.step, "planned_steps": self.cfg.steps,
            "stopped_early": reason == "time", "world_size": self.info.world,
            "interrupted": reason if reason not in (None, "time") else None,
            "checkpoint_step": self.saved_step,
            "elapsed_s": elapsed, "total_elapsed_s": self.elapsed_before + elapsed,
            "img_per_s": (self.step - start_step) * self.cfg.batch_size * self.info.world
            / max(elapsed, 1e-9),
            "ranks_in_sync": ranks_hold_same_parameters(list(self._networks().values()), self.info),
            "best": self.best,
            "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "cpu_threads_reason": (self.thread_choice.describe() if self.device.type == "cpu"
                                else None),
            "final_eval": self.last_eval,
            "patients": self.data.patients,
        }
        if self.info.is_main:  # the table only for a run that was not stopped by a signal
            summary["classical"] = None
            if self.cfg.compare_classical and self.last_eval is not None and not summary["interrupted"]:
                summary["classical"] = classical_comparison(
                    self.generator, self.data.val, self.cfg, self.device,
                    self.run_dir / "figures" / "comparison.png", self.step)
            write_report(self.run_dir, summary, self.cfg, None if summary["interrupted"] else self.stream)
        return summary

    def close(self, failed_setup: bool = False) -> None:
        """Leave the torchrun job (when joined here) and release the run folder's lock;
        ``failed_setup``: also remove the run folder if this run created it and it is empty."""
        if self.info is not None and self.info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.info.initialized_here = False
        if self.lock is not None:
            self.lock.release(remove_empty_folder=failed_setup)
            self.lock = None


def train(cfg: Optional[TrainConfig] = None, resume: Optional[str] = None, stream=None,
          changes: Optional[dict] = None) -> dict:
    """Run (or with ``resume=RUN_DIR`` continue, with ``changes`` such as ``{"steps": N}``)
    a training; -> the summary dict (``summary["interrupted"]``: the signal that stopped
    it, else None)."""
    return TrainingRun(cfg, resume=resume, stream=stream, changes=changes).run()
