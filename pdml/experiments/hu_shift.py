"""The paper's claim as one command: the HU-shift ablation.

Claim (Jung et al., MICCAI 2022): an unsupervised GAN that maps low-dose (LD) CT to the
full-dose (ND) distribution shifts the CT numbers of its output when the two acquisitions
differ; the patch-wise metric loss (positive = the input patch at the same location,
negatives = other patches of the same image) removes noise while keeping the input's CT
numbers.

``python -m pdml.experiments.hu_shift --preset demo`` trains three variants with identical
settings, seeds and data through :func:`pdml.training.train`:

- ``none``: adversarial (LSGAN) + identity loss only, "GAN only";
- ``patchnce``: + CUT's PatchNCE loss;
- ``dml``: + the paper's patch-wise metric loss;

on the built-in dataset (:func:`pdml.data.builtin_dataset`, whose ND domain carries the
acquisition CT-number shift of :data:`pdml.data.shift.BUILTIN_ND_SHIFT`), then evaluates
each final generator (``checkpoints/last.pt``: no selection on the test slices) on every
held-out paired slice of the built-in test split (simulated LD; truth = its noiseless
reconstruction at the LD domain's CT numbers) with :func:`pdml.training.evaluate_slices` and
:func:`pdml.metrics.rmse`: PSNR, SSIM, RMSE, noise std in homogeneous ROIs and HU shift in
those ROIs, and the same figures for the untouched LD input.

Output folder (``--out``): ``ablation.md`` (settings, table, claim), ``ablation.json``
(everything, per slice and per run), ``ablation.png`` (one slice for every variant in a
CT window and its HU difference to the truth), and ``runs/<loss>-seed<k>/``, the trainer's
run folders. Runs already finished in the folder with the same settings are reused, a run
killed midway is resumed exactly, so the command can be repeated after an interruption.

Classical baselines (:mod:`pdml.experiments.classical`: TV, non-local means, BM3D) join
the table: each strength tuned once on every second held-out slice (highest mean PSNR
against the truth), then scored on every held-out slice exactly as the networks are
(``--classical``, ``--no-classical``).

The claim counts as reproduced when the metric-learning variant's mean absolute HU shift
is smaller than the GAN-only variant's and its noise std is below the LD input's.

``--preset shift`` (``shift-gpu`` on a GPU, ``--quick`` for CI; :func:`run_shift_ablation`,
docs/hu-shift.md) is the setting that can tell the variants apart: LD and ND from the same
anatomy (the built-in data's ``same-anatomy`` layout), the ND domain offset by a known
acquisition shift (``--nd-offset-hu``, +100 HU) and GAN only also at 0 HU (the control),
wavelet split off (the main table) and on (a second table), the input centred on water,
a discriminator that sees the image. Each run counts with its held-out evaluations during
the LR decay; cells are mean ± sd over seeds. A validity check (:func:`validity_check`)
says whether GAN-only's shift at the offset minus its shift at 0 HU is at least
:data:`MIN_DIFFERENTIAL_HU` and beyond the seeds' spread; without it nothing is claimed.
Output: ``ablation.{md,json,png}``, ``curves.png`` (the HU shift of every run over its
steps) and ``runs/<table>/<variant>-seed<k>/``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from pdml.experiments.classical import METHODS as CLASSICAL_METHODS
from pdml.experiments.classical import SHORT_NAMES as CLASSICAL_SHORT_NAMES
from pdml.experiments.classical import tuned_baselines

FORMAT = "pdml-hu-shift-ablation"
VERSION = 1
VARIANTS = ("none", "patchnce", "dml")
VARIANT_NAMES = {
    "none": "GAN only (`--loss none`)",
    "patchnce": "+ PatchNCE (`--loss patchnce`)",
    "dml": "+ patch-wise metric (`--loss dml`)",
}
SHORT_NAMES = {"none": "GAN only", "patchnce": "+ PatchNCE", "dml": "+ metric loss (dml)"}
LD_NAME = "LD input (untouched)"
COLUMNS = (  # (key, header, format): per-slice means over the held-out slices
    ("psnr", "PSNR (dB)", ".2f"),
    ("ssim", "SSIM", ".4f"),
    ("rmse", "RMSE (HU)", ".1f"),
    ("noise_std", "noise std (HU)", ".1f"),
    ("hu_shift", "HU shift (HU)", "+.1f"),
    ("abs_hu_shift", "abs HU shift (HU)", ".1f"),
)
METRIC_KEYS = tuple(key for key, _, _ in COLUMNS)
EVAL_KEYS = ("psnr", "ssim", "noise_std", "hu_shift")
"""The metrics the trainer's held-out evaluation records (:func:`pdml.training.evaluate_slices`)."""

DEFAULT_ND_OFFSET_HU = 100.0
MIN_DIFFERENTIAL_HU = 20.0
"""The validity check's threshold: GAN-only's HU shift at the acquisition offset minus its
shift at 0 HU (same seeds) must reach this, beyond the seeds' spread."""
_SHIFT_SETTINGS: dict[str, Any] = dict(
    builtin_layout="same-anatomy", nd_offset_hu=DEFAULT_ND_OFFSET_HU, wavelet=False,
    input_center_hu=0.0, d_input="image", features=16, crop=32, batch_size=4,
    val_slices=10, builtin_size=128, crop_margin=8)

# Settings on top of the trainer's presets (pdml.training.PRESETS), the same for every variant.
# demo: the trainer's demo (128² built-in slices, batch 4, 64² crops) with a schedule that
# the three variants complete within 30 minutes on a busy 2-core CPU: measured with one
# thread among other jobs, a step takes 1.1 s (none), 1.8 s (patchnce), 2.0 s (dml), so
# 280 steps take about 23 minutes. The time limit per run is the safety net for a busier
# machine (3 × 9.5 min); the table reports the steps each run made.
ABLATION_OVERRIDES: dict[str, dict[str, Any]] = {
    "demo": dict(steps=280, decay_steps=140, eval_every=140, ckpt_every=70, max_minutes=9.5),
    "paper": {},
    # tiny: one evaluation and one checkpoint, at the end (the ablation evaluates anyway)
    "tiny": dict(eval_every=4, ckpt_every=4),
    # The discriminating setting (docs/hu-shift.md): same-anatomy domains, the ND domain
    # offset by a known acquisition shift, whole images centred on water, a discriminator
    # that sees the image (its high-pass would remove an offset), generator width 16 and
    # 32² crops. Measured on this 2-core CPU with one thread per run: a step takes 0.13 s
    # GAN only and 0.22 s with the metric loss on a quiet core (0.3-0.9 s while other
    # jobs share the machine); an evaluation of the 10 held-out slices with its figure
    # about 1-2 s. 24 runs (2 tables × 4 variants × 3 seeds) of 600 steps, 2 at a time
    # (PRESET_JOBS): about 35 minutes on a quiet machine. Evaluations every 50 steps; a
    # run counts with those of its LR decay (steps 350-600).
    "shift": dict(_SHIFT_SETTINGS, steps=600, decay_steps=300, eval_every=50, ckpt_every=100,
                  max_minutes=20.0),
    # The same runs on one GPU, 6 at a time: the per-run start-up and the evaluations
    # (figures on the CPU) dominate at this size. Sized to about 3 minutes, not yet
    # measured on a GPU.
    "shift-gpu": dict(_SHIFT_SETTINGS, steps=600, decay_steps=300, eval_every=50,
                      ckpt_every=600, max_minutes=2.0),
}
TRAINER_PRESET = {"shift": "demo", "shift-gpu": "demo"}
"""The trainer preset (pdml.training.PRESETS) an ablation preset starts from (default: the
preset of the same name)."""
SHIFT_PRESETS = ("shift", "shift-gpu")
PRESET_JOBS = {"shift": 2, "shift-gpu": 6}
"""Runs trained at a time by default (``--jobs``): one per CPU core here; on a GPU machine
several small runs share the GPU."""
QUICK_OVERRIDES = dict(steps=4, decay_steps=4, eval_every=2, ckpt_every=4, batch_size=2,
                       crop=32, crop_margin=4, num_patches=32, builtin_size=64, max_minutes=None)
