"""pdml.metrics on synthetic images with known noise and shift."""
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from pdml.metrics import homogeneous_rois, hu_shift, noise_std, psnr, rmse, ssim


def body(n=128, seed=0):
    """Piecewise-constant slice: air, a soft-tissue body, a bone disc, a fat ellipse."""
    yy, xx = np.mgrid[:n, :n] - n / 2
    img = np.full((n, n), -1000.0)
    img[(yy / (0.42 * n)) ** 2 + (xx / (0.45 * n)) ** 2 <= 1] = 40.0
    img[(yy / (0.1 * n)) ** 2 + ((xx - 0.2 * n) / (0.1 * n)) ** 2 <= 1] = 1200.0
    img[((yy + 0.2 * n) / (0.08 * n)) ** 2 + ((xx + 0.1 * n) / (0.15 * n)) ** 2 <= 1] = -100.0
    return img


def test_psnr_rmse_known_values():
    truth = np.clip(np.stack([body(), body()]), -980, 900)   # +40 HU stays in the window
    out = truth + np.array([20.0, 40.0])[:, None, None]      # uniform errors, inside window
    out[:, :2, :2] = truth[:, :2, :2] + 0.0
    np.testing.assert_allclose(rmse(truth + 20.0, truth), [20.0, 20.0])
    # 20 HU = 0.01 in the unit window -> PSNR 40 dB; air at -1000 stays in the window
    np.testing.assert_allclose(psnr(truth + 20.0, truth), [40.0, 40.0], atol=1e-9)
    assert psnr(out, truth)[1] < psnr(out, truth)[0]
    # clipping to the window: errors above 1000 HU do not count
    bone_only = truth.copy()
    bone_only[truth >= 900] += 300          # 900 -> 1200: both clip to the window top
    bone_only[truth >= 900] = np.maximum(bone_only[truth >= 900], 1000)
    truth = truth.copy()
    truth[truth >= 900] = 1000
    assert np.isinf(psnr(bone_only, truth)).all()


def test_ssim_is_scikit_image_in_the_window():
    rng = np.random.default_rng(0)
    truth = body()
    noisy = truth + rng.normal(0, 30, truth.shape)
    expected = structural_similarity(np.clip((noisy + 1000) / 2000, 0, 1),
                                     np.clip((truth + 1000) / 2000, 0, 1), data_range=1.0)
    got = ssim(torch.from_numpy(noisy)[None, None], torch.from_numpy(truth)[None, None])
    assert got.shape == (1,) and got[0] == pytest.approx(expected)
    assert ssim(truth, truth)[0] == pytest.approx(1.0)


def test_rois_are_homogeneous_soft_tissue():
    truth = body(256)
    rois = homogeneous_rois(truth, count=4)[0]
    assert len(rois) == 4
    for r, c, s in rois:
        assert s == 16
        patch = truth[r:r + s, c:c + s]
        assert np.all(patch == 40.0)                       # not air, bone or fat edge
    air = np.full((64, 64), -1000.0)                       # no soft tissue: still answers
    assert len(homogeneous_rois(air, count=2)[0]) == 2


@pytest.mark.parametrize("sigma,offset", [(10.0, 0.0), (30.0, 15.0), (60.0, -25.0)])
def test_noise_std_and_hu_shift_recover_known_values(sigma, offset):
    rng = np.random.default_rng(1)
    truth = np.stack([body(256), body(256)[::-1]])
    output = truth + offset + rng.normal(0, sigma, truth.shape)
    measured_noise = noise_std(output, truth)
    measured_shift = hu_shift(output, truth)
    assert measured_noise.shape == measured_shift.shape == (2,)
    np.testing.assert_allclose(measured_noise, sigma, rtol=0.1)
    # the mean of 4·16² noisy pixels: standard error sigma / 32
    np.testing.assert_allclose(measured_shift, offset, atol=4 * sigma / 32 + 1e-9)
    # without the truth: std of the image itself in its own homogeneous regions
    np.testing.assert_allclose(noise_std(output), sigma, rtol=0.15)


def test_metric_input_validation():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((2, 8, 8)), np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="must be"):
        rmse(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)))
