"""Console scripts ``pdml-train`` and ``pdml-denoise``.

Both return a process exit code, with one ``error:`` line on stderr and no traceback for
anything but success:

- 0: success;
- 2: a user error: bad arguments or settings, missing or unusable data, an output folder
  that cannot be written or is in use by another trainer, a checkpoint of another model or
  with NaN weights; for ``pdml-denoise`` also series that could not be denoised or written
  (one line each; the other series are still written);
- 1: ``pdml-train`` stopped because its losses stayed non-finite (the line names the steps
  and the loss terms; the last good checkpoint stays).

Only the project's user-error types are caught (:class:`~pdml.training.config.TrainError`
and the DICOM reader's errors); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

# the console scripts call pdml.inference's and pdml.training's functions through their
# modules: the trainer (pdml.training.train) loads on first use, not for pdml-denoise
from pdml import inference, ops, training
from pdml.data import (DicomHeaderWarning, DicomReadError, DuplicatePositionWarning,
                       NoCTImagesError, SeriesWriter, derived_paths, load_ct)
from pdml.training.checkpoint import find_checkpoint, load_checkpoint
from pdml.training.config import (ARCHS, BUILTIN_LAYOUTS, D_INPUTS, LOSSES, PRECISIONS, PRESETS,
                                  NonFiniteLossError, TrainConfig, TrainError, format_setting)
from pdml.training.distributed import (choose_cpu_threads, keep_freed_memory, launch_rank,
                                       resolve_device)
from pdml.training.interrupt import exit_status
from pdml.training.rundir import check_writable_folder


class _Parser(argparse.ArgumentParser):
    """argparse with its error as one line (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(prog: str, error, code: int = 2) -> int:
    """Print ``error`` (an exception or a message) as one line on stderr; -> ``code``."""
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return code


# The options of pdml-train that are settings of TrainConfig (same names, "-" for "_").
_TRAIN_KEYS = ("ldct", "ndct", "val_ldct", "val_ndct", "patients", "ld_series", "nd_series",
               "val_patients", "test_patients", "val_fraction", "test_fraction",
               "pair_tolerance_mm", "builtin_layout", "builtin_size",
               "nd_offset_hu", "out", "steps", "decay_steps", "batch_size", "crop", "lr", "lr_d",
               "seed", "log_every", "eval_every", "ckpt_every", "max_minutes", "val_slices",
               "loss", "tau", "num_patches", "lambda_gan", "lambda_identity", "lambda_metric",
               "arch", "features", "input_center_hu", "d_input", "precision", "loss_backend",
               "compile", "device", "threads", "supervised")
# Flags without a value that map onto settings.
_TRAIN_FLAGS = {"no_wavelet": ("wavelet", False), "no_progress": ("progress", False),
                "no_time_limit": ("max_minutes", None),
                "no_eval_figures": ("eval_figures", False),
                "no_classical": ("compare_classical", False)}


def _preset_values(key: str) -> dict:
    """``{preset: value of setting key}`` (the preset's, else TrainConfig's default)."""
    default = getattr(TrainConfig(), key)
    return {name: values.get(key, default) for name, values in sorted(PRESETS.items())}


def _default(key: str) -> str:
    """" (default: X)" of setting ``key``, or a pointer to the preset table when the
    presets differ."""
    values = set(map(format_setting, _preset_values(key).values()))
    if len(values) == 1:
        return f" (default: {values.pop()})"
    return " (default: by --preset, see below)"


def _preset_table(keys) -> str:
    """The epilog's table of the settings the presets set differently."""
    names = sorted(PRESETS)
    rows = [("--" + k.replace("_", "-"), [format_setting(v) for v in _preset_values(k).values()])
            for k in keys]
    rows = [(flag, cells) for flag, cells in rows if len(set(cells)) > 1]
    width = max(len(flag) for flag, _ in rows) + 2
    cols = [max(len(n), *(len(c[i]) for _, c in rows)) + 2 for i, n in enumerate(names)]
    line = lambda first, cells: (first.ljust(width) + "".join(  # noqa: E731
        c.ljust(w) for c, w in zip(cells, cols))).rstrip()
    return "\n".join(["  " + line("", names)] + ["  " + line(f, c) for f, c in rows])


def _setting(group, key: str, *, help: str, **kwargs) -> None:
    """Add option ``--key`` (``_`` written ``-``) of the setting ``key`` to ``group``, its
    ``help`` ending with the setting's default (:func:`_default`)."""
    group.add_argument("--" + key.replace("_", "-"), help=help + _default(key), **kwargs)


_TRAIN_EPILOG = """\
presets (--preset): demo: minutes on a CPU with the built-in data (the default);
paper: the paper's settings, for a GPU; tiny: a smoke test of seconds. An option given
on the command line wins over the preset. The settings the presets set differently:

{table}

--resume RUN_DIR continues a run exactly, with the run's own settings: --steps,
--decay-steps, --max-minutes, --no-time-limit, --no-progress, --device and --threads may
change; any other option may only repeat the run's own value (the command that started
the run, with --resume added). --resume RUN_DIR --steps N takes a finished or
interrupted run on to N steps in all; the LR schedule is then that of an N-step run:
constant until step N - decay-steps, then linear to 0 at step N (a finished run's LR
rises again unless --decay-steps grows too).

Ctrl-C or SIGTERM: the run finishes its step, writes checkpoints/last.pt of that step
and summary.json, prints "interrupted at step N; continue with pdml-train --resume
RUN_DIR" and exits with 130 (SIGTERM: 143). A second Ctrl-C stops at once; every file
is written atomically, so the last checkpoint stays whole.

exit status: 0 done, 1 stopped on non-finite losses, 2 a user error (one line), 130 or
143 interrupted."""


def _train_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pdml-train",
        description="Train the paper's unsupervised LDCT denoiser (RRDN generator, PatchGAN, "
                    "LSGAN + identity + patch-wise metric loss). Without data arguments it "
                    "trains on the built-in dataset with the 'demo' preset.",
        epilog=_TRAIN_EPILOG.format(table=_preset_table(
            [k for k in _TRAIN_KEYS if k not in ("out", "device", "threads")])),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every option defaults to None, "the preset's value" (pdml.training.config.PRESETS);
    # its help says what that value is.
    data = p.add_argument_group("data (DICOM, read recursively, decoded once into a cache; "
                                "without --ldct/--ndct or --patients: the built-in dataset)")
    data.add_argument("--ldct", metavar="PATH", nargs="+", help="low-dose CT: folders, DICOM "
                      "files or glob patterns (quoted); the patient is each slice's PatientID")
    data.add_argument("--ndct", metavar="PATH", nargs="+", help="normal-dose CT, unpaired with "
                      "--ldct (other patients are fine): folders, files or globs")
    data.add_argument("--patients", metavar="PATH", nargs="+",
                      help="instead of --ldct/--ndct: folders holding one folder per patient "
                      "(the AAPM/Mayo challenge, TCIA LDCT-and-Projection-data); each dose's "
                      "series is picked by --ld-series / --nd-series (default: none)")
    data.add_argument("--ld-series", metavar="REGEX", help="--patients: a low-dose series is one "
                      "whose folder path or SeriesDescription matches this (case-insensitive; "
                      "default: quarter, low dose, low, ld)")
    data.add_argument("--nd-series", metavar="REGEX", help="--patients: the normal-dose series "
                      "(default: full, normal dose, routine, standard, nd)")
    data.add_argument("--val-patients", metavar="NAME", nargs="+",
                      help="patients held out for validation, LD and ND paired by position "
                      "(default: none)")
    data.add_argument("--test-patients", metavar="NAME", nargs="+",
                      help="patients held out for testing: never read by the run, for pdml-eval "
                      "(default: none)")
    data.add_argument("--val-fraction", type=float, metavar="F",
                      help="hold out this fraction of the patients for validation, drawn with "
                      "--seed (default: 0)")
    data.add_argument("--test-fraction", type=float, metavar="F",
                      help="hold out this fraction of the patients for testing (default: 0)")
    data.add_argument("--val-ldct", metavar="PATH", nargs="+", help="validation, low dose: "
                      "paired with --val-ndct by patient and slice position; without validation "
                      "data the run evaluates a few --ldct slices, with no reference")
    data.add_argument("--val-ndct", metavar="PATH", nargs="+",
                      help="validation, normal dose (the reference)")
    _setting(data, "pair_tolerance_mm", type=float, metavar="MM",
             help="largest distance along the slice normal of a validation pair")
    _setting(data, "builtin_layout", choices=BUILTIN_LAYOUTS,
             help="built-in data: LD and ND from different sources (domains), or one pool whose "
                  "ND domain is the LD slices' noiseless reconstruction (same-anatomy)")
    _setting(data, "builtin_size", type=int, metavar="N",
             help="built-in data: slice side in pixels")
    _setting(data, "nd_offset_hu", type=float, metavar="HU",
             help="add this CT-number offset to the ND training slices (a known acquisition "
                  "shift; soft tissue gets all of it, air none)")
    data.add_argument("--supervised", action="store_true", default=None,
                      help="train G alone by L1 to the paired noiseless truth of the same "
                      "crops (built-in same-anatomy layout, --loss none: an upper bound for "
                      "the unsupervised runs; default: off)")
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS),
                     help="base settings: demo, paper or tiny (see below; default: demo)")
    run.add_argument("--out", metavar="RUN_DIR",
                     help="run folder (default: runs/<date>-<time>-<loss>)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its checkpoints/last.pt (see below)")
    _setting(run, "steps", type=int, metavar="N", help="training steps, each a G step and a D step")
    _setting(run, "decay_steps", type=int, metavar="N",
             help="the LR is constant, then decays linearly to 0 over these last steps")
    _setting(run, "batch_size", type=int, metavar="N", help="crops per rank and step")
    _setting(run, "crop", type=int, metavar="PX", help="training crop side in pixels")
    _setting(run, "lr", type=float,
             help="Adam learning rate of the generator and heads (and of D unless --lr-d)")
    run.add_argument("--lr-d", type=float, metavar="LR",
                     help="the discriminator's Adam learning rate (default: --lr)")
    _setting(run, "seed", type=int,
             help="seed of every random number the run draws (weights, crops, patches)")
    _setting(run, "log_every", type=int, metavar="N",
             help="steps between training records in metrics.jsonl")
    _setting(run, "eval_every", type=int, metavar="N",
             help="steps between evaluations (metrics, figure, best.pt)")
    _setting(run, "ckpt_every", type=int, metavar="N", help="steps between checkpoints (last.pt)")
    _setting(run, "max_minutes", type=float, metavar="MIN",
             help="stop (evaluate, checkpoint, summarise) after this many minutes of training in "
                  "this session")
    run.add_argument("--no-time-limit", action="store_true", help="lift --max-minutes")
    _setting(run, "val_slices", type=int, metavar="N", help="slices evaluated at each evaluation")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar (default: a bar on stderr)")
    net = p.add_argument_group("networks")
    _setting(net, "arch", choices=ARCHS,
             help="networks: pdml's own, or the paper's reference code's (dmlct: shared dense "
                  "block, attention in D, normal(0, 0.01) init)")
    _setting(net, "features", type=int, metavar="N", help="generator width (feature channels)")
    net.add_argument("--input-center-hu", type=float, metavar="HU",
                     help="without the wavelet split: the HU the networks see as 0 (0 centres "
                     "the input on water; default: the paper's [0, 1] window, -1000 HU is 0)")
    loss = p.add_argument_group("losses")
    _setting(loss, "loss", choices=LOSSES,
             help="third loss term: the paper's patch-wise metric loss (dml), CUT's PatchNCE, or "
                  "none")
    loss.add_argument("--tau", type=float, help="temperature of the patch loss (default: 0.15 "
                      "with --loss dml, 0.07 with patchnce)")
    _setting(loss, "num_patches", type=int, metavar="N", help="patches sampled per loss layer")
    _setting(loss, "lambda_gan", type=float, metavar="W", help="weight of the LSGAN loss")
    _setting(loss, "lambda_identity", type=float, metavar="W",
             help="weight of the identity L1 loss on ND crops")
    _setting(loss, "lambda_metric", type=float, metavar="W", help="weight of the patch loss")
    loss.add_argument("--no-wavelet", action="store_true",
                      help="feed whole images instead of the wavelet high-frequency part "
                      "(default: the db3, level-6 split is on)")
    _setting(loss, "d_input", choices=D_INPUTS,
             help="what the discriminator judges: the image (the paper), its 3x3 high-pass, where "
                  "noise stands out, or both as two channels (image+highpass: noise and CT "
                  "numbers at once), +lowpass: and the local mean in a soft-tissue window, "
                  "where a CT-number offset stands out")
    ex = p.add_argument_group("execution")
    _setting(ex, "precision", choices=PRECISIONS, help="autocast precision; fp16 adds a GradScaler")
    _setting(ex, "loss_backend", choices=ops.BACKEND_NAMES,
             help="implementation of the fused patch loss (auto: the fastest that runs here)")
    ex.add_argument("--compile", action="store_true", default=None,
                    help="torch.compile the networks (default: off)")
    ex.add_argument("--no-eval-figures", action="store_true",
                    help="metrics only at each evaluation, no figure (default: a figure)")
    ex.add_argument("--no-classical", action="store_true",
                    help="no classical denoiser (BM3D, else non-local means, tuned on half the "
                    "evaluated slices) beside the network in the final summary (default: "
                    "beside it when the evaluated slices have references; tiny: off)")
    ex.add_argument("--device", help="auto (a CUDA GPU when one is visible, else the CPU), cpu, "
                    "cuda or cuda:N (default: auto)")
    ex.add_argument("--threads", type=int, metavar="N", help="CPU intra-op threads (default: "
                    "torch's, or 1 when the machine is already busy)")
    return p


