"""The built-in dataset (tiny recipes, built into tmp folders: never the user's cache)
and the torch datasets."""
import json

import numpy as np
import pytest
import torch

from pdml.data import (BUILTIN_ND_SHIFT, PairedCTDataset, UnpairedCTDataset, builtin_dataset,
                       cache_dir, read_slices)
from pdml.data.builtin import LD_SOURCES, ND_SOURCES, SPLITS, phantom

TINY = dict(size=128, ld_per_source=1, nd_per_source=1, test_per_slice=1, views=60)
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return builtin_dataset(root=tmp_path_factory.mktemp("cache_a"), seed=0, progress=False,
                           **TINY)


def test_builtin_layout_and_contents(tiny):
    counts = tiny.manifest["counts"]
    assert counts == {"train/ld": 3, "train/nd": 5, "test/ld": 2, "test/truth": 2}
    for split in SPLITS:
        arr = tiny.load(split)
        assert arr.dtype == np.float32 and arr.shape[1:] == (128, 128)
        assert np.isfinite(arr).all()
    assert tiny.train_ld.is_dir() and tiny.test_truth.is_dir()
    # LD and ND come from different source files (unpaired domains)
    assert not set(tiny.manifest["ld_sources"]) & set(tiny.manifest["nd_sources"])
    assert not set(tiny.manifest["test_sources"]) & (
        set(tiny.manifest["ld_sources"]) | set(tiny.manifest["nd_sources"]))
    # the held-out LD is noisier than its truth, and the truth is at LD's CT numbers
    ld, truth = tiny.load("test/ld"), tiny.load("test/truth")
    assert (ld - truth).std() > 5
    assert abs(float((ld - truth).mean())) < 5


def test_same_anatomy_layout_pairs_each_low_dose_slice_with_its_noiseless_fbp(tmp_path):
    pooled = builtin_dataset(root=tmp_path, seed=0, progress=False, layout="same-anatomy",
                             **TINY)
    # every training source in one pool (1 augmentation of each of 6 real slices + 2
    # phantoms), no ND split: its user makes the ND domain from train/truth
    assert pooled.manifest["counts"] == {"train/ld": 8, "train/truth": 8, "test/ld": 2,
                                         "test/truth": 2}
    assert set(pooled.manifest["ld_sources"]) == set(LD_SOURCES + ND_SOURCES)
    assert not (pooled.root / "train" / "nd").exists()
    with pytest.raises(ValueError, match="same-anatomy"):
        pooled.load("train/nd")
    ld, truth = pooled.load("train/ld"), pooled.load("train/truth")
    assert ld.shape == truth.shape == (8, 128, 128)
    # the same slice: noise only (zero mean), the truth at the LD domain's CT numbers
    assert 5 < float((ld - truth).std()) < 100
    assert abs(float((ld - truth).mean())) < 2
    assert np.corrcoef(ld.ravel(), truth.ravel())[0, 1] > 0.99
    # the pool's truth is the simulation without noise of the planned (augmented) slices
    from pdml.data import simulate_low_dose
    from pdml.data.builtin import BuiltinRecipe, _plan

    recipe = BuiltinRecipe(seed=0, layout="same-anatomy", **TINY)
    plan = _plan(recipe, np.random.default_rng(0))
    assert plan["nd"] == [] and len(plan["ld"]) == 8
    hu, mm = plan["ld"][0]
    _, clean = simulate_low_dose(hu[None], i0=recipe.i0, views=recipe.views, seed=[0],
                                 pixel_size_mm=[mm], return_clean=True, device="cpu")
    np.testing.assert_allclose(truth[0], clean[0], atol=1e-2)
    # the default layout's cache key is what it was before layouts existed
    import hashlib

    default = BuiltinRecipe(seed=0, **TINY)
    blob = json.dumps(dict(seed=0, size=128, ld_per_source=1, nd_per_source=1,
                           test_per_slice=1, i0=5e4, views=60, version=1), sort_keys=True)
    assert default.key() == ("builtin-v1-seed0-128px-"
                             + hashlib.sha256(blob.encode()).hexdigest()[:10])
    assert recipe.key() != default.key()
    with pytest.raises(ValueError, match="layout"):
        BuiltinRecipe(layout="pooled")


