"""End to end on synthetic trees in both public layouts (train with a patient split,
denoise the test patient, score with pdml-eval), pdml-eval against the trainer's own
evaluation, and the one-line errors of layouts, pairing and pdml-eval."""
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pdml.cli import denoise_main, train_main
from pdml.cli_eval import eval_main
from tests.ct_trees import write_slice, write_tree

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


def _tree_hash(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("layout", ["mayo", "tcia"])
def test_end_to_end_in_a_public_layout(layout, tmp_path, capsys):
    root = tmp_path / layout
    folders = write_tree(root, layout, slices=6, size=64, missing=("P002", 2), odd="P001")
    before = _tree_hash(root)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="P001_ld_odd"):   # the slice of another size, named
        rc = train_main(["--preset", "tiny", "--patients", str(root), "--test-patients", "P002",
                         "--out", str(run), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "patients: train P001; val -; test P002" in out.out
    split = json.loads((run / "config.json").read_text())["resolved"]["patients"]
    assert (split["train"], split["val"], split["test"]) == (["P001"], [], ["P002"])
    assert split["slices"]["P002"] == {"ld": 6, "nd": 5}

    denoised = tmp_path / "denoised"
    assert denoise_main(["--checkpoint", str(run), "--input", str(folders["P002"]["ld"]),
                         "--output", str(denoised), "--no-progress"]) == 0
    report = tmp_path / "report"
    rc = eval_main(["--reference", str(folders["P002"]["nd"]), "--input",
                    str(folders["P002"]["ld"]), "--method", f"pdml={denoised}",
                    "--run", str(run), "--out", str(report)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    # the missing ND slice: its LD slice and its denoised slice are named, not scored
    assert f"P002_ld_0002" in out.err and "with no --reference slice" in out.err
    rows = list(csv.DictReader(open(report / "per_slice.csv")))
    assert len(rows) == 2 * 5 and {r["method"] for r in rows} == {"input", "pdml"}
    assert all("_0002" not in r["slice"] for r in rows)
    md = (report / "report.md").read_text()
    assert "## Patient P002 (5 slice(s), test patient of the run)" in md
    assert "train P001; val -; test P002" in md
    summary = json.loads((report / "summary.json").read_text())
    assert summary["split"]["test"] == ["P002"]
    assert (report / "figure.png").stat().st_size > 1000
    # the scores are those of the metrics on the files as written
    from pdml import metrics
    from pdml.data import load_ct
    ref = load_ct(folders["P002"]["nd"])[0].hu
    first = [r for r in rows if r["method"] == "pdml"][0]
    den = load_ct(denoised)[0]
    k = [s.path.name for s in den.slices].index("0000_P002_ld_0000" + den.slices[0].path.suffix)
    assert float(first["psnr"]) == pytest.approx(float(metrics.psnr(den.hu[k], ref[0])[0]),
                                                 rel=1e-12)
    assert _tree_hash(root) == before                     # the input files never change


def test_pdml_eval_equals_the_trainers_evaluation(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny", "--val-slices", "3", "--out", str(run),
                       "--no-progress"]) == 0
    final = json.loads((run / "summary.json").read_text())["final_eval"]
    capsys.readouterr()
    rc = eval_main(["--held-out", str(run), "--method",
                    f"net={run / 'checkpoints' / 'last.pt'}", "--out", str(tmp_path / "rep")])
    assert rc == 0, capsys.readouterr().err
    table = json.loads((tmp_path / "rep" / "summary.json").read_text())["overall"]
    assert table["net"]["psnr"]["n"] == final["slices"] == 3
    for key in ("psnr", "ssim", "noise_std", "hu_shift"):
        assert table["net"][key]["mean"] == pytest.approx(final[key], rel=1e-6, abs=1e-9), key
        assert table["input"][key]["mean"] == pytest.approx(final["ld_" + key], rel=1e-6,
                                                            abs=1e-9), key


def test_pdml_eval_classical_and_user_rois(tmp_path, capsys):
    root = tmp_path / "t"
    folders = write_tree(root, "mayo", patients=("A",), slices=4, size=48)
    rois = tmp_path / "rois.json"
    rois.write_text(json.dumps([{"name": "centre", "row": 20, "col": 20, "size": 8}]))
    rc = eval_main(["--reference", str(folders["A"]["nd"]), "--input", str(folders["A"]["ld"]),
                    "--classical", "tv", "--tune-every", "2", "--rois", str(rois),
                    "--out", str(tmp_path / "r")])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "r" / "per_slice.csv")))
    assert {r["method"] for r in rows} == {"input", "tv"} and len(rows) == 4  # 2 tuned, 2 scored
    from pdml.data import load_ct
    ref, ld = load_ct(folders["A"]["nd"])[0].hu, load_ct(folders["A"]["ld"])[0].hu
    r = [r for r in rows if r["method"] == "input"][0]
    k = int(Path(r["slice"]).stem[-4:])
    diff = ld[k].astype(np.float64)[20:28, 20:28] - ref[k][20:28, 20:28]
    assert float(r["centre_shift"]) == pytest.approx(diff.mean(), rel=1e-9)
    assert float(r["centre_noise"]) == pytest.approx(diff.std(), rel=1e-9)
    assert "tuned" in (tmp_path / "r" / "report.md").read_text()
    rc = eval_main(["--reference", str(folders["A"]["nd"]), "--input", str(folders["A"]["ld"]),
                    "--classical", "tv", "--out", str(tmp_path / "r")])
    _one_line_error(capsys, rc, "already holds a report")