def _interrupted_line(summary: dict, run_dir: str) -> str:
    """The one line of a run stopped by a signal."""
    step, saved = summary["steps"], summary.get("checkpoint_step")
    if saved is None:
        return f"interrupted at step {step}, before any checkpoint; nothing to resume"
    kept = "" if saved == step else f" (checkpoints/last.pt holds step {saved})"
    return f"interrupted at step {step}{kept}; continue with pdml-train --resume {run_dir}"


def train_main(argv=None) -> int:
    """``pdml-train``: parse the arguments, train (or resume), print the summary table."""
    args = _train_parser().parse_args(argv)
    given = {k for k in (*_TRAIN_KEYS, "preset") if getattr(args, k) is not None}
    given |= {k for k in _TRAIN_FLAGS if getattr(args, k)}
    try:
        if args.resume:
            # the run's own settings; what is given must match them, except RESUME_SETTINGS
            changes = {k: tuple(v) if isinstance(v, list) else v
                       for k, v in ((k, getattr(args, k)) for k in given)
                       if k in _TRAIN_KEYS + ("preset",)}
            changes.update(_TRAIN_FLAGS[k] for k in given if k in _TRAIN_FLAGS)
            changes["progress"] = not args.no_progress  # this session's choice
            summary = training.train(resume=args.resume, changes=changes)
        else:
            overrides = {k: getattr(args, k) for k in _TRAIN_KEYS}
            cfg = training.make_config(args.preset or "demo", **overrides)
            for flag, (key, value) in _TRAIN_FLAGS.items():
                if getattr(args, flag):
                    setattr(cfg, key, value)
            summary = training.train(cfg)
    except NonFiniteLossError as e:
        return _fail("pdml-train", e, code=1)
    except TrainError as e:
        return _fail("pdml-train", e)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step
        print("pdml-train: interrupted; stopped at once (the run folder keeps its last "
              "complete checkpoint)", file=sys.stderr)
        return exit_status(signal.SIGINT)
    if summary.get("interrupted"):
        if launch_rank() == 0:
            print(f"pdml-train: {_interrupted_line(summary, summary['run_dir'])}",
                  file=sys.stderr)
        return exit_status(getattr(signal, summary["interrupted"]))
    return 0


