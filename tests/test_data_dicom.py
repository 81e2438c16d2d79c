"""DICOM reading and writing (pdml.data.dicom) on the real CT files that ship offline."""
import hashlib
import shutil
import subprocess
import warnings
from datetime import datetime

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, UID, generate_uid

from pdml._files import TEMP_NAME
from pdml.data import (DicomReadError, DuplicatePositionWarning, NoCTImagesError, SeriesPixels,
                       SeriesWriter, load_ct, save_ct)

# docs/data.md: every real CT slice that installs offline
REAL_CT = ["CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_UNCR.dcm", "explicit_VR-UN.dcm",
           "bad_sequence.dcm", "eCT_Supplemental.dcm"]

# bad_sequence.dcm carries invalid header values (a hex-digest UID, a 64-character SH)
pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
              pytest.mark.filterwarnings("ignore:The value length")]


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def pydicom_hu(ds):
    """pydicom's pixel_array * slope + intercept, slope/intercept from the top level or,
    for enhanced CT, the shared functional group."""
    arr = ds.pixel_array
    if "RescaleSlope" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    else:
        item = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
        slope, intercept = float(item.RescaleSlope), float(item.RescaleIntercept)
    hu = (arr * slope + intercept).astype(np.float32)
    return hu if hu.ndim == 3 else hu[None]


@pytest.mark.parametrize("name", REAL_CT)
def test_real_ct_hu_equals_pydicom_exactly(name):
    path = get_testdata_file(name)
    before = sha256(path)
    series = load_ct(path)
    assert len(series) == 1
    expected = pydicom_hu(pydicom.dcmread(path))
    assert series[0].hu.dtype == np.float32
    assert series[0].hu.shape == expected.shape
    # slices are ordered along the slice normal: compare each with its source frame
    order = [sl.frame or 0 for sl in series[0].slices]
    assert sorted(order) == list(range(len(order)))
    assert np.array_equal(series[0].hu, expected[order])
    assert sha256(path) == before            # input never modified


