"""Low-dose simulation: the torch projector/FBP against scikit-image, the noise levels of
docs/data.md, determinism."""
import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file
from skimage.transform import iradon as sk_iradon
from skimage.transform import radon as sk_radon

from pdml.data import (MU_WATER_PER_MM, fbp, load_ct, projection_angles, radon,
                       simulate_low_dose)
from pdml.metrics import noise_std


def disc_image(n, seed=0):
    """Random image that is zero outside the inscribed circle (scikit-image's circle mode)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] - n // 2
    return rng.random((n, n)) * ((yy ** 2 + xx ** 2) < (n // 2 - 1) ** 2)


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("n", [64, 49])
@pytest.mark.parametrize("circle", [True, False])
def test_projector_matches_scikit_image_fp64(n, circle):
    img = disc_image(n) if circle else np.random.default_rng(1).random((n, n))
    theta = np.linspace(0.0, 180.0, 45, endpoint=False)
    sino_sk = sk_radon(img, theta, circle=circle)                       # [P, V]
    sino = radon(torch.from_numpy(img), theta, circle=circle).numpy()   # [V, P]
    assert sino.shape == sino_sk.T.shape
    assert rel_err(sino.T, sino_sk) <= 1e-4
    recon_sk = sk_iradon(sino_sk, theta, circle=circle)
    recon = fbp(torch.from_numpy(np.ascontiguousarray(sino_sk.T)), theta, circle=circle).numpy()
    assert recon.shape == recon_sk.shape
    assert rel_err(recon, recon_sk) <= 1e-4


def test_projector_batched_and_fp32():
    imgs = np.stack([disc_image(40, s) for s in range(3)])
    theta = projection_angles(30)
    batch64 = radon(torch.from_numpy(imgs), theta)
    for b in range(3):
        assert torch.allclose(batch64[b], radon(torch.from_numpy(imgs[b]), theta), atol=1e-12)
    batch32 = radon(torch.from_numpy(imgs).float(), theta)
    assert batch32.dtype == torch.float32
    assert rel_err(batch32.double().numpy(), batch64.numpy()) <= 1e-5
    recon = fbp(batch32, theta)
    assert recon.shape == (3, 40, 40) and recon.dtype == torch.float32


def small_body(n=48):
    yy, xx = np.mgrid[:n, :n] - n / 2
    hu = np.full((n, n), -1000.0, np.float32)
    hu[(yy / (0.4 * n)) ** 2 + (xx / (0.45 * n)) ** 2 <= 1] = 40.0
    hu[(yy / (0.08 * n)) ** 2 + ((xx - 0.15 * n) / (0.08 * n)) ** 2 <= 1] = 900.0
    return hu


def test_simulate_is_the_documented_pipeline():
    """simulate_low_dose == HU->μ, radon over the padded image, Poisson, -log, FBP, HU."""
    hu, i0, views, px, seed = small_body(), 2e4, 60, 0.7, 5
    ld, clean = simulate_low_dose(hu, i0=i0, views=views, seed=seed, pixel_size_mm=px,
                                  return_clean=True)
    x = torch.from_numpy(hu)
    theta = projection_angles(views)
    p = radon((MU_WATER_PER_MM * (1 + x / 1000)).clamp_min(0) * px, theta, circle=False)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.poisson(i0 * torch.exp(-p), generator=gen).clamp_min(1)
    to_hu = lambda s: (1000 * (fbp(s, theta, 48, circle=False) / px / MU_WATER_PER_MM - 1)).numpy()  # noqa: E731
    np.testing.assert_allclose(ld, to_hu(-torch.log(counts / i0)), atol=1e-3)
    np.testing.assert_allclose(clean, to_hu(p), atol=1e-3)
    assert isinstance(ld, np.ndarray) and ld.dtype == np.float32 and ld.shape == hu.shape
    # the noiseless pipeline keeps the CT numbers of the soft tissue (3 px away from the
    # edges, where FBP's discretisation rings): no bias, small deviations
    from scipy.ndimage import binary_erosion

    tissue = binary_erosion(np.abs(hu - 40) < 1, iterations=3)
    assert abs((clean - hu)[tissue].mean()) < 3
    assert np.abs(clean - hu)[tissue].mean() < 15


def test_simulate_determinism_batching_and_types():
    hu = np.stack([small_body(), small_body()[::-1].copy()])
    a = simulate_low_dose(hu, i0=1e4, views=40, seed=3)
    b = simulate_low_dose(hu, i0=1e4, views=40, seed=3)
    c = simulate_low_dose(hu, i0=1e4, views=40, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # slice b of a batch uses seed + b: the same as simulating it alone
    single = simulate_low_dose(hu[1], i0=1e4, views=40, seed=4)
    np.testing.assert_allclose(a[1], single, atol=1e-3)
    t = simulate_low_dose(torch.from_numpy(hu).double(), i0=1e4, views=40, seed=3)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    assert np.abs(t.numpy() - a).mean() < 0.1      # float64 vs float32 rounding only
    # noise falls with dose; electronic noise adds to it
    body = hu[0] > -500
    std = lambda x: (x - simulate_low_dose(hu[0], i0=1e9, views=40))[body].std()  # noqa: E731
    s_low, s_high = std(simulate_low_dose(hu[0], i0=1e3, views=40)), std(a[0])
    assert s_low > 2.5 * s_high
    assert std(simulate_low_dose(hu[0], i0=1e3, views=40, electronic_noise=20.0)) > s_low
    with pytest.raises(ValueError, match="square"):
        simulate_low_dose(np.zeros((10, 12)))
    with pytest.raises(ValueError, match="positive"):
        simulate_low_dose(hu, i0=0)


def test_noise_levels_on_the_512_head_slice():
    """docs/data.md: 720 views on the 512² head slice: I0 1e5 -> 48 HU, 2.5e4 -> 96 HU
    (±25 %). One projection, two dose levels: the FBP is linear, so the noise image is the
    FBP of (noisy − clean) line integrals, exactly what simulate_low_dose's output minus
    its clean output is (checked above)."""
    series = load_ct(get_testdata_file("J2K_pixelrep_mismatch.dcm"))[0]
    hu, px = torch.from_numpy(series.hu[0]), series.pixel_spacing_mm[0]
    theta = projection_angles(720)
    p = radon((MU_WATER_PER_MM * (1 + hu / 1000)).clamp_min(0) * px, theta, circle=False)
    noise_sinos = []
    for seed, i0 in enumerate((1e5, 2.5e4)):
        gen = torch.Generator().manual_seed(seed)
        counts = torch.poisson(i0 * torch.exp(-p), generator=gen).clamp_min(1)
        noise_sinos.append(-torch.log(counts / i0) - p)
    noise_hu = fbp(torch.stack(noise_sinos), theta, 512, circle=False) / px / MU_WATER_PER_MM * 1000
    measured = noise_std(series.hu + noise_hu.numpy(), np.repeat(series.hu, 2, axis=0))
    for got, want in zip(measured, (48.0, 96.0)):
        assert 0.75 * want <= got <= 1.25 * want, measured


@pytest.mark.cuda
def test_simulation_on_cuda_matches_cpu():
    hu = small_body(64)
    ld_cpu, clean_cpu = simulate_low_dose(hu, i0=1e5, views=90, return_clean=True)
    ld_gpu, clean_gpu = simulate_low_dose(torch.from_numpy(hu).cuda(), i0=1e5, views=90,
                                          return_clean=True)
    assert ld_gpu.is_cuda
    np.testing.assert_allclose(clean_gpu.cpu().numpy(), clean_cpu, atol=0.5)
    body = hu > -500
    s_cpu, s_gpu = (ld_cpu - clean_cpu)[body].std(), (ld_gpu - clean_gpu).cpu().numpy()[body].std()
    assert abs(s_gpu / s_cpu - 1) < 0.2
