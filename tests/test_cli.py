"""pdml-train / pdml-denoise console scripts: DICOM in, DICOM out, clear errors."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from pdml.cli import denoise_main, train_main
from pdml.models import RRDNGenerator


pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")  # the data cache too


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


# --------------------------------------------------------------------------- what the scripts say

def _help(main) -> str:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    return done


@pytest.mark.parametrize("parser", ["train", "denoise"])
def test_help_shows_real_defaults_and_every_option_has_help(parser, capsys):
    from pdml import cli

    build = {"train": cli._train_parser, "denoise": cli._denoise_parser}[parser]
    _help({"train": train_main, "denoise": denoise_main}[parser])
    text = capsys.readouterr().out
    assert "default: None" not in text and "(default: False)" not in text
    for action in build()._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
        if action.option_strings != ["-h", "--help"] and not action.required:
            assert "default" in action.help or "see below" in action.help or \
                action.option_strings[0] in ("--no-time-limit", "--resume", "--val-ndct",
                                             "--ldct", "--ndct", "--val-ldct"), action.help


def test_train_help_tables_the_presets_and_states_the_resume_schedule(capsys):
    from pdml.training.config import PRESETS

    _help(train_main)
    text = " ".join(capsys.readouterr().out.split())
    row = f"--steps {PRESETS['demo']['steps']} {PRESETS['paper']['steps']} {PRESETS['tiny']['steps']}"
    assert row in text, text
    assert "--lr LR Adam learning rate" in text and "(default: 0.0002)" in text
    assert "0.15 with --loss dml, 0.07 with patchnce" in text
    assert "--resume RUN_DIR --steps N" in text and "linear to 0 at step N" in text
    assert "exits with 130" in text


@pytest.fixture(scope="module")
def unpaired_run(tmp_path_factory, ct_small_dir) -> tuple:
    """A run on one DICOM file (--ldct FILE) and a folder, without validation folders:
    -> (run folder, what it printed). It evaluates training LD slices, with no reference."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("unpaired_run") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = train_main(["--preset", "tiny", "--steps", "2", "--decay-steps", "1",
                         "--ldct", str(ct_small_dir / "CT_small.dcm"), "--ndct", str(ct_small_dir),
                         "--out", str(out), "--no-progress"])
    assert rc == 0
    return out, printed.getvalue()


def test_summary_names_what_was_evaluated(trained_run, unpaired_run):
    out, printed = unpaired_run
    assert "training LD slices" in printed and "held-out" not in printed
    assert "no reference" in printed
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals and all(e["slices_from"] == "training" and e["psnr"] is None for e in evals)
    assert not (out / "checkpoints" / "best.pt").exists()  # no PSNR to rank by
    paired = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()
              if '"eval"' in line]
    assert paired and all(e["slices_from"] == "validation" for e in paired)


def test_denoise_says_which_checkpoint_of_a_run_folder_it_uses(tmp_path, trained_run,
                                                              unpaired_run, ct_small_dir, capsys):
    for run, name in ((trained_run, "best.pt"), (unpaired_run[0], "last.pt")):
        out = tmp_path / name
        assert denoise_main(["--checkpoint", str(run), "--input", str(ct_small_dir),
                             "--output", str(out), "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert f"checkpoint {run / 'checkpoints' / name} (step 2" in printed, printed


def test_denoise_into_existing_files_names_the_flag_and_writes_nothing(tmp_path, trained_run,
                                                                     ct_small_dir, capsys):
    argv = ["--checkpoint", str(trained_run), "--input", str(ct_small_dir), "--output",
            str(tmp_path / "out"), "--no-progress"]
    assert denoise_main(argv) == 0
    before = _folder_hash(tmp_path / "out")
    capsys.readouterr()
    assert denoise_main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0] and "overwrite=True" not in lines[0]
    assert "exists" in lines[0] and "wrote" not in captured.out
    assert _folder_hash(tmp_path / "out") == before
    assert denoise_main(argv + ["--overwrite"]) == 0
    assert "wrote 1 slice(s)" in capsys.readouterr().out


def test_a_file_that_is_not_a_checkpoint_is_named_as_such_in_one_short_line(tmp_path,
                                                                            ct_small_dir, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not a checkpoint\n")
    rc = denoise_main(["--checkpoint", str(notes), "--input", str(ct_small_dir), "--output",
                       str(tmp_path / "out"), "--no-progress"])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(lines) == 1
    assert "not a checkpoint file" in lines[0] and len(lines[0]) < 100 + len(str(notes)), lines[0]


def test_crop_larger_than_the_slices_blames_the_right_option(tmp_path, ct_small_dir, capsys):
    def err(argv):
        assert train_main(argv + ["--preset", "tiny", "--no-progress", "--out",
                                  str(tmp_path / "run")]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1
        return lines[0]

    builtin = err(["--crop", "4096"])  # the built-in data: its slice size is --builtin-size
    assert "--builtin-size 64" in builtin and "--crop 4096" in builtin and "--ldct" not in builtin
    own = err(["--crop", "256", "--ldct", str(ct_small_dir), "--ndct", str(ct_small_dir)])
    assert f"--ldct {ct_small_dir}" in own and "128x128" in own and "--crop 256" in own
    assert not (tmp_path / "run").exists()


def test_resume_refuses_settings_it_cannot_change(trained_run, capsys):
    rc = train_main(["--resume", str(trained_run), "--lr", "1e-3", "--preset", "paper", "--seed", "0"])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(lines) == 1
    assert "--lr 0.001 differs from the run's 0.0002" in lines[0], lines[0]
    assert "--preset paper differs from the run's tiny" in lines[0] and "--seed" not in lines[0]
    assert "--steps" in lines[0]  # what may change
    rc = train_main(["--resume", str(trained_run), "--out", str(trained_run.parent / "other")])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(lines) == 1 and "--out" in lines[0]


def test_ctrl_c_outside_the_steps_is_one_line_and_status_130(monkeypatch, capsys):
    import pdml.training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pdml.training, "train", interrupted)
    assert train_main(["--preset", "tiny", "--no-progress"]) == 130
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "interrupted" in captured.err
    assert "Traceback" not in captured.err


def test_ctrl_c_in_pdml_denoise_is_one_line_and_status_130(tmp_path, trained_run, ct_small_dir,
                                                          monkeypatch, capsys):
    import pdml.inference

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pdml.inference, "denoise_hu", interrupted)
    rc = denoise_main(["--checkpoint", str(trained_run), "--input", str(ct_small_dir),
                       "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.dcm"))


def test_denoise_warns_of_slices_at_one_position_naming_the_files(tmp_path, trained_run, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("first.dcm", "copy.dcm"):  # the same slice twice
        shutil.copy(get_testdata_file("CT_small.dcm"), inp / name)
    assert denoise_main(["--checkpoint", str(trained_run), "--input", str(inp), "--output",
                         str(tmp_path / "out"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "position" in line]
    assert len(warning) == 1 and "first.dcm" in warning[0] and "copy.dcm" in warning[0], captured.err
    assert "wrote 2 slice(s) of 1 series" in captured.out


@pytest.mark.parametrize("option,value,words", [("--tile", "-1", "--tile must be >= 0"),
                                                ("--threads", "0", "--threads must be >= 1")])
def test_denoise_bad_tile_or_threads_is_one_line(tmp_path, capsys, option, value, words):
    rc = denoise_main(["--checkpoint", str(tmp_path / "none.pt"), "--input", str(tmp_path),
                       "--output", str(tmp_path / "out"), option, value])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err
