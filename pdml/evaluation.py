"""Scoring denoised CT against references: the table of ``pdml-eval`` (:mod:`pdml.cli_eval`).

Inputs: scored slices (:class:`Scored`: the reference, the LD input and each method's
output of one slice, float32 ``[H, W]`` HU, with the slice's patient and name). Per slice
and method (:func:`score_slice`, the calls of the trainer's evaluation
:func:`pdml.training.evaluate_slices`, so both give the same numbers for the same images):

- PSNR (dB) and SSIM in the HU window (default the paper's [-1000, 1000]), RMSE in HU;
- ``hu_shift`` and ``noise_std``: the CT-number shift (mean of output − reference) and the
  noise (std of output − reference) in HU, averaged over automatic homogeneous
  soft-tissue ROIs of the reference (:func:`pdml.metrics.homogeneous_rois`);
- for each user ROI (:func:`read_rois`): ``<name>_shift`` and ``<name>_noise`` likewise.

Report (:func:`write_report`): ``per_slice.csv`` (one row per slice and method),
``report.md`` (per patient and overall: mean ± sd of each metric, and for each method the
two-sided Wilcoxon signed-rank test of its per-slice PSNR and SSIM against the input's),
``summary.json`` (the same numbers) and ``figure.png`` (one slice: every method in one
display window, a zoomed region, and the difference to the reference). Every file is
written atomically (:func:`pdml._files.atomic_write_bytes`).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pdml import metrics
from pdml._files import atomic_write_bytes
from pdml._plot import pyplot
from pdml.data.hu import HU_WINDOW

METRICS = ("psnr", "ssim", "rmse", "hu_shift", "noise_std")
HEADINGS = {"psnr": "PSNR dB", "ssim": "SSIM", "rmse": "RMSE HU", "hu_shift": "HU shift",
            "noise_std": "noise HU"}
DISPLAY_WINDOW = (-160.0, 240.0)
"""The figure's display window in HU (soft tissue: width 400, level 40)."""
DIFFERENCE_RANGE = 150.0
"""The figure's difference panels show ±this many HU."""
INPUT = "input"


@dataclass
class Scored:
    """One scored slice: ``reference``, ``input`` and ``outputs[method]``, float32
    ``[H, W]`` HU; ``patient`` and ``name`` (its reference file) for the tables."""
    reference: np.ndarray
    input: np.ndarray
    outputs: dict = field(default_factory=dict)
    patient: str = ""
    name: str = ""


@dataclass(frozen=True)
class UserRoi:
    """A square region of interest: top ``row``, left ``col``, side ``size`` (px);
    ``patient``: only that patient's slices ("" for all)."""
    name: str
    row: int
    col: int
    size: int
    patient: str = ""


