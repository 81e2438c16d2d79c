"""The declared rules applied to the rows (:mod:`pdml.experiments.design`): is the setting
valid, which λ the sweep chooses, and the verdict on each part of the paper's promise
(CT numbers, noise, anatomy, against the traditional denoisers). Each function returns
its numbers and one sentence that says what they show."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from pdml.experiments.design import (LAMBDA_RULE, SHIFT_BOUND_HU, VALID_NOISE_RATIO,
                                     VALID_SHIFT_HU, VERDICT_RULES)
from pdml.experiments.statistics import excludes_zero, paired_difference
from pdml.experiments.tables import per_seed


def _ci(stat: dict, unit: str = " HU", spec: str = ".1f") -> str:
    if math.isnan(stat.get("lo", math.nan)):
        return f"{stat['mean']:{spec}}{unit} (n={stat.get('n', 1)}, no CI)"
    return (f"{stat['mean']:{spec}}{unit} (95 % CI {stat['lo']:{spec}} to {stat['hi']:{spec}}, "
            f"n={stat['n']})")


def validity(gan: dict, control: dict, ld: dict) -> dict:
    """Item 1 of the rules: every GAN-only seed at the offset denoises (noise ≤
    VALID_NOISE_RATIO × the LD input's) and shifts at least VALID_SHIFT_HU above its own
    seed's 0 HU control. Seeds missing from either arm do not count; two are needed."""
    ld_noise = ld["noise_std"]["mean"]
    shift, noise = per_seed(gan, "hu_shift"), per_seed(gan, "noise_std")
    held = per_seed(control, "hu_shift")
    seeds = [s for s in shift if s in held]
    per = [{"seed": s, "noise_ratio": noise[s] / ld_noise, "differential_hu": shift[s] - held[s],
            "denoises": noise[s] <= VALID_NOISE_RATIO * ld_noise,
            "shifts": shift[s] - held[s] >= VALID_SHIFT_HU} for s in seeds]
    valid = len(per) >= 2 and all(p["denoises"] and p["shifts"] for p in per)
    failing = [p["seed"] for p in per if not (p["denoises"] and p["shifts"])]
    ratios = [p["noise_ratio"] for p in per]
    diffs = [p["differential_hu"] for p in per]
    measured = (f"GAN only over its 0 HU control: {min(diffs, default=math.nan):+.1f} to "
                f"{max(diffs, default=math.nan):+.1f} HU; noise {min(ratios, default=math.nan):.2f}"
                f"–{max(ratios, default=math.nan):.2f}× the LD input's ({len(per)} seeds)")
    if valid:
        statement = f"Valid for both halves: {measured}."
    else:
        why = "fewer than two seeds" if len(per) < 2 else f"seeds {failing} fail"
        statement = f"Not valid ({why}): {measured}; no verdict on CT numbers."
    return {"valid": valid, "rule": VERDICT_RULES["validity"], "per_seed": per,
            "failing_seeds": failing, "statement": statement}


def choose_lambda(rows: Sequence[dict], ld: dict) -> dict:
    """The declared choice of λ (:data:`~pdml.experiments.design.LAMBDA_RULE`) among the
    sweep rows of one patch loss (each an arm at one λ)."""
    ld_noise = ld["noise_std"]["mean"]
    scored = [r for r in rows if "hu_shift" in r]
    if not scored:
        raise ValueError("rows: no sweep arm has results")
    denoising = [r for r in scored if r["noise_std"]["mean"] <= VALID_NOISE_RATIO * ld_noise]
    pool = denoising or scored
    best = min(pool, key=lambda r: (r["abs_hu_shift"]["mean"], r["lambda_metric"]))
    table = [{"lambda": r["lambda_metric"], "abs_hu_shift": r["abs_hu_shift"]["mean"],
              "noise_ratio": r["noise_std"]["mean"] / ld_noise,
              "denoises": r in denoising} for r in scored]
    statement = (f"λ = {best['lambda_metric']:g}: mean |HU shift| "
                 f"{best['abs_hu_shift']['mean']:.1f} HU, noise "
                 f"{best['noise_std']['mean'] / ld_noise:.2f}× the LD input's"
                 + ("" if denoising else " (no λ reached the noise bound: flagged)"))
    return {"loss": best["loss"], "lambda": best["lambda_metric"],
            "denoising_lambdas": [r["lambda_metric"] for r in denoising],
            "flagged": not denoising, "rule": LAMBDA_RULE, "table": table,
            "statement": statement}


def _paired(metric: dict, gan: dict, key: str) -> Optional[dict]:
    """Paired ``key`` difference metric − GAN only over the seeds both arms have."""
    a, b = per_seed(metric, key), per_seed(gan, key)
    seeds = [s for s in a if s in b]
    if len(seeds) < 2:
        return None
    out = paired_difference([a[s] for s in seeds], [b[s] for s in seeds])
    out["seeds"] = seeds
    return out


def verdict(metric: dict, gan: dict, ld: dict, classical: Sequence[dict], valid: bool) -> dict:
    """The verdict on each part of the promise for one metric-learning arm ``metric``
    against GAN only ``gan`` at the same offset, the LD input ``ld`` and the classical rows
    (rules: :data:`~pdml.experiments.design.VERDICT_RULES`)."""
    ld_noise = ld["noise_std"]["mean"]
    diff = _paired(metric, gan, "abs_hu_shift")
    where = excludes_zero(diff) if diff is not None else "spans"
    abs_shift = metric["abs_hu_shift"]
    if not valid:
        ct = "no verdict"
    elif abs_shift["hi"] <= SHIFT_BOUND_HU and where == "below":
        ct = "reproduced"
    elif where == "below":
        ct = "partly"
    else:
        ct = "not reproduced"
    diff_text = ("not computable (fewer than two paired seeds)" if diff is None else
                 f"{diff['mean']:+.1f} HU (95 % CI {diff['lo']:+.1f} to {diff['hi']:+.1f}, "
                 f"p = {diff['p']:.3g}, {len(diff['seeds'])} paired seeds)")
    parts = {"ct_numbers": {
        "verdict": ct, "rule": VERDICT_RULES["ct_numbers"], "paired_difference": diff,
        "statement": f"{ct}: mean |HU shift| {_ci(abs_shift)}; paired difference to GAN only "
                     f"{diff_text}" + ("" if valid else " (the setting is not valid)")}}
    noise = metric["noise_std"]
    noise_ok = noise["hi"] <= VALID_NOISE_RATIO * ld_noise
    parts["noise"] = {
        "verdict": "reproduced" if noise_ok else "not reproduced",
        "rule": VERDICT_RULES["noise"], "ratio": noise["mean"] / ld_noise,
        "statement": f"{'reproduced' if noise_ok else 'not reproduced'}: noise std "
                     f"{_ci(noise)} against the LD input's {ld_noise:.1f} HU "
                     f"({noise['mean'] / ld_noise:.2f}×)"}
    kept = all(metric[k]["lo"] >= ld[k]["mean"] for k in ("psnr", "ssim"))
    parts["anatomy"] = {
        "verdict": "kept" if kept else "not kept", "rule": VERDICT_RULES["anatomy"],
        "statement": f"{'kept' if kept else 'not kept'}: PSNR {_ci(metric['psnr'], ' dB', '.2f')} "
                     f"against the LD input's {ld['psnr']['mean']:.2f} dB; SSIM "
                     f"{_ci(metric['ssim'], '', '.4f')} against {ld['ssim']['mean']:.4f}"}
    if classical:
        best = max(classical, key=lambda r: r["psnr"]["mean"])
        better = all(metric[k]["lo"] > best[k]["mean"] for k in ("psnr", "ssim"))
        parts["classical"] = {
            "verdict": "better" if better else "not better", "rule": VERDICT_RULES["classical"],
            "best": best["key"],
            "statement": f"{'better' if better else 'not better'}: PSNR "
                         f"{metric['psnr']['mean']:.2f} dB and SSIM {metric['ssim']['mean']:.4f} "
                         f"against {best['title']}'s {best['psnr']['mean']:.2f} dB and "
                         f"{best['ssim']['mean']:.4f}"}
    return {"arm": metric["key"], "title": metric["title"], "parts": parts}
