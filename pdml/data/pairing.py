"""Pairing slices of two series by geometry (low dose with its reference, a denoised
slice with its reference).

Two slices pair when they belong to one patient (PatientID, else FrameOfReferenceUID)
and lie at the same place along the slice normal (ImagePositionPatient projected on the
normal of ImageOrientationPatient) to within ``tolerance_mm`` (default
:data:`TOLERANCE_MM`). Each slice pairs at most once (the nearest wins). Slices without a
partner are returned by name; a pair of different size or pixel spacing is refused with one
line naming both files; a slice without a position cannot be paired and is refused too.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Sequence

TOLERANCE_MM = 0.1
"""Default largest distance (mm) along the slice normal between two paired slices: far
below any reconstruction interval (0.5 mm and up), far above the rounding of written
positions."""


class PairingError(ValueError):
    """Two series that cannot be paired; the message is one line naming the slices."""


@dataclass
class Pairing:
    """``pairs``: ``(i, j)`` indices into the two record lists, in the order of the first
    (by patient, then position); ``unmatched_a`` / ``unmatched_b``: names of the slices
    without a partner."""
    pairs: list = field(default_factory=list)
    unmatched_a: list = field(default_factory=list)
    unmatched_b: list = field(default_factory=list)


def patient_of(rec) -> str:
    return rec.patient or rec.frame_of_reference or ""


def pair_by_position(a: Sequence, b: Sequence, tolerance_mm: float = TOLERANCE_MM,
                     names: tuple = ("input", "reference")) -> Pairing:
    """Pair records ``a`` with records ``b`` (:class:`pdml.data.store.SliceRecord`), see
    the module doc; ``names`` name the two sides in messages."""
    if not tolerance_mm >= 0:
        raise PairingError(f"the pairing tolerance must be >= 0 mm, got {tolerance_mm}")
    for side, recs in zip(names, (a, b)):
        missing = [r.name for r in recs if r.position is None]
        if missing:
            raise PairingError(f"{side}: {len(missing)} slice(s) without ImagePositionPatient "
                               f"cannot be paired by position (first: {missing[0]})")
    by_patient: dict = {}
    for j, rec in enumerate(b):
        by_patient.setdefault(patient_of(rec), []).append((rec.position, j))
    for lst in by_patient.values():
        lst.sort()
    candidates = []   # (distance, i, j)
    for i, rec in enumerate(a):
        lst = by_patient.get(patient_of(rec), [])
        k = bisect_left(lst, (rec.position, -1))
        for kk in (k - 1, k):
            if 0 <= kk < len(lst) and abs(lst[kk][0] - rec.position) <= tolerance_mm:
                candidates.append((abs(lst[kk][0] - rec.position), i, lst[kk][1]))
    used_a, used_b, pairs = set(), set(), []
    for _, i, j in sorted(candidates):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    for i, j in pairs:
        ra, rb = a[i], b[j]
        if tuple(ra.shape) != tuple(rb.shape):
            raise PairingError(f"{names[0]} {ra.name} ({ra.shape[0]}x{ra.shape[1]}) and "
                               f"{names[1]} {rb.name} ({rb.shape[0]}x{rb.shape[1]}) lie at one "
                               f"position ({ra.position:g} mm) but differ in size")
        if ra.spacing and rb.spacing and any(abs(x - y) > 1e-3 * max(abs(y), 1e-6)
                                             for x, y in zip(ra.spacing, rb.spacing)):
            raise PairingError(f"{names[0]} {ra.name} (pixel spacing {list(ra.spacing)} mm) and "
                               f"{names[1]} {rb.name} ({list(rb.spacing)} mm) lie at one position "
                               f"({ra.position:g} mm) but differ in pixel spacing")
    pairs.sort(key=lambda p: (patient_of(a[p[0]]), a[p[0]].position, p[0]))
    return Pairing(pairs=pairs,
                   unmatched_a=[a[i].name for i in range(len(a)) if i not in used_a],
                   unmatched_b=[b[j].name for j in range(len(b)) if j not in used_b])


def describe_unmatched(pairing: Pairing, names: tuple = ("input", "reference"),
                       shown: int = 4) -> list[str]:
    """One line per side with unmatched slices, naming the first ``shown``."""
    lines = []
    for side, other, lst in ((names[0], names[1], pairing.unmatched_a),
                             (names[1], names[0], pairing.unmatched_b)):
        if lst:
            more = f" and {len(lst) - shown} more" if len(lst) > shown else ""
            lines.append(f"{len(lst)} {side} slice(s) with no {other} slice at their "
                         f"position: {', '.join(lst[:shown])}{more}")
    return lines
