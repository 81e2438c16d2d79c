"""DICOM CT input and output: :func:`load_ct` reads a file or a folder into CT series
(:mod:`pdml.data.dicom_read`), :func:`save_ct` and :class:`SeriesWriter` write a new
series derived from one (:mod:`pdml.data.dicom_write`), over the records both share
(:mod:`pdml.data.dicom_series`). Each module's doc says what it does with the files.
"""
from pdml.data.dicom_read import (ENHANCED_CT_IMAGE_STORAGE, CTSeriesList, DicomHeaderWarning,
                                  DicomReadError, DuplicatePositionWarning, NoCTImagesError,
                                  SeriesPixels, load_ct)
from pdml.data.dicom_series import CTSeries, CTSlice, PathLike
from pdml.data.dicom_write import SeriesWriter, derived_paths, save_ct

__all__ = ["ENHANCED_CT_IMAGE_STORAGE", "CTSeries", "CTSeriesList", "CTSlice",
           "DicomHeaderWarning", "DicomReadError", "DuplicatePositionWarning", "NoCTImagesError",
           "PathLike", "SeriesPixels", "SeriesWriter", "derived_paths", "load_ct", "save_ct"]
