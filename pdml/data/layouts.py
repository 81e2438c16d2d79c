"""Which slices are which: sources (folders, files, globs), the two dataset layouts, the
patient split.

Sources: each source is a folder (searched recursively), a file, or a glob pattern
(``data/L*/quarter_1mm``); hidden files (names starting with ".") are passed over.

Layouts (each gives ``{patient: {"ld": [store indices], "nd": [...]}}`` over a
:class:`pdml.data.store.SliceStore`):

- folders (:func:`folder_layout`): every slice under an LD source is low dose, under an
  ND source normal dose; the patient is the slice's PatientID (else its
  FrameOfReferenceUID, else "unknown").
- patients (:func:`patient_layout`): each source holds one folder per patient (the AAPM
  Low Dose CT Grand Challenge: ``L067/quarter_1mm/*.IMA``; TCIA LDCT-and-Projection-data:
  ``patient/study/series/*.dcm``); the patient is that folder's name. A series is low
  dose when :data:`LD_SERIES` (a case-insensitive regular expression) finds a match in
  its folder path inside the patient folder or in its SeriesDescription, normal dose for
  :data:`ND_SERIES`; other series are passed over. A series matching both, or two series
  of one dose in one patient (the 1 mm and 3 mm reconstructions), is refused with one line
  naming them: narrow the pattern (``--ld-series quarter_1mm``).

In both layouts, slices of a patient's dose whose size differs from that dose's usual
size (a scout, a stray file) are dropped with a warning naming them.

Split (:func:`split_patients`): named patients and/or fractions drawn with a fixed seed;
a patient's slices are all in one split.
"""
from __future__ import annotations

import glob
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

LD_SERIES = r"quarter|low[ _-]?dose|(^|[^a-z])(low|ld)([^a-z]|$)"
ND_SERIES = r"full|normal[ _-]?dose|routine|(^|[^a-z])(nd|standard)([^a-z]|$)"
"""The default patterns of the patient layout: Mayo's ``quarter_*`` / ``full_*`` folders,
TCIA's "Low Dose Images" / "Full Dose Images" descriptions, and LD / ND names."""


class LayoutError(ValueError):
    """A source or layout that cannot be used; the message is one line naming it."""


def expand_sources(flag: str, sources: Sequence[str]) -> list[Path]:
    """Each source (a path or a glob) as existing paths; LayoutError naming ``flag`` and
    the source when it does not exist or the glob matches nothing."""
    out = []
    for source in sources:
        if any(c in source for c in "*?["):
            found = sorted(glob.glob(source))
            if not found:
                raise LayoutError(f"{flag} {source}: the pattern matches nothing")
            out += [Path(p) for p in found]
        elif not Path(source).exists():
            raise LayoutError(f"{flag} {source}: no such folder or file")
        else:
            out.append(Path(source))
    return out


def source_files(roots: Sequence[Path]) -> list[Path]:
    """Every file under ``roots`` (recursively), sorted, each once, hidden ones excluded."""
    files = set()
    for root in roots:
        if root.is_file():
            files.add(root.resolve())
            continue
        for p in root.rglob("*"):
            if p.is_file() and not any(part.startswith(".") for part in
                                       p.relative_to(root).parts):
                files.add(p.resolve())
    return sorted(files)


def _under(path: Path, roots: Sequence[Path]) -> Optional[Path]:
    for root in roots:
        r = root.resolve()
        if path == r or r in path.parents:
            return r
    return None


def _patient_key(rec) -> str:
    return rec.patient or rec.frame_of_reference or "unknown"


def _drop_odd_sizes(flag: str, store, groups: dict) -> dict:
    """Keep each patient's dose at its most common slice size; warn naming the others."""
    for patient, doses in groups.items():
        for dose, idx in doses.items():
            sizes = Counter(store.records[i].shape for i in idx)
            if len(sizes) > 1:
                keep = sizes.most_common(1)[0][0]
                odd = [store.records[i].name for i in idx if store.records[i].shape != keep]
                warnings.warn(f"{flag}: patient {patient}, {dose.upper()}: {len(odd)} slice(s) "
                              f"not of the series' size {keep[0]}x{keep[1]} left out: "
                              f"{', '.join(odd[:4])}", stacklevel=3)
                doses[dose] = [i for i in idx if store.records[i].shape == keep]
    return groups


