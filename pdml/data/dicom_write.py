"""DICOM CT output: :func:`save_ct`, :class:`SeriesWriter`.

Writing (:func:`save_ct`): one new single-frame CT image per slice, derived from its
source slice (same patient, study, frame of reference and geometry; new series and SOP
instance UIDs; ImageType DERIVED\\SECONDARY; a SeriesDescription naming what made it;
the series, content and instance-creation date and time of the writing),
stored as signed 16-bit integers with RescaleSlope 1 and RescaleIntercept 0 (HU rounded to
the nearest integer, clipped to [-32768, 32767]), Explicit VR Little Endian. Each file is
written to a temporary name in the output folder, flushed, then linked to its final name,
which fails instead of replacing an existing file; writing into the folder the series was
read from is refused. Both are allowed only when asked (``overwrite=True``,
``allow_input_dir=True``).
"""
from __future__ import annotations

import copy
import io
import os
from datetime import datetime
from pathlib import Path
from typing import List

import numpy as np
import pydicom
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DS, MAX_VALUE_LEN, validate_value

from pdml._files import atomic_write_bytes
from pdml.data.dicom_series import PIXEL_DATA_KEYWORDS, CTSeries, CTSlice, PathLike

_INT16_MIN, _INT16_MAX = -32768, 32767

# Attributes of the source that do not describe the new image and must not be copied.
_DROP = (
    *PIXEL_DATA_KEYWORDS, "LargestImagePixelValue",
    "SmallestImagePixelValue", "IconImageSequence", "PixelPaddingValue",
    "PixelPaddingRangeLimit", "LossyImageCompression", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence", "NumberOfFrames", "DimensionIndexSequence",
    "DimensionOrganizationSequence", "FrameIncrementPointer", "ReferencedImageSequence",
    "SourceImageSequence", "WindowCenterWidthExplanation", "ContentQualification",
    "ImageComments", "PresentationLUTShape", "DimensionOrganizationType",
    "ConcatenationFrameOffsetNumber", "InConcatenationNumber", "InstanceCreatorUID",
    "PixelPresentation", "VolumetricProperties", "VolumeBasedCalculationTechnique",
    "AcquisitionContextSequence", "BurnedInAnnotation", "RecognizableVisualFeatures",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData", "PaletteColorLookupTableUID",
    "ICCProfile", "ColorSpace",
)


def _valid_uid(value) -> str:
    """``value`` if it is a valid DICOM UID, else a valid UID derived from it
    deterministically (some sources carry e.g. hex digests as UIDs; mapping them keeps
    every derived slice of one study in one study)."""
    uid = pydicom.uid.UID(str(value))
    return str(uid) if uid.is_valid else generate_uid(entropy_srcs=[str(value)])


