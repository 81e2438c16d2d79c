"""HU window, wavelet split, acquisition shift."""
import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from pdml.data import (BUILTIN_ND_SHIFT, HU_WINDOW, KVP_120_TO_80, AcquisitionShift,
                       hu_to_unit, load_ct, unit_to_hu, wavelet_split)


def test_hu_window_round_trip_numpy_and_torch():
    hu = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0], np.float32)
    unit = hu_to_unit(hu)
    np.testing.assert_allclose(unit, [0, 0, 0.5, 0.75, 1, 1])
    assert unit.dtype == np.float32
    np.testing.assert_allclose(hu_to_unit(hu, clip=False), (hu + 1000) / 2000)
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(hu, clip=False)), hu, atol=1e-3)
    t = torch.tensor(hu)
    assert torch.allclose(unit_to_hu(hu_to_unit(t, clip=False)), t, atol=1e-3)
    assert hu_to_unit(torch.tensor([0], dtype=torch.int16)).dtype == torch.float32
    np.testing.assert_allclose(hu_to_unit(np.array([40.0]), window=(-160, 240)), [0.5])
    assert HU_WINDOW == (-1000.0, 1000.0)
    with pytest.raises(ValueError, match="window"):
        hu_to_unit(hu, window=(10, 10))


@pytest.mark.parametrize("shape", [(128, 128), (2, 1, 100, 90), (37, 203)])
def test_wavelet_split_reconstructs(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    low, high = wavelet_split(x)
    assert low.shape == x.shape and high.dtype == x.dtype
    assert (low + high - x).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", [(3, 128, 128), (2, 37, 203)])
def test_wavelet_split_torch_matrices_match_pywavelets(shape):
    """The torch path (separable matrices) and the NumPy path (PyWavelets wavedec2 /
    waverec2, low and high rebuilt separately) are the same map."""
    x = np.random.default_rng(2).normal(size=shape)
    low_np, high_np = wavelet_split(x)
    assert np.abs(low_np + high_np - x).max() <= 1e-10          # perfect reconstruction
    low_t, high_t = wavelet_split(torch.from_numpy(x))
    assert low_t.dtype == torch.float64
    assert np.abs(low_t.numpy() - low_np).max() <= 1e-10
    assert np.abs(high_t.numpy() - high_np).max() <= 1e-10
    low32, _ = wavelet_split(torch.from_numpy(x).float())
    assert low32.dtype == torch.float32 and np.abs(low32.numpy() - low_np).max() <= 1e-5


def test_wavelet_split_on_a_real_slice():
    hu = load_ct(get_testdata_file("CT_small.dcm"))[0].hu       # [1, 128, 128]
    x = hu_to_unit(hu, clip=False)
    low, high = wavelet_split(x)
    assert isinstance(low, np.ndarray) and low.dtype == np.float32
    assert np.abs(low + high - x).max() <= 1e-5
    # low carries the smooth part (the CT numbers): high has ~zero mean and is what varies
    assert abs(high.mean()) < 0.05 * abs(x.mean())
    assert np.abs(np.diff(low, axis=-1)).mean() < 0.2 * np.abs(np.diff(x, axis=-1)).mean()
    const = np.full((64, 64), 0.3)
    low_c, high_c = wavelet_split(const)
    assert np.abs(high_c).max() < 1e-9 and np.abs(low_c - 0.3).max() < 1e-9


def test_wavelet_level_and_family_are_parameters():
    x = np.random.default_rng(0).random((96, 96))
    low6, _ = wavelet_split(x)
    low2, _ = wavelet_split(x, level=2)
    low_h, high_h = wavelet_split(x, wavelet="haar", level=3)
    assert np.abs(low_h + high_h - x).max() < 1e-9
    assert low6.std() < low2.std()           # deeper level = smoother low part


def test_acquisition_shift_model():
    hu = np.array([-1000.0, -100.0, 0.0, 40.0, 1000.0, 2000.0])
    kv = KVP_120_TO_80(hu)
    np.testing.assert_allclose(kv[[0, 2]], [-1000, 0])          # air and water fixed
    np.testing.assert_allclose(kv[[1, 4, 5]], [-110, 1340, 2680])
    shifted = BUILTIN_ND_SHIFT(hu)
    assert shifted[0] == -1000                                  # air stays air
    assert shifted[2] == pytest.approx(20.0)                    # calibration offset
    assert np.all(np.diff(AcquisitionShift(1.3, 1.1, 5.0)(np.linspace(-1024, 3000, 500))) > 0)
    img = np.zeros((3, 32, 32), np.float32)
    img[:, 16:, :] = 1000
    blurred = AcquisitionShift(kernel_sigma=2.0)(img)
    assert blurred.dtype == np.float32 and blurred.shape == img.shape
    assert 0 < blurred[0, 15, 5] < 1000 and np.allclose(blurred[0], blurred[2])
