"""Dataset layouts, the patient split, pairing by position and the decoded-slice store,
on small synthetic trees written with pydicom (tests/ct_trees.py)."""
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from pdml.data import load_ct, wavelet_split
from pdml.data.layouts import (LayoutError, expand_sources, folder_layout, patient_layout,
                               source_files, split_patients)
from pdml.data.pairing import PairingError, describe_unmatched, pair_by_position
from pdml.data.store import SliceRecord, StoreWarning, open_store
from tests.ct_trees import write_slice, write_tree


@pytest.fixture
def mayo(tmp_path):
    root = tmp_path / "mayo"
    write_tree(root, "mayo", slices=4, size=48, missing=("P002", 1), odd="P001")
    return root


def _store(roots, tmp_path, wavelet=None):
    roots = [Path(r) for r in roots]
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreWarning)
        return open_store(source_files(roots), roots, wavelet, cache=tmp_path / "cache")


def test_store_holds_load_ct_slices_and_the_high_band(mayo, tmp_path):
    store = _store([mayo], tmp_path, ("db3", 2))
    assert len(store.records) == 4 + 4 + 1 + 4 + 3   # P001 LD + ND + odd, P002 LD + ND
    for i, rec in enumerate(store.records):
        ref = load_ct(rec.file)[0].hu[0].astype(np.float64)
        np.testing.assert_array_equal(store.slice(i), ref)
        high64 = wavelet_split(ref[None], "db3", 2)[1][0]
        np.testing.assert_allclose(store.slice(i, "high"), high64, atol=1e-3)
        assert rec.shape == ref.shape and rec.patient in ("P001", "P002")
    assert store.records[0].spacing == (0.7, 0.7)
    # the store is mapped, not loaded
    assert isinstance(store.stack([0, 1]).array, np.memmap)


def test_store_is_reused_rebuilt_when_stale_or_damaged(mayo, tmp_path):
    first = _store([mayo], tmp_path)
    again = _store([mayo], tmp_path)   # no warning: the same folder, opened
    assert again.folder == first.folder
    victim = Path(first.records[0].file)
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    with pytest.warns(StoreWarning, match="changed since"):
        fresh = open_store(source_files([mayo]), [mayo], cache=tmp_path / "cache")
    assert fresh.folder != first.folder and not first.folder.exists()   # the stale one is gone
    # damage: a byte of a checked slice, then a truncated array, then no manifest
    data = next(fresh.folder.glob("hu-48x48.f32"))
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.warns(StoreWarning, match="CRC-32"):
        rebuilt = open_store(source_files([mayo]), [mayo], cache=tmp_path / "cache")
    np.testing.assert_array_equal(rebuilt.slice(0), load_ct(rebuilt.records[0].file)[0].hu[0])
    with open(data, "r+b") as fh:
        fh.truncate(100)
    with pytest.warns(StoreWarning, match="bytes"):
        open_store(source_files([mayo]), [mayo], cache=tmp_path / "cache")
    (rebuilt.folder / "manifest.json").unlink()
    with pytest.warns(StoreWarning, match="unreadable manifest"):
        ok = open_store(source_files([mayo]), [mayo], cache=tmp_path / "cache")
    assert len(ok.records) == 16
    with pytest.raises(FileNotFoundError, match="missing"):
        open_store(source_files([mayo]), [mayo], ("db3", 1), cache=tmp_path / "cache",
                   build=False)


def test_store_skips_files_that_are_not_ct(tmp_path):
    root = tmp_path / "d"
    write_slice(root / "a.dcm", np.zeros((16, 16)), patient="X", study="1.2", series="1.3",
                frame_of_reference="1.4", z=0.0, description="full", instance=1)
    (root / "notes.txt").write_text("not DICOM")
    store = _store([root], tmp_path)
    assert len(store.records) == 1 and store.skipped[0][0].endswith("notes.txt")


def test_patient_layout_picks_series_and_drops_the_odd_size(mayo, tmp_path):
    store = _store([mayo], tmp_path)
    with pytest.warns(UserWarning, match=r"P001, LD: 1 slice\(s\) not of the series' size "
                                         r"48x48 left out: .*P001_ld_odd.IMA"):
        groups = patient_layout(store, [mayo])
    assert sorted(groups) == ["P001", "P002"]
    assert {p: (len(g["ld"]), len(g["nd"])) for p, g in groups.items()} == {
        "P001": (4, 4), "P002": (4, 3)}
    assert all("quarter_1mm" in store.records[i].file for i in groups["P002"]["ld"])


def test_tcia_layout_is_told_by_series_description(tmp_path):
    root = tmp_path / "tcia"
    write_tree(root, "tcia", slices=2, size=32)
    store = _store([root], tmp_path)
    groups = patient_layout(store, [root])
    for g in groups.values():
        assert {store.records[i].description for i in g["ld"]} == {"Low Dose Images"}
        assert {store.records[i].description for i in g["nd"]} == {"Full Dose Images"}


