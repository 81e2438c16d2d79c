"""DICOM CT input: :func:`load_ct`.

Reading (:func:`load_ct`): a file, or a folder searched recursively. Files are grouped
into series by SeriesInstanceUID (and image size); slices are ordered along the slice
normal by ImagePositionPatient, with InstanceNumber, then the file name as fallbacks.
Single-frame CT and multi-frame (enhanced) CT are read; for enhanced CT each frame is a
slice and its rescale and position come from the functional groups (per-frame first, then
shared). Compressed transfer syntaxes decode through pydicom's pixel handlers
(JPEG 2000 and JPEG lossless need the ``pylibjpeg`` plugins, which pdml depends on).
HU = stored value · RescaleSlope + RescaleIntercept, float32. Files without the DICOM
preamble (a bare little-endian dataset starting with group 0008) are read too. Input
files are opened read-only and never modified.

Folder mode skips what is not a CT image (not DICOM, other modality, no pixel data,
corrupt or truncated, a malformed header value such as ``RescaleSlope = "ab"``) with one
warning line per file and a final count; the skipped files and their reasons are in
``result.skipped``. A single file that cannot be used raises :class:`DicomReadError` (a
``ValueError``) naming the file. A folder without any CT image raises
:class:`NoCTImagesError` (a ``FileNotFoundError``). A CT image without RescaleIntercept
is read with intercept 0 and a :class:`DicomHeaderWarning` naming the file (HU of such a
file are likely off by the usual -1024). Slices of one series at the same
ImagePositionPatient are all kept, with a :class:`DuplicatePositionWarning` naming them.
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pdml.data.dicom_series import PIXEL_DATA_KEYWORDS, CTSeries, CTSlice, PathLike

ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


class DicomReadError(ValueError):
    """A file could not be used as a CT image: not DICOM, corrupt or truncated, not CT, or
    without pixel data. The message names the file."""


class NoCTImagesError(FileNotFoundError):
    """A folder (or empty file list) held no readable CT image."""


class DicomHeaderWarning(UserWarning):
    """A CT image was read, but its header lacks a value the HU depend on (a default was
    used). The message names the file."""


class DuplicatePositionWarning(UserWarning):
    """Several slices of one series lie at the same ImagePositionPatient (the same slice
    copied twice, or two acquisitions in one series). All are kept; the message names the
    files."""


class SeriesPixels:
    """The HU of a series' slices, read from their files when indexed
    (``load_ct(..., lazy=True)``): ``shape`` ``(S, H, W)``, ``dtype`` float32;
    ``pixels[i]`` -> ``[H, W]``, ``pixels[a:b]`` -> ``[n, H, W]`` float32 (each file decoded
    again; a multi-frame file once per indexing); ``np.asarray(pixels)``: all slices."""

    dtype = np.dtype(np.float32)
    ndim = 3

    def __init__(self, slices: List["CTSlice"], shape: Tuple[int, int, int]):
        self.slices, self.shape = slices, tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = range(self.shape[0])[index]   # IndexError when out of range
            return self[i:i + 1][0]
        if not isinstance(index, slice):
            raise TypeError(f"SeriesPixels takes an int or a slice, got {type(index).__name__}")
        chosen = [self.slices[i] for i in range(self.shape[0])[index]]
        out = np.empty((len(chosen),) + self.shape[1:], dtype=np.float32)
        decoded: dict = {}  # one decode per file and call (the frames of a multi-frame file)
        for k, sl in enumerate(chosen):
            if sl.path not in decoded:
                decoded = {sl.path: _read_file(sl.path)[1]}
            pixels = decoded[sl.path]
            stack = pixels if pixels.ndim == 3 else pixels[None]
            out[k] = _to_hu(stack[sl.frame or 0], sl.slope, sl.intercept)
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class CTSeriesList(list):
    """``list[CTSeries]`` with ``skipped``: ``[(path, reason), ...]`` of the files that
    folder mode passed over, and ``files_seen``: how many files were looked at."""

    def __init__(self, series=(), skipped=(), files_seen: int = 0):
        super().__init__(series)
        self.skipped: List[Tuple[Path, str]] = list(skipped)
        self.files_seen = files_seen


def _floats(value, count: int) -> Optional[Tuple[float, ...]]:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if len(out) == count and all(map(math.isfinite, out)) else None


def _first_item(ds, sequence: str):
    seq = ds.get(sequence) if ds is not None else None
    return seq[0] if seq else None


def _get(path: Path, ds, keyword: str, default=None):
    """``ds.get(keyword, default)``, a malformed value (pydicom converts values on first
    access: a DS of "ab", an IS of "x") as DicomReadError naming the file and attribute."""
    try:
        return ds.get(keyword, default)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DicomReadError(f"{path}: malformed {keyword} ({exc})") from None


def _number(path: Path, keyword: str, value, default=None, *, integer: bool = False):
    """A header ``value`` as a finite float (an int with ``integer``); ``default`` when it
    is absent or empty; DicomReadError naming the file and attribute when malformed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError, OverflowError):
        raise DicomReadError(f"{path}: {keyword} {str(value)[:40]!r} is not a number") from None
    if not math.isfinite(number):
        raise DicomReadError(f"{path}: {keyword} {str(value)[:40]!r} is not a finite number")
    return number


