"""The HU-shift experiment's design, fixed before any run (docs/hu-shift.md): the setting,
the arms and their seeds, the λ sweep, the endpoint, the plateau rule and the thresholds
of the verdict. Nothing here trains or reads results; :mod:`pdml.experiments.ablation`
runs what this module declares, :mod:`pdml.experiments.verdicts` applies its rules.

The setting (``SHIFT_SETTING``): the built-in data's same-anatomy layout (LD = simulated
low dose of a pool of real slices, ND = the same pool's noiseless reconstruction, drawn
independently, with a known acquisition offset of :data:`ND_OFFSET_HU`); whole images
(wavelet split off) centred on water; a discriminator that sees the image, its 3×3
high-pass and its local mean in a soft-tissue window as three channels
(``d_input="image+highpass+lowpass"``: noise, and a CT-number offset it keeps seeing once
the noise is gone).
The paper's own design (``PAPER_SETTING``: wavelet split on, the image alone for D) is
the second table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

ND_OFFSET_HU = 100.0
"""The ND domain's known acquisition offset (HU) of the main arms; the controls use 0."""

PAPER_LAMBDA = 0.1
"""The paper's weight of the patch-wise metric loss (λ_metric)."""

LAMBDA_GRID = (0.1, 0.3, 1.0, 3.0)
"""The sweep's λ values for metric learning and PatchNCE at the offset (log-spaced around the
paper's 0.1: from a light touch to a patch loss that outweighs the adversarial one)."""

SWEEP_SEEDS = (120, 121, 122)
"""The λ sweep's seeds; the confirmation never reuses them (no selection on reported seeds)."""

CONFIRM_SEEDS = tuple(range(20, 30))
"""Fresh seeds of the main arms (no earlier run of any setting used them): GAN only at the
offset and at 0 HU, metric learning at the paper's λ and at the chosen λ. A run of seed
``s`` in any arm starts from the same initial G and D and draws the same crops
(pdml-train's seeding): arms are paired by seed."""

SMALL_ARM_SEEDS = CONFIRM_SEEDS[:5]
"""Seeds of metric learning at 0 HU (chosen λ) and of PatchNCE at the offset (its chosen λ)."""

SUPERVISED_SEEDS = CONFIRM_SEEDS[:3]
"""Seeds of the supervised upper bound (paired L1 to the noiseless truth, same G and steps)."""

PAPER_TABLE_SEEDS = (10, 11, 12)
"""Seeds of the second table, the paper's own design. Its setting does not involve the main
table's discriminator view, so these are the runs of the earlier experiment
(benchmarks/results/hu-shift-20261206), which a new results folder may restore from that
folder's ``ablation.json`` instead of training them again."""

# ---------------------------------------------------------------------------- the rules
WINDOW_FRACTION = 0.25
"""A run's value of each metric: the mean over its last 25 % of held-out evaluations."""

PLATEAU_HU = 10.0
"""A run whose HU shift moves by more than this across its window (least-squares line,
first to last evaluation of the window) is counted as not plateaued."""

VALID_NOISE_RATIO = 0.8
"""Validity and the noise verdict: a network denoises when its noise std is at most this
fraction of the LD input's."""

VALID_SHIFT_HU = 50.0
"""Validity: GAN only at the offset must shift at least this much more than its own seed's
0 HU control, for every seed (with the noise condition above, for every seed too)."""

SHIFT_BOUND_HU = 20.0
"""CT numbers "reproduced": the 95 % CI of metric learning's mean |HU shift| ends at or
below this, and the paired difference to GAN only excludes 0."""

CONFIDENCE = 0.95
"""Every interval: two-sided Student-t confidence intervals of means over seeds."""

LAMBDA_RULE = (
    f"on the sweep seeds {list(SWEEP_SEEDS)} only: among the λ of {list(LAMBDA_GRID)} whose "
    f"mean noise std is at most {VALID_NOISE_RATIO:g}× the LD input's, the one with the "
    f"smallest mean |HU shift| (a tie: the smaller λ); when no λ denoises, the smallest mean "
    f"|HU shift| of all, flagged")
"""The declared choice of λ, one per patch loss (metric learning, PatchNCE)."""