def test_builtin_is_deterministic_and_cached(tiny, tmp_path, capsys):
    again = builtin_dataset(root=tmp_path, seed=0, progress=True, **TINY)
    assert "pdml built-in dataset" in capsys.readouterr().err      # the progress bar
    assert again.manifest["sha256"] == tiny.manifest["sha256"]
    for split in SPLITS:
        assert np.array_equal(again.load(split), tiny.load(split))
    # second call: cached, nothing rebuilt
    stamp = (again.root / "manifest.json").stat().st_mtime_ns
    cached = builtin_dataset(root=tmp_path, seed=0, progress=True, **TINY)
    assert cached.root == again.root and capsys.readouterr().err == ""
    assert (cached.root / "manifest.json").stat().st_mtime_ns == stamp
    other = builtin_dataset(root=tmp_path, seed=1, progress=False, **TINY)
    assert other.root != again.root
    assert other.manifest["sha256"] != again.manifest["sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dirs left


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PDML_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PDML_CACHE_DIR")
    assert "pdml" in str(cache_dir())


def test_phantom_is_body_like():
    img = phantom(128, np.random.default_rng(0))
    assert img.dtype == np.float32 and img.shape == (128, 128)
    assert img.min() < -950 and img.max() > 500          # air and bone
    assert ((img > -150) & (img < 150)).mean() > 0.2     # mostly soft tissue


def test_nd_carries_the_acquisition_shift(tiny):
    nd = tiny.load("train/nd")
    assert json.dumps(tiny.manifest["nd_shift"]) == json.dumps(BUILTIN_ND_SHIFT.__dict__)
    # ND = the shift applied to the augmented source slices (re-planned from the seed)
    from pdml.data.builtin import BuiltinRecipe, _plan

    plan = _plan(BuiltinRecipe(seed=0, **TINY), np.random.default_rng(0))
    unshifted = np.stack([hu for hu, _ in plan["nd"]])
    np.testing.assert_allclose(nd, BUILTIN_ND_SHIFT(unshifted), atol=1e-3)
    water_like = np.abs(unshifted) < 5                   # gains barely act near 0 HU
    assert water_like.sum() > 100
    assert float((nd - unshifted)[water_like].mean()) == pytest.approx(20.0, abs=1.0)


def coordinate_image(n=200):
    """HU image whose value encodes the pixel position: value = 1000 * row + col."""
    rows, cols = np.mgrid[:n, :n]
    return (rows * 1000 + cols).astype(np.float32)[None]


def test_unpaired_dataset_crops_margin_flips_determinism():
    img = coordinate_image()
    ds = UnpairedCTDataset(np.repeat(img, 3, 0), np.repeat(img, 2, 0), crop=64, margin=30,
                           flip=False, window=(0, 1), seed=7, length=20)
    assert len(ds) == 20
    for i in range(20):
        item = ds[i]
        assert set(item) == {"ld", "nd"}
        for key in ("ld", "nd"):
            t = item[key]
            assert t.shape == (1, 64, 64) and t.dtype == torch.float32
            top_left = float(t[0, 0, 0])                       # window (0, 1): value = HU
            r, c = divmod(int(round(top_left)), 1000)
            assert 30 <= r <= 200 - 64 - 30 and 30 <= c <= 200 - 64 - 30
    a, b = ds[3], ds[3]
    assert torch.equal(a["ld"], b["ld"]) and torch.equal(a["nd"], b["nd"])
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["ld"], a["ld"])
    flipped = UnpairedCTDataset(img, img, crop=64, margin=30, flip=True, window=(0, 1), seed=0,
                                length=40)
    seen_lr = any(float(flipped[i]["ld"][0, 0, 1] - flipped[i]["ld"][0, 0, 0]) < 0
                  for i in range(40))
    assert seen_lr
    with pytest.raises(ValueError, match="crop"):
        UnpairedCTDataset(img[:, :50, :50], img, crop=64)
    with pytest.raises(IndexError):
        ds[20]


def test_unit_scale_is_unclipped_and_paired_dataset(tiny):
    hu = np.array([[-1000.0, 0.0], [1000.0, 2000.0]], np.float32)[None].repeat(128, 1).repeat(64, 2)
    ds = UnpairedCTDataset(hu, hu, crop=128, margin=0, flip=False)
    np.testing.assert_allclose(ds[0]["ld"][0, 0, :2].numpy(), [0.0, 0.0])
    assert float(ds[0]["ld"].max()) == pytest.approx(1.5)
    paired = PairedCTDataset(tiny.test_ld, tiny.test_truth)
    assert len(paired) == 2
    item = paired[1]
    assert item["ld"].shape == item["truth"].shape == (1, 128, 128) and item["index"] == 1
    np.testing.assert_allclose(item["truth"][0].numpy(),
                               (tiny.load("test/truth")[1] + 1000) / 2000, rtol=1e-6)
    loader = torch.utils.data.DataLoader(UnpairedCTDataset(tiny.train_ld, tiny.train_nd),
                                         batch_size=2)
    batch = next(iter(loader))
    assert batch["ld"].shape == (2, 1, 128, 128)


def test_read_slices_sources(tiny, tmp_path):
    from pydicom.data import get_testdata_file

    assert read_slices(tiny.train_nd).shape == (5, 128, 128)
    np.save(tmp_path / "one.npy", np.zeros((5, 5), np.float32))
    assert read_slices(tmp_path / "one.npy").shape == (1, 5, 5)
    assert read_slices(get_testdata_file("eCT_Supplemental.dcm")).shape == (2, 512, 512)
    assert read_slices([np.zeros((2, 4, 4)), np.ones((4, 4))]).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="sizes"):
        read_slices([np.zeros((4, 4)), np.zeros((5, 5))])