def folder_layout(store, ld_roots: Sequence[Path], nd_roots: Sequence[Path],
                  flag: str = "--ldct/--ndct") -> dict:
    """``{patient: {"ld": [...], "nd": [...]}}``: slices under ``ld_roots`` are LD, under
    ``nd_roots`` ND (a file under both is in both); patient from the header."""
    groups: dict = {}
    for i, rec in enumerate(store.records):
        path = Path(rec.file)
        for dose, roots in (("ld", ld_roots), ("nd", nd_roots)):
            if _under(path, roots) is not None:
                groups.setdefault(_patient_key(rec), {"ld": [], "nd": []})[dose].append(i)
    return _drop_odd_sizes(flag, store, groups)


def patient_layout(store, roots: Sequence[Path], ld_series: str = LD_SERIES,
                   nd_series: str = ND_SERIES, flag: str = "--patients") -> dict:
    """``{patient: {"ld": [...], "nd": [...]}}`` of the patient-folder layout (module doc)."""
    ld_re, nd_re = re.compile(ld_series, re.I), re.compile(nd_series, re.I)
    series: dict = {}   # (patient, series uid) -> indices
    for i, rec in enumerate(store.records):
        path = Path(rec.file)
        root = _under(path, roots)
        if root is None or root == path:
            continue
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            raise LayoutError(f"{flag} {root}: {rel} lies directly in the source; the patient "
                              "layout wants one folder per patient (--ldct/--ndct take "
                              "folders of one dose)")
        series.setdefault((rel.parts[0], rec.series), []).append(i)
    groups: dict = {}
    for (patient, uid), idx in sorted(series.items()):
        rec = store.records[idx[0]]
        folder = str(Path(rec.file).parent.relative_to(_under(Path(rec.file), roots) / patient))
        text = f"{folder} {rec.description}"
        is_ld, is_nd = bool(ld_re.search(text)), bool(nd_re.search(text))
        if is_ld and is_nd:
            raise LayoutError(f"{flag}: patient {patient}, series {folder!r} ({rec.description!r}) "
                              f"matches both --ld-series and --nd-series; narrow one of them")
        if is_ld or is_nd:
            dose = "ld" if is_ld else "nd"
            entry = groups.setdefault(patient, {"ld": [], "nd": [], "series": {"ld": [], "nd": []}})
            entry[dose] += idx
            entry["series"][dose].append(folder if folder != "." else rec.description)
    for patient, entry in groups.items():
        for dose in ("ld", "nd"):
            names = sorted(set(entry["series"][dose]))
            if len(entry["series"][dose]) > 1:
                raise LayoutError(f"{flag}: patient {patient} has {len(entry['series'][dose])} "
                                  f"{dose.upper()} series ({', '.join(map(repr, names))}); pick one "
                                  f"with --{dose}-series (e.g. --{dose}-series {names[0]!r})")
        del entry["series"]
    if not groups:
        raise LayoutError(f"{flag}: no series matched --ld-series or --nd-series in "
                          f"{len(series)} series under {', '.join(map(str, roots))}")
    return _drop_odd_sizes(flag, store, groups)


def split_patients(patients: Sequence[str], val: Optional[Sequence[str]] = None,
                   test: Optional[Sequence[str]] = None, val_fraction: float = 0.0,
                   test_fraction: float = 0.0, seed: int = 0) -> dict:
    """``{"train": [...], "val": [...], "test": [...]}`` (sorted names): the named
    patients first, then the fractions of all patients drawn from the rest with
    ``numpy.random.default_rng(seed)`` (at least one patient for a fraction > 0).
    LayoutError for an unknown name, a patient named twice, or no training patient."""
    names = sorted(patients)
    chosen = {"val": list(val or ()), "test": list(test or ())}
    for split, flag in (("val", "--val-patients"), ("test", "--test-patients")):
        unknown = sorted(set(chosen[split]) - set(names))
        if unknown:
            raise LayoutError(f"{flag}: unknown patient(s) {', '.join(unknown)} (found: "
                              f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''})")
    both = sorted(set(chosen["val"]) & set(chosen["test"]))
    if both:
        raise LayoutError(f"patient(s) {', '.join(both)} named in both --val-patients and "
                          "--test-patients")
    rest = [p for p in names if p not in chosen["val"] and p not in chosen["test"]]
    order = list(np.random.default_rng(seed).permutation(len(rest)))
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction > 0:
            n = max(1, int(round(fraction * len(names))))
            take = [rest[k] for k in order[:n]]
            order = order[n:]
            chosen[split] += take
    train = [p for p in names if p not in chosen["val"] and p not in chosen["test"]]
    if not train:
        raise LayoutError(f"no patient left for training ({len(names)} patient(s): "
                          f"{', '.join(names)})")
    return {"train": train, "val": sorted(chosen["val"]), "test": sorted(chosen["test"])}
