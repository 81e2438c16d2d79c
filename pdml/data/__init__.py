"""CT data for pdml: DICOM in and out, HU window, low-dose simulation, acquisition
shift, wavelet split, the built-in dataset and PyTorch datasets.

Units: images are float32 arrays in HU; the networks' scale is the paper's window
``[-1000, 1000]`` HU -> ``[0, 1]`` (:func:`hu_to_unit`, :func:`unit_to_hu`).
Each module's docstring gives its details: ``dicom`` (reading, writing), ``hu``,
``simulate`` (projector, FBP, low dose), ``shift`` (acquisition shift and its numbers),
``wavelet``, ``builtin`` (the built-in dataset), ``datasets`` (torch datasets),
``layouts`` (sources, the patient-folder layout, the patient split), ``pairing`` (slices
paired by position), ``store`` (the decoded-slice cache).
"""
from pdml.data.builtin import BuiltinDataset, BuiltinRecipe, builtin_dataset, cache_dir, phantom
from pdml.data.datasets import (PairedCropDataset, PairedCTDataset, UnpairedCTDataset,
                                random_crop_flip, read_slices)
from pdml.data.dicom import (CTSeries, CTSeriesList, CTSlice, DicomHeaderWarning, DicomReadError,
                             DuplicatePositionWarning, NoCTImagesError, SeriesPixels,
                             SeriesWriter, derived_paths, load_ct, save_ct)
from pdml.data.hu import HU_WINDOW, hu_to_unit, unit_to_hu
from pdml.data.shift import (BUILTIN_ND_SHIFT, KVP_120_TO_80, KVP_120_TO_100,
                             AcquisitionShift)
from pdml.data.simulate import (MU_WATER_PER_MM, fbp, projection_angles, radon,
                                simulate_low_dose)
from pdml.data.wavelet import wavelet_split

__all__ = [
    "load_ct", "save_ct", "derived_paths", "CTSeries", "CTSeriesList", "CTSlice",
    "SeriesPixels", "SeriesWriter",
    "DicomReadError", "NoCTImagesError", "DicomHeaderWarning", "DuplicatePositionWarning",
    "HU_WINDOW", "hu_to_unit", "unit_to_hu",
    "simulate_low_dose", "radon", "fbp", "projection_angles", "MU_WATER_PER_MM",
    "AcquisitionShift", "BUILTIN_ND_SHIFT", "KVP_120_TO_100", "KVP_120_TO_80",
    "wavelet_split",
    "builtin_dataset", "BuiltinDataset", "BuiltinRecipe", "cache_dir", "phantom",
    "UnpairedCTDataset", "PairedCropDataset", "PairedCTDataset", "read_slices", "random_crop_flip",
]
