"""Synthetic CT trees in the public low-dose CT layouts, written with pydicom.

- ``mayo``: the AAPM/Mayo Low Dose CT Grand Challenge: ``ROOT/<patient>/full_1mm/*.IMA``
  and ``ROOT/<patient>/quarter_1mm/*.IMA``;
- ``tcia``: TCIA's LDCT-and-Projection-data: ``ROOT/<patient>/<study>/<series>/*.dcm``,
  the dose told by SeriesDescription only ("Full Dose Images" / "Low Dose Images").

Each patient's slices: a phantom (:func:`pdml.data.phantom`) per position; ND = phantom
+ N(0, ``nd_noise``) HU, LD = phantom + N(0, ``ld_noise``) HU, stored as unsigned 16-bit
with RescaleIntercept -1024, a private tag block, PatientID = the patient's name.
Options: ``missing``: ``(patient, index)`` of an ND slice left out; ``odd``: a patient
whose LD series gets one extra file of another size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SPACING_MM = 0.7
SLICE_MM = 1.0


def write_slice(path: Path, hu: np.ndarray, *, patient: str, study: str, series: str,
                frame_of_reference: str, z: float, description: str, instance: int,
                spacing: float = SPACING_MM) -> None:
    """One CT image file: ``hu`` [H, W] HU at ImagePositionPatient (0, 0, z)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = patient
    ds.PatientName = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame_of_reference
    ds.SeriesDescription = description
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, round(z, 3)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = SLICE_MM
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    block = ds.private_block(0x0019, "SYNTHETIC SCANNER", create=True)
    block.add_new(0x10, "LO", "private value")
    ds.PixelData = np.clip(np.rint(hu + 1024), 0, 65535).astype("<u2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_tree(root: Path, layout: str, patients=("P001", "P002"), slices: int = 6,
               size: int = 64, ld_noise: float = 60.0, nd_noise: float = 10.0,
               missing=None, odd=None, seed: int = 0) -> dict:
    """Write a tree (module doc) under ``root``; -> ``{patient: {"ld": folder, "nd":
    folder}}`` (the series folders)."""
    from pdml.data import phantom

    rng = np.random.default_rng(seed)
    out = {}
    for p, patient in enumerate(patients):
        study, frame_of_reference = generate_uid(), generate_uid()
        folders = {}
        for dose in ("nd", "ld"):
            if layout == "mayo":
                folder = root / patient / ("full_1mm" if dose == "nd" else "quarter_1mm")
                description = "FULL DOSE 1MM" if dose == "nd" else "QUARTER DOSE 1MM"
                suffix = ".IMA"
            elif layout == "tcia":
                folder = root / patient / f"study-{p}" / f"series-{0 if dose == 'nd' else 1}"
                description = "Full Dose Images" if dose == "nd" else "Low Dose Images"
                suffix = ".dcm"
            else:
                raise ValueError(layout)
            folders[dose] = folder
            series = generate_uid()
            for k in range(slices):
                if missing == (patient, k) and dose == "nd":
                    continue
                truth = phantom(size, np.random.default_rng([seed, p, k]))
                noise = ld_noise if dose == "ld" else nd_noise
                hu = truth + rng.normal(0, noise, truth.shape)
                write_slice(folder / f"{patient}_{dose}_{k:04d}{suffix}", hu, patient=patient,
                            study=study, series=series, frame_of_reference=frame_of_reference,
                            z=-100.0 + SLICE_MM * k, description=description, instance=k + 1)
            if odd == patient and dose == "ld":
                write_slice(folder / f"{patient}_{dose}_odd{suffix}",
                            np.full((size // 2, size // 2), 40.0), patient=patient, study=study,
                            series=series, frame_of_reference=frame_of_reference,
                            z=-100.0 + SLICE_MM * slices, description=description,
                            instance=slices + 1)
        out[patient] = folders
    return out


def read_uid(path: Path, keyword: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))