def _denoise_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pdml-denoise",
        description="Denoise CT series with a pdml-train checkpoint and write them as new "
                    "DICOM series (never into the input folder, never over existing files "
                    "unless --overwrite).",
        epilog="A run folder given as --checkpoint means its checkpoints/best.pt (the best "
               "validation PSNR) when it has one, else checkpoints/last.pt; the file used is "
               "printed. exit status: 0 done, 2 a user error or a series not written (one "
               "line each).")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a checkpoint file (best.pt, last.pt) or a pdml-train run folder")
    p.add_argument("--input", required=True, metavar="PATH",
                   help="a DICOM CT file or a folder (searched recursively; each series found "
                   "is denoised)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="folder for the new series (one series_NNN folder each when there are "
                   "several)")
    p.add_argument("--precision", choices=inference.DENOISE_PRECISIONS, default="auto",
                   help="autocast precision of the generator; auto: bf16 where the device "
                   "computes it natively (a CPU with AVX512-BF16 or AMX, a GPU with bf16), "
                   "else fp32 (default: auto)")
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda or "
                   "cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="slices per forward pass; each holds ~0.5 GiB of maps at 512² "
                   "(default: 1)")
    p.add_argument("--tile", type=int, default=inference.DENOISE_TILE, metavar="N",
                   help="compute N×N pixels at a time with a halo of the network's receptive "
                   "field: the same output with smaller maps (less memory for large slices); "
                   "networks with a global operation (pdml's own, with its squeeze-excitation "
                   "means) always run whole slices; 0: whole slices (default: %(default)s)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU intra-op threads (default: torch's, fewer when other work keeps "
                   "the cores busy at start)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files already in --output (default: refuse)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar on stderr)")
    return p


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def denoise_main(argv=None) -> int:
    """``pdml-denoise``: every CT series under ``--input`` -> a denoised series in ``--output``."""
    args = _denoise_parser().parse_args(argv)
    try:
        return _denoise(args)
    except KeyboardInterrupt:  # save_ct removes the files of the series it was writing
        print("pdml-denoise: interrupted; the series written before are complete, the one "
              "being written was removed", file=sys.stderr)
        return exit_status(signal.SIGINT)


