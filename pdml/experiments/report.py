"""The experiment's report: ``ablation.md`` (the declared rules, the verdicts, the tables
with per-seed values and confidence intervals) and its figures: ``tradeoff.png`` (HU
shift against noise per λ, beside GAN only, the classical methods and the supervised
bound), ``curves.png`` (each main-table run's held-out HU shift over its steps) and
``examples.png`` (one held-out slice through every method)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from pdml.experiments.provenance import commit_label

FIGURES = {"tradeoff": "tradeoff.png", "curves": "curves.png", "examples": "examples.png"}


def _earlier_wall(doc: dict) -> str:
    """", N min in all with the earlier invocations (M runs restored from their
    records)" when earlier invocations wrote this folder; else ""."""
    earlier = doc.get("earlier_elapsed_s", 0.0)
    if not earlier:
        return ""
    restored = sum(r["how"] == "restored" for r in doc["runs"])
    note = f" ({restored} runs restored from their records)" if restored else ""
    return f", {(earlier + doc['elapsed_s']) / 60:.0f} min in all with the earlier ones{note}"


def _num(stat: dict, spec: str, ci: bool = False) -> str:
    text = format(stat["mean"], spec)
    if not math.isnan(stat.get("sd", math.nan)):
        text += f" ± {stat['sd']:{spec.lstrip('+')}}"
    if ci and not math.isnan(stat.get("lo", math.nan)):
        text += f" [{stat['lo']:{spec}}, {stat['hi']:{spec}}]"
    return text


def _row_cells(row: dict, ld_noise: float) -> list[str]:
    noise = row["noise_std"]["mean"]
    return [_num(row["hu_shift"], "+.1f", ci=True), _num(row["abs_hu_shift"], ".1f", ci=True),
            _num(row["noise_std"], ".1f") + f" ({noise / ld_noise:.2f}×)",
            _num(row["psnr"], ".2f"), _num(row["ssim"], ".4f")]


