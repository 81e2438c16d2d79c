"""What a run shows a person: the metrics records, the evaluation and loss figures, the
terminal summary table."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from pdml import metrics
from pdml._files import atomic_write_bytes
from pdml._plot import pyplot
from pdml.classical import SHORT_NAMES, best_available
from pdml.training.config import RESOLVED_KEY, TrainConfig
from pdml.training.evaluate import classical_rows, denoise_slices

DISPLAY_WINDOW = (-160.0, 240.0)
"""Soft-tissue display window (HU) of the figures (W 400, L 40)."""

SLICE_SOURCES = {"held-out": "held-out slices", "validation": "validation slices",
                 "training": "training LD slices"}
"""How the summary names the evaluated slices, by their source
(:attr:`pdml.training.data.RunData.val_source`)."""


def _write_figure(fig, path: Path) -> None:
    """Lay out, render to PNG in memory and write atomically (a killed run leaves no torn PNG)."""
    plt = pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_eval_figure(val_item, denoised: np.ndarray, path: Path, step: int,
                     extra: Sequence[tuple[str, np.ndarray]] = ()) -> None:
    """PNG of one evaluated slice: LD | denoised | each of ``extra`` | ND (when known) |
    denoised − LD (HU).

    ``extra``: ``(title, image [H, W] HU)`` panels of other methods (the summary's
    classical comparison). With a reference, the LD, denoised and extra panels are titled
    with their PSNR, noise std and HU shift against it (:mod:`pdml.metrics`, homogeneous
    ROIs), the numbers the run records for that slice; without one, with their noise std.
    """
    plt = pyplot()
    ld, nd = val_item.ld, val_item.nd

    def scored(title, img):
        if nd is None:
            return f"{title}\nnoise {float(np.mean(metrics.noise_std(img))):.1f} HU"
        psnr = float(np.mean(metrics.psnr(img, nd)))
        noise = float(np.mean(metrics.noise_std(img, nd)))
        shift = float(np.mean(metrics.hu_shift(img, nd)))
        return f"{title}\nPSNR {psnr:.2f} dB, noise {noise:.1f} HU\nHU shift {shift:+.1f} HU"

    panels = [(scored("LD input", ld), ld), (scored(f"denoised (step {step})", denoised), denoised)]
    panels += [(scored(title, img), img) for title, img in extra]
    lo, hi = DISPLAY_WINDOW
    if nd is not None:
        panels.append((f"reference\nwindow [{lo:.0f}, {hi:.0f}] HU", nd))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.6))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    diff = axes[-1].imshow(denoised - ld, cmap="RdBu_r", vmin=-150, vmax=150)
    axes[-1].set_title("denoised − LD (HU)", fontsize=9)
    axes[-1].axis("off")
    fig.colorbar(diff, ax=axes[-1], fraction=0.046, pad=0.04)
    _write_figure(fig, path)


def classical_comparison(generator, val, cfg: TrainConfig, device, figure: Path, step: int):
    """The best classical denoiser available (:func:`pdml.classical.best_available`) beside
    the network on the held-out slices ``val`` (:func:`pdml.training.evaluate.classical_rows`:
    tuned on every second slice, scored on all): its row for summary.json, and ``figure``
    (LD | network | classical | reference of slice 0). None when the slices lack references
    or the comparison fails (it never loses the run's summary)."""
    if not val or any(item.nd is None for item in val):
        return None
    try:
        (row, images), = classical_rows(val, [best_available()])
        network = denoise_slices(generator, val[:1], cfg, device)[0]
        save_eval_figure(val[0], network, figure, step,
                         extra=[(SHORT_NAMES[row["method"]], images[0])])
    except Exception as e:
        warnings.warn(f"classical comparison not made: {e}")
        return None
    return row


def append_metrics(path: Path, record: dict) -> None:
    """Append ``record`` (keys starting with "_" left out) as one line of ``metrics.jsonl``;
    a non-finite number is written as null, so every line stays valid JSON."""
    record = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
              for k, v in record.items() if not k.startswith("_")}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` past ``step`` (a killed run logged beyond its
    checkpoint) and any torn line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            kept.append(line)
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


def save_loss_figure(metrics_path: Path, path: Path) -> None:
    """PNG of the run over its steps, from ``metrics.jsonl`` (resumed runs included): the
    training losses and, when the run evaluated, the PSNR and HU shift of each evaluation
    (denoised and LD input)."""
    plt = pyplot()
    records = {"train": [], "eval": []}
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") in records:
            records[rec["kind"]].append(rec)
    if not records["train"]:
        return
    evals = records["eval"]
    panels = [("loss", ("loss_G", "loss_D", "loss_gan", "loss_idt", "loss_patch"), records["train"])]
    if any(r.get("psnr") is not None for r in evals):
        panels.append(("PSNR (dB)", ("psnr", "ld_psnr"), evals))
    if any(r.get("hu_shift") is not None for r in evals):
        panels.append(("HU shift (HU)", ("hu_shift", "ld_hu_shift"), evals))
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 2.6 + 2.0 * len(panels)),
                             sharex=True, squeeze=False)
    for ax, (label, keys, recs) in zip(axes[:, 0], panels):
        steps = [r["step"] for r in recs]
        for key in keys:
            # a non-finite value is logged as null: a gap in the line
            values = [np.nan if r.get(key) is None else r[key] for r in recs]
            name = {"psnr": "denoised", "hu_shift": "denoised", "ld_psnr": "LD input",
                    "ld_hu_shift": "LD input"}.get(key, key)
            ax.plot(steps, values, label=name, marker="o" if recs is evals else None,
                    markersize=3)
        ax.set_ylabel(label)
        if label == "loss":
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    _write_figure(fig, path)


def write_config(run_dir: Path, cfg: TrainConfig, resolved: dict) -> None:
    """``config.json``: every setting and, under ``"resolved"``
    (:data:`pdml.training.config.RESOLVED_KEY`), what the run's "auto" settings came to
    here (device, threads, loss backend); :meth:`TrainConfig.from_dict` passes it over."""
    record = {**cfg.to_dict(), RESOLVED_KEY: resolved}
    atomic_write_bytes(run_dir / "config.json", (json.dumps(record, indent=2) + "\n").encode())


def write_report(run_dir: Path, summary: dict, cfg: TrainConfig, stream=None) -> None:
    """The end of a run: ``figures/losses.png``, ``summary.json`` and, on ``stream`` when
    given, the summary table (:func:`format_summary`)."""
    try:
        save_loss_figure(run_dir / "metrics.jsonl", run_dir / "figures" / "losses.png")
    except Exception as e:  # a figure must never lose the summary
        warnings.warn(f"loss figure not written: {e}")
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    if stream is not None:
        print(format_summary(summary, cfg), file=stream, flush=True)


def format_summary(summary: dict, cfg: TrainConfig) -> str:
    """The terminal table printed at the end of a run."""
    lines = [
        "",
        f"pdml-train summary: {summary['run_dir']}",
        f"  {summary['steps']}/{summary['planned_steps']} steps"
        + (" (stopped at the time limit)" if summary["stopped_early"] else "")
        + f", {_fmt_time(summary['elapsed_s'])} this session"
        + f", {summary['img_per_s']:.1f} img/s, {summary['world_size']} rank(s)"
        + f", loss={cfg.loss}, precision={cfg.precision}"
        + (f", {summary['cpu_threads']} CPU thread(s)" if summary.get("cpu_threads") else ""),
    ]
    if summary.get("ranks_in_sync") is not None:
        lines.append(f"  ranks hold identical parameters: {summary['ranks_in_sync']}")
    ev = summary.get("final_eval")
    if ev:
        classical = summary.get("classical")
        rows = [("LD input", ev, "ld_"), ("denoised", ev, "")]
        if classical:
            rows.append((classical["name"].split(",")[0], classical, ""))
        label = SLICE_SOURCES.get(ev.get("slices_from", "held-out"), "evaluated slices")
        head = f"  {label:<19}{'PSNR dB':>9}{'SSIM':>8}{'noise HU':>10}{'HU shift':>10}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        for name, values, prefix in rows:
            cells = []
            for key, spec, width in (("psnr", ".2f", 9), ("ssim", ".4f", 8),
                                     ("noise_std", ".1f", 10), ("hu_shift", "+.1f", 10)):
                v = values.get(prefix + key)
                cells.append(format(v, spec).rjust(width) if v is not None else "-".rjust(width))
            lines.append(f"  {name:<19}" + "".join(cells))
        ref = ("the reference" if ev.get("psnr") is not None
               else "the LD input (no reference: give --val-ldct/--val-ndct)")
        lines.append(f"  ({ev.get('slices')} slice(s); noise = std in homogeneous ROIs, "
                     f"HU shift = mean difference to {ref})")
        patients = summary.get("patients")
        if patients:
            lines.append("  patients: " + "; ".join(
                f"{split} {', '.join(patients[split]) or '-'}"
                for split in ("train", "val", "test")) + " (config.json, resolved.patients)")
        if classical:
            lines.append(f"  ({classical['name']}: strength tuned on evaluated slices "
                         f"{classical['tuning_slices']}; figures/comparison.png)")
    best = summary.get("best") or {}
    if best.get("psnr") is not None:
        lines.append(f"  best PSNR {best['psnr']:.2f} dB at step {best['step']} "
                     f"(checkpoints/best.pt)")
    lines.append(f"  checkpoints: {summary['run_dir']}/checkpoints/last.pt; "
                 f"figures: {summary['run_dir']}/figures/")
    return "\n".join(lines)


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"