def read_rois(path: Path, shape: Optional[tuple] = None) -> list[UserRoi]:
    """User ROIs from a JSON list of ``{"name", "row", "col", "size"[, "patient"]}``;
    ValueError naming the file and the entry when malformed or (with ``shape``) outside
    the slices."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--rois {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"--rois {path}: want a non-empty JSON list of "
                         '{"name", "row", "col", "size"} objects')
    rois = []
    for k, item in enumerate(data):
        try:
            roi = UserRoi(str(item["name"]), int(item["row"]), int(item["col"]),
                          int(item["size"]), str(item.get("patient", "")))
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"--rois {path}: entry {k} needs name, row, col and size "
                             f"(integers): {type(e).__name__} {e}") from None
        if not roi.name.replace("_", "").isalnum() or roi.name in {r.name for r in rois}:
            raise ValueError(f"--rois {path}: entry {k}: the name {roi.name!r} must be unique, "
                             "letters, digits and _")
        if roi.size < 2 or roi.row < 0 or roi.col < 0 or (
                shape is not None and (roi.row + roi.size > shape[0] or roi.col + roi.size > shape[1])):
            raise ValueError(f"--rois {path}: {roi.name} ({roi.row}, {roi.col}, side {roi.size}) "
                             f"does not lie inside the {shape[0]}x{shape[1]} slices" if shape
                             else f"--rois {path}: {roi.name}: size >= 2 and row, col >= 0 needed")
        rois.append(roi)
    return rois


def score_slice(image: np.ndarray, reference: np.ndarray, window=HU_WINDOW,
                rois: Sequence[UserRoi] = (), patient: str = "") -> dict:
    """The metrics of one output ``image`` against ``reference`` (both ``[H, W]`` HU): see
    the module doc; -> ``{metric: float}``."""
    first = lambda v: float(np.asarray(v).reshape(-1)[0])  # noqa: E731  (as evaluate_slices)
    row = {"psnr": first(metrics.psnr(image, reference, window)),
           "ssim": first(metrics.ssim(image, reference, window)),
           "rmse": first(metrics.rmse(image, reference)),
           "hu_shift": first(metrics.hu_shift(image, reference)),
           "noise_std": first(metrics.noise_std(image, reference))}
    for roi in rois:
        if roi.patient and roi.patient != patient:
            continue
        diff = (np.asarray(image, np.float64) - np.asarray(reference, np.float64))[
            roi.row:roi.row + roi.size, roi.col:roi.col + roi.size]
        row[f"{roi.name}_shift"] = float(diff.mean())
        row[f"{roi.name}_noise"] = float(diff.std())
    return row


def score_all(slices: Sequence[Scored], methods: Sequence[str], window=HU_WINDOW,
              rois: Sequence[UserRoi] = ()) -> list[dict]:
    """One row per slice and method (the input first): ``{"patient", "slice", "method",
    metric: value, ...}``."""
    rows = []
    for s in slices:
        for method in (INPUT, *methods):
            image = s.input if method == INPUT else s.outputs[method]
            rows.append({"patient": s.patient, "slice": s.name, "method": method,
                         **score_slice(image, s.reference, window, rois, s.patient)})
    return rows


def _paired_p(values: Sequence[float], base: Sequence[float]) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank p of ``values`` against ``base`` (paired); None when
    there are fewer than 2 pairs or every difference is 0."""
    from scipy.stats import wilcoxon  # ~0.7 s: only the report's p-values need it

    d = np.asarray(values, np.float64) - np.asarray(base, np.float64)
    if len(d) < 2 or not np.any(d != 0):
        return None
    return float(wilcoxon(values, base).pvalue)