def _frame_attr(path: Path, ds: Dataset, frame_group, shared_group, sequence: str,
                keyword: str):
    """Enhanced-IOD lookup: per-frame functional group first, then shared."""
    for group in (frame_group, shared_group):
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            return _get(path, item, keyword)
    return None


def _check_header_values(path: Path, ds: Dataset) -> None:
    """Convert every top-level value once, so a malformed one (a DS of "ab") is a
    DicomReadError naming the file here, not a ValueError wherever it is first read."""
    for tag in list(ds.keys()):
        try:
            ds[tag]
        except (ValueError, TypeError, OverflowError) as exc:
            name = keyword_for_tag(tag) or str(tag)
            raise DicomReadError(f"{path}: malformed {name} ({exc})") from None


def _read_file(path: Path) -> Tuple[Dataset, np.ndarray]:
    """Read one file fully and decode its pixels; DicomReadError naming the file when it
    is not a usable CT image."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Files without the 128-byte preamble + "DICM" (older writers) are read when
            # they start like a little-endian dataset: group 0x0008, the usual first group.
            with open(path, "rb") as fh:
                bare_dataset = fh.read(2) == b"\x08\x00"
            ds = pydicom.dcmread(str(path), force=bare_dataset)
    except pydicom.errors.InvalidDicomError as exc:
        raise DicomReadError(f"{path}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # truncated / corrupt headers raise many kinds
        raise DicomReadError(f"{path}: corrupt or truncated DICOM file "
                             f"({type(exc).__name__}: {exc})") from exc
    _check_complete(path, ds, caught)
    _check_header_values(path, ds)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # no file meta (bare dataset): the syntax is the encoding pydicom detected
        implicit, little = ds.original_encoding
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else
            ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    is_ct = modality == "CT" or sop_class in (CTImageStorage, ENHANCED_CT_IMAGE_STORAGE)
    if not is_ct:
        raise DicomReadError(f"{path}: not a CT image (Modality {modality or 'missing'})")
    if "PixelData" not in ds:
        raise DicomReadError(f"{path}: CT file without pixel data (not an image, or "
                             "truncated before its pixels)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise DicomReadError(f"{path}: cannot decode pixel data, corrupt or truncated "
                             f"({type(exc).__name__}: {exc})") from exc
    frames = _number(path, "NumberOfFrames", ds.get("NumberOfFrames"), 1, integer=True) or 1
    rows, columns = (_number(path, k, ds.get(k), integer=True) for k in ("Rows", "Columns"))
    expected = (frames, rows, columns) if frames > 1 else (rows, columns)
    if pixels.shape != expected:
        raise DicomReadError(f"{path}: pixel data has shape {pixels.shape}, header says "
                             f"{expected} (colour or truncated?)")
    return ds, pixels


def _check_complete(path: Path, ds: Dataset, caught) -> None:
    """pydicom returns what it could parse of a truncated file without raising: detect the
    signs (an end-of-file warning; the last element shorter than its declared length)."""
    for w in caught:
        text = str(w.message)
        if "End of file" in text or "delimiter" in text:
            raise DicomReadError(f"{path}: truncated DICOM file ({text})")
    raw = getattr(ds, "_dict", {})
    if raw:
        last = raw[next(reversed(raw))]
        length, value = getattr(last, "length", None), getattr(last, "value", None)
        if (isinstance(value, (bytes, bytearray)) and length is not None
                and length != 0xFFFFFFFF and len(value) < length):
            raise DicomReadError(f"{path}: truncated DICOM file (element {last.tag} has "
                                 f"{len(value)} of its {length} bytes)")
    else:
        raise DicomReadError(f"{path}: no data elements (truncated or empty DICOM file)")
    for w in caught:   # anything else pydicom had to say is passed on
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _header_copy(ds: Dataset) -> Dataset:
    """The dataset without its pixel data (element by element: a deepcopy of the whole
    dataset would also copy the pixel bytes and pydicom's decoded-array cache)."""
    header = Dataset()
    for elem in ds:
        if elem.keyword not in PIXEL_DATA_KEYWORDS:
            header.add(copy.deepcopy(elem))
    header.file_meta = copy.deepcopy(getattr(ds, "file_meta", FileMetaDataset()))
    return header


def _slices_of(path: Path, ds: Dataset, pixels: np.ndarray) -> List[Tuple[CTSlice, np.ndarray]]:
    """``(CTSlice, hu [H, W] float32)`` for every frame of a decoded file.

    DicomReadError naming the file for a malformed number (rescale, instance number,
    slice thickness), a zero RescaleSlope or HU beyond float32; one DicomHeaderWarning
    naming the file when RescaleIntercept is missing (read as 0).
    """
    header = _header_copy(ds)
    frames = _number(path, "NumberOfFrames", ds.get("NumberOfFrames"), 1, integer=True) or 1
    top_slope = _number(path, "RescaleSlope", ds.get("RescaleSlope"))
    top_intercept = _number(path, "RescaleIntercept", ds.get("RescaleIntercept"))
    instance = _number(path, "InstanceNumber", ds.get("InstanceNumber"), integer=True)
    single = frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds
    stack = pixels if pixels.ndim == 3 else pixels[None]
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ([] if single else _get(path, ds, "PerFrameFunctionalGroupsSequence")) or []
    out, intercept_missing = [], False
    for f in range(frames):
        group = per_frame[f] if f < len(per_frame) else None

        def attr(seq, kw, _g=group):
            # single-frame: the top level; enhanced: the frame's functional groups
            return ds.get(kw) if single else _frame_attr(path, ds, _g, shared, seq, kw)

        slope = _number(path, "RescaleSlope", attr("PixelValueTransformationSequence",
                                                   "RescaleSlope"), top_slope)
        intercept = _number(path, "RescaleIntercept", attr("PixelValueTransformationSequence",
                                                           "RescaleIntercept"), top_intercept)
        slope = 1.0 if slope is None else slope
        if slope == 0:
            raise DicomReadError(f"{path}: RescaleSlope is 0 (every HU would be the intercept)")
        if intercept is None:
            intercept, intercept_missing = 0.0, True
        hu = _to_hu(stack[f], slope, intercept)
        if not np.isfinite(hu).all():
            raise DicomReadError(f"{path}: RescaleSlope {slope:g} and RescaleIntercept "
                                 f"{intercept:g} give HU beyond the float32 range")
        out.append((CTSlice(
            path=path, frame=None if single else f, header=header,
            position=_floats(attr("PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_floats(attr("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=_floats(attr("PixelMeasuresSequence", "PixelSpacing"), 2),
            slice_thickness=_number(path, "SliceThickness",
                                    attr("PixelMeasuresSequence", "SliceThickness")),
            instance_number=instance, slope=slope, intercept=intercept), hu))
    if intercept_missing:
        warnings.warn(f"{path}: CT image without RescaleIntercept; its HU are read with "
                      "intercept 0 (for the usual unsigned CT storage they are then 1024 "
                      "too high)", DicomHeaderWarning, stacklevel=3)
    return out


def _to_hu(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """stored · slope + intercept as float32 (computed in float64, rounded once)."""
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def _sort_key(item):
    sl, _ = item
    normal = None
    if sl.orientation is not None:
        r, c = np.array(sl.orientation[:3]), np.array(sl.orientation[3:])
        normal = np.cross(r, c)
    if sl.position is not None and normal is not None:
        along = float(np.dot(normal, sl.position))
    elif sl.position is not None:
        along = float(sl.position[2])
    else:
        along = None
    return (0 if along is not None else 1, along if along is not None else 0.0,
            sl.instance_number if sl.instance_number is not None else 0,
            str(sl.path), sl.frame if sl.frame is not None else 0)


def _warn_duplicate_positions(uid: str, slices: List[CTSlice], shown: int = 4) -> None:
    """One :class:`DuplicatePositionWarning` per position that several slices of series
    ``uid`` share (to 0.001 mm), naming their files."""
    at: dict = {}
    for sl in slices:
        if sl.position is not None:
            at.setdefault(tuple(round(v, 3) for v in sl.position), []).append(sl)
    for position, same in at.items():
        if len(same) < 2:
            continue
        names = [str(sl.path) + (f" (frame {sl.frame})" if sl.frame is not None else "")
                 for sl in same]
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        warnings.warn(f"load_ct: {len(same)} slices of series {uid or '(no UID)'} lie at the "
                      f"same ImagePositionPatient {list(position)}: {', '.join(names[:shown])}"
                      f"{more}; all are kept (one slice copied twice?)",
                      DuplicatePositionWarning, stacklevel=4)


def _group(items, root: Path, lazy: bool = False) -> List[CTSeries]:
    groups = {}
    for sl, hu in items:
        key = (str(sl.header.get("SeriesInstanceUID", "")), hu.shape)
        groups.setdefault(key, []).append((sl, hu))
    series = []
    for (uid, _), members in groups.items():
        members.sort(key=_sort_key)
        _warn_duplicate_positions(uid, [sl for sl, _ in members])
        slices = [sl for sl, _ in members]
        series.append(CTSeries(
            hu=(SeriesPixels(slices, (len(members),) + members[0][1].shape) if lazy else
                np.stack([hu for _, hu in members]).astype(np.float32, copy=False)),
            slices=slices, series_uid=uid, source_root=root,
            description=str(members[0][0].header.get("SeriesDescription", ""))))
    series.sort(key=lambda s: (str(s.slices[0].path), s.series_uid))
    return series


def load_ct(path: PathLike, lazy: bool = False) -> CTSeriesList:
    """Read CT images from a DICOM file or a folder (searched recursively).

    Returns a :class:`CTSeriesList` of :class:`CTSeries`, each with ``hu`` float32
    ``[S, H, W]`` in HU (``S`` ordered along the slice normal) and ``slices`` (source
    metadata for :func:`save_ct`). A file that is not a usable CT image raises
    :class:`DicomReadError`; in a folder such files are skipped with a warning each and
    counted (``result.skipped``); a folder with no CT image raises
    :class:`NoCTImagesError`. A missing path raises ``FileNotFoundError``.

    ``lazy``: every file is still read and checked, but the pixels are not kept: each
    series' ``hu`` is a :class:`SeriesPixels` that reads them again when indexed (memory
    independent of the series' length, for reading a series in chunks).
    """
    root = Path(path)

    def slices_of(file, ds, pixels):
        found = _slices_of(file, ds, pixels)
        # lazy: a zero-memory stand-in of the right shape for each slice's pixels
        return [(sl, np.broadcast_to(np.float32(0), hu.shape)) for sl, hu in found] if lazy else found

    if root.is_file():
        ds, pixels = _read_file(root)
        return CTSeriesList(_group(slices_of(root, ds, pixels), root.parent, lazy),
                            files_seen=1)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    items, skipped = [], []
    for file in files:
        try:
            ds, pixels = _read_file(file)
            items.extend(slices_of(file, ds, pixels))
        except DicomReadError as exc:
            reason = str(exc)
            skipped.append((file, reason))
            warnings.warn(f"load_ct: skipping {reason}", stacklevel=2)
    if skipped:
        warnings.warn(f"load_ct: skipped {len(skipped)} of {len(files)} files in {root}",
                      stacklevel=2)
    if not items:
        raise NoCTImagesError(f"{root}: no CT images found ({len(files)} files looked at, "
                              f"{len(skipped)} skipped)")
    return CTSeriesList(_group(items, root, lazy), skipped=skipped, files_seen=len(files))