def write_slice(path, hu_slice, series_uid, position=None, instance=None, modality="CT",
                study_uid="1.2.3.4"):
    """A minimal valid single-frame CT file with stored = hu + 1024 (uint16)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.PatientID, ds.PatientName = modality, "TEST", "Test^Patient"
    if position is not None:
        ds.ImagePositionPatient = [0, 0, position]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if instance is not None:
        ds.InstanceNumber = instance
    ds.PixelSpacing = [0.7, 0.7]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = hu_slice.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (hu_slice + 1024).astype("<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_series_grouping_and_ordering(tmp_path):
    positions = [12.5, -3.0, 40.0, 7.25, 0.0]          # deliberately unsorted
    instances = [3, 1, 5, 4, 2]                        # disagrees with the positions
    uid_a, uid_b = generate_uid(), generate_uid()
    (tmp_path / "sub").mkdir()
    for k, (pos, inst) in enumerate(zip(positions, instances)):
        # slice value encodes its position; file names in yet another order
        write_slice(tmp_path / "sub" / f"z{9 - k}.dcm", np.full((8, 8), int(pos * 4)),
                    uid_a, position=pos, instance=inst)
    for k, inst in enumerate([2, 3, 1]):               # no positions: InstanceNumber order
        write_slice(tmp_path / f"b{k}.dcm", np.full((8, 8), inst * 10), uid_b, instance=inst)
    series = load_ct(tmp_path)
    assert len(series) == 2 and series.skipped == []
    by_uid = {s.series_uid: s for s in series}
    a = by_uid[uid_a]
    assert [sl.position[2] for sl in a.slices] == sorted(positions)
    assert np.array_equal(a.hu[:, 0, 0], np.array(sorted(positions)) * 4)
    b = by_uid[uid_b]
    assert np.array_equal(b.hu[:, 0, 0], [10, 20, 30])


def dciodvfy_errors(path):
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy (Debian package dicom3tools) is required: the test set-up installs it"
    out = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


@pytest.mark.parametrize("name", ["J2K_pixelrep_mismatch.dcm", "bad_sequence.dcm",
                                  "eCT_Supplemental.dcm", "693_UNCR.dcm"])
def test_write_read_round_trip(tmp_path, name):
    src = get_testdata_file(name)
    before = sha256(src)
    series = load_ct(src)[0]
    rng = np.random.default_rng(1)
    denoised = series.hu + rng.uniform(-20, 20, series.hu.shape).astype(np.float32)
    paths = save_ct(series, torch.from_numpy(denoised), tmp_path / "out")
    assert len(paths) == len(series)
    back = load_ct(tmp_path / "out")
    assert len(back) == 1 and len(back[0]) == len(series)
    assert np.abs(back[0].hu - denoised).max() <= 0.5
    src_ds = pydicom.dcmread(src, stop_before_pixels=True)
    sop_uids = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.SeriesInstanceUID != src_ds.SeriesInstanceUID
        assert UID(ds.SeriesInstanceUID).is_valid and UID(ds.SOPInstanceUID).is_valid
        assert ds.SOPInstanceUID != src_ds.SOPInstanceUID
        sop_uids.add(ds.SOPInstanceUID)
        assert ds.PatientID == src_ds.get("PatientID", ds.PatientID)
        if UID(src_ds.StudyInstanceUID).is_valid:
            assert ds.StudyInstanceUID == src_ds.StudyInstanceUID
        assert ds.ImageType[0] == "DERIVED" and "pdml" in ds.SeriesDescription
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(series.pixel_spacing_mm)
        assert dciodvfy_errors(path) == []
    assert len(sop_uids) == len(paths)
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in paths}) == 1
    assert sha256(src) == before
    # no temporary file of the atomic writes (pdml._files.TEMP_NAME) is left behind
    assert not [f for f in (tmp_path / "out").iterdir() if TEMP_NAME.fullmatch(f.name)]


def test_write_clips_to_int16_range(tmp_path):
    series = load_ct(get_testdata_file("CT_small.dcm"))[0]
    hu = series.hu.copy()
    hu[0, 0, 0], hu[0, 0, 1] = 40000.0, -40000.0
    save_ct(series, hu, tmp_path / "o")
    back = load_ct(tmp_path / "o")[0].hu
    assert back[0, 0, 0] == 32767 and back[0, 0, 1] == -32768


def test_write_refuses_overwrite_and_input_folder(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), inp / "ct.dcm")
    series = load_ct(inp)[0]
    paths = save_ct(series, series.hu, tmp_path / "out")
    first = sha256(paths[0])
    with pytest.raises(FileExistsError):
        save_ct(series, series.hu + 5, tmp_path / "out")
    assert sha256(paths[0]) == first
    save_ct(series, series.hu + 5, tmp_path / "out", overwrite=True)
    assert load_ct(paths[0])[0].hu[0, 0, 0] == series.hu[0, 0, 0] + 5
    with pytest.raises(ValueError, match="input folder"):
        save_ct(series, series.hu, inp)
    with pytest.raises(ValueError, match="input folder"):
        save_ct(series, series.hu, inp / "nested")
    written = save_ct(series, series.hu, inp / "nested", allow_input_dir=True)
    assert written[0].exists()
    with pytest.raises(ValueError, match="shape"):
        save_ct(series, series.hu[:, :10], tmp_path / "bad")


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    series = load_ct(get_testdata_file("CT_small.dcm"))[0]

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.dataset.FileDataset, "save_as", boom, raising=False)
    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", boom)
    with pytest.raises(OSError, match="disk full"):
        save_ct(series, series.hu, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []      # neither target nor temp file


def truncated_copy(tmp_path, name, fraction):
    data = open(get_testdata_file(name), "rb").read()
    path = tmp_path / f"truncated_{name}"
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("name,fraction", [("CT_small.dcm", 0.6), ("CT_small.dcm", 0.01),
                                           ("J2K_pixelrep_mismatch.dcm", 0.6),
                                           ("eCT_Supplemental.dcm", 0.3)])
def test_truncated_file_is_a_clear_error(tmp_path, name, fraction):
    path = truncated_copy(tmp_path, name, fraction)
    with pytest.raises(DicomReadError, match="truncated") as info:
        load_ct(path)
    assert str(path) in str(info.value)


def test_file_without_preamble(tmp_path):
    """Older writers omit the preamble: the dataset starts directly with group 0008."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, src)                         # the dataset alone: no preamble/meta
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(buffer.getvalue())
    assert bare.read_bytes()[:2] == b"\x08\x00"
    assert np.array_equal(load_ct(bare)[0].hu, pydicom_hu(src))


def test_non_dicom_and_non_ct_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a DICOM file\n")
    with pytest.raises(DicomReadError, match="not a DICOM file") as info:
        load_ct(text)
    assert str(text) in str(info.value)
    with pytest.raises(DicomReadError, match="not a CT image"):
        load_ct(get_testdata_file("MR_small.dcm"))
    with pytest.raises(FileNotFoundError):
        load_ct(tmp_path / "missing")


