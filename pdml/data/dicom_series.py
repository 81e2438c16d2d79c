"""What reading DICOM (:mod:`pdml.data.dicom_read`) and writing it back
(:mod:`pdml.data.dicom_write`) share: the records of a series (:class:`CTSlice`, where a
slice came from and its header; :class:`CTSeries`, a series' HU and slices) and the
header elements that hold pixels (:data:`PIXEL_DATA_KEYWORDS`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import numpy as np
from pydicom.dataset import Dataset

if TYPE_CHECKING:  # the reader's lazy pixels; named by an annotation only, never run
    from pdml.data.dicom_read import SeriesPixels

PathLike = Union[str, os.PathLike]

PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
"""The elements that hold an image's pixels: a :class:`CTSlice`'s header never keeps them,
and a derived image gets its own."""


@dataclass
class CTSlice:
    """Where one slice of a series came from, and its header for writing back.

    ``path``: source file. ``frame``: frame index in a multi-frame file, None for a
    single-frame file. ``header``: the source dataset without its pixel data (a copy).
    ``position``: ImagePositionPatient in mm or None. ``orientation``: the six direction
    cosines or None. ``pixel_spacing``: (row, column) spacing in mm or None.
    ``slope``/``intercept``: the rescale used for this slice.
    """

    path: Path
    frame: Optional[int]
    header: Dataset
    position: Optional[Tuple[float, float, float]]
    orientation: Optional[Tuple[float, ...]]
    pixel_spacing: Optional[Tuple[float, float]]
    slice_thickness: Optional[float]
    instance_number: Optional[int]
    slope: float
    intercept: float


@dataclass
class CTSeries:
    """One CT series: ``hu`` float32 ``[S, H, W]`` in HU (a
    :class:`~pdml.data.dicom_read.SeriesPixels` reading
    the files on demand when loaded with ``lazy=True``), slice s from ``slices[s]``."""

    hu: Union[np.ndarray, "SeriesPixels"]
    slices: List[CTSlice]
    series_uid: str
    source_root: Path
    description: str = ""

    @property
    def paths(self) -> List[Path]:
        return [s.path for s in self.slices]

    @property
    def pixel_spacing_mm(self) -> Optional[Tuple[float, float]]:
        """(row, column) spacing of the first slice in mm, None when the files lack it."""
        return self.slices[0].pixel_spacing

    def __len__(self) -> int:
        return self.hu.shape[0]
