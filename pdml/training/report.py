"""What a run shows a person: the metrics records, the evaluation and loss figures, the
terminal summary table."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pdml.training.checkpoint import atomic_write_bytes
from pdml.training.config import TrainConfig

DISPLAY_WINDOW = (-160.0, 240.0)
"""Soft-tissue display window (HU) of the figures (W 400, L 40)."""


def _write_figure(fig, path: Path) -> None:
    """Lay out, render to PNG in memory and write atomically (a killed run leaves no torn PNG)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_eval_figure(val_item, denoised: np.ndarray, path: Path, step: int,
                     extra: Sequence[tuple[str, np.ndarray]] = ()) -> None:
    """PNG of one held-out slice: LD | denoised | each of ``extra`` | ND (when known) |
    denoised − LD (HU).

    ``extra``: ``(title, image [H, W] HU)`` panels of other methods (the summary's
    classical comparison). With a reference, the LD, denoised and extra panels are titled
    with their noise std and HU shift against it (:mod:`pdml.metrics`, homogeneous ROIs),
    the run's own numbers.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from pdml import metrics

    ld, nd = val_item.ld, val_item.nd

    def scored(title, img):
        if nd is None:
            return title
        noise = float(np.mean(metrics.noise_std(img, nd)))
        shift = float(np.mean(metrics.hu_shift(img, nd)))
        return f"{title}\nnoise {noise:.1f} HU, shift {shift:+.1f} HU"

    panels = [(scored("LD input", ld), ld), (scored(f"denoised (step {step})", denoised), denoised)]
    panels += [(scored(title, img), img) for title, img in extra]
    if nd is not None:
        panels.append(("ND reference", nd))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.4))
    lo, hi = DISPLAY_WINDOW
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    diff = axes[-1].imshow(denoised - ld, cmap="RdBu_r", vmin=-150, vmax=150)
    axes[-1].set_title("denoised − LD (HU)", fontsize=9)
    axes[-1].axis("off")
    fig.colorbar(diff, ax=axes[-1], fraction=0.046, pad=0.04)
    fig.suptitle(f"window [{lo:.0f}, {hi:.0f}] HU", fontsize=9)
    _write_figure(fig, path)


def classical_comparison(generator, val, cfg: TrainConfig, device, figure: Path, step: int):
    """The best classical denoiser available (:func:`pdml.classical.best_available`) beside
    the network on the held-out slices ``val`` (:func:`pdml.training.evaluate.classical_rows`:
    tuned on every second slice, scored on all): its row for summary.json, and ``figure``
    (LD | network | classical | reference of slice 0). None when the slices lack references
    or the comparison fails (it never loses the run's summary)."""
    import warnings

    from pdml.classical import SHORT_NAMES, best_available
    from pdml.training.evaluate import classical_rows, denoise_slices

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
    """PNG of the training losses over steps, from ``metrics.jsonl`` (resumed runs included)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "train":
            records.append(rec)
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key in ("loss_G", "loss_D", "loss_gan", "loss_idt", "loss_patch"):
        # a non-finite loss is logged as null: a gap in the line
        ax.plot(steps, [np.nan if r.get(key) is None else r[key] for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _write_figure(fig, path)


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
        head = f"  {'held-out slices':<16}{'PSNR dB':>9}{'SSIM':>8}{'noise HU':>10}{'HU shift':>10}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        for name, values, prefix in rows:
            cells = []
            for key, spec, width in (("psnr", ".2f", 9), ("ssim", ".4f", 8),
                                     ("noise_std", ".1f", 10), ("hu_shift", "+.1f", 10)):
                v = values.get(prefix + key)
                cells.append(format(v, spec).rjust(width) if v is not None else "-".rjust(width))
            lines.append(f"  {name:<16}" + "".join(cells))
        ref = "truth/ND" if ev.get("psnr") is not None else "the LD input (no reference)"
        lines.append(f"  ({ev.get('slices')} slice(s); noise = std in homogeneous ROIs, "
                     f"HU shift = mean difference to {ref})")
        if classical:
            lines.append(f"  ({classical['name']}: strength tuned on held-out slices "
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
