"""pdml-train / pdml-denoise console scripts: DICOM in, DICOM out, clear errors."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from pdml.cli import denoise_main, train_main
from pdml.models import RRDNGenerator


pytestmark = pytest.mark.usefixtures("one_thread")


def _folder_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ct_small_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct_small_input")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "CT_small.dcm")
    return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ct_small_dir) -> Path:
    """A 2-step run on unpaired DICOM folders with paired validation folders."""
    out = tmp_path_factory.mktemp("dicom_run") / "run"
    rc = train_main(["--preset", "tiny", "--steps", "2", "--decay-steps", "1",
                     "--ldct", str(ct_small_dir), "--ndct", str(ct_small_dir),
                     "--val-ldct", str(ct_small_dir), "--val-ndct", str(ct_small_dir),
                     "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_train_on_dicom_folders_with_paired_validation(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["ldct"] is not None
    assert ckpt["best"]["psnr"] is not None  # paired validation gives a PSNR to rank by


def test_denoise_ct_small_writes_a_valid_dicom_with_the_same_geometry(
        tmp_path, trained_run, ct_small_dir, capsys, precision="fp32"):
    before = _folder_hash(ct_small_dir)
    out = tmp_path / "denoised"
    rc = denoise_main(["--checkpoint", str(trained_run / "checkpoints" / "last.pt"),
                       "--input", str(ct_small_dir), "--output", str(out),
                       "--precision", precision, "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "wrote 1 slice(s) of 1 series" in capsys.readouterr().out
    assert _folder_hash(ct_small_dir) == before  # the input is untouched
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 1
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    new = pydicom.dcmread(files[0])
    assert new.Modality == "CT" and new.SeriesInstanceUID != src.SeriesInstanceUID
    assert (new.Rows, new.Columns) == (src.Rows, src.Columns)
    for key in ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient"):
        assert [float(v) for v in new[key].value] == pytest.approx([float(v) for v in src[key].value])
    assert new.FrameOfReferenceUID == src.FrameOfReferenceUID
    hu_new = new.pixel_array * float(new.RescaleSlope) + float(new.RescaleIntercept)
    hu_src = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
    assert hu_new.shape == hu_src.shape and np.isfinite(hu_new).all()
    # the denoiser keeps the anatomy: the images correlate strongly
    assert np.corrcoef(hu_new.ravel(), hu_src.ravel())[0, 1] > 0.9


def test_denoise_single_file_and_refuses_to_write_into_the_input(tmp_path, trained_run, ct_small_dir,
                                                                  capsys):
    ckpt = str(trained_run / "checkpoints" / "last.pt")
    before = _folder_hash(ct_small_dir)
    rc = denoise_main(["--checkpoint", ckpt, "--input", str(ct_small_dir / "CT_small.dcm"),
                       "--output", str(ct_small_dir / "out"), "--no-progress"])
    assert rc == 2 and "never writes into its input" in capsys.readouterr().err
    assert _folder_hash(ct_small_dir) == before and not (ct_small_dir / "out").exists()
    rc = denoise_main(["--checkpoint", str(trained_run), "--input",
                       str(ct_small_dir / "CT_small.dcm"), "--output", str(tmp_path / "o"),
                       "--no-progress"])
    assert rc == 0 and len(list((tmp_path / "o").glob("*.dcm"))) == 1
    # a second run does not silently replace the files
    rc = denoise_main(["--checkpoint", ckpt, "--input", str(ct_small_dir), "--output",
                       str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "exists" in capsys.readouterr().err


def test_denoise_bad_arguments_give_clear_errors(tmp_path, trained_run, ct_small_dir, capsys):
    ckpt = str(trained_run / "checkpoints" / "last.pt")
    out = str(tmp_path / "out")

    def err(argv):
        assert denoise_main(argv + ["--no-progress"]) == 2
        return capsys.readouterr().err

    assert "no such file or folder" in err(["--checkpoint", ckpt, "--input",
                                            str(tmp_path / "missing"), "--output", out])
    not_ct = tmp_path / "not_ct"
    not_ct.mkdir()
    (not_ct / "notes.txt").write_text("no images here")
    assert "no CT images" in err(["--checkpoint", ckpt, "--input", str(not_ct), "--output", out])
    # a checkpoint of another model (a plain state dict)
    torch.save({"state_dict": {"conv.weight": torch.zeros(3, 3)}}, tmp_path / "other.pt")
    assert "not a pdml-train checkpoint" in err(["--checkpoint", str(tmp_path / "other.pt"),
                                                 "--input", str(ct_small_dir), "--output", out])
    # a pdml checkpoint whose generator weights do not fit its config
    good = torch.load(ckpt, weights_only=True)
    good["model"]["generator"] = RRDNGenerator(features=16).state_dict()
    torch.save(good, tmp_path / "mismatch.pt")
    assert "do not fit" in err(["--checkpoint", str(tmp_path / "mismatch.pt"), "--input",
                                str(ct_small_dir), "--output", out])
    assert "does not exist" in err(["--checkpoint", str(tmp_path / "nope.pt"), "--input",
                                    str(ct_small_dir), "--output", out])
    assert not Path(out).exists()


def test_train_bad_arguments_give_clear_errors(tmp_path, capsys):
    def err(argv):
        assert train_main(argv + ["--preset", "tiny", "--no-progress",
                                  "--out", str(tmp_path / "run")]) == 2
        return capsys.readouterr().err

    assert "no such folder" in err(["--ldct", str(tmp_path / "missing"), "--ndct", str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("not a CT")
    assert "no CT images" in err(["--ldct", str(empty), "--ndct", str(empty)])
    assert "--ldct and --ndct go together" in err(["--ldct", str(empty)])
    assert "not a pdml-train checkpoint" in err(["--resume", str(_foreign_run(tmp_path))])
    assert "last.pt does not exist" in err(["--resume", str(empty)])


def _foreign_run(tmp_path) -> Path:
    run = tmp_path / "foreign"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"weights": torch.zeros(1)}, run / "checkpoints" / "last.pt")
    return run