def test_folder_skips_and_counts(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    (tmp_path / "readme.txt").write_text("hello")
    truncated_copy(tmp_path, "CT_small.dcm", 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        series = load_ct(tmp_path)
    messages = [str(w.message) for w in caught if "load_ct" in str(w.message)]
    assert len(series) == 1 and len(series[0]) == 1
    assert len(series.skipped) == 3 and series.files_seen == 4
    assert sum("skipping" in m for m in messages) == 3
    assert any("skipped 3 of 4 files" in m for m in messages)
    reasons = " ".join(r for _, r in series.skipped)
    assert "not a CT image" in reasons and "not a DICOM" in reasons and "truncated" in reasons


def test_empty_or_ct_free_folder(tmp_path):
    with pytest.raises(NoCTImagesError, match="no CT images"):
        load_ct(tmp_path)
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NoCTImagesError, match="1 skipped"):
            load_ct(tmp_path)
    assert [str(w.message).split(":")[1].strip().split(" ")[0] for w in caught] == \
        ["skipping", "skipped"]


def _replace_value(path, old: bytes, new: bytes):
    """Overwrite one header value in the file's bytes (same length): pydicom refuses to
    write a malformed value, a careless scanner export does not."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


# the bytes write_slice stores: tag, VR, length, value (explicit VR little endian)
SLOPE_1 = b"\x28\x00\x53\x10DS\x04\x001.0 "
INTERCEPT_M1024 = b"\x28\x00\x52\x10DS\x08\x00-1024.0 "


@pytest.mark.parametrize("old,new,words", [
    (SLOPE_1, SLOPE_1[:-4] + b"ab  ", "RescaleSlope"),
    (SLOPE_1, SLOPE_1[:-4] + b"0   ", "RescaleSlope is 0"),
    (INTERCEPT_M1024, INTERCEPT_M1024[:-8] + b"1e999   ", "RescaleIntercept"),
    (INTERCEPT_M1024, INTERCEPT_M1024[:-8] + b"nan     ", "RescaleIntercept"),
    (INTERCEPT_M1024, INTERCEPT_M1024[:-8] + b"1\\2     ", "RescaleIntercept"),
    (SLOPE_1, SLOPE_1[:-4] + b"9e  ", "RescaleSlope"),
], ids=["slope-ab", "slope-zero", "intercept-overflow", "intercept-nan", "intercept-two-values",
        "slope-9e"])
def test_one_malformed_slice_is_skipped_in_a_folder_and_named_alone(tmp_path, old, new, words):
    uid = generate_uid()
    for k in range(4):
        write_slice(tmp_path / f"s{k}.dcm", np.full((8, 8), 10 * k), uid, position=float(k),
                    instance=k + 1)
    bad = tmp_path / "s2.dcm"
    _replace_value(bad, old, new)
    before = {p.name: sha256(p) for p in tmp_path.iterdir()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        series = load_ct(tmp_path)
    assert len(series) == 1 and np.array_equal(series[0].hu[:, 0, 0], [0, 10, 30])
    assert [p for p, _ in series.skipped] == [bad] and words in series.skipped[0][1]
    per_file = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(per_file) == 1 and str(bad) in per_file[0] and words in per_file[0]
    with pytest.raises(DicomReadError, match=words) as info:  # the file alone: a clear error
        load_ct(bad)
    assert str(bad) in str(info.value)
    assert {p.name: sha256(p) for p in tmp_path.iterdir()} == before


def test_missing_rescale_intercept_warns_naming_the_file(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    intercept = float(ds.RescaleIntercept)
    del ds.RescaleIntercept
    ds.save_as(tmp_path / "no_intercept.dcm")
    with pytest.warns(UserWarning, match="without RescaleIntercept") as caught:
        series = load_ct(tmp_path / "no_intercept.dcm")
    ours = [w for w in caught if "RescaleIntercept" in str(w.message)]
    assert len(ours) == 1 and str(tmp_path / "no_intercept.dcm") in str(ours[0].message)
    assert ours[0].category.__name__ == "DicomHeaderWarning"
    expected = pydicom_hu(pydicom.dcmread(get_testdata_file("CT_small.dcm")))[0] - intercept
    assert np.array_equal(series[0].hu[0], expected)


def test_written_files_carry_the_time_of_writing(tmp_path):
    """InstanceCreationDate/Time (like the series and content date/time) are those of the
    writing, not copied from the source; the files still validate."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    series = load_ct(get_testdata_file("CT_small.dcm"))[0]
    before = datetime.now().replace(microsecond=0)
    path = save_ct(series, series.hu, tmp_path / "out")[0]
    after = datetime.now()
    ds = pydicom.dcmread(path)
    for date, time in (("InstanceCreationDate", "InstanceCreationTime"),
                       ("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime")):
        written = datetime.strptime(ds[date].value + ds[time].value[:6], "%Y%m%d%H%M%S")
        assert before <= written <= after, (date, written)
    assert src.get("InstanceCreationDate") != ds.InstanceCreationDate  # the source's is old
    assert dciodvfy_errors(path) == []


def test_slices_at_one_position_are_kept_with_a_warning_naming_the_files(tmp_path):
    uid = generate_uid()
    for name, pos in (("a", 0.0), ("b", 5.0), ("c", 5.0), ("d", 5.0), ("e", 10.0)):
        write_slice(tmp_path / f"{name}.dcm", np.full((8, 8), int(pos)), uid, position=pos)
    with pytest.warns(DuplicatePositionWarning) as caught:
        series = load_ct(tmp_path)
    assert len(series) == 1 and len(series[0]) == 5   # all kept
    assert len(caught) == 1                            # one warning per shared position
    message = str(caught[0].message)
    assert all(f"{name}.dcm" in message for name in "bcd"), message
    assert "a.dcm" not in message and "e.dcm" not in message and "[0.0, 0.0, 5.0]" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # distinct positions: no warning
        load_ct(tmp_path / "a.dcm")


# ------------------------------------------------------------------ reading and writing in chunks

def _series_folder(tmp_path, slices=7, shape=(9, 11)):
    uid = generate_uid()
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(slices):
        write_slice(folder / f"s{(k * 3) % slices}.dcm", rng.integers(-1000, 2000, shape),
                    uid, position=float(slices - k), instance=k + 1)
    return folder


@pytest.mark.parametrize("name", ["CT_small.dcm", "eCT_Supplemental.dcm"])
def test_lazy_series_read_the_same_hu_when_indexed(tmp_path, name):
    eager, lazy = load_ct(get_testdata_file(name)), load_ct(get_testdata_file(name), lazy=True)
    assert [len(s) for s in lazy] == [len(s) for s in eager]
    for e, l in zip(eager, lazy):
        assert isinstance(l.hu, SeriesPixels) and l.hu.shape == e.hu.shape
        np.testing.assert_array_equal(np.asarray(l.hu), e.hu)
        np.testing.assert_array_equal(l.hu[-1], e.hu[-1])
        assert [sl.path for sl in l.slices] == [sl.path for sl in e.slices]
    folder = _series_folder(tmp_path)
    eager, lazy = load_ct(folder)[0], load_ct(folder, lazy=True)[0]
    np.testing.assert_array_equal(lazy.hu[2:5], eager.hu[2:5])
    np.testing.assert_array_equal(lazy.hu[5:], eager.hu[5:])
    with pytest.raises(IndexError):
        lazy.hu[7]


def test_writing_in_chunks_gives_the_series_save_ct_writes(tmp_path):
    series = load_ct(_series_folder(tmp_path), lazy=True)[0]
    hu = np.asarray(series.hu) * 0.5 + 3.0
    whole = save_ct(series, hu, tmp_path / "whole")
    writer = SeriesWriter(series, tmp_path / "chunks")
    for start in range(0, len(series), 3):
        writer.write(start, hu[start:start + 3])
    assert [p.name for p in writer.targets] == [p.name for p in whole]
    a, b = load_ct(tmp_path / "whole")[0], load_ct(tmp_path / "chunks")[0]
    np.testing.assert_array_equal(a.hu, b.hu)
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in writer.targets}) == 1


def test_a_bad_chunk_is_refused_and_what_was_written_can_be_removed(tmp_path):
    series = load_ct(_series_folder(tmp_path), lazy=True)[0]
    writer = SeriesWriter(series, tmp_path / "out")
    writer.write(0, np.zeros((3, 9, 11)))
    with pytest.raises(ValueError, match="NaN or inf"):
        writer.write(3, np.full((2, 9, 11), np.nan))
    with pytest.raises(ValueError, match=r"shape \(2, 9, 10\) at slice 3"):
        writer.write(3, np.zeros((2, 9, 10)))
    with pytest.raises(ValueError, match="at slice 6"):
        writer.write(6, np.zeros((2, 9, 11)))   # past the last slice
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 3
    writer.remove_written()
    assert list((tmp_path / "out").glob("*.dcm")) == []
    with pytest.raises(ValueError, match="input folder"):
        SeriesWriter(series, tmp_path / "in" / "sub")
