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
}
# config keys that may differ between an interrupted invocation and its repetition
_EXECUTION_ONLY = ("progress", "threads")
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
    cfg = make_config(preset, **values)
    if not time_limit:
        cfg.max_minutes = None
    return cfg


def held_out_slices(cfg) -> list:
    """Every paired slice of the built-in test split at the run's size, as
    :class:`pdml.training.ValItem` (``ld``, ``nd`` = the truth, float32 ``[H, W]`` HU)."""
    from pdml.data import builtin_dataset
    from pdml.training import ValItem

    ds = builtin_dataset(size=cfg.builtin_size, progress=cfg.progress)
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
    commit = s["source"]["commit"] or "unknown"
    if s["source"]["pdml_modified"]:
        commit += " (pdml/ modified locally)"
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
        *([f"- classical baselines ({', '.join(s['classical'])}): strength tuned once on "
           f"held-out slices {s['classical_tuning_slices']} (highest mean PSNR against the "
           f"truth over the grid of pdml.experiments.classical), then scored on all held-out "
           f"slices like the networks"] if s.get("classical") else []),
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
    minus the truth (HU) with its HU shift and noise in the title."""
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
    classical = list(dict.fromkeys(classical))
    if any(m not in CLASSICAL_METHODS for m in classical):
        raise TrainError(f"classical must be a subset of {CLASSICAL_METHODS}, got {classical}")
    if "bm3d" in classical and importlib.util.find_spec("bm3d") is None:
        # before any training: the baselines run last
        raise TrainError("--classical bm3d needs the optional bm3d package (non-commercial "
                         "licence): pip install 'pdml[classical]', or leave it out "
                         "(--classical tv nlm)")
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
        print(f"[hu-shift] training --loss {loss} seed {seed} -> {cfg.out}", file=stream,
              flush=True)
        t0 = time.time()
        summary, how = train_or_reuse(cfg, stream)
        t1 = time.time()
        denoised, per_slice, ld_rows = evaluate_run(Path(cfg.out), items, _device(cfg))
        t2 = time.time()
        if ld_per_slice is None:
            ld_per_slice = ld_rows
        if seed == seeds[0]:
            figure_outputs[loss] = denoised[figure_slice]
        runs.append({
            "loss": loss, "seed": seed, "run_dir": str(cfg.out), "how": how,
            "tau": cfg.resolved_tau, "steps": summary["steps"],
            "planned_steps": summary["planned_steps"],
            "stopped_early": bool(summary["stopped_early"]),
            "train_s": float(summary.get("total_elapsed_s", summary["elapsed_s"])),
            "wall_s": {"train": t1 - t0, "evaluate": t2 - t1},
            "img_per_s": summary.get("img_per_s"), "cpu_threads": summary.get("cpu_threads"),
            "per_slice": per_slice,
        })
        print(f"[hu-shift] --loss {loss} seed {seed}: {how}, {summary['steps']} steps, "
              f"train {t1 - t0:.0f} s, evaluate {t2 - t1:.0f} s", file=stream, flush=True)

    rows = summarize(runs, ld_per_slice)
    classical_details: list[dict] = []
    if classical:
        t0 = time.time()
        classical_rows, classical_details, classical_images = classical_baselines(items, classical)
        rows += classical_rows
        for row, images in zip(classical_rows, classical_images):
            figure_outputs[CLASSICAL_SHORT_NAMES[row["key"]]] = images[figure_slice]
        print(f"[hu-shift] classical baselines {', '.join(classical)}: tuned and scored in "
              f"{time.time() - t0:.0f} s", file=stream, flush=True)
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


def _parser() -> argparse.ArgumentParser:
    from pdml import ops
    from pdml.training import PRECISIONS

    p = argparse.ArgumentParser(
        prog="python -m pdml.experiments.hu_shift",
        description="HU-shift ablation: train GAN only (--loss none), + PatchNCE and + the "
                    "patch-wise metric loss with identical settings on the built-in dataset, "
                    "evaluate on its held-out paired slices, write ablation.md/.json/.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(ABLATION_OVERRIDES), default="demo",
                   help="demo: ≤ 30 min on a 2-core CPU; paper: the paper's settings (GPU); "
                        "tiny: seconds (tests)")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/<time>-hu-shift)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="one run per variant and seed; the table averages over seeds")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
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
                        "which keeps the global CT numbers by construction)")
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
    if args.no_wavelet:
        overrides["wavelet"] = False
    command = "python -m pdml.experiments.hu_shift " + " ".join(
        sys.argv[1:] if argv is None else argv)
    try:
        run_ablation(args.preset, args.out, args.seeds, args.variants, args.figure_slice,
                     time_limit=not args.no_time_limit, command=command.strip(),
                     classical=[] if args.no_classical else args.classical, **overrides)
    except TrainError as e:
        print(f"hu_shift: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