"""``--quick`` (CI): a few steps on the 64² built-in data, one seed."""
# config keys that may differ between an interrupted invocation and its repetition
_EXECUTION_ONLY = ("progress", "threads", "resolved")
TUNE_EVERY = 2
"""The classical baselines are tuned on held-out slices 0, TUNE_EVERY, 2·TUNE_EVERY, ..."""


def ablation_config(preset: str, loss: str, seed: int, run_dir, time_limit: bool = True,
                    **overrides):
    """The :class:`pdml.training.TrainConfig` of one variant: preset + ablation settings +
    ``overrides`` (``None`` = keep), with ``loss``, ``seed`` and ``out=run_dir``;
    ``time_limit=False`` drops the per-run time limit."""
    from pdml.training import TrainError, make_config

    if preset not in ABLATION_OVERRIDES:
        raise TrainError(f"--preset must be one of {sorted(ABLATION_OVERRIDES)}, got {preset!r}")
    values = dict(ABLATION_OVERRIDES[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.update(loss=loss, seed=seed, out=str(run_dir))
    cfg = make_config(TRAINER_PRESET.get(preset, preset), **values)
    if not time_limit:
        cfg.max_minutes = None
    return cfg


def held_out_slices(cfg) -> list:
    """Every paired slice of the built-in test split at the run's size, as
    :class:`pdml.training.ValItem` (``ld``, ``nd`` = the truth, float32 ``[H, W]`` HU)."""
    from pdml.data import builtin_dataset
    from pdml.training import ValItem

    ds = builtin_dataset(size=cfg.builtin_size, progress=cfg.progress, layout=cfg.builtin_layout)
    ld, truth = ds.load("test/ld"), ds.load("test/truth")
    return [ValItem(ld[i], truth[i], f"builtin test {i}") for i in range(len(ld))]


def _device(cfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def evaluate_run(run_dir: Path, items: Sequence, device: torch.device) -> tuple[list, list, list]:
    """Evaluate the final generator of a run on every slice of ``items``.

    -> ``(denoised, per_slice, ld_per_slice)``: the denoised slices (float32 ``[H, W]``
    HU) and one dict of :data:`METRIC_KEYS` per slice for the output and for the LD input.
    Each slice goes alone through :func:`pdml.training.denoise_slices` and
    :func:`pdml.training.evaluate_slices` (the trainer's own evaluation), which gives
    per-slice values.
    """
    from pdml.inference import generator_from_checkpoint
    from pdml.training import denoise_slices, load_checkpoint

    generator, cfg = generator_from_checkpoint(load_checkpoint(run_dir), device)
    denoised, per_slice, ld_per_slice = [], [], []
    for index, item in enumerate(items):
        out = denoise_slices(generator, [item], cfg, device)[0]
        row, ld_row = slice_rows(index, item, out)
        denoised.append(out)
        per_slice.append(row)
        ld_per_slice.append(ld_row)
    return denoised, per_slice, ld_per_slice


def slice_rows(index: int, item, image: np.ndarray) -> tuple[dict, dict]:
    """The :data:`METRIC_KEYS` of one held-out slice ``item`` denoised to ``image`` (float32
    ``[H, W]`` HU) and of its LD input, through :func:`pdml.training.evaluate_slices` (the
    trainer's own evaluation) and :func:`pdml.metrics.rmse` -> ``(row, ld_row)``."""
    from pdml import metrics
    from pdml.training import evaluate_slices

    ev = evaluate_slices([item], [image])
    rows = []
    for prefix, img in (("", image), ("ld_", item.ld)):
        row = {"index": index, "name": item.name}
        row.update({k: ev[prefix + k] for k in ("psnr", "ssim", "noise_std", "hu_shift")})
        row["rmse"] = float(metrics.rmse(img, item.nd)[0])
        row["abs_hu_shift"] = abs(row["hu_shift"])
        rows.append(row)
    return rows[0], rows[1]


def checked_classical(classical: Sequence[str]) -> list[str]:
    """``classical`` without repeats; TrainError for an unknown method, or for BM3D when
    its optional package is missing (checked before any training: the baselines run last)."""
    from pdml.training import TrainError

    classical = list(dict.fromkeys(classical))
    if any(m not in CLASSICAL_METHODS for m in classical):
        raise TrainError(f"classical must be a subset of {CLASSICAL_METHODS}, got {classical}")
    if "bm3d" in classical and importlib.util.find_spec("bm3d") is None:
        raise TrainError("--classical bm3d needs the optional bm3d package (non-commercial "
                         "licence): pip install 'pdml[classical]', or leave it out "
                         "(--classical tv nlm)")
    return classical


def classical_baselines(items: Sequence, methods: Sequence[str]) -> tuple[list, list, list]:
    """Tune each classical method on every :data:`TUNE_EVERY`-th held-out slice, score it on
    all of them (:func:`slice_rows`) -> ``(table rows, details for ablation.json, the
    denoised slices [S, H, W] HU of each method)``."""
    tune_items = items[::TUNE_EVERY]
    baselines = tuned_baselines(np.stack([i.ld for i in items]),
                                np.stack([i.ld for i in tune_items]),
                                np.stack([i.nd for i in tune_items]), methods)
    rows, details = [], []
    for b in baselines:
        per_slice = [slice_rows(k, item, b.denoised[k])[0] for k, item in enumerate(items)]
        rows.append({"key": b.method, "name": b.name, **_mean_over(per_slice), "seeds": None,
                     "strength": b.strength, "tune_s": b.seconds})
        details.append({"method": b.method, "strength": b.strength,
                        "tuning_psnr": {f"{s:g}": v for s, v in b.scores.items()},
                        "tuning_slices": list(range(0, len(items), TUNE_EVERY)),
                        "seconds": b.seconds, "per_slice": per_slice})
    return rows, details, [b.denoised for b in baselines]


def add_classical_rows(rows: list, figure_outputs: dict, items: Sequence,
                       classical: Sequence[str], figure_slice: int, stream) -> list[dict]:
    """Append the rows of the ``classical`` baselines (:func:`classical_baselines`) to
    ``rows`` and their denoised ``figure_slice`` to ``figure_outputs``; -> the details
    ``ablation.json`` keeps of them (empty without baselines)."""
    if not classical:
        return []
    t0 = time.time()
    classical_rows, details, images = classical_baselines(items, classical)
    rows += classical_rows
    for row, denoised in zip(classical_rows, images):
        figure_outputs[CLASSICAL_SHORT_NAMES[row["key"]]] = denoised[figure_slice]
    print(f"[hu-shift] classical baselines {', '.join(classical)}: tuned and scored in "
          f"{time.time() - t0:.0f} s", file=stream, flush=True)
    return details


def _classical_line(settings: dict) -> list[str]:
    """The report's line on the classical baselines (none without them)."""
    if not settings.get("classical"):
        return []
    return [f"- classical baselines ({', '.join(settings['classical'])}): strength tuned once "
            f"on held-out slices {settings['classical_tuning_slices']} (highest mean PSNR "
            f"against the truth over the grid of pdml.experiments.classical), then scored on "
            f"all held-out slices like the networks"]


def _mean_over(rows: Sequence[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in METRIC_KEYS}


def summarize(runs: Sequence[dict], ld_per_slice: Sequence[dict]) -> list[dict]:
    """Table rows: the LD input, then one per variant (in ``runs`` order).

    Each metric: the mean over held-out slices, then the mean over seeds (``<key>_std``:
    the standard deviation over seeds, with more than one seed).
    """
    rows = [{"key": "ld", "name": LD_NAME, **_mean_over(ld_per_slice), "seeds": None}]
    variants = list(dict.fromkeys(r["loss"] for r in runs))
    for loss in variants:
        mine = [r for r in runs if r["loss"] == loss]
        per_seed = [_mean_over(r["per_slice"]) for r in mine]
        row: dict[str, Any] = {"key": loss, "name": VARIANT_NAMES[loss],
                               "seeds": [r["seed"] for r in mine]}
        for k in METRIC_KEYS:
            values = [s[k] for s in per_seed]
            row[k] = float(np.mean(values))
            if len(values) > 1:
                row[k + "_std"] = float(np.std(values, ddof=1))
        row["steps"] = [r["steps"] for r in mine]
        row["train_s"] = float(sum(r["train_s"] for r in mine))
        rows.append(row)
    return rows


def claim_verdict(rows: Sequence[dict]) -> Optional[dict]:
    """Whether the paper's claim held: ``dml``'s mean |HU shift| below ``none``'s and its
    noise std below the LD input's. None when either variant was not run."""
    by_key = {r["key"]: r for r in rows}
    if "dml" not in by_key or "none" not in by_key:
        return None
    ld, gan, dml = by_key["ld"], by_key["none"], by_key["dml"]
    shift_ok = dml["abs_hu_shift"] < gan["abs_hu_shift"]
    noise_ok = dml["noise_std"] < ld["noise_std"]
    reproduced = shift_ok and noise_ok
    statement = (
        f"{'Reproduced' if reproduced else 'Not reproduced'}: metric learning's mean |HU shift| "
        f"is {dml['abs_hu_shift']:.1f} HU against GAN-only's {gan['abs_hu_shift']:.1f} HU "
        f"({'smaller' if shift_ok else 'not smaller'}), and its noise std is "
        f"{dml['noise_std']:.1f} HU against the LD input's {ld['noise_std']:.1f} HU "
        f"({'below' if noise_ok else 'not below'}).")
    if "patchnce" in by_key:
        nce = by_key["patchnce"]
        statement += (f" PatchNCE: |HU shift| {nce['abs_hu_shift']:.1f} HU, "
                      f"noise {nce['noise_std']:.1f} HU.")
    return {"reproduced": reproduced, "hu_shift_smaller_than_gan_only": shift_ok,
            "noise_below_ld_input": noise_ok,
            "abs_hu_shift": {"dml": dml["abs_hu_shift"], "none": gan["abs_hu_shift"]},
            "noise_std": {"dml": dml["noise_std"], "ld": ld["noise_std"]},
            "statement": statement}


# --------------------------------------------------------------------------- provenance

def source_commit() -> dict:
    """The git commit of the pdml source in use and whether ``pdml/`` differs from it."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "pdml"], cwd=repo,
                               capture_output=True, timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):  # not a git checkout (installed wheel)
        return {"commit": None, "pdml_modified": None}
    return {"commit": commit, "pdml_modified": dirty}


def cpu_name() -> str:
    """The CPU model and core count, e.g. ``"AMD EPYC 9654 (2 cores)"``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _cell(row: dict, key: str, spec: str) -> str:
    text = format(row[key], spec)
    if key + "_std" in row:
        text += f" ± {row[key + '_std']:.2g}"
    return text


def _commit_label(source: dict) -> str:
    """The commit of :func:`source_commit` for a report line."""
    commit = source["commit"] or "unknown"
    return commit + (" (pdml/ modified locally)" if source["pdml_modified"] else "")


def markdown_table(rows: Sequence[dict]) -> str:
    head = ["", *(h for _, h, _ in COLUMNS), "steps", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], *(_cell(row, k, spec) for k, _, spec in COLUMNS)]
        if row["key"] == "ld":
            cells += ["–", "–"]
        elif "strength" in row:  # a classical baseline: no training, its tuning time
            cells += ["–", _fmt_minutes(row["tune_s"]) + " tuning"]
        else:
            cells += ["/".join(str(s) for s in row["steps"]), _fmt_minutes(row["train_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    s = result["settings"]
    cfg = s["shared_config"]
    commit = _commit_label(s["source"])
    lines = [
        "# HU-shift ablation: GAN only vs PatchNCE vs patch-wise metric learning",
        "",
        f"`{s['command']}`",
        "",
        f"- preset `{s['preset']}`; seeds {s['seeds']}; {cfg['steps']} steps (LR decays "
        f"linearly over the last {cfg['decay_steps']}), batch {cfg['batch_size']}, "
        f"{cfg['crop']}² crops, built-in data at {cfg['builtin_size']}², precision "
        f"{cfg['precision']}, time limit per run "
        + (f"{cfg['max_minutes']} min" if cfg["max_minutes"] else "none"),
        f"- losses: LSGAN λ {cfg['lambda_gan']}, identity λ {cfg['lambda_identity']}, patch "
        f"loss λ {cfg['lambda_metric']} ({cfg['num_patches']} patches per layer; τ "
        + ", ".join(f"{t} {k}" for k, t in s["tau"].items() if k != "none") + "); "
        f"wavelet split {'on' if cfg['wavelet'] else 'off'}",
        f"- evaluation: final generator (`last.pt`) of each run on all {s['held_out_slices']} "
        f"held-out paired slices of the built-in test split (simulated LD; truth = noiseless "
        f"reconstruction at the LD domain's CT numbers); noise std and HU shift in "
        f"homogeneous ROIs of the truth; abs HU shift = mean over slices of |HU shift|",
        *_classical_line(s),
        f"- {s['device']}, {s['cpu_threads']} CPU thread(s), torch {s['torch']}, "
        f"commit {commit}, started {s['started_utc']}",
        f"- runtime: {_fmt_minutes(result['runtime_s']['total'])} in total",
        "",
        markdown_table(result["rows"]),
        "",
    ]
    if result["claim"] is not None:
        lines += [f"**Claim** (metric learning: |HU shift| smaller than GAN-only's, noise "
                  f"below the LD input's): {result['claim']['statement']}", ""]
    stopped = [f"{r['loss']} seed {r['seed']}" for r in result["runs"] if r["stopped_early"]]
    if stopped:
        lines += [f"Stopped at the time limit before the planned {cfg['steps']} steps: "
                  f"{', '.join(stopped)}.", ""]
    lines += [f"![HU-shift ablation]({result['figure']})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figure

def save_figure(path: Path, item, outputs: dict, slice_index: int) -> None:
    """PNG: top row the truth, the LD input and every variant's output of one held-out
    slice in the soft-tissue window; bottom row the ROIs on the truth, then each image
    minus the truth (HU) with its HU shift and noise in the title. ``outputs``: {variant
    key (its :data:`SHORT_NAMES` entry is the title) or title: image}."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from pdml import metrics
    from pdml.training import DISPLAY_WINDOW

    truth = item.nd
    images = [("LD input", item.ld)] + [(SHORT_NAMES.get(k, k), v) for k, v in outputs.items()]
    cols = 1 + len(images)
    fig, axes = plt.subplots(2, cols, figsize=(2.6 * cols, 5.6), layout="constrained")
    lo, hi = DISPLAY_WINDOW
    axes[0, 0].imshow(truth, cmap="gray", vmin=lo, vmax=hi)
    axes[0, 0].set_title("truth (LD CT numbers)", fontsize=9)
    axes[1, 0].imshow(truth, cmap="gray", vmin=lo, vmax=hi)
    for r, c, side in metrics.homogeneous_rois(truth)[0]:
        axes[1, 0].add_patch(Rectangle((c - 0.5, r - 0.5), side, side, fill=False,
                                       edgecolor="yellow", linewidth=1.0))
    axes[1, 0].set_title("ROIs (noise, HU shift)", fontsize=9)
    diff_im = None
    for col, (title, image) in enumerate(images, start=1):
        axes[0, col].imshow(image, cmap="gray", vmin=lo, vmax=hi)
        axes[0, col].set_title(title, fontsize=9)
        shift = float(metrics.hu_shift(image, truth)[0])
        noise = float(metrics.noise_std(image, truth)[0])
        diff_im = axes[1, col].imshow(image - truth, cmap="RdBu_r", vmin=-100, vmax=100)
        axes[1, col].set_title(f"− truth: shift {shift:+.1f}, noise {noise:.1f}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.colorbar(diff_im, ax=axes[1, -1], fraction=0.046, pad=0.02, label="HU")
    fig.suptitle(f"held-out slice {slice_index}: window [{lo:.0f}, {hi:.0f}] HU (top), "
                 f"difference to the truth in [-100, 100] HU (bottom)", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the ablation

def _comparable(config: dict) -> dict:
    d = dict(config)
    for key in _EXECUTION_ONLY:
        d.pop(key, None)
    d["loss_layers"] = list(d.get("loss_layers", []))
    return d


def train_or_reuse(cfg, stream) -> tuple[dict, str]:
    """Train ``cfg`` into ``cfg.out``; a finished run there with the same settings is
    reused, an interrupted one resumed exactly. -> ``(summary, "trained"|"reused"|"resumed")``."""
    from pdml.training import TrainError, train

    run_dir = Path(cfg.out)
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return train(cfg, stream=stream), "trained"
    saved, wanted = _comparable(json.loads((run_dir / "config.json").read_text())), \
        _comparable(cfg.to_dict())
    if saved != wanted:
        differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise TrainError(f"{run_dir} holds a run with other settings ({', '.join(differ)}); "
                         f"choose another --out")
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("steps") == cfg.steps or summary.get("stopped_early"):
            return summary, "reused"
    return train(resume=str(run_dir), stream=stream), "resumed"


def train_and_evaluate(cfg, items: Sequence, stream, label: str, evaluate: bool = True,
                       trained: Optional[tuple[dict, str]] = None
                       ) -> tuple[dict, Optional[list], Optional[list]]:
    """Train (or reuse, or resume: :func:`train_or_reuse`) the run of ``cfg`` and, when
    ``evaluate``, its final generator on ``items`` (:func:`evaluate_run`). ``trained``:
    the ``(summary, how)`` of a training already done (:func:`train_all`).

    -> ``(run, denoised, ld_per_slice)``: ``run`` the record of ``ablation.json``'s "runs"
    (settings, steps, times, ``per_slice`` when evaluated, ``evals``: the run's held-out
    evaluations during training from its ``metrics.jsonl``); ``denoised``/``ld_per_slice``
    as :func:`evaluate_run` gives them (None without ``evaluate``).
    """
    t0 = time.time()
    if trained is None:
        print(f"[hu-shift] training {label} seed {cfg.seed} -> {cfg.out}", file=stream,
              flush=True)
        trained = train_or_reuse(cfg, stream)
    summary, how = trained
    t1 = time.time()
    denoised = per_slice = ld_rows = None
    if evaluate:
        denoised, per_slice, ld_rows = evaluate_run(Path(cfg.out), items, _device(cfg))
    t2 = time.time()
    run = {
        "loss": cfg.loss, "seed": cfg.seed, "run_dir": str(cfg.out), "how": how,
        "tau": cfg.resolved_tau, "steps": summary["steps"],
        "planned_steps": summary["planned_steps"],
        "stopped_early": bool(summary["stopped_early"]),
        "train_s": float(summary.get("total_elapsed_s", summary["elapsed_s"])),
        "wall_s": {"train": t1 - t0, "evaluate": t2 - t1},
        "img_per_s": summary.get("img_per_s"), "cpu_threads": summary.get("cpu_threads"),
        "evals": eval_records(Path(cfg.out)),
    }
    if per_slice is not None:
        run["per_slice"] = per_slice
    print(f"[hu-shift] {label} seed {cfg.seed}: {how}, {summary['steps']} steps, "
          f"train {t1 - t0:.0f} s, evaluate {t2 - t1:.0f} s", file=stream, flush=True)
    return run, denoised, ld_rows


def eval_records(run_dir: Path) -> list[dict]:
    """The held-out evaluations a run made while training (``metrics.jsonl`` records of
    kind "eval"), in step order: ``step``, ``slices`` and the :data:`EVAL_KEYS` (the
    output's and, prefixed ``ld_``, the LD input's)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    keep = ("step", "slices") + EVAL_KEYS + tuple("ld_" + k for k in EVAL_KEYS)
    records = []
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("kind") == "eval":
            records.append({k: rec.get(k) for k in keep})
    return sorted(records, key=lambda r: r["step"])


def run_ablation(preset: str = "demo", out=None, seeds: Sequence[int] = (0,),
                 variants: Sequence[str] = VARIANTS, figure_slice: int = 0,
                 time_limit: bool = True, stream=None, command: Optional[str] = None,
                 classical: Sequence[str] = CLASSICAL_METHODS, **overrides) -> dict:
    """Train every variant for every seed, evaluate, write ``ablation.{md,json,png}``.

    ``overrides``: :class:`pdml.training.TrainConfig` fields for every run (``steps``,
    ``max_minutes``, ``device``, ``threads``, ``loss_backend``, ``precision``,
    ``progress``...; ``None`` = the preset's); ``time_limit=False`` drops the per-run
    time limit. ``classical``: the classical baselines in the table (:func:`classical_baselines`).
    -> the result dict written to ``ablation.json``.
    """
    from pdml.training import TrainError

    stream = stream if stream is not None else sys.stdout
    started = time.time()
    started_utc = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
    out = Path(out) if out is not None else Path("runs") / (
        time.strftime("%Y%m%d-%H%M%S") + "-hu-shift")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    variants = list(dict.fromkeys(variants))
    classical = checked_classical(classical)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or not seeds:
        raise TrainError(f"variants must be a non-empty subset of {VARIANTS} and seeds "
                         f"non-empty, got {variants} and {seeds}")
    configs = {(loss, seed): ablation_config(preset, loss, seed,
                                             out / "runs" / f"{loss}-seed{seed}",
                                             time_limit=time_limit, **overrides)
               for seed in seeds for loss in variants}
    first = next(iter(configs.values()))
    items = held_out_slices(first)  # builds the built-in data once, before any run
    if not 0 <= figure_slice < len(items):
        raise TrainError(f"--figure-slice must be in [0, {len(items)}), got {figure_slice}")
    out.mkdir(parents=True, exist_ok=True)

    runs: list[dict] = []
    ld_per_slice: Optional[list] = None
    figure_outputs: dict[str, np.ndarray] = {}
    for (loss, seed), cfg in configs.items():
        run, denoised, ld_rows = train_and_evaluate(cfg, items, stream, f"--loss {loss}")
        if ld_per_slice is None:
            ld_per_slice = ld_rows
        if seed == seeds[0]:
            figure_outputs[loss] = denoised[figure_slice]
        runs.append(run)

    rows = summarize(runs, ld_per_slice)
    classical_details = add_classical_rows(rows, figure_outputs, items, classical,
                                           figure_slice, stream)
    figure = "ablation.png"
    save_figure(out / figure, items[figure_slice], figure_outputs, figure_slice)
    device = _device(first)
    shared = {k: v for k, v in first.to_dict().items()
              if k not in ("loss", "seed", "out", "tau", "progress")}
    result = {
        "format": FORMAT, "version": VERSION,
        "settings": {
            "command": command or f"python -m pdml.experiments.hu_shift --preset {preset}",
            "preset": preset, "seeds": seeds, "variants": variants,
            "tau": {loss: configs[(loss, seeds[0])].resolved_tau for loss in variants},
            "shared_config": shared, "held_out_slices": len(items),
            "figure_slice": figure_slice,
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else cpu_name()),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "pdml": __import__("pdml").__version__, "python": platform.python_version(),
            "source": source_commit(), "started_utc": started_utc,
            "classical": classical,
            "classical_tuning_slices": list(range(0, len(items), TUNE_EVERY)),
        },
        "columns": [{"key": k, "header": h} for k, h, _ in COLUMNS],
        "rows": rows,
        "claim": claim_verdict(rows),
        "runs": runs,
        "classical": classical_details,
        "ld_per_slice": ld_per_slice,
        "figure": figure,
        "runtime_s": {"total": time.time() - started,
                      "per_run": {f"{r['loss']}-seed{r['seed']}":
                                  r["wall_s"]["train"] + r["wall_s"]["evaluate"] for r in runs}},
    }
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown_report(result)
    (out / "ablation.md").write_text(report)
    print("\n" + report, file=stream, flush=True)
    print(f"[hu-shift] wrote {out / 'ablation.md'}, {out / 'ablation.json'}, "
          f"{out / figure}", file=stream, flush=True)
    return result


# --------------------------------------------------------------------------- the shift ablation

@dataclass(frozen=True)
class ShiftVariant:
    """One row of the shift ablation: ``loss`` trained with the acquisition offset, or
    with 0 HU (``control``: the same runs on an ND domain without the offset)."""

    key: str
    loss: str
    control: bool = False

    def names(self, offset_hu: float) -> tuple[str, str]:
        """-> (table name, figure title) at the acquisition offset ``offset_hu``."""
        at = "0 HU (control)" if self.control else f"{offset_hu:+g} HU"
        return f"{VARIANT_NAMES[self.loss]}, {at}", f"{SHORT_NAMES[self.loss]}, {at}"


SHIFT_VARIANTS = (ShiftVariant("none", "none"), ShiftVariant("none-0hu", "none", control=True),
                  ShiftVariant("patchnce", "patchnce"), ShiftVariant("dml", "dml"))
SHIFT_VARIANT_KEYS = tuple(v.key for v in SHIFT_VARIANTS)
SHIFT_TABLES = {"no-wavelet": False, "wavelet": True}
"""The shift ablation's tables: key -> the wavelet split; the first is the main table."""
SHIFT_TITLES = {
    "no-wavelet": "wavelet split off (main table: the networks see and return whole images)",
    "wavelet": "wavelet split on (the paper's design: the input's low band is added back, so "
               "its CT numbers cannot move)",
}
SHIFT_COLUMNS = ("HU shift (HU)", "per seed", "within-run sd", "noise std (HU)", "PSNR (dB)",
                 "SSIM", "steps", "train time")


def settle_window(evals: Sequence[dict], planned_steps: int, decay_steps: int) -> list[dict]:
    """The evaluations a run is judged by: those during its learning-rate decay (step >
    ``planned_steps − decay_steps``), where the run settles; the last one if none is."""
    start = planned_steps - decay_steps
    return [r for r in evals if r["step"] > start] or list(evals[-1:])


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize_shift(runs: Sequence[dict], variants: Sequence[ShiftVariant], offset_hu: float,
                    ld_per_slice: Sequence[dict]) -> list[dict]:
    """Table rows of one shift table: the LD input, then one per variant.

    Each run counts with the mean of its :func:`settle_window` evaluations (``run
    ["window"]``); a row holds, per :data:`EVAL_KEYS` metric, the mean over seeds, ``_std``
    (the sd over seeds), ``_per_seed`` and ``_within_sd`` (the mean over seeds of the sd
    over each run's window), and ``abs_hu_shift``, the mean over seeds of |HU shift|.
    """
    rows = [{"key": "ld", "name": LD_NAME, "seeds": None,
             **{k: float(np.mean([r[k] for r in ld_per_slice])) for k in EVAL_KEYS}}]
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant.key]
        if not mine:
            continue
        row: dict[str, Any] = {"key": variant.key, "name": variant.names(offset_hu)[0],
                               "loss": variant.loss,
                               "nd_offset_hu": 0.0 if variant.control else offset_hu,
                               "seeds": [r["seed"] for r in mine]}
        for k in EVAL_KEYS:
            values = [r["window"]["mean"][k] for r in mine]
            row[k] = float(np.mean(values))
            row[k + "_std"] = _sd(values)
            row[k + "_per_seed"] = values
            row[k + "_within_sd"] = float(np.mean([r["window"]["sd"][k] for r in mine]))
        row["abs_hu_shift"] = float(np.mean(np.abs(row["hu_shift_per_seed"])))
        row["steps"] = [r["steps"] for r in mine]
        row["train_s"] = float(sum(r["train_s"] for r in mine))
        rows.append(row)
    return rows


def validity_check(rows: Sequence[dict], offset_hu: float) -> dict:
    """Can this setting tell a shifting method from one that keeps CT numbers?

    With the same seeds, GAN-only's HU shift at the acquisition offset minus its shift at
    0 HU (signed towards the offset) must be at least :data:`MIN_DIFFERENTIAL_HU` on
    average and beyond the seeds' spread: every seed's shift at the offset lies beyond
    every seed's shift at 0 HU. Needs two seeds or more and a non-zero offset.
    """
    by_key = {r["key"]: r for r in rows}
    result: dict[str, Any] = {"valid": False, "threshold_hu": MIN_DIFFERENTIAL_HU,
                              "nd_offset_hu": offset_hu}
    gan, control = by_key.get("none"), by_key.get("none-0hu")
    if gan is None or control is None:
        result["statement"] = ("The validity check needs GAN-only at the offset and at 0 HU "
                               "(variants none and none-0hu): not run, no claim.")
        return result
    sign = float(np.sign(offset_hu))
    shifted = [sign * v for v in gan["hu_shift_per_seed"]]
    held = [sign * v for v in control["hu_shift_per_seed"]]
    diffs = [a - b for a, b in zip(shifted, held)]
    differential = float(np.mean(diffs))
    separated = bool(sign != 0 and min(shifted) > max(held))
    enough = differential >= MIN_DIFFERENTIAL_HU
    seeds = len(diffs)
    valid = bool(sign != 0 and seeds >= 2 and enough and separated)
    result.update(valid=valid, differential_hu=differential, differential_sd=_sd(diffs),
                  differential_per_seed=diffs, seeds=gan["seeds"], seeds_separated=separated,
                  gan_only_per_seed=gan["hu_shift_per_seed"],
                  control_per_seed=control["hu_shift_per_seed"])
    measured = (f"GAN-only's HU shift is {gan['hu_shift']:+.1f} ± {gan['hu_shift_std']:.1f} HU "
                f"at {offset_hu:+g} HU and {control['hu_shift']:+.1f} ± "
                f"{control['hu_shift_std']:.1f} HU at 0 HU (mean ± sd over seeds "
                f"{gan['seeds']}): a differential of {differential:+.1f} HU")
    if valid:
        result["statement"] = (f"Valid: {measured}, at least {MIN_DIFFERENTIAL_HU:g} HU, and "
                               f"every seed at {offset_hu:+g} HU lies beyond every seed at "
                               f"0 HU. The setting can tell a method that shifts CT numbers "
                               f"from one that keeps them.")
    else:
        why = []
        if sign == 0:
            why.append("the acquisition offset is 0 HU")
        if seeds < 2:
            why.append("one seed cannot show the seeds' spread")
        if not enough:
            why.append(f"below {MIN_DIFFERENTIAL_HU:g} HU")
        if not separated:
            why.append("the seeds' ranges overlap")
        result["statement"] = (f"Not valid ({'; '.join(why)}): {measured}. This setting "
                               f"cannot discriminate; no claim is made from this table.")
    return result


def shift_verdict(rows: Sequence[dict], validity: dict) -> Optional[dict]:
    """What metric learning did, as measured: its |HU shift| against GAN-only's at the
    same offset (smaller on average, and for every seed), its noise against the LD
    input's. ``reproduced`` is None when the setting is not valid (no claim)."""
    by_key = {r["key"]: r for r in rows}
    if "dml" not in by_key or "none" not in by_key:
        return None
    ld, gan, dml = by_key["ld"], by_key["none"], by_key["dml"]
    gan_abs = np.abs(gan["hu_shift_per_seed"])
    dml_abs = np.abs(dml["hu_shift_per_seed"])
    smaller = bool(dml_abs.mean() < gan_abs.mean())
    every_seed = bool(dml_abs.max() < gan_abs.min())
    seeds_note = " for every seed" if every_seed else (", not for every seed" if smaller else "")
    noise_ok = bool(dml["noise_std"] < ld["noise_std"])
    measured = (f"metric learning's HU shift is {dml['hu_shift']:+.1f} ± "
                f"{dml['hu_shift_std']:.1f} HU (|shift| {dml_abs.mean():.1f}) against "
                f"GAN-only's {gan['hu_shift']:+.1f} ± {gan['hu_shift_std']:.1f} HU (|shift| "
                f"{gan_abs.mean():.1f}): {'smaller' if smaller else 'not smaller'}"
                f"{seeds_note}"
                f"; its noise std is {dml['noise_std']:.1f} HU against the LD input's "
                f"{ld['noise_std']:.1f} HU ({'below' if noise_ok else 'not below'}).")
    if "patchnce" in by_key:
        nce = by_key["patchnce"]
        measured += (f" PatchNCE: HU shift {nce['hu_shift']:+.1f} ± {nce['hu_shift_std']:.1f} "
                     f"HU, noise {nce['noise_std']:.1f} HU.")
    if validity["valid"]:
        reproduced: Optional[bool] = smaller and every_seed and noise_ok
        if reproduced:
            head = "Reproduced"
        elif smaller and every_seed:
            head = "CT numbers reproduced, noise not"
        else:
            head = "Not reproduced"
        statement = f"{head}: {measured}"
    else:
        reproduced = None
        statement = f"No claim (the setting did not pass the validity check). Measured: {measured}"
    return {"reproduced": reproduced, "hu_shift_smaller_than_gan_only": smaller,
            "hu_shift_smaller_for_every_seed": every_seed, "noise_below_ld_input": noise_ok,
            "abs_hu_shift": {"dml": float(dml_abs.mean()), "none": float(gan_abs.mean())},
            "noise_std": {"dml": dml["noise_std"], "ld": ld["noise_std"]},
            "statement": statement}


def shift_markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| | " + " | ".join(SHIFT_COLUMNS) + " |", "|" + "---|" * (len(SHIFT_COLUMNS) + 1)]
    for row in rows:
        if row.get("seeds"):
            def sd(key):  # an sd over one seed says nothing
                return f" ± {row[key + '_std']:.1f}" if len(row["seeds"]) > 1 else ""

            cells = [f"{row['hu_shift']:+.1f}{sd('hu_shift')}",
                     " / ".join(f"{v:+.1f}" for v in row["hu_shift_per_seed"]),
                     f"{row['hu_shift_within_sd']:.1f}",
                     f"{row['noise_std']:.1f}{sd('noise_std')}",
                     f"{row['psnr']:.2f}", f"{row['ssim']:.4f}",
                     "/".join(str(s) for s in row["steps"]), _fmt_minutes(row["train_s"])]
        else:  # the LD input, a baseline: no seeds, no training
            cells = [f"{row['hu_shift']:+.1f}", "–", "–", f"{row['noise_std']:.1f}",
                     f"{row['psnr']:.2f}", f"{row['ssim']:.4f}", "–",
                     _fmt_minutes(row["tune_s"]) + " tuning" if "tune_s" in row else "–"]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shift_markdown_report(result: dict) -> str:
    s = result["settings"]
    cfg = s["shared_config"]
    commit = _commit_label(s["source"])
    main = result["tables"][0]
    lines = [
        "# HU-shift ablation in a discriminating setting: GAN only vs PatchNCE vs patch-wise "
        "metric learning",
        "",
        f"`{s['command']}`",
        "",
        f"- data: the built-in dataset's same-anatomy layout at {cfg['builtin_size']}² "
        f"(docs/hu-shift.md): LD = simulated low dose of one pool of slices, ND = the same "
        f"pool's noiseless reconstruction drawn independently (unpaired) with a known "
        f"acquisition offset of **{s['nd_offset_hu']:+g} HU** (`--nd-offset-hu`; the control "
        f"runs use 0 HU)",
        f"- training: preset `{s['preset']}`; seeds {s['seeds']}; {cfg['steps']} steps (LR "
        f"decays linearly over the last {cfg['decay_steps']}), batch {cfg['batch_size']}, "
        f"{cfg['crop']}² crops, generator width {cfg['features']}, lr {cfg['lr']} (D "
        f"{cfg['lr_d'] if cfg['lr_d'] is not None else cfg['lr']}), discriminator input "
        f"`{cfg['d_input']}`, whole-image input centred at {cfg['input_center_hu']} HU; "
        f"LSGAN λ {cfg['lambda_gan']}, identity λ {cfg['lambda_identity']}, patch loss λ "
        f"{cfg['lambda_metric']} ({cfg['num_patches']} patches per layer; τ "
        + ", ".join(f"{t} {k}" for k, t in s["tau"].items() if k != "none") + ")",
        f"- evaluation: every {cfg['eval_every']} steps on all {s['held_out_slices']} held-out "
        f"slices (simulated LD; truth = its noiseless reconstruction at the LD domain's CT "
        f"numbers); HU shift = mean of output − truth, noise std of output − truth, both in "
        f"homogeneous ROIs of the truth. Each run counts with the mean of its evaluations "
        f"during the LR decay (steps {s['settle_steps']}); cells are mean ± sd over seeds, "
        f"'per seed' lists the seeds' values, 'within-run sd' is the sd over a run's "
        f"evaluations (mean over seeds)",
        *_classical_line(s),
        f"- {s['device']}, {s['cpu_threads']} CPU thread(s) per run, {s['jobs']} run(s) at a "
        f"time, torch {s['torch']}, commit {commit}, started {s['started_utc']}",
        f"- runtime: {_fmt_minutes(result['runtime_s']['total'])} in total",
        "",
        f"**Validity** ({main['title']}): {main['validity']['statement']}",
        "",
    ]
    if main["claim"] is not None:
        lines += [f"**Metric learning** (as measured): {main['claim']['statement']}", ""]
    for table in result["tables"]:
        lines += [f"## {table['title']}", "", shift_markdown_table(table["rows"]), ""]
        if table is not main:
            lines += [f"Validity: {table['validity']['statement']}", ""]
            if table["claim"] is not None:
                lines += [f"Metric learning: {table['claim']['statement']}", ""]
    stopped = [f"{r['table']}/{r['variant']} seed {r['seed']}" for r in result["runs"]
               if r["stopped_early"]]
    if stopped:
        lines += [f"Stopped at the time limit before the planned {cfg['steps']} steps: "
                  f"{', '.join(stopped)}.", ""]
    lines += [f"![HU-shift ablation]({result['figure']})", "",
              f"![HU shift during training]({result['curves']})", ""]
    return "\n".join(lines)


def save_curves(path: Path, result_tables: Sequence[dict], runs: Sequence[dict],
                offset_hu: float, settle_from: int) -> None:
    """PNG: one panel per table, the held-out HU shift of every run over its training
    steps (a colour per variant, a line per seed), the offset and 0 HU dashed, the
    evaluations the table averages shaded."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result_tables), figsize=(5.2 * len(result_tables), 3.8),
                             squeeze=False, layout="constrained")
    colours = dict(zip(SHIFT_VARIANT_KEYS, ("tab:red", "tab:gray", "tab:orange", "tab:blue")))
    variants = {v.key: v for v in SHIFT_VARIANTS}
    for ax, table in zip(axes[0], result_tables):
        for run in (r for r in runs if r["table"] == table["key"]):
            steps = [e["step"] for e in run["evals"]]
            label = (variants[run["variant"]].names(offset_hu)[1]
                     if run["seed"] == table["seeds"][0] else None)
            ax.plot(steps, [e["hu_shift"] for e in run["evals"]], color=colours[run["variant"]],
                    marker=".", linewidth=1, label=label)
        for level in {0.0, offset_hu}:
            ax.axhline(level, color="black", linestyle="--", linewidth=0.7)
        ax.axvspan(settle_from, max([r["planned_steps"] for r in runs] + [settle_from]),
                   color="0.9", zorder=0)
        ax.set_title(table["title"].split(" (")[0], fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out HU shift (HU)")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _train_in_worker(cfg, log_path: str) -> tuple[dict, str]:
    """:func:`train_or_reuse` in a worker process, its terminal output to ``log_path``."""
    with open(log_path, "a") as log:
        return train_or_reuse(cfg, log)


def train_all(configs: Sequence, jobs: int, stream, log_dir: Path) -> list[tuple[dict, str]]:
    """:func:`train_or_reuse` for every config, ``jobs`` at a time (processes; 1: here,
    in order) -> ``(summary, how)`` per config, in order. With several jobs each run's
    terminal output goes to ``log_dir/<run folder name>.log``."""
    if jobs <= 1:
        return [train_or_reuse(cfg, stream) for cfg in configs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    log_dir.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = []
        for cfg in configs:
            name = "-".join(Path(cfg.out).parts[-2:])
            futures.append(pool.submit(_train_in_worker, cfg, str(log_dir / f"{name}.log")))
        results = []
        for cfg, future in zip(configs, futures):
            results.append(future.result())
            print(f"[hu-shift] {cfg.out}: {results[-1][1]}, {results[-1][0]['steps']} steps",
                  file=stream, flush=True)
        return results


def run_shift_ablation(preset: str = "shift", out=None, seeds: Sequence[int] = (0, 1, 2),
                       variants: Sequence[str] = SHIFT_VARIANT_KEYS,
                       tables: Sequence[str] = tuple(SHIFT_TABLES), figure_slice: int = 0,
                       time_limit: bool = True, stream=None, command: Optional[str] = None,
                       quick: bool = False, jobs: int = 1,
                       classical: Sequence[str] = CLASSICAL_METHODS, **overrides) -> dict:
    """The shift ablation (docs/hu-shift.md): train every variant for every seed and table,
    judge each run by its evaluations during the LR decay, check validity, write
    ``ablation.{md,json,png}`` and ``curves.png`` into ``out``.

    ``overrides``: :class:`pdml.training.TrainConfig` fields for every run
    (``nd_offset_hu``: the acquisition offset, the control runs use 0; ``steps``, ...);
    ``quick``: :data:`QUICK_OVERRIDES` first (CI); ``jobs``: runs trained at a time
    (processes); ``classical``: the classical baselines (:func:`classical_baselines`, the
    demo table's), added to the main table. -> the result written to ``ablation.json``.
    """
    from pdml.training import TrainError

    stream = stream if stream is not None else sys.stdout
    started = time.time()
    started_utc = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
    out = Path(out) if out is not None else Path("runs") / (
        time.strftime("%Y%m%d-%H%M%S") + "-hu-shift")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    chosen = [v for v in SHIFT_VARIANTS if v.key in set(variants)]
    tables = list(dict.fromkeys(tables))
    if preset not in SHIFT_PRESETS:
        raise TrainError(f"the shift ablation's preset must be one of {SHIFT_PRESETS}, "
                         f"got {preset!r}")
    if (not chosen or not seeds or not tables or set(variants) - set(SHIFT_VARIANT_KEYS)
            or set(tables) - set(SHIFT_TABLES)):
        raise TrainError(f"variants must be a non-empty subset of {SHIFT_VARIANT_KEYS}, tables "
                         f"of {tuple(SHIFT_TABLES)}, seeds non-empty; got {list(variants)}, "
                         f"{tables}, {seeds}")
    if jobs < 1:
        raise TrainError(f"--jobs must be >= 1, got {jobs}")
    classical = checked_classical(classical)
    values = dict(QUICK_OVERRIDES) if quick else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if jobs > 1 and values.get("threads") is None:
        values["threads"] = 1  # a run per core
    probe = ablation_config(preset, "none", seeds[0], out / "runs", time_limit, **values)
    offset = probe.nd_offset_hu
    items = held_out_slices(probe)  # builds the built-in data once, before any run
    if not 0 <= figure_slice < len(items):
        raise TrainError(f"--figure-slice must be in [0, {len(items)}), got {figure_slice}")
    values["val_slices"] = len(items)  # every evaluation on every held-out slice
    keys, configs = [], []
    for table in tables:
        for seed in seeds:
            for v in chosen:
                extra = dict(values, wavelet=SHIFT_TABLES[table])
                if v.control:
                    extra["nd_offset_hu"] = 0.0
                keys.append((table, seed, v))
                configs.append(ablation_config(preset, v.loss, seed,
                                               out / "runs" / table / f"{v.key}-seed{seed}",
                                               time_limit, **extra))
    out.mkdir(parents=True, exist_ok=True)
    trained = train_all(configs, jobs, stream, out / "logs")

    runs: list[dict] = []
    ld_per_slice: Optional[list] = None
    figure_outputs: dict[str, np.ndarray] = {}
    for (table, seed, v), cfg, done in zip(keys, configs, trained):
        show = table == tables[0] and seed == seeds[0]  # the figure's runs
        run, denoised, ld_rows = train_and_evaluate(cfg, items, stream, f"{table}/{v.key}",
                                                    evaluate=show, trained=done)
        if not run["evals"]:
            raise TrainError(f"{cfg.out}: the run recorded no held-out evaluation")
        window = settle_window(run["evals"], cfg.steps, cfg.decay_steps)
        run.update(table=table, variant=v.key, nd_offset_hu=cfg.nd_offset_hu,
                   window={"steps": [r["step"] for r in window],
                           "mean": {k: float(np.mean([r[k] for r in window])) for k in EVAL_KEYS},
                           "sd": {k: _sd([r[k] for r in window]) for k in EVAL_KEYS}})
        runs.append(run)
        if show:
            ld_per_slice = ld_per_slice or ld_rows
            figure_outputs[v.names(offset)[1]] = denoised[figure_slice]

    result_tables, classical_details = [], []
    for table in tables:
        mine = [r for r in runs if r["table"] == table]
        rows = summarize_shift(mine, chosen, offset, ld_per_slice)
        if table == tables[0]:  # they do not depend on the training settings
            classical_details = add_classical_rows(rows, figure_outputs, items, classical,
                                                   figure_slice, stream)
        validity = validity_check(rows, offset)
        result_tables.append({"key": table, "title": SHIFT_TITLES[table],
                              "wavelet": SHIFT_TABLES[table], "seeds": seeds, "rows": rows,
                              "validity": validity, "claim": shift_verdict(rows, validity)})
    figure, curves = "ablation.png", "curves.png"
    save_figure(out / figure, items[figure_slice], figure_outputs, figure_slice)
    settle_from = probe.steps - probe.decay_steps
    save_curves(out / curves, result_tables, runs, offset, settle_from)
    shared = {k: v for k, v in configs[0].to_dict().items()
              if k not in ("loss", "seed", "out", "tau", "progress", "wavelet")}
    device = _device(probe)
    main = result_tables[0]
    result = {
        "format": FORMAT, "version": VERSION, "kind": "shift",
        "settings": {
            "command": command or f"python -m pdml.experiments.hu_shift --preset {preset}",
            "preset": preset, "quick": quick, "seeds": seeds, "variants": [v.key for v in chosen],
            "tables": tables, "nd_offset_hu": offset, "jobs": jobs,
            "tau": {v.loss: configs[i].resolved_tau for i, (_, _, v) in enumerate(keys)},
            "shared_config": shared, "held_out_slices": len(items),
            "settle_steps": f"{settle_from + 1}-{probe.steps}",
            "figure_slice": figure_slice, "classical": classical,
            "classical_tuning_slices": list(range(0, len(items), TUNE_EVERY)),
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else cpu_name()),
            "cpu_threads": probe.threads or torch.get_num_threads(), "torch": torch.__version__,
            "pdml": __import__("pdml").__version__, "python": platform.python_version(),
            "source": source_commit(), "started_utc": started_utc,
        },
        "rows": main["rows"], "validity": main["validity"], "claim": main["claim"],
        "tables": result_tables, "runs": runs, "classical": classical_details,
        "ld_per_slice": ld_per_slice, "figure": figure, "curves": curves,
        "runtime_s": {"total": time.time() - started,
                      "train_s": {f"{r['table']}/{r['variant']}-seed{r['seed']}": r["train_s"]
                                  for r in runs}},
    }
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    report = shift_markdown_report(result)
    (out / "ablation.md").write_text(report)
    print("\n" + report, file=stream, flush=True)
    print(f"[hu-shift] wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / figure}, "
          f"{out / curves}", file=stream, flush=True)
    return result


def _parser() -> argparse.ArgumentParser:
    from pdml import ops
    from pdml.training import PRECISIONS

    p = argparse.ArgumentParser(
        prog="python -m pdml.experiments.hu_shift",
        description="HU-shift ablation: train GAN only (--loss none), + PatchNCE and + the "
                    "patch-wise metric loss with identical settings on the built-in dataset, "
                    "evaluate on its held-out paired slices, write ablation.md/.json/.png. "
                    "The shift presets train on same-anatomy domains with a known "
                    "acquisition offset, add the 0 HU control and check that the setting "
                    "can discriminate (docs/hu-shift.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(ABLATION_OVERRIDES), default="demo",
                   help="demo: ≤ 30 min on a 2-core CPU; paper: the paper's settings (GPU); "
                        "tiny: seconds (tests); shift: the discriminating setting, ≤ 60 min "
                        "on a 2-core CPU with --jobs 2; shift-gpu: the same on one GPU")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/<time>-hu-shift)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="one run per variant and seed; the table averages over seeds "
                        "(default: 0 1 2 for the shift presets, 0 otherwise)")
    p.add_argument("--variants", nargs="+",
                   choices=tuple(dict.fromkeys(VARIANTS + SHIFT_VARIANT_KEYS)),
                   help=f"default: {' '.join(VARIANTS)}; shift presets: "
                        f"{' '.join(SHIFT_VARIANT_KEYS)} (none-0hu: GAN only at 0 HU, the control)")
    p.add_argument("--figure-slice", type=int, default=0, help="held-out slice in the figure")
    p.add_argument("--classical", nargs="+", choices=CLASSICAL_METHODS,
                   default=list(CLASSICAL_METHODS),
                   help="classical baselines in the table, each tuned once on held-out slices")
    p.add_argument("--no-classical", action="store_true", help="no classical baselines")
    p.add_argument("--steps", type=int, help="override the preset's training steps")
    p.add_argument("--decay-steps", type=int, help="override the LR decay steps")
    p.add_argument("--max-minutes", type=float, help="time limit per run")
    p.add_argument("--no-time-limit", action="store_true", help="no time limit per run")
    p.add_argument("--no-wavelet", action="store_true",
                   help="feed whole images (by default the networks see the wavelet "
                        "high-frequency part and the LD low-frequency part is added back, "
                        "which keeps the global CT numbers by construction); the shift "
                        "presets make one table of each (--tables)")
    shift = p.add_argument_group("shift presets")
    shift.add_argument("--nd-offset-hu", type=float, metavar="HU",
                       help=f"the ND domain's acquisition offset (default "
                            f"{DEFAULT_ND_OFFSET_HU:+g}); the control runs use 0")
    shift.add_argument("--tables", nargs="+", choices=tuple(SHIFT_TABLES),
                       default=list(SHIFT_TABLES),
                       help="no-wavelet: the main table; wavelet: the same with the split on")
    shift.add_argument("--quick", action="store_true",
                       help="a few steps on 64² slices and one seed (CI: it runs, not a result)")
    shift.add_argument("--jobs", type=int,
                       help=f"runs trained at a time (processes, one CPU thread each unless "
                            f"--threads; default {PRESET_JOBS})")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--loss-backend", choices=ops.BACKEND_NAMES)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="CPU intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    from pdml.training import TrainError

    args = _parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("steps", "decay_steps", "max_minutes",
                                               "precision", "loss_backend", "device",
                                               "threads")}
    if args.steps is not None and args.decay_steps is None:
        overrides["decay_steps"] = args.steps // 2
    if args.no_progress:
        overrides["progress"] = False
    command = "python -m pdml.experiments.hu_shift " + " ".join(
        sys.argv[1:] if argv is None else argv)
    shift = args.preset in SHIFT_PRESETS
    try:
        if shift and args.no_wavelet:
            raise TrainError("--no-wavelet: the shift presets make a table without and one "
                             "with the wavelet split; choose them with --tables")
        if not shift and (args.quick or args.nd_offset_hu is not None or args.jobs is not None
                          or args.tables != list(SHIFT_TABLES)):
            raise TrainError("--quick, --nd-offset-hu, --tables and --jobs belong to the "
                             f"shift presets {SHIFT_PRESETS}")
        if args.no_wavelet:
            overrides["wavelet"] = False
        classical = [] if args.no_classical else args.classical
        if shift:
            seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
            run_shift_ablation(args.preset, args.out, seeds, args.variants or SHIFT_VARIANT_KEYS,
                               args.tables, args.figure_slice,
                               time_limit=not args.no_time_limit, command=command.strip(),
                               quick=args.quick,
                               jobs=(args.jobs if args.jobs is not None
                                     else 1 if args.quick else PRESET_JOBS[args.preset]),
                               classical=classical, nd_offset_hu=args.nd_offset_hu,
                               **overrides)
        else:
            run_ablation(args.preset, args.out, args.seeds or [0], args.variants or VARIANTS,
                         args.figure_slice, time_limit=not args.no_time_limit,
                         command=command.strip(), classical=classical, **overrides)
    except TrainError as e:
        print(f"hu_shift: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
