"""A run's settings: :class:`TrainConfig`, the presets, the LR schedule.

``TrainError`` is the user-facing error of the trainer (bad arguments or data): the CLI
prints it without a traceback. :meth:`TrainConfig.validate` is the one place a setting is
checked (type, finiteness, range), for a new run, a resumed run's stored config and a
checkpoint's config alike.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pywt
import torch

from pdml import ops
from pdml._validation import check_metric_tau
from pdml.data.builtin import LAYOUTS as BUILTIN_LAYOUTS
from pdml.models import FEATURE_LAYERS
from pdml.training.sources import SourceSettings, check_sources, uses_dicom

METRIC_LOSS = "dml"
"""The metric loss's name on the command line and in saved configs, checkpoints and
experiment records (after DML_CT). Inside the code the loss is "metric"
(:func:`pdml.ops.patch_metric_rows_layers`, :class:`pdml.PatchMetricLoss`): code compares
``cfg.loss`` with this constant, never with the string."""
LOSSES = (METRIC_LOSS, "patchnce", "none")
"""``--loss``: the paper's patch-wise metric loss, CUT's PatchNCE, or none."""
ARCHS = ("pdml", "dmlct")
"""Network sets: pdml's own (:class:`pdml.models.RRDNGenerator`), the paper's reference code's
(:mod:`pdml.models.dmlct`). A config without ``arch`` (runs before it existed) is "pdml"."""
PRECISIONS = ("fp32", "bf16", "fp16")
D_INPUTS = ("image", "highpass", "image+highpass", "image+highpass+lowpass")
D_HIGHPASS_HU = 20.0
"""HU per unit of the discriminator's input with ``d_input="highpass"`` (LD noise of ~25 HU
is then about one unit, whatever the networks' scale)."""
D_LOWPASS_HU = 100.0
"""Width (HU per unit before the tanh) of the soft window of ``d_input``'s "lowpass" view,
the local 3×3 mean: a 100 HU offset inside soft tissue moves it by about half a unit."""
D_LOWPASS_CENTER_HU = 40.0
"""Centre of that window: soft tissue (a standard abdomen window's level)."""
DEFAULT_TAU = {METRIC_LOSS: 0.15, "patchnce": 0.07, "none": 0.15}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


RESOLVED_KEY = "resolved"
"""The key of ``config.json`` that records what "auto" settings came to where the run ran."""
RESUME_SETTINGS = ("steps", "decay_steps", "max_minutes", "progress", "device", "threads")
"""What ``--resume`` may change (:func:`resumed_config`): the run's length and so its LR
schedule, its time budget, the progress bar, and where it runs. Every other setting is
the run's own."""


class TrainError(Exception):
    """A user-facing error (bad arguments or data): the CLI prints it without a traceback."""


class NonFiniteLossError(TrainError):
    """The training losses stayed non-finite (NaN/inf) for several consecutive steps: the
    run stopped without writing a checkpoint of those steps (the last good one stays)."""


_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device_name(device) -> None:
    """TrainError unless ``device`` is "auto", "cpu", "cuda" or "cuda:N" (whether that
    device exists is checked where it is made: :func:`pdml.training.distributed.resolve_device`)."""
    if not isinstance(device, str) or not _DEVICE_NAME.fullmatch(device):
        raise TrainError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_KIND_CHECKS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v), "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "tuple": (lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
              "a list of names"),
}