VERDICT_RULES = {
    "validity": (f"every GAN-only seed at {ND_OFFSET_HU:+g} HU has noise ≤ "
                 f"{VALID_NOISE_RATIO:g}× the LD input's and an HU shift ≥ "
                 f"{VALID_SHIFT_HU:g} HU above its own seed's 0 HU control; otherwise no "
                 f"verdict on CT numbers"),
    "ct_numbers": (f"reproduced when metric learning's mean |HU shift| has a {CONFIDENCE:.0%} "
                   f"CI upper end ≤ {SHIFT_BOUND_HU:g} HU and the paired difference "
                   f"|shift(metric)| − |shift(GAN only)| (same seeds) has a CI that excludes "
                   f"0 below; partly when only that difference excludes 0; not reproduced "
                   f"otherwise"),
    "noise": (f"reproduced when the CI upper end of metric learning's mean noise std is ≤ "
              f"{VALID_NOISE_RATIO:g}× the LD input's; not reproduced otherwise"),
    "anatomy": ("kept when the CI lower ends of metric learning's mean PSNR and SSIM against "
                "the noiseless truth are ≥ the LD input's; not kept otherwise"),
    "classical": ("better than the traditional denoisers when the CI lower ends of its mean "
                  "PSNR and SSIM are above the best classical method's (TV, NLM, BM3D, "
                  "each tuned on half the held-out slices); not better otherwise"),
}
"""The verdict's rules, per part, written before the runs (README, docs/hu-shift.md)."""

# ---------------------------------------------------------------------------- settings
SHIFT_SETTING: dict[str, Any] = dict(
    builtin_layout="same-anatomy", builtin_size=128, crop_margin=8, wavelet=False,
    input_center_hu=0.0, d_input="image+highpass+lowpass", arch="pdml", features=16, crop=32,
    batch_size=4, lr=1e-4, steps=1200, decay_steps=400, eval_every=100, ckpt_every=200,
    log_every=50, val_slices=10, eval_figures=False, compare_classical=False,
    max_minutes=None)
"""The main table's training settings on top of pdml-train's demo preset. 1200 steps with
the LR decaying over the last 400: the window (steps 1000-1200) lies in the decay, where
runs settle. Adam at 1e-4 for G and D: at the demo's 2e-4 a GAN-only run's CT numbers
swing by hundreds of HU and may end back at the LD input's (the pilot in
docs/hu-shift.md).
Evaluations every 100 steps on all 10 held-out slices (figures off: they cost more than
the metrics). The soft-tissue low-pass view of D: with the image and its high-pass alone, 2
of 10 GAN-only seeds ended under the validity margin (benchmarks/results/hu-shift-20261206);
with it, every pilot seed shifted by at least 60 HU (the pilot in docs/hu-shift.md)."""

PAPER_SETTING: dict[str, Any] = dict(SHIFT_SETTING, wavelet=True, d_input="image")
"""The paper's own design: the wavelet split on (the input's low band is added back) and
a discriminator that sees the image."""

SETTINGS = {"shift": SHIFT_SETTING, "paper": PAPER_SETTING}


@dataclass(frozen=True)
class Arm:
    """One arm: a loss at a weight and an ND offset, trained for each of ``seeds``.

    ``loss``: "none" (GAN only), "dml" (metric learning), "patchnce"; ``lambda_metric``
    its weight (None for GAN only); ``supervised``: the paired L1 bound instead;
    ``setting``: a key of :data:`SETTINGS`; ``role``: "sweep", "main" or "paper".
    """

    loss: str
    lambda_metric: Optional[float]
    nd_offset_hu: float
    seeds: tuple
    setting: str = "shift"
    role: str = "main"
    supervised: bool = False

    @property
    def key(self) -> str:
        """A name for folders and tables, e.g. ``dml-l0.3``, ``none-0hu``, ``supervised``."""
        if self.supervised:
            return "supervised"
        name = self.loss if self.lambda_metric is None else f"{self.loss}-l{self.lambda_metric:g}"
        return name + ("-0hu" if self.nd_offset_hu == 0 else "")

    @property
    def title(self) -> str:
        """The arm's row title in the tables."""
        if self.supervised:
            return "supervised bound (paired L1)"
        what = {"none": "GAN only", "dml": "metric learning", "patchnce": "PatchNCE"}[self.loss]
        weight = "" if self.lambda_metric is None else f" λ={self.lambda_metric:g}"
        at = f"{self.nd_offset_hu:+g} HU" if self.nd_offset_hu else "0 HU (control)"
        return f"{what}{weight}, {at}"

    def overrides(self, seed: int) -> dict[str, Any]:
        """pdml-train settings of this arm's run of ``seed`` (on top of its setting)."""
        values: dict[str, Any] = dict(SETTINGS[self.setting], seed=seed,
                                      nd_offset_hu=self.nd_offset_hu, loss=self.loss,
                                      supervised=self.supervised)
        if self.lambda_metric is not None:
            values["lambda_metric"] = self.lambda_metric
        return values


