"""pdml.experiments.hu_shift: the HU-shift ablation end to end at the tiny size (three
variants trained, evaluated on every held-out slice, table + JSON + PNG), its table's
structure, the LD row against pdml.metrics computed here, the claim verdict against the
table's numbers, and a repeated invocation reusing the finished runs."""
import contextlib
import io
import json
import math
from pathlib import Path

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
        cfg.pop("loss"), cfg.pop("out"), cfg.pop("tau"), cfg["resolved"].pop("loss_backend")
    assert configs[0] == configs[1] == configs[2]
    assert [r["tau"] for r in runs][1:] == [0.07, 0.15]
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


# --------------------------------------------------------------------------- the shift ablation

SHIFT_KEYS = ["ld", "none", "none-0hu", "patchnce", "dml"]


@pytest.fixture(scope="module")
def shift_ablation(tmp_path_factory):
    """``--preset shift --quick`` through the command-line entry point (a few steps: it
    runs, it is not a result) -> (out dir, ablation.json)."""
    out = tmp_path_factory.mktemp("shift")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = H.main(["--preset", "shift", "--quick", "--out", str(out), "--threads", "1",
                       "--no-progress", "--classical", *CLASSICAL])
    assert code == 0, printed.getvalue()[-3000:]
    return out, json.loads((out / "ablation.json").read_text())


