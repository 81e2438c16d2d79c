"""pdml.experiments.hu_shift: the HU-shift ablation end to end at the tiny size (three
variants trained, evaluated on every held-out slice, table + JSON + PNG), its table's
structure, the LD row against pdml.metrics computed here, the claim verdict against the
table's numbers, and a repeated invocation reusing the finished runs."""
import contextlib
import io
import json
import math

import numpy as np
import pytest

from pdml import metrics
from pdml.experiments import hu_shift as H

ROWS = {"ld": H.LD_NAME, "none": H.VARIANT_NAMES["none"],
        "patchnce": H.VARIANT_NAMES["patchnce"], "dml": H.VARIANT_NAMES["dml"]}
HEADERS = ("PSNR (dB)", "SSIM", "RMSE (HU)", "noise std (HU)", "HU shift (HU)")
# BM3D takes about a second per 64² slice here: the table's wiring is tested with the two
# fast baselines (tests/test_classical.py tests BM3D itself)
CLASSICAL = ("tv", "nlm")


pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """The tiny ablation through the command-line entry point; -> (out dir, its stdout)."""
    out = tmp_path_factory.mktemp("ablation")
    printed = io.StringIO()  # module-scoped: capsys is not available here
    with contextlib.redirect_stdout(printed):
        code = H.main(["--preset", "tiny", "--out", str(out), "--threads", "1",
                       "--no-progress", "--classical", *CLASSICAL])
    assert code == 0, printed.getvalue()[-3000:]
    return out, printed.getvalue()


def test_ablation_writes_table_json_and_figure(ablation):
    out, printed = ablation
    result = json.loads((out / "ablation.json").read_text())
    assert result["format"] == H.FORMAT and result["settings"]["preset"] == "tiny"
    assert [r["key"] for r in result["rows"]] == list(ROWS) + list(CLASSICAL)
    assert [r["name"] for r in result["rows"]][:len(ROWS)] == list(ROWS.values())
    for row in result["rows"]:
        for key in ("psnr", "ssim", "rmse", "noise_std", "hu_shift", "abs_hu_shift"):
            assert math.isfinite(row[key]), (row["key"], key)
        assert 0 < row["ssim"] <= 1 and row["rmse"] > 0 and row["noise_std"] > 0
        assert row["abs_hu_shift"] >= abs(row["hu_shift"]) - 1e-9
    # identical settings: only the loss (and its default τ) differs between the runs
    runs = result["runs"]
    assert [r["loss"] for r in runs] == ["none", "patchnce", "dml"]
    assert all(r["steps"] == 4 and r["how"] == "trained" for r in runs)
    configs = [json.loads((out / "runs" / f"{r['loss']}-seed0" / "config.json").read_text())
               for r in runs]
    for cfg in configs:
        cfg.pop("loss"), cfg.pop("out")
    assert configs[0] == configs[1] == configs[2]
    n_slices = result["settings"]["held_out_slices"]
    assert n_slices == 10 and all(len(r["per_slice"]) == n_slices for r in runs)

    # the Markdown table: header with every column, one line per row, printed too
    md = (out / "ablation.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert all(h in header for h in HEADERS)
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [cells[0] for cells in body] == [r["name"] for r in result["rows"]]
    assert all(len(cells) == len(header) for cells in body)
    ld_cells = dict(zip(header, body[0]))
    assert float(ld_cells["PSNR (dB)"]) == pytest.approx(result["rows"][0]["psnr"], abs=0.006)
    assert "\n".join(table) in printed
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_ld_row_and_claim_follow_from_the_numbers(ablation):
    out, _ = ablation
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    # the LD row: pdml.metrics on the built-in test split, computed independently here
    from pdml.data import builtin_dataset

    ds = builtin_dataset(size=64, progress=False)
    ld, truth = ds.load("test/ld"), ds.load("test/truth")
    assert rows["ld"]["psnr"] == pytest.approx(float(np.mean(metrics.psnr(ld, truth))), rel=1e-9)
    assert rows["ld"]["rmse"] == pytest.approx(float(np.mean(metrics.rmse(ld, truth))), rel=1e-9)
    assert rows["ld"]["abs_hu_shift"] == pytest.approx(
        float(np.mean(np.abs(metrics.hu_shift(ld, truth)))), rel=1e-9)
    # a variant's row is the mean of its per-slice values
    dml_run = next(r for r in result["runs"] if r["loss"] == "dml")
    assert rows["dml"]["noise_std"] == pytest.approx(
        np.mean([s["noise_std"] for s in dml_run["per_slice"]]), rel=1e-12)
    claim = result["claim"]
    assert claim["hu_shift_smaller_than_gan_only"] == (
        rows["dml"]["abs_hu_shift"] < rows["none"]["abs_hu_shift"])
    assert claim["noise_below_ld_input"] == (rows["dml"]["noise_std"] < rows["ld"]["noise_std"])
    assert claim["reproduced"] == (claim["hu_shift_smaller_than_gan_only"]
                                   and claim["noise_below_ld_input"])
    verdict = "Reproduced" if claim["reproduced"] else "Not reproduced"
    assert claim["statement"].startswith(verdict)
    assert f"{rows['dml']['abs_hu_shift']:.1f} HU" in claim["statement"]
    assert claim["statement"] in (out / "ablation.md").read_text()


def test_classical_baselines_are_tuned_on_half_and_scored_like_the_networks(ablation):
    from pdml.experiments.classical import GRIDS

    out, _ = ablation
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert result["settings"]["classical"] == list(CLASSICAL)
    assert result["settings"]["classical_tuning_slices"] == [0, 2, 4, 6, 8]
    for detail in result["classical"]:
        method, row = detail["method"], rows[detail["method"]]
        assert detail["strength"] == row["strength"] and detail["strength"] in GRIDS[method]
        assert detail["tuning_psnr"][f"{detail['strength']:g}"] == max(
            detail["tuning_psnr"].values())
        assert len(detail["per_slice"]) == result["settings"]["held_out_slices"]
        assert row["noise_std"] == pytest.approx(
            np.mean([s["noise_std"] for s in detail["per_slice"]]), rel=1e-12)
        # tuned for PSNR against the truth, every baseline removes noise on held-out data
        assert row["noise_std"] < rows["ld"]["noise_std"] and row["psnr"] > rows["ld"]["psnr"]
    assert "classical baselines (tv, nlm)" in (out / "ablation.md").read_text()


def test_repeated_invocation_reuses_finished_runs(ablation):
    out, _ = ablation
    before = json.loads((out / "ablation.json").read_text())
    result = H.run_ablation("tiny", out, seeds=[0], threads=1, progress=False,
                            classical=CLASSICAL)
    assert [r["how"] for r in result["runs"]] == ["reused"] * 3
    for old, new in zip(before["rows"], result["rows"]):
        assert new["psnr"] == pytest.approx(old["psnr"], abs=1e-9)
        assert new["hu_shift"] == pytest.approx(old["hu_shift"], abs=1e-9)
    # other settings in the same folder are refused, not mixed into the table
    from pdml.training import TrainError

    with pytest.raises(TrainError, match="other settings"):
        H.run_ablation("tiny", out, seeds=[0], variants=["none"], steps=2, decay_steps=1,
                       threads=1, progress=False)