@dataclass(frozen=True)
class Plan:
    """Seeds and λ grid of one preset (the full experiment, or a small one for tests)."""

    lambda_grid: tuple = LAMBDA_GRID
    sweep_seeds: tuple = SWEEP_SEEDS
    confirm_seeds: tuple = CONFIRM_SEEDS
    small_arm_seeds: tuple = SMALL_ARM_SEEDS
    supervised_seeds: tuple = SUPERVISED_SEEDS
    paper_seeds: tuple = PAPER_TABLE_SEEDS

    def first_arms(self) -> list[Arm]:
        """The arms that do not depend on the sweep's choice, sweep first (so the choice
        is made as early as possible)."""
        off = ND_OFFSET_HU
        arms = [Arm("none", None, off, self.sweep_seeds, role="sweep")]
        arms += [Arm(loss, lam, off, self.sweep_seeds, role="sweep")
                 for loss in ("dml", "patchnce") for lam in self.lambda_grid]
        arms += [Arm("none", None, off, self.confirm_seeds),
                 Arm("none", None, 0.0, self.confirm_seeds),
                 Arm("dml", PAPER_LAMBDA, off, self.confirm_seeds),
                 Arm("none", None, 0.0, self.supervised_seeds, supervised=True)]
        arms += [Arm("none", None, off, self.paper_seeds, setting="paper", role="paper"),
                 Arm("none", None, 0.0, self.paper_seeds, setting="paper", role="paper"),
                 Arm("dml", PAPER_LAMBDA, off, self.paper_seeds, setting="paper", role="paper")]
        return arms

    def chosen_arms(self, lambda_dml: float, lambda_nce: float) -> list[Arm]:
        """The arms at the λ the sweep chose (metric learning's ``lambda_dml``, PatchNCE's
        ``lambda_nce``); metric learning at the chosen λ only when it is not the paper's
        (that arm already runs)."""
        off = ND_OFFSET_HU
        arms = []
        if lambda_dml != PAPER_LAMBDA:
            arms.append(Arm("dml", lambda_dml, off, self.confirm_seeds))
        arms += [Arm("dml", lambda_dml, 0.0, self.small_arm_seeds),
                 Arm("patchnce", lambda_nce, off, self.small_arm_seeds)]
        return arms


PLANS = {
    "shift": Plan(),
    "shift-gpu": Plan(),
    # CI: every phase and table, a few seeds, a few steps (it runs; not a result)
    "quick": Plan(lambda_grid=(0.1, 1.0), sweep_seeds=(100,), confirm_seeds=(0, 1),
                  small_arm_seeds=(0,), supervised_seeds=(0,), paper_seeds=(0,)),
}

PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    # one run per core, one thread each (measured: a step 0.10 s GAN only, 0.16 s with a
    # patch loss on a quiet core; see docs/hu-shift.md for the whole budget)
    "shift": dict(threads=1),
    # every run on the GPU; a run still short of its steps after the cap is excluded
    "shift-gpu": dict(device="cuda", max_minutes=4.0),
    "quick": dict(steps=4, decay_steps=2, eval_every=2, ckpt_every=4, log_every=2,
                  batch_size=2, crop=32, crop_margin=4, num_patches=32, builtin_size=64),
}
"""Settings of each preset on top of the arms' (``quick``: the 64² built-in data)."""

PRESET_JOBS = {"shift": 2, "shift-gpu": 12, "quick": 1}
"""Runs trained at a time by default (processes; one per core on a CPU)."""