def _denoise(args) -> int:
    try:
        if args.batch_size < 1:
            raise TrainError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.tile < 0:
            raise TrainError(f"--tile must be >= 0 (0: whole slices), got {args.tile}")
        if args.threads is not None and args.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {args.threads}")
        device = resolve_device(args.device)
        precision = inference.denoise_precision(args.precision, device)
        inp, out = Path(args.input).resolve(), Path(args.output).resolve()
        if not inp.exists():
            raise TrainError(f"--input {args.input}: no such file or folder")
        in_root = inp if inp.is_dir() else inp.parent
        if _inside(out, in_root):
            raise TrainError(f"--output {args.output} is inside the input folder {in_root}; "
                             "pdml-denoise never writes into its input")
        check_writable_folder(out, "--output")
        ckpt_path = find_checkpoint(args.checkpoint, ("best.pt", "last.pt"))
        ckpt = load_checkpoint(ckpt_path)
        generator, cfg = inference.generator_from_checkpoint(ckpt, device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # load_ct's per-file warnings: summarised below
            series_list = load_ct(inp, lazy=True)
    except (TrainError, DicomReadError, NoCTImagesError, FileNotFoundError, FileExistsError) as e:
        return _fail("pdml-denoise", e)
    best = ckpt.get("best") or {}
    print(f"pdml-denoise: checkpoint {ckpt_path} (step {ckpt['step']}"
          + (f", best validation PSNR {best['psnr']:.2f} dB"
             if best.get("step") == ckpt["step"] and best.get("psnr") is not None else "")
          + ")", flush=True)
    how = f"precision {precision}" + (" (auto)" if args.precision == "auto" else "")
    if device.type == "cpu":
        keep_freed_memory()
        choice = choose_cpu_threads(args.threads)
        torch.set_num_threads(choice.threads)
        how += f", {choice.describe()}"
    print(f"pdml-denoise: {how}", flush=True)
    if series_list.skipped:
        print(f"pdml-denoise: skipped {len(series_list.skipped)} file(s) that are not "
              f"usable CT images (first: {series_list.skipped[0][1]})", file=sys.stderr)
    for category, what in ((DicomHeaderWarning, "file(s) with an incomplete header"),
                           (DuplicatePositionWarning, "position(s) holding several slices")):
        found = [str(w.message) for w in caught if issubclass(w.category, category)]
        if found:
            print(f"pdml-denoise: warning: {len(found)} {what} (first: {found[0]})",
                  file=sys.stderr)

    total = sum(len(s) for s in series_list)
    bar = tqdm(total=total, desc="pdml-denoise", unit="slice", disable=args.no_progress,
               file=sys.stderr)
    written, failed = [], []
    for k, series in enumerate(series_list):
        # one bad series (unwritable target, files in the way, NaN output) is reported and
        # the others are still written
        target = out if len(series_list) == 1 else out / f"series_{k:03d}"
        done = [0]

        def advance(n, _done=done):
            bar.update(n - _done[0])
            _done[0] = n

        in_the_way = [] if args.overwrite else [t for t in derived_paths(series, target)
                                                if t.exists()]
        try:
            if in_the_way:  # said before the series is denoised, in the flag's words
                raise FileExistsError(f"{in_the_way[0]} exists ({len(in_the_way)} of the "
                                      f"{len(series)} file(s) to write); pass --overwrite "
                                      f"to replace them")
            # slices in, slices out: one batch read, denoised and written at a time
            writer = SeriesWriter(series, target, overwrite=args.overwrite,
                                  description=f"pdml denoised ({cfg.loss}, step {ckpt['step']})")
            try:
                for start in range(0, len(series), args.batch_size):
                    hu = inference.denoise_hu(
                        generator, series.hu[start:start + args.batch_size], cfg, device,
                        precision=precision, batch_size=args.batch_size,
                        tile=args.tile or None)
                    writer.write(start, hu)
                    advance(start + hu.shape[0])
            except BaseException:
                writer.remove_written()   # no partial series
                raise
            written += writer.targets
        except (TrainError, ValueError, OSError) as e:
            bar.update(len(series) - done[0])
            failed.append((k, series, e))
    bar.close()
    for k, series, e in failed:
        where = (f"series {k} ({series.slices[0].path}, {len(series)} slice(s)) not written"
                 if len(series_list) > 1 else "not written")
        _fail("pdml-denoise", f"{where}: {e}")
    if written:
        print(f"pdml-denoise: wrote {len(written)} slice(s) of {len(series_list) - len(failed)} "
              f"series to {out}")
    return 2 if failed else 0
