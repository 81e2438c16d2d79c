"""pdml.classical: TV, non-local means and BM3D on a simulated low-dose slice (pydicom's
CT_small, 64×64 crops: one to tune on, another to evaluate on), the tuning rule, the rows'
metrics against pdml's evaluation (pdml.training.evaluate.classical_rows), and bad input."""
import numpy as np
import pytest

from pdml import metrics
from pdml import classical as C

pytestmark = pytest.mark.usefixtures("one_thread")

# small grids around the defaults keep BM3D's share of the runtime down
SMALL_GRIDS = {"tv": (0.25, 1.0, 3.0), "nlm": (0.4, 0.8, 1.6), "bm3d": (0.5, 1.5)}


@pytest.fixture(scope="module")
def pair():
    """``(tune_ld, tune_truth, val_ld, val_truth)``: float32 ``[1, 64, 64]`` HU crops of
    one simulated low-dose slice and its noiseless reconstruction, side by side."""
    from pydicom.data import get_testdata_file

    from pdml.data import load_ct, simulate_low_dose

    series = load_ct(get_testdata_file("CT_small.dcm"))[0]
    hu = series.hu[0]
    ld, truth = simulate_low_dose(hu, i0=1e4, views=256, seed=0, pixel_size_mm=0.66,
                                  return_clean=True)
    tune, val = (slice(32, 96), slice(0, 64)), (slice(32, 96), slice(64, 128))
    return tuple(a[None, r, c].astype(np.float32) for r, c in (tune, val) for a in (ld, truth))


def _noise(img, truth):
    return float(metrics.noise_std(img, truth).mean())


@pytest.mark.parametrize("method", C.METHODS)
def test_each_baseline_reduces_noise_at_its_tuned_strength(pair, method):
    tune_ld, tune_truth, val_ld, val_truth = pair
    grid = SMALL_GRIDS[method]
    strength, scores = C.tune(method, tune_ld, tune_truth, grid)
    assert sorted(scores) == sorted(grid) and strength in grid
    assert scores[strength] == max(scores.values())
    # the tuning PSNRs are those of the denoised tuning slices
    assert scores[strength] == pytest.approx(
        float(metrics.psnr(C.denoise(method, tune_ld, strength), tune_truth).mean()), abs=1e-9)
    den = C.denoise(method, val_ld, strength)
    assert den.shape == val_ld.shape and den.dtype == np.float32
    ld_noise, noise = _noise(val_ld, val_truth), _noise(den, val_truth)
    assert noise < 0.75 * ld_noise, (method, strength, noise, ld_noise)
    assert metrics.psnr(den, val_truth).mean() > metrics.psnr(val_ld, val_truth).mean() + 1.0
    assert abs(float(metrics.hu_shift(den, val_truth).mean())) < 5.0
    # one slice in, one slice out; a noiseless constant slice stays what it is
    assert C.denoise(method, val_ld[0], strength).shape == val_ld.shape[1:]
    flat = np.full((16, 16), 40.0, dtype=np.float32)
    np.testing.assert_allclose(C.denoise(method, flat, strength), flat, atol=0.05)  # BM3D: 0.02


def test_classical_rows_score_with_the_trainers_evaluation(pair):
    from pdml.training.data import ValItem
    from pdml.training.evaluate import classical_rows, evaluate_slices

    tune_ld, tune_truth, val_ld, val_truth = pair
    # tuned on item 0 (tune_every=2), scored on both
    items = [ValItem(tune_ld[0], tune_truth[0], "tune"), ValItem(val_ld[0], val_truth[0], "val")]
    rows = classical_rows(items, methods=("tv", "nlm"), grids=SMALL_GRIDS)
    assert [r["method"] for r, _ in rows] == ["tv", "nlm"]
    for row, denoised in rows:
        method = row["method"]
        strength, scores = C.tune(method, tune_ld, tune_truth, SMALL_GRIDS[method])
        assert row["strength"] == strength and row["tuning_slices"] == [0]
        assert set(row["tuning_psnr"]) == {f"{s:g}" for s in SMALL_GRIDS[method]}
        want_images = C.denoise(method, np.stack([tune_ld[0], val_ld[0]]), strength)
        np.testing.assert_array_equal(denoised, want_images)
        want = evaluate_slices(items, list(want_images))
        for key in ("psnr", "ssim", "noise_std", "hu_shift", "ld_noise_std"):
            assert row[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
        assert row["noise_std"] < row["ld_noise_std"] and row["seconds"] > 0
        assert row["name"].startswith(C.NAMES[method])
    with pytest.raises(ValueError, match="reference"):
        classical_rows([ValItem(val_ld[0], None)], methods=("tv",))
    with pytest.raises(ValueError, match="tune_every"):
        classical_rows(items, methods=("tv",), tune_every=0)


def test_best_available_is_bm3d_with_its_package_else_nlm(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bm3d" else real(name, *a))
    assert C.best_available() == "nlm"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert C.best_available() == "bm3d"


def test_the_tuning_rule_maximises_psnr_and_prefers_the_smaller_strength_on_a_tie(
        pair, monkeypatch):
    tune_ld, tune_truth, _, _ = pair
    # a stand-in denoiser whose error is smallest at strength 2: the rule must pick 2
    noise = tune_ld - tune_truth
    monkeypatch.setattr(C, "denoise", lambda method, hu, s: tune_truth + abs(s - 2.0) * noise)
    strength, scores = C.tune("bm3d", tune_ld, tune_truth, (3.0, 1.0, 2.0, 4.0))
    assert strength == 2.0 and list(scores) == [1.0, 2.0, 3.0, 4.0]
    assert scores[1.0] == scores[3.0] < scores[2.0]
    # a tie (strengths 1 and 3 score the same when 2 is absent) goes to the smaller
    strength, _ = C.tune("bm3d", tune_ld, tune_truth, (3.0, 1.0))
    assert strength == 1.0


def test_bad_input_names_the_argument(pair):
    tune_ld, tune_truth, val_ld, val_truth = pair
    with pytest.raises(ValueError, match="method"):
        C.denoise("wiener", val_ld, 1.0)
    with pytest.raises(ValueError, match="strength"):
        C.denoise("tv", val_ld, 0.0)
    with pytest.raises(ValueError, match="hu"):
        C.denoise("tv", np.zeros((2, 2, 2, 2)), 0.1)
    nan = val_ld.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        C.denoise("tv", nan, 0.1)
    with pytest.raises(ValueError, match="tune_ld_hu"):
        C.tune("tv", tune_ld, tune_truth[:, :32], (0.01,))
    with pytest.raises(ValueError, match="grid"):
        C.tune("tv", tune_ld, tune_truth, ())
    with pytest.raises(ValueError, match="val_ld_hu"):
        C.tuned_baselines(np.zeros((1, 2, 2)), tune_ld, tune_truth, methods=("tv",))