def _table(title_rows: Sequence[dict], ld: dict, classical: Sequence[dict] = ()) -> list[str]:
    head = ["", "n", "HU shift (HU) [95 % CI]", "abs HU shift [95 % CI]",
            "noise std (HU, × LD)", "PSNR (dB)", "SSIM", "not plateaued", "excluded",
            "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ld_noise = ld["noise_std"]["mean"]
    lines.append("| " + " | ".join([ld["title"], "–", *_row_cells(ld, ld_noise), "–", "–", "–"])
                 + " |")
    for row in title_rows:
        if "hu_shift" not in row:
            continue
        lines.append("| " + " | ".join([
            row["title"], str(row["hu_shift"]["n"]), *_row_cells(row, ld_noise),
            f"{len(row['not_plateaued'])}" + (f" ({row['not_plateaued']})" if row["not_plateaued"] else ""),
            str(len(row["excluded"])), f"{row['train_s'] / 60:.0f} min"]) + " |")
    for row in classical:
        lines.append("| " + " | ".join([row["title"], "–", *_row_cells(row, ld_noise), "–", "–",
                                        "–"]) + " |")
    return lines


def _per_seed_table(rows: Sequence[dict], key: str, spec: str) -> list[str]:
    seeds = sorted({s for r in rows for s in r["seeds"]})
    lines = ["| | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|" + "---|" * (len(seeds) + 1)]
    for row in rows:
        values = dict(zip(row["seeds"], row[key]["per_seed"])) if key in row else {}
        lines.append(f"| {row['title']} | " + " | ".join(
            format(values[s], spec) if s in values else "–" for s in seeds) + " |")
    return lines


def _verdict_lines(verdicts: Sequence[dict]) -> list[str]:
    lines = []
    for v in verdicts:
        lines.append(f"**{v['title']}**")
        lines.append("")
        for part, name in (("ct_numbers", "CT numbers"), ("noise", "noise"),
                           ("anatomy", "anatomy"), ("classical", "against TV / NLM / BM3D")):
            if part in v["parts"]:
                lines.append(f"- {name}: {v['parts'][part]['statement']}")
        lines.append("")
    return lines


def markdown(doc: dict) -> str:
    s, env, tables = doc["settings"], doc["environment"], doc["tables"]
    main, sweep, paper = tables["main"], tables["sweep"], tables["paper"]
    rules = s["rules"]
    commits = sorted({c for r in doc["runs"] for c in
                      [commit_label(x) for x in r["provenance"].get("sessions", [])]})
    setting = next((r["config"] for r in doc["runs"] if r["setting"] == "shift"),
                   s["arm_settings"]["shift"])
    lines = [
        "# HU-shift experiment: does patch-wise metric learning keep CT numbers where a GAN "
        "shifts them?", "",
        f"`{s['command']}`", "",
        f"- {env['device']}, torch {env['torch']}, pdml {env['pdml']}; finished "
        f"{env['utc']}; {doc['elapsed_s'] / 60:.0f} min wall for this invocation"
        f"{_earlier_wall(doc)}; "
        f"{len(doc['runs'])} runs, "
        f"{sum(r['train_s'] for r in doc['runs']) / 60:.0f} min of training in total; "
        f"runs trained at commit(s) {', '.join(commits)}",
        f"- setting: built-in same-anatomy data at {setting['builtin_size']}², ND = the "
        f"noiseless reconstruction {s['nd_offset_hu']:+g} HU (controls 0 HU), wavelet split "
        f"off, discriminator input {setting['d_input']}, generator width "
        f"{setting['features']}, {setting['crop']}² crops, batch {setting['batch_size']}, "
        f"{setting['steps']} steps (LR decay over the last {setting['decay_steps']}), "
        f"held-out evaluation every {setting['eval_every']} steps on "
        f"{setting['val_slices']} slices; pdml-train's settings of every run in ablation.json",
        "",
        "## The rules, declared before the runs", "",
        f"- endpoint: a run's value is the mean over its last "
        f"{rules['window_fraction']:.0%} of held-out evaluations; a run whose HU shift moves "
        f"by more than {rules['plateau_hu']:g} HU across that window counts as not plateaued "
        f"(counted, not excluded); runs stopped by a time cap are excluded",
        f"- validity: {rules['validity']}",
        f"- choice of λ: {rules['lambda_choice']}",
        f"- CT numbers: {rules['ct_numbers']}",
        f"- noise: {rules['noise']}", f"- anatomy: {rules['anatomy']}",
        f"- traditional denoisers: {rules['classical']}", "",
        "## Verdict", "",
        f"Validity: {main['validity']['statement'] if main['validity'] else 'not checked'}", "",
        *_verdict_lines(main["verdicts"]),
        "## λ sweep (seeds " + ", ".join(str(x) for x in s["plan"]["sweep_seeds"]) + ")", "",
        *_table(sweep["rows"], sweep["ld"]), "",
        *(f"- {name}: {doc['lambda_choice'][loss]['statement']}"
          for loss, name in (("dml", "metric learning"), ("patchnce", "PatchNCE"))
          if loss in doc["lambda_choice"]), "",
        f"![HU shift against noise per λ]({FIGURES['tradeoff']})", "",
        "## Main table (fresh seeds " + ", ".join(str(x) for x in s["plan"]["confirm_seeds"])
        + ")", "",
        *_table(main["rows"], main["ld"], main["classical"]), "",
        "Classical methods: strength tuned once on every second held-out slice, scored on all "
        "of them (favourable to them).", "",
        "HU shift per seed (HU):", "", *_per_seed_table(main["rows"], "hu_shift", "+.1f"), "",
        "Noise std per seed (HU):", "", *_per_seed_table(main["rows"], "noise_std", ".1f"), "",
        f"![HU shift during training]({FIGURES['curves']})", "",
        f"![one held-out slice]({FIGURES['examples']})", "",
        "## The paper's own design (wavelet split on, the discriminator sees the image)", "",
        *_table(paper["rows"], paper["ld"]), "",
        f"Validity: {paper['validity']['statement'] if paper['validity'] else 'not checked'}", "",
        *_verdict_lines(paper["verdicts"]),
    ]
    return "\n".join(lines) + "\n"


def _plot_setup():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_tradeoff(doc: dict, path: Path) -> None:
    """Left: mean HU shift against mean noise (× the LD input's) of every sweep arm (a
    marker per λ, ± sd bars), GAN only, the supervised bound, the classical methods and the
    LD input. Right: PSNR against λ per patch loss, GAN only and the best classical as
    lines."""
    plt = _plot_setup()
    sweep, main = doc["tables"]["sweep"], doc["tables"]["main"]
    ld = sweep["ld"]
    ld_noise = ld["noise_std"]["mean"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    colours = {"dml": "tab:blue", "patchnce": "tab:orange", "none": "tab:red"}
    names = {"dml": "metric learning", "patchnce": "PatchNCE", "none": "GAN only"}
    for loss in ("dml", "patchnce"):
        rows = sorted((r for r in sweep["rows"] if r["loss"] == loss and "hu_shift" in r),
                      key=lambda r: r["lambda_metric"])
        if not rows:
            continue
        x = [r["noise_std"]["mean"] / ld_noise for r in rows]
        y = [r["hu_shift"]["mean"] for r in rows]
        ax.errorbar(x, y, yerr=[np.nan_to_num(r["hu_shift"]["sd"]) for r in rows],
                    color=colours[loss], marker="o", capsize=2, label=names[loss] + " (sweep)")
        for xi, yi, r in zip(x, y, rows):
            ax.annotate(f"λ={r['lambda_metric']:g}", (xi, yi), fontsize=7,
                        textcoords="offset points", xytext=(4, 3))
        bx.plot([r["lambda_metric"] for r in rows], [r["psnr"]["mean"] for r in rows],
                color=colours[loss], marker="o", label=names[loss])
    others = [(r, colours["none"], "s", f"GAN only ({r['role']})") for r in sweep["rows"] + main["rows"]
              if r["loss"] == "none" and r["nd_offset_hu"] != 0 and not r["supervised"]
              and "hu_shift" in r]
    others += [(r, "tab:purple", "D", "supervised bound") for r in main["rows"] if r["supervised"]
               and "hu_shift" in r]
    others += [(r, "tab:green", "^", r["title"].split(",")[0]) for r in main["classical"]]
    others += [(ld, "black", "x", "LD input")]
    for r, colour, marker, label in others:
        ax.scatter([r["noise_std"]["mean"] / ld_noise], [r["hu_shift"]["mean"]], color=colour,
                   marker=marker, label=label, zorder=3)
    ax.axhline(0, color="0.5", linewidth=0.7)
    ax.axhline(doc["settings"]["nd_offset_hu"], color="0.5", linewidth=0.7, linestyle="--")
    ax.axvline(0.8, color="0.5", linewidth=0.7, linestyle=":")
    ax.set_xlabel("held-out noise std (× the LD input's)")
    ax.set_ylabel("held-out HU shift (HU)")
    ax.legend(fontsize=7)
    ax.set_title("CT numbers against noise (mean over seeds)", fontsize=9)
    for r, colour, label in [(r, colours["none"], "GAN only") for r in sweep["rows"]
                             if r["loss"] == "none" and "psnr" in r] + \
            [(r, "tab:green", r["title"].split(",")[0]) for r in main["classical"][-1:]] + \
            [(ld, "black", "LD input")]:
        bx.axhline(r["psnr"]["mean"], color=colour, linewidth=0.8, linestyle="--", label=label)
    bx.set_xscale("log")
    bx.set_xlabel("λ of the patch loss")
    bx.set_ylabel("held-out PSNR (dB)")
    bx.legend(fontsize=7)
    bx.set_title("anatomy: PSNR against the noiseless truth", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curves(doc: dict, path: Path) -> None:
    """The held-out HU shift of every main-table run over its steps (a colour per arm, a
    line per seed), the endpoint windows shaded."""
    plt = _plot_setup()
    main = doc["tables"]["main"]
    keys = [r["key"] for r in main["rows"] if "hu_shift" in r]
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    runs = [r for r in doc["runs"] if r["role"] == "main" and r["evals"]]
    for i, key in enumerate(keys):
        title = next(r["title"] for r in main["rows"] if r["key"] == key)
        for j, run in enumerate(r for r in runs if r["arm"] == key):
            ax.plot([e["step"] for e in run["evals"]], [e["hu_shift"] for e in run["evals"]],
                    color=cmap(i % 10), linewidth=0.8, alpha=0.7, label=title if j == 0 else None)
    windows = [r["values"]["window_steps"] for r in runs if r["values"]]
    if windows:
        ax.axvspan(min(w[0] for w in windows), max(w[-1] for w in windows), color="0.9", zorder=0)
    ax.axhline(0, color="0.5", linewidth=0.7)
    ax.axhline(doc["settings"]["nd_offset_hu"], color="0.5", linewidth=0.7, linestyle="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out HU shift (HU)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def example_images(doc: dict, items: Sequence, out: Path, index: int = 0
                   ) -> list[tuple[str, np.ndarray]]:
    """``(title, image [H, W] HU)`` of held-out slice ``index``: the LD input, then the
    first seed's run of each main-table arm at the offset whose last checkpoint is kept (run
    folders relative to the experiment's folder ``out``; an arm with none is left out),
    then the classical methods at their tuned strengths."""
    import torch

    from pdml import classical
    from pdml.inference import generator_from_checkpoint
    from pdml.training import denoise_slices, load_checkpoint

    main = doc["tables"]["main"]
    images = [("LD input", items[index].ld)]
    device = torch.device("cpu")
    for row in main["rows"]:
        if "hu_shift" not in row or (row["nd_offset_hu"] == 0 and not row["supervised"]):
            continue
        runs = sorted((r for r in doc["runs"] if r["role"] == "main" and r["arm"] == row["key"]),
                      key=lambda r: r["seed"])
        kept = [(r, Path(out) / r["run_dir"] / "checkpoints" / "last.pt") for r in runs]
        kept = [(r, path) for r, path in kept if path.exists()]
        if not kept:  # results kept without the weights (pdml.experiments.runner)
            continue
        run, path = kept[0]
        generator, cfg = generator_from_checkpoint(load_checkpoint(path), device)
        images.append((f"{row['title']} (seed {run['seed']})",
                       denoise_slices(generator, [items[index]], cfg, device)[0]))
    for row in doc["classical"]:
        images.append((row["name"], classical.denoise(row["method"], items[index].ld,
                                                      row["strength"])))
    return images


def save_examples(images: Sequence[tuple[str, np.ndarray]], truth: np.ndarray, path: Path) -> None:
    """Top: the truth and every image in the soft-tissue window; bottom: each image minus
    the truth in [-100, 100] HU, titled with its HU shift and noise (homogeneous ROIs)."""
    plt = _plot_setup()
    from pdml import metrics
    from pdml.training import DISPLAY_WINDOW

    cols = len(images) + 1
    fig, axes = plt.subplots(2, cols, figsize=(2.3 * cols, 5.0), layout="constrained")
    lo, hi = DISPLAY_WINDOW
    axes[0, 0].imshow(truth, cmap="gray", vmin=lo, vmax=hi)
    axes[0, 0].set_title("noiseless truth", fontsize=7)
    axes[1, 0].axis("off")
    diff = None
    for col, (title, image) in enumerate(images, start=1):
        axes[0, col].imshow(image, cmap="gray", vmin=lo, vmax=hi)
        axes[0, col].set_title(title, fontsize=7)
        shift = float(metrics.hu_shift(image, truth)[0])
        noise = float(metrics.noise_std(image, truth)[0])
        diff = axes[1, col].imshow(image - truth, cmap="RdBu_r", vmin=-100, vmax=100)
        axes[1, col].set_title(f"shift {shift:+.1f}, noise {noise:.1f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if diff is not None:
        fig.colorbar(diff, ax=axes[1, -1], fraction=0.046, pad=0.02, label="− truth (HU)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(doc: dict, items: Sequence, out: Path) -> dict:
    """Write ``ablation.md`` and the figures into ``out``; -> ``{figure: file name}``."""
    out = Path(out)
    save_tradeoff(doc, out / FIGURES["tradeoff"])
    save_curves(doc, out / FIGURES["curves"])
    save_examples(example_images(doc, items, out), items[0].nd, out / FIGURES["examples"])
    (out / "ablation.md").write_text(markdown(doc))
    return dict(FIGURES)