def test_layout_errors_are_one_line(mayo, tmp_path):
    extra = mayo / "P001" / "full_3mm"
    write_slice(extra / "x.IMA", np.zeros((48, 48)), patient="P001", study="1.2", series="1.9",
                frame_of_reference="1.4", z=0.0, description="FULL 3MM", instance=1)
    store = _store([mayo], tmp_path)
    with pytest.raises(LayoutError, match=r"patient P001 has 2 ND series \('full_1mm', "
                                          r"'full_3mm'\); pick one with --nd-series"):
        patient_layout(store, [mayo])
    with pytest.raises(LayoutError, match="matches both"):
        patient_layout(store, [mayo], ld_series="1mm", nd_series="full")
    with pytest.raises(LayoutError, match="lies directly in the source"):
        patient_layout(store, [mayo / "P001" / "full_3mm"])
    with pytest.raises(LayoutError, match="no series matched"):
        patient_layout(store, [mayo], ld_series="nothing", nd_series="nothing")
    with pytest.raises(LayoutError, match=r"--ldct .*/nope\*: the pattern matches nothing"):
        expand_sources("--ldct", [str(mayo / "nope*")])
    with pytest.raises(LayoutError, match="no such folder"):
        expand_sources("--ldct", [str(mayo / "missing")])
    assert expand_sources("--ldct", [str(mayo / "P00*" / "quarter_1mm")]) == [
        mayo / "P001" / "quarter_1mm", mayo / "P002" / "quarter_1mm"]


def test_folder_layout_patients_come_from_the_header(mayo, tmp_path):
    store = _store([mayo], tmp_path)
    ld = expand_sources("--ldct", [str(mayo / "*" / "quarter_1mm")])
    nd = expand_sources("--ndct", [str(mayo / "*" / "full_1mm")])
    with pytest.warns(UserWarning, match="P001_ld_odd"):
        groups = folder_layout(store, ld, nd)
    assert {p: (len(g["ld"]), len(g["nd"])) for p, g in groups.items()} == {
        "P001": (4, 4), "P002": (4, 3)}


def test_split_patients():
    names = [f"L{i:03d}" for i in range(10)]
    a = split_patients(names, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert a == split_patients(names, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (7, 2, 1)
    assert sorted(a["train"] + a["val"] + a["test"]) == names       # each patient once
    assert a != split_patients(names, val_fraction=0.2, test_fraction=0.1, seed=4)
    b = split_patients(names, val=["L001"], test=["L002", "L003"])
    assert b["val"] == ["L001"] and b["test"] == ["L002", "L003"] and "L001" not in b["train"]
    with pytest.raises(LayoutError, match="unknown patient"):
        split_patients(names, val=["X9"])
    with pytest.raises(LayoutError, match="both"):
        split_patients(names, val=["L001"], test=["L001"])
    with pytest.raises(LayoutError, match="no patient left"):
        split_patients(["A"], val=["A"])


def _rec(name, patient, position, shape=(8, 8), spacing=(0.7, 0.7)):
    return SliceRecord(file=name, frame=None, patient=patient, frame_of_reference="",
                       series="s", description="", position=position, spacing=spacing,
                       shape=shape, row=0)


def test_pairing_by_position():
    a = [_rec("a0", "P", 0.0), _rec("a1", "P", 1.0), _rec("a2", "P", 2.0), _rec("q0", "Q", 0.0)]
    b = [_rec("b2", "P", 2.05), _rec("b0", "P", -0.04), _rec("bq", "Q", 5.0)]
    pairing = pair_by_position(a, b)
    assert [(a[i].file, b[j].file) for i, j in pairing.pairs] == [("a0", "b0"), ("a2", "b2")]
    assert pairing.unmatched_a == ["a1", "q0"] and pairing.unmatched_b == ["bq"]
    lines = describe_unmatched(pairing, ("LD", "ND"))
    assert lines[0] == "2 LD slice(s) with no ND slice at their position: a1, q0"
    assert pair_by_position(a, b, tolerance_mm=0.01).pairs == []
    # one partner each: the nearest wins
    twice = pair_by_position([_rec("x", "P", 0.0), _rec("y", "P", 0.06)], [_rec("z", "P", 0.05)])
    assert twice.pairs == [(1, 0)] and twice.unmatched_a == ["x"]


def test_pairing_refuses_other_size_spacing_and_no_position():
    with pytest.raises(PairingError, match=r"input a \(8x8\) and reference b \(9x9\) lie at one "
                                           r"position \(0 mm\) but differ in size"):
        pair_by_position([_rec("a", "P", 0.0)], [_rec("b", "P", 0.0, shape=(9, 9))])
    with pytest.raises(PairingError, match="differ in pixel spacing"):
        pair_by_position([_rec("a", "P", 0.0)], [_rec("b", "P", 0.0, spacing=(0.8, 0.8))])
    with pytest.raises(PairingError, match="without ImagePositionPatient"):
        pair_by_position([_rec("a", "P", None)], [_rec("b", "P", 0.0)])
