"""Console script ``pdml-eval``: score denoised CT against references (:mod:`pdml.evaluation`).

Exit status: 0 done; 2 a user error (one ``error:`` line on stderr, no traceback); 130
interrupted (Ctrl-C; the report files are written atomically, each whole or absent).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from pathlib import Path

import numpy as np

from pdml import classical, evaluation, inference
from pdml.cli import _fail, _Parser
from pdml.data.dicom_read import DicomReadError
from pdml.data.layouts import LayoutError, expand_sources, source_files
from pdml.data.pairing import TOLERANCE_MM, PairingError, describe_unmatched, pair_by_position
from pdml.data.store import open_store
from pdml.training.checkpoint import find_checkpoint, load_checkpoint
from pdml.training.config import TrainConfig, TrainError
from pdml.training.data import ValItem, build_data
from pdml.training.distributed import DistInfo, resolve_device
from pdml.training.evaluate import denoise_slices
from pdml.training.interrupt import exit_status

_EPILOG = """\
sources: --reference and --input are DICOM folders, files or glob patterns (several
allowed); slices pair by patient (PatientID, else FrameOfReferenceUID) and position along
the slice normal (--pair-tolerance-mm). A --method is NAME=PATH: a folder of DICOM series
(pdml-denoise's --output, any other denoiser's output), or a pdml-train checkpoint or run
folder, which then denoises the input slices itself. --held-out RUN_DIR scores the
slices that run evaluates (its held-out or validation pairs) instead of --reference/--input.

classical methods (--classical tv,nlm,bm3d) are tuned on one in --tune-every of the scored
slices (highest mean PSNR); those slices are then left out of every row of the table.

--rois FILE: a JSON list of {"name", "row", "col", "size"[, "patient"]} squares in pixels.