def _derived_dataset(sl: CTSlice, stored: np.ndarray, series_uid: str, index: int,
                     description: str) -> Dataset:
    src = sl.header
    ds = Dataset()
    for elem in src:
        if elem.tag.group == 0x0002 or elem.keyword in _DROP or elem.tag.is_private:
            continue
        ds.add(copy.deepcopy(elem))
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if keyword in ds and ds.get(keyword):
            setattr(ds, keyword, _valid_uid(ds.get(keyword)))
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
            "DeidentificationMethod" in ds or "DeidentificationMethodCodeSequence" in ds):
        ds.DeidentificationMethod = "unspecified (source marked PatientIdentityRemoved)"
    now = datetime.now()
    sop_uid = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SeriesDescription = description[:64]
    ds.DerivationDescription = description[:1024]
    ds.SeriesNumber = int(src.get("SeriesNumber", 0) or 0) + 1000
    ds.InstanceNumber = index + 1
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    # Geometry: a single-frame source's own strings are kept (exact); for a frame of an
    # enhanced CT the values come from its functional groups, written as valid DS.
    for keyword, value in (("ImagePositionPatient", sl.position),
                           ("ImageOrientationPatient", sl.orientation),
                           ("PixelSpacing", sl.pixel_spacing),
                           ("SliceThickness", sl.slice_thickness)):
        if value is not None and (sl.frame is not None or keyword not in ds):
            values = [DS(v, auto_format=True) for v in np.atleast_1d(value)]
            setattr(ds, keyword, values if len(values) > 1 else values[0])
    for keyword in ("KVP", "AcquisitionNumber", "PatientPosition", "FrameOfReferenceUID",
                    "PositionReferenceIndicator", "Manufacturer", "ReferringPhysicianName",
                    "AccessionNumber", "StudyID", "PatientSex", "PatientBirthDate"):
        if keyword not in ds:
            setattr(ds, keyword, generate_uid() if keyword == "FrameOfReferenceUID" else "")
    for keyword in ("StudyDate", "StudyTime"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    # General Series Laterality (type 2C) is required when the body part is unknown or
    # paired, and must be absent for an unpaired one: add it empty only when unknown.
    if "Laterality" not in ds and not str(ds.get("BodyPartExamined", "")).strip():
        ds.Laterality = ""
    _sanitise_values(ds)
    source = Dataset()
    source.ReferencedSOPClassUID = src.get("SOPClassUID", CTImageStorage)
    source.ReferencedSOPInstanceUID = _valid_uid(src.get("SOPInstanceUID", ""))
    if sl.frame is not None:
        source.ReferencedFrameNumber = sl.frame + 1
    ds.SourceImageSequence = [source]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    ds.RescaleType = "HU"
    ds.PixelData = stored.astype("<i2").tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _sanitise_values(ds: Dataset) -> None:
    """Make copied top-level text values valid for their VR, so the derived file validates
    even when the source did not: too-long strings are cut to the VR's maximum, an age such
    as "22Y" is zero-padded ("022Y"), anything else invalid is removed."""
    def valid(vr, items):
        try:
            for item in items:
                validate_value(vr, item, config.RAISE)
            return True
        except (ValueError, TypeError):
            return False

    for elem in list(ds):
        if elem.VR not in ("AS", "AE", "CS", "SH", "LO", "ST", "LT") or elem.value is None:
            continue
        items = list(elem.value) if elem.VM > 1 else [elem.value]
        if not all(isinstance(v, str) for v in items) or valid(elem.VR, items):
            continue
        if elem.VR == "AS":
            items = [v.strip().zfill(4) for v in items]
        else:
            items = [v[: MAX_VALUE_LEN[elem.VR]] if elem.VR in MAX_VALUE_LEN else v
                     for v in items]
        if valid(elem.VR, items):
            elem.value = items if len(items) > 1 else items[0]
        else:
            del ds[elem.tag]


def _write_new(ds: Dataset, target: Path, overwrite: bool) -> None:
    """Write ``ds`` to ``target`` atomically (:func:`pdml._files.atomic_write_bytes`):
    without ``overwrite`` an existing ``target`` is never replaced (FileExistsError)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(target, buf.getvalue(), replace=overwrite)


class SeriesWriter:
    """Writes a new CT series derived from ``series`` into ``out_dir`` a range of slices at
    a time (:meth:`write`), as :func:`save_ct` writes it at once; so a series can be
    denoised and written in chunks, with memory independent of its length.

    The checks of :func:`save_ct` on ``out_dir``, ``description``, the input folder and
    existing targets run on construction (before anything is written); :meth:`write`
    checks each chunk's shape and values. :meth:`remove_written` removes the files this
    writer created (call it when a later chunk fails: no partial series is left behind).
    ``targets``: every file of the series (:func:`derived_paths`).
    """

    def __init__(self, series: CTSeries, out_dir: PathLike, *,
                 description: str = "pdml denoised (patch-wise metric learning)",
                 overwrite: bool = False, allow_input_dir: bool = False):
        if not isinstance(series, CTSeries):
            raise TypeError(f"series must be a CTSeries (an item of load_ct's result), got "
                            f"{type(series).__name__}")
        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir must be a path (str or os.PathLike), got "
                            f"{type(out_dir).__name__}")
        if not isinstance(description, str):
            raise TypeError(f"description must be a str, got {type(description).__name__}")
        out = Path(out_dir).resolve()
        if not allow_input_dir:
            inputs = {series.source_root.resolve()} | {s.path.resolve().parent
                                                        for s in series.slices}
            for folder in inputs:
                if out == folder or folder in out.parents:
                    raise ValueError(f"refusing to write into the input folder {folder}; "
                                     "pass allow_input_dir=True to do so")
        self.series, self.description, self.overwrite = series, description, overwrite
        self.targets = derived_paths(series, out)
        if not overwrite:
            existing = [t for t in self.targets if t.exists()]
            if existing:
                raise FileExistsError(f"{existing[0]} exists ({len(existing)} of the targets); "
                                      "pass overwrite=True to replace")
        out.mkdir(parents=True, exist_ok=True)
        self.series_uid = generate_uid()
        self.created: List[Path] = []

    def write(self, start: int, hu) -> None:
        """Write slices ``start .. start + len(hu) - 1`` from ``hu`` ``[n, H, W]`` HU (NumPy
        or torch); ValueError for another shape or NaN/inf, TypeError for non-real data."""
        hu = _real_array("hu", hu)
        if hu.ndim == 2:
            hu = hu[None]
        want = (len(self.series),) + tuple(self.series.hu.shape[1:])
        if hu.ndim != 3 or hu.shape[1:] != want[1:] or not 0 <= start <= want[0] - hu.shape[0]:
            raise ValueError(f"hu has shape {hu.shape} at slice {start}, the series {want}")
        if not np.isfinite(hu).all():
            raise ValueError("hu contains NaN or inf")
        stored = np.clip(np.rint(hu), _INT16_MIN, _INT16_MAX).astype(np.int16)
        for i in range(hu.shape[0]):
            index = start + i
            target = self.targets[index]
            existed = target.exists()
            _write_new(_derived_dataset(self.series.slices[index], stored[i], self.series_uid,
                                        index, self.description), target, self.overwrite)
            if not existed:
                self.created.append(target)

    def remove_written(self) -> None:
        for path in self.created:
            path.unlink(missing_ok=True)
        self.created = []


def save_ct(series: CTSeries, hu, out_dir: PathLike, *,
            description: str = "pdml denoised (patch-wise metric learning)",
            overwrite: bool = False, allow_input_dir: bool = False) -> List[Path]:
    """Write ``hu`` (``[S, H, W]`` HU, NumPy or torch; S, H, W as ``series.hu``) as a new
    CT series derived from ``series`` in ``out_dir`` (created if missing).

    File ``s`` is ``out_dir / f"{s:04d}_{source stem}[_f{frame}].dcm"``
    (:func:`derived_paths`). Returns the
    written paths. Raises ``FileExistsError`` (before writing anything) when a target
    exists and ``overwrite`` is False, and ``ValueError`` when ``out_dir`` is the folder
    the series was read from (or inside it, or holds one of its files) unless
    ``allow_input_dir``, or when ``hu`` has another shape or holds NaN/inf; ``TypeError``
    naming the argument when ``hu`` is not a NumPy array or torch tensor of real numbers
    (a list, complex, bool) or ``series`` is not a :class:`CTSeries`. A failure while
    writing removes the files this call created (no partial series is left behind).
    :class:`SeriesWriter` writes a series in chunks.
    """
    if not isinstance(series, CTSeries):
        raise TypeError(f"series must be a CTSeries (an item of load_ct's result), got "
                        f"{type(series).__name__}")
    hu = _real_array("hu", hu)
    if hu.ndim == 2:
        hu = hu[None]
    if hu.shape != tuple(series.hu.shape):
        raise ValueError(f"hu has shape {hu.shape}, the series {tuple(series.hu.shape)}")
    if not np.isfinite(hu).all():
        raise ValueError("hu contains NaN or inf")
    writer = SeriesWriter(series, out_dir, description=description, overwrite=overwrite,
                          allow_input_dir=allow_input_dir)
    try:
        writer.write(0, hu)
    except BaseException:
        writer.remove_written()
        raise
    return writer.targets


def derived_paths(series: CTSeries, out_dir: PathLike) -> List[Path]:
    """The files :func:`save_ct` writes for ``series`` into ``out_dir``, in slice order:
    ``out_dir / f"{s:04d}_{source stem}[_f{frame}].dcm"``."""
    out = Path(out_dir)
    return [out / (f"{i:04d}_{sl.path.stem}" + (f"_f{sl.frame:03d}" if sl.frame is not None
                                                 else "") + ".dcm")
            for i, sl in enumerate(series.slices)]


def _real_array(name: str, value) -> np.ndarray:
    """``value`` (a NumPy array or torch tensor of real numbers) as float64 NumPy;
    TypeError naming the argument for anything else (lists, complex, bool, objects)."""
    if hasattr(value, "detach") and hasattr(value, "is_floating_point"):   # a torch tensor
        value = value.detach().cpu()
        value = (value.double() if value.is_floating_point() else value).numpy()  # bf16 too
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array or a torch tensor, got "
                        f"{type(value).__name__}")
    if value.dtype == np.bool_ or not (np.issubdtype(value.dtype, np.integer)
                                       or np.issubdtype(value.dtype, np.floating)):
        raise TypeError(f"{name} must hold real numbers (integer or floating), got dtype "
                        f"{value.dtype}")
    return value.astype(np.float64, copy=False)
