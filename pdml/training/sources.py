"""The data-source settings of a run (:class:`pdml.training.config.TrainConfig`): DICOM
sources (``ldct``/``ndct`` folders, files or globs, or ``patients`` folders in the patient
layout with the ``ld_series`` / ``nd_series`` patterns, :mod:`pdml.data.layouts`),
validation sources, the patient split (named patients or fractions drawn with ``seed``;
the split a run used is recorded in config.json under "resolved"), and the pairing
tolerance of validation pairs (:mod:`pdml.data.pairing`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from pdml.data.layouts import LD_SERIES, ND_SERIES
from pdml.data.pairing import TOLERANCE_MM

PATH_LISTS = ("ldct", "ndct", "val_ldct", "val_ndct", "patients", "val_patients", "test_patients")
"""Settings that are lists of sources or names (one or more; the CLI takes several)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class SourceSettings:
    """The data-source settings (module doc); the first fields of
    :class:`pdml.training.config.TrainConfig`, checked by :func:`check_sources`."""
    ldct: Optional[tuple] = None
    ndct: Optional[tuple] = None
    val_ldct: Optional[tuple] = None
    val_ndct: Optional[tuple] = None
    patients: Optional[tuple] = None
    ld_series: str = LD_SERIES
    nd_series: str = ND_SERIES
    val_patients: Optional[tuple] = None
    test_patients: Optional[tuple] = None
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    pair_tolerance_mm: float = TOLERANCE_MM

    def __post_init__(self):
        # a source given as one string (config.json of runs before several sources, a
        # Python caller) is a list of one; JSON lists become tuples
        for name in PATH_LISTS:
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, (value,))
            elif isinstance(value, list):
                setattr(self, name, tuple(value))


def uses_dicom(cfg) -> bool:
    """True when the run reads the user's data (not the built-in dataset)."""
    return cfg.ldct is not None or cfg.patients is not None


def check_sources(cfg, error: type) -> None:
    """Raise ``error`` (the trainer's TrainError) naming the first bad source setting."""
    for name in PATH_LISTS:
        value = getattr(cfg, name)
        if value is not None and (not value or not all(v.strip() for v in value)):
            raise error(f"{_flag(name)} needs at least one non-empty value")
    if cfg.patients is not None and cfg.ldct is not None:
        raise error("--patients (folders of patient folders) and --ldct/--ndct (folders "
                         "of one dose) are two layouts; give one of them")
    if cfg.val_ldct is not None and not uses_dicom(cfg):
        raise error("--val-ldct/--val-ndct validate a run on DICOM data: give "
                         "--ldct/--ndct or --patients too")
    if cfg.nd_offset_hu != 0 and uses_dicom(cfg):
        raise error("--nd-offset-hu is an experiment option of the built-in data; "
                         "it is not applied to DICOM sources (--ldct/--ndct/--patients)")
    for name in ("ld_series", "nd_series"):
        try:
            re.compile(getattr(cfg, name))
        except re.error as e:
            raise error(f"{_flag(name)} {getattr(cfg, name)!r} is not a regular "
                             f"expression ({e})") from None
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(cfg, name) < 1:
            raise error(f"{_flag(name)} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise error("--val-fraction and --test-fraction leave no patient for training")
    split = (cfg.val_patients, cfg.test_patients, cfg.val_fraction or None,
             cfg.test_fraction or None)
    if any(v is not None for v in split) and not uses_dicom(cfg):
        raise error("--val-patients, --test-patients and the fractions split DICOM "
                         "sources by patient; the built-in data has its own test split")
    if cfg.val_ldct is not None and (cfg.val_patients or cfg.val_fraction):
        raise error("validate either on --val-ldct/--val-ndct or on --val-patients / "
                         "--val-fraction, not both")
    if not 0 <= cfg.pair_tolerance_mm <= 10:
        raise error(f"--pair-tolerance-mm must be in [0, 10] mm, "
                         f"got {cfg.pair_tolerance_mm}")