writes per_slice.csv, report.md, summary.json and figure.png into --out.
exit status: 0 done, 2 a user error (one line), 130 interrupted."""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdml-eval", epilog=_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Score denoised CT against full-dose references: PSNR, SSIM, RMSE, "
                            "CT-number shift and noise in ROIs, per patient and overall, with "
                            "a paired test against the low-dose input, and a figure.")
    p.add_argument("--reference", nargs="+", metavar="PATH",
                   help="full-dose (normal-dose) DICOM: the references")
    p.add_argument("--input", nargs="+", metavar="PATH", help="the low-dose DICOM the methods "
                   "denoised")
    p.add_argument("--held-out", metavar="RUN_DIR", help="score the held-out slices of this "
                   "pdml-train run instead of --reference/--input")
    p.add_argument("--method", action="append", default=[], metavar="NAME=PATH",
                   help="a method's output folder, or a checkpoint / run folder (repeatable)")
    p.add_argument("--classical", metavar="LIST", help="comma-separated classical denoisers "
                   "to tune and score: tv, nlm, bm3d (bm3d needs pdml[classical])")
    p.add_argument("--tune-every", type=int, default=4, metavar="K",
                   help="classical tuning slices: every K-th scored slice (default: 4)")
    p.add_argument("--rois", metavar="FILE", help="user ROIs (JSON, see below)")
    p.add_argument("--window", type=float, nargs=2, default=[-1000.0, 1000.0],
                   metavar=("LO", "HI"), help="HU window of PSNR and SSIM (default: -1000 1000)")
    p.add_argument("--pair-tolerance-mm", type=float, default=None, metavar="MM",
                   help="largest distance along the slice normal of a pair (default: 0.1)")
    p.add_argument("--run", metavar="RUN_DIR", help="a pdml-train run whose patient split "
                   "the report names (a run folder given as a method or --held-out is used "
                   "without this)")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="folder for the report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--device", default="auto", help="for checkpoint methods: auto, cpu, cuda "
                   "or cuda:N (default: auto)")
    return p


def eval_main(argv=None) -> int:
    """``pdml-eval``."""
    args = _parser().parse_args(argv)
    try:
        return _eval(args)
    except KeyboardInterrupt:
        print("pdml-eval: interrupted; no report file was left half-written", file=sys.stderr)
        return exit_status(signal.SIGINT)


class _UserError(Exception):
    pass


def _is_checkpoint(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".pt") or (path.is_dir() and any(
        (path / sub / name).is_file() for sub in ("checkpoints", ".")
        for name in ("best.pt", "last.pt")))


def _run_folder(path: Path):
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _split_of(run_dir) -> dict | None:
    if run_dir is None:
        return None
    try:
        record = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise _UserError(f"--run {run_dir}: no readable config.json ({e})") from None
    return (record.get("resolved") or {}).get("patients")


def _store_of(flag: str, sources):
    roots = expand_sources(flag, sources)
    files = source_files(roots)
    if not files:
        raise _UserError(f"{flag} {' '.join(sources)}: no files")
    store = open_store(files, roots, None)
    if not store.records:
        raise _UserError(f"{flag} {' '.join(sources)}: no CT images ({len(files)} files looked at)")
    return store


def _dicom_slices(args, dicom_methods: dict, tolerance: float):
    """Scored slices of --reference/--input and the methods' DICOM outputs, paired by
    position; -> (slices, notes)."""
    ref = _store_of("--reference", args.reference)
    inp = _store_of("--input", args.input)
    notes = []
    pairing = pair_by_position(inp.records, ref.records, tolerance, ("--input", "--reference"))
    notes += describe_unmatched(pairing, ("--input", "--reference"))
    partner = {name: {} for name in dicom_methods}
    stores = {}
    for name, sources in dicom_methods.items():
        stores[name] = _store_of(f"--method {name}", sources)
        pm = pair_by_position(stores[name].records, ref.records, tolerance,
                              (f"--method {name}", "--reference"))
        notes += [line for line in describe_unmatched(pm, (f"--method {name}", "--reference"))
                  if line.startswith(f"{len(pm.unmatched_a)} --method")]
        partner[name] = {j: i for i, j in pm.pairs}
    slices, missing = [], []
    for i, j in pairing.pairs:
        if any(j not in partner[name] for name in dicom_methods):
            missing.append(ref.records[j].name)
            continue
        rec = ref.records[j]
        slices.append(evaluation.Scored(
            reference=np.array(ref.slice(j)), input=np.array(inp.slice(i)),
            outputs={n: np.array(stores[n].slice(partner[n][j])) for n in dicom_methods},
            patient=rec.patient or rec.frame_of_reference, name=rec.name))
    if missing:
        notes.append(f"{len(missing)} reference slice(s) left out: a method has no slice at "
                     f"their position (first: {missing[0]})")
    return slices, notes


def _held_out_slices(run_dir: str):
    try:
        record = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise _UserError(f"--held-out {run_dir}: no readable config.json ({e})") from None
    cfg = TrainConfig.from_dict(record)
    cfg.progress = False
    cfg.validate()
    data = build_data(cfg, DistInfo())
    if not data.val or any(v.nd is None for v in data.val):
        raise TrainError(f"--held-out {run_dir}: the run's evaluated slices have no reference "
                         "(it had no validation data)")
    patient = "held-out" if data.patients is None else "validation"
    return [evaluation.Scored(reference=v.nd, input=v.ld, patient=patient, name=v.name)
            for v in data.val]


def _denoise_with(path: Path, slices, device_name: str) -> tuple[list, str]:
    """Each slice's input denoised by the checkpoint at ``path`` (the trainer's own
    :func:`pdml.training.evaluate.denoise_slices`); -> (images, description)."""
    ckpt_path = find_checkpoint(path, ("best.pt", "last.pt"))
    ckpt = load_checkpoint(ckpt_path)
    device = resolve_device(device_name)
    generator, cfg = inference.generator_from_checkpoint(ckpt, device)
    out = []
    for start in range(0, len(slices), 64):   # a multiple of denoise_hu's batch of 4
        chunk = [ValItem(s.input, None) for s in slices[start:start + 64]]
        out += denoise_slices(generator, chunk, cfg, device)
    return out, f"{ckpt_path} (step {ckpt['step']})"


def _eval(args) -> int:
    try:
        lo, hi = args.window
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise _UserError(f"--window must be two finite HU values LO < HI, got {lo:g} {hi:g}")
        if args.held_out is None and (args.reference is None or args.input is None):
            raise _UserError("give --reference and --input (DICOM), or --held-out RUN_DIR")
        if args.held_out is not None and (args.reference or args.input):
            raise _UserError("--held-out scores a run's own held-out slices: leave out "
                             "--reference and --input")
        tolerance = TOLERANCE_MM if args.pair_tolerance_mm is None else args.pair_tolerance_mm
        methods, ckpt_methods, dicom_methods = [], {}, {}
        for spec in args.method:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise _UserError(f"--method {spec!r}: want NAME=PATH")
            if name in methods or name in ("input", "reference") or name in classical.METHODS:
                raise _UserError(f"--method {spec!r}: the name {name!r} is taken")
            methods.append(name)
            first = Path(path)
            if first.exists() and _is_checkpoint(first):
                ckpt_methods[name] = first
            elif args.held_out is not None:
                raise _UserError(f"--method {spec}: with --held-out a method must be a checkpoint "
                                 "or run folder (the held-out slices are not DICOM files)")
            else:
                dicom_methods[name] = [path]
        classic = [m.strip() for m in args.classical.split(",") if m.strip()] if args.classical else []
        for m in classic:
            if m not in classical.METHODS:
                raise _UserError(f"--classical: {m!r} is not one of {', '.join(classical.METHODS)}")
        if not methods and not classic:
            raise _UserError("nothing to score: give --method NAME=PATH and/or --classical")
        if args.tune_every < 2:
            raise _UserError(f"--tune-every must be >= 2, got {args.tune_every}")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise _UserError(f"--out {out}: exists and is not a folder")
        there = [f for f in evaluation.REPORT_FILES if (out / f).exists()]
        if there and not args.overwrite:
            raise _UserError(f"--out {out} already holds a report ({there[0]}); pass --overwrite "
                             "or choose another folder")
        for flag, sources in (("--reference", args.reference or []),
                              ("--input", args.input or []),
                              *((f"--method {n}", v) for n, v in dicom_methods.items())):
            for source in sources:
                folder = Path(source).resolve()
                if folder.is_dir() and (out.resolve() == folder or folder in out.resolve().parents):
                    raise _UserError(f"--out {out} is inside {flag} {source}; pdml-eval never "
                                     "writes into its inputs")
        run_dir = args.run or args.held_out or next(
            (r for r in map(_run_folder, ckpt_methods.values()) if r is not None), None)
        split = _split_of(run_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the reader's per-file notes; the pairing reports
            if args.held_out is not None:
                slices, notes = _held_out_slices(args.held_out), []
            else:
                slices, notes = _dicom_slices(args, dicom_methods, tolerance)
        if not slices:
            raise _UserError("no slice pairs to score (same patient, same position to "
                             f"{tolerance:g} mm)" + (f": {notes[0]}" if notes else ""))
        shapes = {s.reference.shape for s in slices}
        rois = evaluation.read_rois(Path(args.rois),
                                    next(iter(shapes)) if len(shapes) == 1 else None) \
            if args.rois else []
        described = {}
        for name, path in ckpt_methods.items():
            images, described[name] = _denoise_with(path, slices, args.device)
            for s, img in zip(slices, images):
                s.outputs[name] = img
        context = {"reference": " ".join(args.reference) if args.reference else
                   f"held-out slices of {args.held_out}",
                   "input": " ".join(args.input) if args.input else "their LD input",
                   **{f"method {n}": described.get(n) or " ".join(dicom_methods[n])
                      for n in methods},
                   "HU window (PSNR, SSIM)": f"{lo:g} .. {hi:g}"}
        if args.held_out is None:
            context["pairing"] = (f"same patient, position along the slice normal within "
                                  f"{tolerance:g} mm")
        if classic:
            if len(shapes) > 1:
                raise _UserError("--classical: the scored slices differ in size")
            tune, slices = slices[::args.tune_every], [s for k, s in enumerate(slices)
                                                       if k % args.tune_every]
            if not slices:
                raise _UserError(f"--classical: {len(tune)} slice(s) leave none to score after "
                                 f"tuning on one in {args.tune_every}")
            baselines = classical.tuned_baselines(np.stack([s.input for s in slices]),
                                                  np.stack([s.input for s in tune]),
                                                  np.stack([s.reference for s in tune]), classic)
            for b in baselines:
                methods.append(b.method)
                context[f"method {b.method}"] = f"{b.name} (tuned)"
                for s, img in zip(slices, b.denoised):
                    s.outputs[b.method] = img
            context["classical tuning"] = (f"{len(tune)} slice(s) (one in {args.tune_every} of "
                                           f"the scored pairs, left out of every row): "
                                           + ", ".join(s.name for s in tune[:3])
                                           + (" ..." if len(tune) > 3 else ""))
        if rois:
            context["user ROIs"] = ", ".join(f"{r.name} ({r.row}, {r.col}, {r.size} px)"
                                             for r in rois)
        if split:
            context[f"patient split of {run_dir}"] = "; ".join(
                f"{k} {', '.join(split.get(k, [])) or '-'}" for k in ("train", "val", "test"))
            trained = sorted({s.patient for s in slices} & set(split.get("train", [])))
            if trained:
                notes.append(f"scored patient(s) {', '.join(trained)} are training patients of "
                             f"{run_dir}")
        for note in notes:
            print(f"pdml-eval: warning: {note}", file=sys.stderr)
        context["scored slices"] = len(slices)
        if notes:
            context["notes"] = " | ".join(notes)
        rows = evaluation.score_all(slices, methods, (lo, hi), rois)
        summary = evaluation.summarise(rows, methods)
        evaluation.write_report(out, rows, summary, context, slices[len(slices) // 2], methods,
                                split)
    except (_UserError, TrainError, LayoutError, PairingError, DicomReadError,
            FileNotFoundError, ValueError) as e:
        return _fail("pdml-eval", e)
    print(_terminal_table(summary["overall"], len(slices)))
    print(f"pdml-eval: wrote {', '.join(evaluation.REPORT_FILES)} to {out}")
    return 0


def _terminal_table(tab: dict, n: int) -> str:
    lines = [f"{'method':<16}{'PSNR dB':>9}{'SSIM':>8}{'RMSE HU':>9}{'HU shift':>10}"
             f"{'noise HU':>10}{'p PSNR':>8}"]
    for m, e in tab.items():
        p = e.get("p_psnr")
        lines.append(f"{m[:15]:<16}{e['psnr']['mean']:>9.2f}{e['ssim']['mean']:>8.4f}"
                     f"{e['rmse']['mean']:>9.1f}{e['hu_shift']['mean']:>+10.1f}"
                     f"{e['noise_std']['mean']:>10.1f}"
                     + ("" if m == "input" else f"{p:>8.2g}" if p is not None else f"{'–':>8}"))
    lines.append(f"({n} slice(s), mean over slices; p: Wilcoxon signed-rank against the input)")
    return "\n".join(lines)