@dataclass
class TrainConfig(SourceSettings):
    """Every setting of a run; ``config.json`` and the checkpoints store ``to_dict()``.
    The data sources (``ldct``, ``patients``, the patient split, ...) are
    :class:`pdml.training.sources.SourceSettings`; none of them: the built-in dataset."""
    preset: str = "demo"
    out: Optional[str] = None
    # schedule: ``steps`` generator+discriminator steps; the LR is constant, then decays
    # linearly to 0 over the last ``decay_steps``.
    steps: int = 400
    decay_steps: int = 200
    batch_size: int = 4
    crop: int = 64
    crop_margin: int = 30
    builtin_size: int = 256
    # The built-in dataset's layout (pdml.data.builtin): "domains" (LD and ND training
    # slices of different sources, ND with the built-in acquisition shift) or
    # "same-anatomy" (one pool: LD = its simulated low dose, ND = its noiseless FBP).
    builtin_layout: str = "domains"
    # A CT-number offset (HU) added to the ND training slices, as a different
    # acquisition's calibration would (pdml.data.AcquisitionShift: soft tissue gets all of
    # it, air none). 0: the data as given. The HU-shift ablation's known shift.
    nd_offset_hu: float = 0.0
    lr: float = 2e-4
    # The discriminator's Adam learning rate (None: ``lr``).
    lr_d: Optional[float] = None
    beta1: float = 0.5
    beta2: float = 0.999
    # networks; input_residual applies to arch "pdml" only (dmlct has none, as DML_CT)
    arch: str = "pdml"
    features: int = 32
    growth: int = 8
    block_layers: int = 5
    input_residual: bool = True
    ndf: int = 32
    d_layers: int = 3
    # What the discriminator judges: "image" (the paper), "highpass": the image's 3×3
    # high-pass, one unit = D_HIGHPASS_HU HU, where LD noise stands out against the
    # anatomy (docs/training.md), or "image+highpass": both as two input channels, noise
    # and CT numbers at once (docs/hu-shift.md); "image+highpass+lowpass" adds the local
    # mean in a soft-tissue window (D_LOWPASS_*), where a CT-number offset is ten times
    # larger than in the image. Runs stored without it trained with "image".
    d_input: str = "image"
    head_dim: int = 128
    # losses
    # The supervised upper bound of the HU-shift experiment: G alone, trained by L1 to the
    # paired noiseless truth of the same crops (built-in "same-anatomy" layout only); no
    # discriminator, identity or patch loss. False: the paper's unsupervised training.
    supervised: bool = False
    loss: str = METRIC_LOSS
    lambda_gan: float = 1.0
    lambda_identity: float = 5.0
    lambda_metric: float = 0.1
    tau: Optional[float] = None
    num_patches: int = 128
    loss_layers: tuple = ("trunk", "fusion")
    wavelet: bool = True
    wavelet_name: str = "db3"
    wavelet_level: int = 6
    # The networks see the image times ``net_scale`` (None: 20 with the wavelet split,
    # 1 without). The high-frequency part is small in the unit window (25 HU noise is
    # 0.0125); spectral norm makes every layer 1-Lipschitz, so a discriminator fed such
    # inputs cannot move its scores far from its bias and stays at chance. At 20, one unit
    # is 100 HU. Losses other than the adversarial one are computed in the unit window.
    net_scale: Optional[float] = None
    # The HU value the networks see as 0 when they see whole images (no wavelet split):
    # None keeps the paper's [0, 1] window (-1000 HU is 0, water 0.5); 0 centres the input
    # on water. The wavelet high band is zero-mean: it is always centred at 0 HU.
    # pdml.training.networks.to_network is the one place this is applied.
    input_center_hu: Optional[float] = None
    # execution
    precision: str = "fp32"
    loss_backend: str = "auto"
    compile: bool = False
    device: str = "auto"
    threads: Optional[int] = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 50
    max_minutes: Optional[float] = None
    val_slices: int = 4
    # a figure of held-out slice 0 at every evaluation (figures/eval_step*.png); False:
    # metrics only (an experiment's many small runs: the figure costs more than the metrics)
    eval_figures: bool = True
    # the final summary puts the best classical denoiser available (pdml.classical: BM3D
    # with its optional package, else non-local means) beside the network on the held-out
    # slices, tuned on every second one (only when they have references)
    compare_classical: bool = True
    progress: bool = True

    @property
    def resolved_net_scale(self) -> float:
        if self.net_scale is not None:
            return float(self.net_scale)
        return 20.0 if self.wavelet else 1.0

    @property
    def resolved_lr_d(self) -> float:
        return float(self.lr_d) if self.lr_d is not None else float(self.lr)

    @property
    def resolved_tau(self) -> float:
        return float(self.tau) if self.tau is not None else DEFAULT_TAU[self.loss]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["loss_layers"] = list(self.loss_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config of a dict (``config.json``, a checkpoint's ``config``); TrainError for
        anything but a dict of known keys. Values are checked by :meth:`validate`.
        ``config.json``'s ``"resolved"`` (what the settings came to on the machine that
        ran: device, threads, loss backend) is a record, not a setting: passed over."""
        if not isinstance(d, dict):
            raise TrainError(f"a config must be a dict of settings, got {type(d).__name__}")
        kwargs = {k: v for k, v in d.items() if k != RESOLVED_KEY}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, kwargs)) - names)
        if unknown:
            raise TrainError(f"unknown config keys {unknown}")
        if isinstance(kwargs.get("loss_layers"), list):
            kwargs["loss_layers"] = tuple(kwargs["loss_layers"])
        return cls(**kwargs)

    def _check_types(self) -> None:
        """Each value has its field's type (``Optional[...]`` allows None); numbers are
        finite: NaN or inf in any setting is refused here."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            optional = kind.startswith("Optional[")
            base = kind[len("Optional["):-1] if optional else kind
            if value is None and optional:
                continue
            check, what = _KIND_CHECKS[base]
            if not check(value):
                raise TrainError(f"{_flag(f.name)} must be {what}, got {value!r}")

    def validate(self) -> None:
        """Raise TrainError naming the first bad setting."""
        self._check_types()
        if self.preset not in PRESETS:
            raise TrainError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.arch not in ARCHS:
            raise TrainError(f"--arch must be one of {ARCHS}, got {self.arch!r}")
        if self.loss not in LOSSES:
            raise TrainError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.d_input not in D_INPUTS:
            raise TrainError(f"--d-input must be one of {D_INPUTS}, got {self.d_input!r}")
        if self.builtin_layout not in BUILTIN_LAYOUTS:
            raise TrainError(f"--builtin-layout must be one of {BUILTIN_LAYOUTS}, "
                             f"got {self.builtin_layout!r}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.loss_backend not in ops.BACKEND_NAMES:
            raise TrainError(f"--loss-backend must be one of {ops.BACKEND_NAMES}, "
                             f"got {self.loss_backend!r}")
        check_device_name(self.device)
        if (self.ldct is None) != (self.ndct is None):
            raise TrainError("--ldct and --ndct go together (unpaired LD and ND folders); "
                             "give both, or neither for the built-in dataset")
        if (self.val_ldct is None) != (self.val_ndct is None):
            raise TrainError("--val-ldct and --val-ndct go together (a paired validation set)")
        check_sources(self, TrainError)
        if self.supervised:
            if uses_dicom(self) or self.builtin_layout != "same-anatomy":
                raise TrainError("--supervised trains on paired noiseless references: only the "
                                 "built-in data's --builtin-layout same-anatomy has them")
            if self.loss != "none" or self.nd_offset_hu != 0:
                raise TrainError("--supervised trains G alone by L1 to the truth: use it with "
                                 "--loss none and without --nd-offset-hu")
        for name in ("steps", "batch_size", "crop", "num_patches", "log_every", "eval_every",
                     "ckpt_every", "features", "growth", "block_layers", "ndf", "d_layers",
                     "head_dim", "val_slices", "builtin_size", "wavelet_level"):
            if getattr(self, name) < 1:
                raise TrainError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.decay_steps <= self.steps:
            raise TrainError(f"--decay-steps must be in [0, steps={self.steps}], got {self.decay_steps}")
        if self.crop < 8:
            raise TrainError(f"--crop must be >= 8 (the discriminator downsamples 8x), got {self.crop}")
        if not uses_dicom(self) and self.crop > self.builtin_size:
            raise TrainError(f"--crop {self.crop} is larger than the built-in slices "
                             f"(--builtin-size {self.builtin_size})")
        if self.crop_margin < 0:
            raise TrainError(f"crop_margin must be >= 0, got {self.crop_margin}")
        if not 0 <= self.seed < 2 ** 32:
            raise TrainError(f"--seed must be in [0, 2**32), got {self.seed}")
        unknown = [n for n in self.loss_layers if n not in FEATURE_LAYERS]
        if unknown or not self.loss_layers or len(set(self.loss_layers)) != len(self.loss_layers):
            raise TrainError(f"loss layers must be a non-empty subset of {FEATURE_LAYERS} "
                             f"without repeats, got {list(self.loss_layers)}")
        if self.lr <= 0:
            raise TrainError(f"--lr must be > 0, got {self.lr}")
        if self.lr_d is not None and self.lr_d <= 0:
            raise TrainError(f"--lr-d must be > 0, got {self.lr_d}")
        if not -1000 <= self.nd_offset_hu <= 1000:
            raise TrainError(f"--nd-offset-hu must be in [-1000, 1000] HU, got {self.nd_offset_hu}")
        if self.input_center_hu is not None and not -1000 <= self.input_center_hu <= 1000:
            raise TrainError(f"--input-center-hu must be in [-1000, 1000] HU, "
                             f"got {self.input_center_hu}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("lambda_gan", "lambda_identity", "lambda_metric"):
            if getattr(self, name) < 0:
                raise TrainError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not self.resolved_net_scale > 0:
            raise TrainError(f"net_scale must be > 0, got {self.net_scale}")
        if self.resolved_tau <= 0:
            raise TrainError(f"--tau must be > 0, got {self.tau}")
        if self.loss == METRIC_LOSS:
            # the op's own bound (pdml/_validation.py), at float32: the trainer's reductions
            # run in float32 at least; refused here so the CLI says it before training
            try:
                check_metric_tau(self.resolved_tau, torch.float32)
            except ValueError as e:
                raise TrainError(f"--tau: {e}") from None
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {self.threads}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if self.wavelet:
            if self.wavelet_name not in pywt.wavelist(kind="discrete"):
                raise TrainError(f"wavelet_name must be a discrete wavelet of PyWavelets "
                                 f"(db3, ...), got {self.wavelet_name!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # Finishes in minutes on a 2-core CPU with the built-in data (the default without data).
    # The built-in slices at 128² build in seconds (256²: minutes on a busy 2-core CPU).
    "demo": dict(steps=400, decay_steps=200, batch_size=4, crop=64, log_every=10,
                 eval_every=100, ckpt_every=50, max_minutes=8.0, val_slices=4,
                 builtin_size=128, crop_margin=8, d_input="highpass"),
    # The paper's settings, for a GPU: the authors' networks, larger crops, a long schedule.
    "paper": dict(steps=100_000, decay_steps=50_000, batch_size=8, crop=128, log_every=50,
                  eval_every=2_000, ckpt_every=1_000, max_minutes=None, val_slices=16,
                  arch="dmlct"),
    # For tests and smoke runs: a few seconds.
    "tiny": dict(steps=4, decay_steps=2, batch_size=2, crop=32, num_patches=32, log_every=1,
                 eval_every=2, ckpt_every=2, max_minutes=None, val_slices=1, builtin_size=64,
                 crop_margin=4, compare_classical=False),
}


def make_config(preset: str = "demo", **overrides) -> TrainConfig:
    """The preset's config with ``overrides`` (``None`` values mean "keep the preset's")."""
    if preset not in PRESETS:
        raise TrainError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["preset"] = preset
    cfg = TrainConfig.from_dict(values)
    if cfg.tau is None and cfg.loss in DEFAULT_TAU:  # recorded as the value the run uses
        cfg.tau = DEFAULT_TAU[cfg.loss]
    cfg.validate()
    return cfg


def resumed_config(cfg: TrainConfig, step: int, run_dir, **given) -> TrainConfig:
    """The config a resumed run continues with: the run's own ``cfg`` (at ``step``, in
    ``run_dir``) with the settings ``given`` again (a key present is set, a None value
    included: ``max_minutes=None`` lifts the time limit).

    The settings in :data:`RESUME_SETTINGS` may change; any other may be given only with
    the run's own value (the command that started the run, repeated with ``--resume``),
    and ``out`` only as ``run_dir``. ``steps`` extends (or shortens, not below ``step``)
    the run: the LR schedule is that of the new length (:func:`lr_factor`: constant until
    ``steps - decay_steps``, then linear to 0 at ``steps``), so a finished run's LR rises
    again unless ``decay_steps`` grows too. TrainError naming the settings otherwise.
    """
    given = dict(given)
    out = given.pop("out", None)
    own = {k: cfg.resolved_tau if k == "tau" else getattr(cfg, k) for k in given}
    changed = [k for k, v in given.items() if k not in RESUME_SETTINGS and own[k] != v]
    if changed:
        raise TrainError(
            "--resume continues the run with its own settings; "
            + ", ".join(f"{_flag(k)} {format_setting(given[k])} differs from the run's "
                        f"{format_setting(own[k])}" for k in changed)
            + f" (with --resume only {', '.join(map(_flag, RESUME_SETTINGS))} may change)")
    if out is not None and Path(out).resolve() != Path(run_dir).resolve():
        raise TrainError(f"--out {out} is not the folder of the resumed run {run_dir}")
    new = dataclasses.replace(cfg, **{k: v for k, v in given.items() if k in RESUME_SETTINGS})
    new.validate()
    if new.steps < step:
        raise TrainError(f"--steps {new.steps} is below the step the run has reached ({step})")
    return new


def format_setting(value) -> str:
    """A setting's value as the messages and ``pdml-train --help`` write it."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else \
        "none" if value is None else ("on" if value is True else "off" if value is False
                                         else f"{value:g}" if isinstance(value, float)
                                         else str(value))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Constant 1 for ``steps - decay_steps`` steps, then linear to 0 at ``steps``."""
    const = cfg.steps - cfg.decay_steps
    if step < const or cfg.decay_steps == 0:
        return 1.0
    return max(0.0, 1.0 - (step - const) / cfg.decay_steps)