def test_shift_ablation_writes_every_variant_per_seed_and_the_validity_flag(shift_ablation):
    out, result = shift_ablation
    assert result["kind"] == "shift" and result["settings"]["quick"] is True
    assert result["settings"]["seeds"] == [0] and result["settings"]["nd_offset_hu"] == 100.0
    assert [t["key"] for t in result["tables"]] == ["no-wavelet", "wavelet"]
    assert [t["wavelet"] for t in result["tables"]] == [False, True]
    assert result["rows"] == result["tables"][0]["rows"]
    for table in result["tables"]:
        rows = {r["key"]: r for r in table["rows"]}
        # the classical baselines, once: in the main table (they train nothing)
        assert list(rows) == SHIFT_KEYS + (list(CLASSICAL) if table["wavelet"] is False else [])
        for key in CLASSICAL if table["wavelet"] is False else ():
            assert rows[key]["seeds"] is None and math.isfinite(rows[key]["hu_shift"])
        for key in SHIFT_KEYS[1:]:
            row = rows[key]
            for metric in ("hu_shift", "noise_std"):
                assert math.isfinite(row[metric]) and len(row[metric + "_per_seed"]) == 1
                runs = [r for r in result["runs"]
                        if r["table"] == table["key"] and r["variant"] == key]
                # a run counts with the mean of its evaluations during the LR decay
                window = [e for e in runs[0]["evals"] if e["step"] in runs[0]["window"]["steps"]]
                assert [e["step"] for e in window] == [2, 4]  # 4 steps, all decaying, eval every 2
                assert row[metric] == pytest.approx(np.mean([e[metric] for e in window]))
        # one seed cannot show the seeds' spread: never valid, never a claim
        assert table["validity"]["valid"] is False
        assert "one seed" in table["validity"]["statement"]
        assert table["claim"]["reproduced"] is None
    assert result["validity"] == result["tables"][0]["validity"]
    assert isinstance(result["validity"]["differential_hu"], float)
    # the runs: same-anatomy data, the control at 0 HU, the others at the offset
    for run in result["runs"]:
        cfg = json.loads((Path(run["run_dir"]) / "config.json").read_text())
        assert cfg["builtin_layout"] == "same-anatomy" and cfg["d_input"] == "image"
        assert cfg["nd_offset_hu"] == (0.0 if run["variant"] == "none-0hu" else 100.0)
        assert cfg["wavelet"] == (run["table"] == "wavelet")
        assert cfg["input_center_hu"] == 0.0 and cfg["val_slices"] == 10
        assert all(e["slices"] == 10 for e in run["evals"])
    assert result["settings"]["classical"] == list(CLASSICAL)
    assert [d["method"] for d in result["classical"]] == list(CLASSICAL)
    md = (out / "ablation.md").read_text()
    assert result["validity"]["statement"] in md and md.count("| LD input (untouched) |") == 2
    assert "| TV (Chambolle), " in md and "classical baselines (tv, nlm)" in md
    for png in ("ablation.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rows(gan, control, dml=None, ld_noise=20.0, dml_noise=15.0):
    def row(key, values, noise):
        return {"key": key, "seeds": list(range(len(values))), "hu_shift": float(np.mean(values)),
                "hu_shift_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "hu_shift_per_seed": list(values), "noise_std": noise}

    rows = [{"key": "ld", "noise_std": ld_noise, "hu_shift": 0.0},
            row("none", gan, 22.0), row("none-0hu", control, 22.0)]
    if dml is not None:
        rows.append(row("dml", dml, dml_noise))
    return rows


@pytest.mark.parametrize("offset,gan,control,valid,why", [
    (100.0, [60.0, 30.0, 45.0], [0.0, -5.0, 10.0], True, None),
    (100.0, [60.0, 5.0, 45.0], [0.0, -5.0, 10.0], False, "overlap"),
    (100.0, [15.0, 18.0, 16.0], [0.0, 1.0, -1.0], False, "below 20 HU"),
    (-100.0, [-60.0, -30.0, -45.0], [0.0, 5.0, -10.0], True, None),
    (-100.0, [60.0, 30.0, 45.0], [0.0, -5.0, 10.0], False, "below 20 HU"),
    (100.0, [80.0], [0.0], False, "one seed"),
    (0.0, [80.0, 70.0], [0.0, 1.0], False, "offset is 0 HU"),
])
def test_validity_check(offset, gan, control, valid, why):
    check = H.validity_check(_rows(gan, control), offset)
    assert check["valid"] is valid
    sign = np.sign(offset)
    assert check["differential_hu"] == pytest.approx(
        float(np.mean([sign * (a - b) for a, b in zip(gan, control)])))
    if valid:
        assert check["statement"].startswith("Valid")
    else:
        assert why in check["statement"] and "no claim" in check["statement"]


def test_shift_verdict_reports_what_metric_learning_did():
    valid = {"valid": True}
    kept = H.shift_verdict(_rows([60.0, 30.0, 45.0], [0, 0, 0], dml=[5.0, -3.0, 8.0]), valid)
    assert kept["reproduced"] is True and kept["hu_shift_smaller_for_every_seed"]
    assert kept["statement"].startswith("Reproduced")
    noisy = H.shift_verdict(_rows([60.0, 30.0, 45.0], [0, 0, 0], dml=[5.0, -3.0, 8.0],
                                  dml_noise=25.0), valid)
    assert noisy["reproduced"] is False and noisy["statement"].startswith("CT numbers reproduced")
    one_bad_seed = H.shift_verdict(_rows([60.0, 30.0, 45.0], [0, 0, 0], dml=[5.0, 40.0, 8.0]),
                                   valid)
    assert one_bad_seed["hu_shift_smaller_than_gan_only"] is True
    assert one_bad_seed["reproduced"] is False and "not for every seed" in one_bad_seed["statement"]
    invalid = H.shift_verdict(_rows([60.0, 30.0, 45.0], [0, 0, 0], dml=[5.0, -3.0, 8.0]),
                              {"valid": False})
    assert invalid["reproduced"] is None and invalid["statement"].startswith("No claim")


def test_settle_window_is_the_learning_rate_decay():
    evals = [{"step": s} for s in (50, 100, 150, 200, 250, 300, 350, 400)]
    assert [e["step"] for e in H.settle_window(evals, 400, 200)] == [250, 300, 350, 400]
    assert [e["step"] for e in H.settle_window(evals[:3], 400, 200)] == [150]  # stopped early
