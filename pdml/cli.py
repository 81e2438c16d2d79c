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
import sys
import warnings
from pathlib import Path

from pdml import ops


class _Parser(argparse.ArgumentParser):
    """argparse with its error as one line (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(prog: str, error, code: int = 2) -> int:
    """Print ``error`` (an exception or a message) as one line on stderr; -> ``code``."""
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return code


def _train_parser() -> argparse.ArgumentParser:
    from pdml.training.config import ARCHS, BUILTIN_LAYOUTS, D_INPUTS, LOSSES, PRECISIONS, PRESETS

    p = _Parser(
        prog="pdml-train",
        description="Train the paper's unsupervised LDCT denoiser (RRDN generator, PatchGAN, "
                    "LSGAN + identity + patch-wise metric loss). Without data arguments it "
                    "trains on the built-in dataset with the 'demo' preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # None means "the preset's value"; the presets live in pdml.training.config.PRESETS.
    data = p.add_argument_group("data")
    data.add_argument("--ldct", metavar="DIR", help="folder of low-dose DICOM CT (unpaired)")
    data.add_argument("--ndct", metavar="DIR", help="folder of normal-dose DICOM CT (unpaired)")
    data.add_argument("--val-ldct", metavar="DIR", help="paired validation: low-dose folder")
    data.add_argument("--val-ndct", metavar="DIR", help="paired validation: normal-dose folder")
    data.add_argument("--builtin-layout", choices=BUILTIN_LAYOUTS,
                      help="built-in data: LD and ND from different sources (domains), or "
                      "one pool whose ND domain is the LD slices' noiseless reconstruction "
                      "(same-anatomy)")
    data.add_argument("--builtin-size", type=int, help="built-in data: slice side in pixels")
    data.add_argument("--supervised", action="store_true", default=None,
                      help="train G alone by L1 to the paired noiseless truth (built-in "
                      "same-anatomy layout; an upper bound for the unsupervised runs)")
    data.add_argument("--nd-offset-hu", type=float, metavar="HU",
                      help="add this CT-number offset to the ND training slices (a known "
                      "acquisition shift; soft tissue gets all of it, air none)")
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                     help="base settings: demo (minutes on a CPU), paper (GPU), tiny (tests)")
    run.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<time>-<loss>)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR exactly (its own config is used)")
    run.add_argument("--steps", type=int, help="training steps (G step + D step)")
    run.add_argument("--decay-steps", type=int, help="final steps over which the LR decays to 0")
    run.add_argument("--batch-size", type=int, help="crops per rank and step")
    run.add_argument("--crop", type=int, help="training crop size in pixels")
    run.add_argument("--lr", type=float, help="Adam learning rate (G, heads; D too unless --lr-d)")
    run.add_argument("--lr-d", type=float, help="the discriminator's Adam learning rate")
    run.add_argument("--seed", type=int)
    run.add_argument("--log-every", type=int, help="steps between metrics.jsonl records")
    run.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    run.add_argument("--ckpt-every", type=int, help="steps between checkpoints (last.pt)")
    run.add_argument("--max-minutes", type=float,
                     help="stop (evaluate, checkpoint, summarise) after this many minutes")
    run.add_argument("--no-time-limit", action="store_true", help="ignore the preset's time limit")
    run.add_argument("--val-slices", type=int, help="held-out slices evaluated (built-in data)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    net = p.add_argument_group("networks")
    net.add_argument("--arch", choices=ARCHS,
                     help="networks: pdml's own, or the paper's reference code's (dmlct: shared "
                          "dense block, attention in D, normal(0, 0.01) init; the paper preset's)")
    net.add_argument("--features", type=int, help="generator width (feature channels)")
    net.add_argument("--input-center-hu", type=float, metavar="HU",
                     help="without the wavelet split: the HU the networks see as 0 (0 centres "
                     "the input on water; default: the paper's [0, 1] window, -1000 HU is 0)")
    loss = p.add_argument_group("losses")
    loss.add_argument("--loss", choices=LOSSES, help="third loss term: the paper's patch-wise "
                      "metric loss (dml), CUT's PatchNCE, or none")
    loss.add_argument("--tau", type=float, help="temperature (default 0.15 dml, 0.07 patchnce)")
    loss.add_argument("--num-patches", type=int, help="patches sampled per loss layer")
    loss.add_argument("--lambda-gan", type=float)
    loss.add_argument("--lambda-identity", type=float)
    loss.add_argument("--lambda-metric", type=float, help="weight of the patch loss")
    loss.add_argument("--no-wavelet", action="store_true",
                      help="feed whole images instead of the wavelet high-frequency part")
    loss.add_argument("--d-input", choices=D_INPUTS,
                      help="what the discriminator judges: the image (the paper), its 3x3 "
                      "high-pass, where noise stands out (demo preset), or both as two "
                      "channels (image+highpass: noise and CT numbers at once)")
    ex = p.add_argument_group("execution")
    ex.add_argument("--precision", choices=PRECISIONS, help="autocast precision (fp16 uses a GradScaler)")
    ex.add_argument("--loss-backend", choices=ops.BACKEND_NAMES,
                    help="implementation of the fused patch loss")
    ex.add_argument("--compile", action="store_true", default=None, help="torch.compile the networks")
    ex.add_argument("--no-eval-figures", dest="eval_figures", action="store_false", default=None,
                    help="no figure at each held-out evaluation (metrics only)")
    ex.add_argument("--no-classical", dest="compare_classical", action="store_false",
                    default=None, help="no classical denoiser (BM3D, else non-local means) "
                    "beside the network in the final summary")
    ex.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    ex.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's, or 1 "
                    "when the machine is already busy)")
    return p


_TRAIN_KEYS = ("ldct", "ndct", "val_ldct", "val_ndct", "builtin_layout", "builtin_size",
               "nd_offset_hu", "out", "steps", "decay_steps", "batch_size", "crop", "lr", "lr_d",
               "seed", "log_every", "eval_every", "ckpt_every", "max_minutes", "val_slices",
               "loss", "tau", "num_patches", "lambda_gan", "lambda_identity", "lambda_metric",
               "arch", "features", "input_center_hu", "d_input", "precision", "loss_backend",
               "compile", "device", "threads", "supervised", "eval_figures",
               "compare_classical")


def train_main(argv=None) -> int:
    """``pdml-train``: parse the arguments, train (or resume), print the summary table."""
    from pdml.training import TrainError, make_config, train
    from pdml.training.config import NonFiniteLossError

    args = _train_parser().parse_args(argv)
    try:
        if args.resume:
            given = [k for k in _TRAIN_KEYS if getattr(args, k) is not None]
            if given:
                print(f"pdml-train: --resume continues with the run's saved config; ignoring "
                      f"{', '.join('--' + k.replace('_', '-') for k in given)}", file=sys.stderr)
            train(resume=args.resume)
            return 0
        overrides = {k: getattr(args, k) for k in _TRAIN_KEYS}
        if args.no_wavelet:
            overrides["wavelet"] = False
        if args.no_progress:
            overrides["progress"] = False
        cfg = make_config(args.preset, **overrides)
        if args.no_time_limit:
            cfg.max_minutes = None
        train(cfg)
        return 0
    except NonFiniteLossError as e:
        return _fail("pdml-train", e, code=1)
    except TrainError as e:
        return _fail("pdml-train", e)


def _denoise_parser() -> argparse.ArgumentParser:
    from pdml.training.config import PRECISIONS

    p = _Parser(
        prog="pdml-denoise",
        description="Denoise CT series with a pdml-train checkpoint and write them as new "
                    "DICOM series (never into the input folder).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a checkpoint file (last.pt, best.pt) or a run folder")
    p.add_argument("--input", required=True, metavar="FILE_OR_DIR",
                   help="a DICOM CT file or a folder (searched recursively)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the new series")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=4, help="slices per forward pass")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --output")
    p.add_argument("--no-progress", action="store_true")
    return p


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def denoise_main(argv=None) -> int:
    """``pdml-denoise``: every CT series under ``--input`` -> a denoised series in ``--output``."""
    from tqdm.auto import tqdm

    from pdml.data import (DicomHeaderWarning, DicomReadError, NoCTImagesError, load_ct,
                           save_ct)
    from pdml.inference import denoise_hu, generator_from_checkpoint
    from pdml.training.checkpoint import load_checkpoint
    from pdml.training.config import TrainError
    from pdml.training.distributed import resolve_device
    from pdml.training.rundir import check_writable_folder

    args = _denoise_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise TrainError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = resolve_device(args.device)
        inp, out = Path(args.input).resolve(), Path(args.output).resolve()
        if not inp.exists():
            raise TrainError(f"--input {args.input}: no such file or folder")
        in_root = inp if inp.is_dir() else inp.parent
        if _inside(out, in_root):
            raise TrainError(f"--output {args.output} is inside the input folder {in_root}; "
                             "pdml-denoise never writes into its input")
        check_writable_folder(out, "--output")
        ckpt = load_checkpoint(args.checkpoint)
        generator, cfg = generator_from_checkpoint(ckpt, device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # load_ct's per-file warnings: summarised below
            series_list = load_ct(inp)
        if series_list.skipped:
            print(f"pdml-denoise: skipped {len(series_list.skipped)} file(s) that are not "
                  f"usable CT images (first: {series_list.skipped[0][1]})", file=sys.stderr)
        header = [str(w.message) for w in caught if issubclass(w.category, DicomHeaderWarning)]
        if header:
            print(f"pdml-denoise: warning: {len(header)} file(s) with an incomplete header "
                  f"(first: {header[0]})", file=sys.stderr)
    except (TrainError, DicomReadError, NoCTImagesError, FileNotFoundError, FileExistsError) as e:
        return _fail("pdml-denoise", e)

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

        try:
            hu = denoise_hu(generator, series.hu, cfg, device, precision=args.precision,
                            batch_size=args.batch_size, progress=advance)
            written += save_ct(series, hu, target, overwrite=args.overwrite,
                               description=f"pdml denoised ({cfg.loss}, step {ckpt['step']})")
        except (TrainError, ValueError, OSError) as e:
            bar.update(len(series) - done[0])
            failed.append((k, series, e))
    bar.close()
    print(f"pdml-denoise: wrote {len(written)} slice(s) of {len(series_list) - len(failed)} "
          f"series to {out}")
    for k, series, e in failed:
        _fail("pdml-denoise", f"series {k} ({series.slices[0].path}, {len(series)} slice(s)) "
                              f"not written: {e}")
    return 2 if failed else 0