def summarise(rows: Sequence[dict], methods: Sequence[str]) -> dict:
    """``{"overall": table, "patients": {patient: table}}``; a table maps each method to
    ``{metric: {"mean", "sd", "n"}, "p_psnr", "p_ssim"}`` (p: against the input)."""
    keys = [k for k in rows[0] if k not in ("patient", "slice", "method")] if rows else []

    def table(sel):
        out = {}
        by = {m: [r for r in sel if r["method"] == m] for m in (INPUT, *methods)}
        for m, rs in by.items():
            entry = {}
            for k in keys:
                vals = [r[k] for r in rs if k in r and math.isfinite(r[k])]
                if vals:
                    entry[k] = {"mean": float(np.mean(vals)), "n": len(vals),
                                "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
            if m != INPUT:
                for k in ("psnr", "ssim"):
                    entry[f"p_{k}"] = _paired_p([r[k] for r in rs], [r[k] for r in by[INPUT]])
            out[m] = entry
        return out

    patients = sorted({r["patient"] for r in rows})
    return {"overall": table(rows),
            "patients": {p: table([r for r in rows if r["patient"] == p]) for p in patients}}


def _markdown_table(tab: dict, keys: Sequence[str]) -> list[str]:
    head = ["method", *(HEADINGS.get(k, k) for k in keys), "p PSNR", "p SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, entry in tab.items():
        cells = [m]
        for k in keys:
            v = entry.get(k)
            digits = 4 if k == "ssim" else 2
            cells.append("–" if v is None else f"{v['mean']:.{digits}f} ± {v['sd']:.{digits}f}")
        for k in ("p_psnr", "p_ssim"):
            p = entry.get(k)
            cells.append("" if m == INPUT else "–" if p is None else f"{p:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict, context: dict, split: Optional[dict] = None) -> str:
    """report.md: what was scored, then the overall table and one table per patient
    (``split``: a run's patient split, ``{"train": [...], "val": [...], "test": [...]}``,
    names each patient's part in its heading)."""
    part = {p: k for k in ("train", "val", "test") for p in (split or {}).get(k, [])}
    keys = [k for k in summary["overall"].get(INPUT, {}) if not k.startswith("p_")]
    lines = ["# pdml-eval report", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += ["", "Mean ± sd over slices. PSNR and SSIM in the HU window above; RMSE, HU shift "
              "(mean of output − reference) and noise (std of output − reference) in HU; HU "
              "shift and noise in automatic homogeneous soft-tissue ROIs of the reference "
              "(and `<roi>_shift` / `<roi>_noise` in the user ROIs). p: two-sided Wilcoxon "
              "signed-rank test of the method's per-slice PSNR / SSIM against the input's.",
              "", "## Overall", ""]
    lines += _markdown_table(summary["overall"], keys)
    for patient, tab in summary["patients"].items():
        n = tab.get(INPUT, {}).get("psnr", {}).get("n", 0)
        where = f", {part[patient]} patient of the run" if patient in part else ""
        lines += ["", f"## Patient {patient or '(no PatientID)'} ({n} slice(s){where})", ""]
        lines += _markdown_table(tab, keys)
    return "\n".join(lines) + "\n"


REPORT_FILES = ("per_slice.csv", "report.md", "summary.json", "figure.png")


def write_report(out: Path, rows: Sequence[dict], summary: dict, context: dict,
                 figure_slice: Optional[Scored], methods: Sequence[str],
                 split: Optional[dict] = None) -> None:
    """Write the report files (module doc) into ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "per_slice.csv", buf.getvalue().encode())
    atomic_write_bytes(out / "report.md", markdown(summary, context, split).encode())
    atomic_write_bytes(out / "summary.json",
                       (json.dumps({"context": context, "split": split, **summary}, indent=1)
                        + "\n").encode())
    if figure_slice is not None:
        atomic_write_bytes(out / "figure.png", _figure_png(figure_slice, methods))


def _figure_png(s: Scored, methods: Sequence[str]) -> bytes:
    """Rows: the slice in :data:`DISPLAY_WINDOW`, its central half zoomed 2x, the
    difference to the reference (±:data:`DIFFERENCE_RANGE` HU); columns: reference,
    input, each method."""
    plt = pyplot()
    panels = [("reference", s.reference), (INPUT, s.input)] + [(m, s.outputs[m]) for m in methods]
    H, W = s.reference.shape
    zoom = (slice(H // 4, H // 4 + H // 2), slice(W // 4, W // 4 + W // 2))
    fig, axes = plt.subplots(3, len(panels), figsize=(2.6 * len(panels), 8), squeeze=False)
    for c, (title, img) in enumerate(panels):
        axes[0, c].imshow(img, cmap="gray", vmin=DISPLAY_WINDOW[0], vmax=DISPLAY_WINDOW[1])
        axes[0, c].set_title(title, fontsize=9)
        axes[1, c].imshow(img[zoom], cmap="gray", vmin=DISPLAY_WINDOW[0], vmax=DISPLAY_WINDOW[1])
        if c == 0:
            axes[2, c].text(0.5, 0.5, "difference\nto the reference\n"
                            f"(±{DIFFERENCE_RANGE:g} HU)", ha="center", va="center", fontsize=9)
        else:
            axes[2, c].imshow(img - s.reference, cmap="RdBu_r", vmin=-DIFFERENCE_RANGE,
                              vmax=DIFFERENCE_RANGE)
        for r in range(3):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    axes[0, 0].set_ylabel(f"window {DISPLAY_WINDOW[0]:g}..{DISPLAY_WINDOW[1]:g} HU", fontsize=8)
    axes[1, 0].set_ylabel("central half, 2x", fontsize=8)
    fig.suptitle(f"{s.name} (patient {s.patient})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