def test_bad_layouts_and_pairing_give_one_line(tmp_path, capsys):
    root = tmp_path / "m"
    folders = write_tree(root, "mayo", slices=3, size=48)
    rc = train_main(["--preset", "tiny", "--patients", str(root), "--nd-offset-hu", "20",
                     "--out", str(tmp_path / "r1")])
    _one_line_error(capsys, rc, "--nd-offset-hu", "built-in")
    rc = train_main(["--preset", "tiny", "--patients", str(root), "--val-patients", "P009",
                     "--out", str(tmp_path / "r2"), "--no-progress"])
    _one_line_error(capsys, rc, "--val-patients", "P009")
    rc = train_main(["--preset", "tiny", "--patients", str(root), "--ld-series", "1mm",
                     "--out", str(tmp_path / "r3"), "--no-progress"])
    _one_line_error(capsys, rc, "matches both")
    rc = train_main(["--preset", "tiny", "--ldct", str(root / "nothing*"), "--ndct", str(root),
                     "--out", str(tmp_path / "r4"), "--no-progress"])
    _one_line_error(capsys, rc, "--ldct", "matches nothing")
    assert not (tmp_path / "r4").exists()
    # a reference of another size at the input's positions
    other = tmp_path / "other"
    for k in range(3):
        write_slice(other / f"{k}.dcm", np.zeros((32, 32)), patient="P001", study="1.2",
                    series="1.3", frame_of_reference="1.4", z=-100.0 + k, description="full",
                    instance=k + 1)
    rc = eval_main(["--reference", str(other), "--input", str(folders["P001"]["ld"]),
                    "--classical", "tv", "--out", str(tmp_path / "e1")])
    _one_line_error(capsys, rc, "differ in size", "48x48", "32x32")
    rc = train_main(["--preset", "tiny", "--ldct", str(folders["P001"]["ld"]), "--ndct",
                     str(folders["P001"]["nd"]), "--val-ldct", str(folders["P001"]["ld"]),
                     "--val-ndct", str(other), "--out", str(tmp_path / "r5"), "--no-progress"])
    _one_line_error(capsys, rc, "differ in size")
    for argv, needle in (([], "--out"), (["--out", "x"], "--reference and --input"),
                         (["--reference", "a", "--input", "b", "--method", "nopath",
                           "--out", "x"], "NAME=PATH"),
                         (["--held-out", str(tmp_path), "--method", f"m={root}", "--out", "x"],
                          "checkpoint or run folder"),
                         (["--reference", str(root), "--input", str(root), "--classical", "xyz",
                           "--out", "x"], "'xyz'"),
                         (["--reference", str(root), "--input", str(root), "--out", "x"],
                          "nothing to score"),
                         (["--reference", str(root), "--input", str(root), "--classical", "tv",
                           "--out", str(root / "P001" / "report")], "never writes into")):
        rc = 2
        try:
            rc = eval_main(argv)
        except SystemExit as e:   # argparse: a missing required option
            rc = e.code
        _one_line_error(capsys, rc, needle)


def test_pdml_eval_ctrl_c_is_130(tmp_path, monkeypatch, capsys):
    import pdml.evaluation

    folders = write_tree(tmp_path / "t", "mayo", patients=("A",), slices=2, size=32)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pdml.evaluation, "score_all", interrupted)
    rc = eval_main(["--reference", str(folders["A"]["nd"]), "--input", str(folders["A"]["ld"]),
                    "--classical", "tv", "--tune-every", "2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 130 and err.count("\n") == 1 and "interrupted" in err
    assert not list((tmp_path / "r").glob("*")) if (tmp_path / "r").exists() else True


def test_pdml_eval_help_names_every_option(capsys):
    from pdml.cli_eval import _parser

    with pytest.raises(SystemExit) as done:
        eval_main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for action in _parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
        assert action.option_strings[0] in text
    assert "exit status" in text and "--held-out" in text
