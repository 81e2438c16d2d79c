"""The built-in dataset: real CT slices that install with pdml's dependencies, augmented,
with simulated low dose and an acquisition shift between the domains.

Sources (docs/data.md; reached with ``pydicom.data.get_testdata_file``, no network):

================================  ==============  =============================================
file                              anatomy         used for
================================  ==============  =============================================
J2K_pixelrep_mismatch.dcm         head, 512²      low-dose domain (training LD)
explicit_VR-UN.dcm                abdomen, 512²   low-dose domain (training LD)
bad_sequence.dcm                  neck, 512²      full-dose domain (training ND)
CT_small.dcm                      spine, 128²     full-dose domain (training ND)
eCT_Supplemental.dcm (2 frames)   brain, 512²     full-dose domain (training ND)
693_UNCR.dcm                      head, 512²      held-out paired test set only
================================  ==============  =============================================

Each real slice is clipped below at -1024 HU (outside-the-field padding is air), then
augmented: one of the 8 flips/90° rotations, a random square crop of 75-100 % of the side,
resized to ``size``² (antialiased bilinear). Procedural phantoms (random ellipses: body,
fat, organs, bone, lung-like regions, smooth texture) only add volume: a quarter of each
split. Pixel sizes follow from the source spacing and the crop (phantoms: 0.8 mm).

- ``train/ld``: low-dose domain slices through :func:`simulate_low_dose` (i0, views below).
- ``train/nd``: full-dose domain slices (no simulated noise; the real scans' own noise)
  through :data:`pdml.data.shift.BUILTIN_ND_SHIFT`: their CT numbers differ from the
  low-dose domain's, as between real acquisitions.
- ``test/ld`` and ``test/truth``: held-out slices (693_UNCR, a head no training slice
  comes from, and phantoms): the simulated low dose and its noiseless FBP (the same pipeline without
  noise: the clean truth at the low-dose domain's CT numbers, same resolution).

Layout ``"same-anatomy"`` (``BuiltinRecipe.layout``; the HU-shift ablation's data,
docs/hu-shift.md): one training pool of every real source (the low- and full-dose
domains' files together) and phantoms, each pool slice simulated once, giving
``train/ld`` (its simulated low dose) and ``train/truth`` (its noiseless FBP, the same
slice at the same CT numbers). There is no ``train/nd``: the user of the build makes the
full-dose domain from ``train/truth`` with the acquisition shift it studies
(``pdml-train --builtin-layout same-anatomy --nd-offset-hu``), so the two domains differ in
noise and in that shift only, never in anatomy. The test split is made as in the default
layout (``"domains"``).

Every file is a float32 ``[size, size]`` ``.npy`` in HU, named ``00000.npy``, ... .
The build is deterministic for a seed (same machine and torch), cached under
``$PDML_CACHE_DIR`` or the user's cache folder (``platformdirs.user_cache_dir("pdml")``),
and built once behind a progress bar; ``manifest.json`` records the recipe and a SHA-256
of every file.

Default size 256² (not 512²): the CPU projector needs about 1 s per 256² slice at 360
views against about 10 s per 512² slice at 720 views, and the paper's 128² crops with a
30 px margin fit in 256².
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import platformdirs
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file
from tqdm.auto import tqdm

from pdml.data.dicom_read import load_ct
from pdml.data.shift import BUILTIN_ND_SHIFT
from pdml.data.simulate import simulate_low_dose

RECIPE_VERSION = 1
LD_SOURCES = ("J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm")
ND_SOURCES = ("bad_sequence.dcm", "CT_small.dcm", "eCT_Supplemental.dcm")
TEST_SOURCES = ("693_UNCR.dcm",)
SPLITS = ("train/ld", "train/nd", "test/ld", "test/truth")
LAYOUT_SPLITS = {"domains": SPLITS,
                 "same-anatomy": ("train/ld", "train/truth", "test/ld", "test/truth")}
"""The splits of each layout: ``domains`` (the default): LD and ND training slices from
different sources; ``same-anatomy``: one pool of all sources, ``train/ld`` and its
noiseless ``train/truth``."""
LAYOUTS = tuple(LAYOUT_SPLITS)
PHANTOM_PIXEL_MM = 0.8


def cache_dir() -> Path:
    """``$PDML_CACHE_DIR`` if set, else the user's cache folder for pdml."""
    env = os.environ.get("PDML_CACHE_DIR")
    if env:
        return Path(env)
    return Path(platformdirs.user_cache_dir("pdml"))


def _split_folder(split: str) -> property:
    """The folder of ``split`` ("train/ld", ...) of a :class:`BuiltinDataset`."""
    return property(lambda self: self.root / split, doc=f"``root / {split!r}``")


@dataclass(frozen=True)
class BuiltinDataset:
    """Paths of a built dataset: four folders of float32 ``[size, size]`` HU ``.npy``."""

    root: Path
    manifest: dict

    train_ld = _split_folder("train/ld")
    train_nd = _split_folder("train/nd")
    train_truth = _split_folder("train/truth")
    test_ld = _split_folder("test/ld")
    test_truth = _split_folder("test/truth")

    def load(self, split: str) -> np.ndarray:
        """``split`` of this build's layout (:data:`LAYOUT_SPLITS`) -> float32
        ``[S, size, size]`` HU; ValueError naming the layout's splits otherwise."""
        layout = self.manifest.get("recipe", {}).get("layout", "domains")
        if split not in LAYOUT_SPLITS[layout]:
            raise ValueError(f"split must be one of {LAYOUT_SPLITS[layout]} (layout "
                             f"{layout!r}), got {split!r}")
        return np.stack([np.load(p) for p in sorted((self.root / split).glob("*.npy"))])


# ------------------------------------------------------------------------ augmentation

def _real_slices(name: str) -> List[Tuple[np.ndarray, float]]:
    """[(hu [N, N] float32 clipped at -1024, pixel mm)] for each slice (frame) of a
    pydicom / pydicom-data test file."""
    with warnings.catch_warnings():
        # pydicom-data's files carry some invalid header values on purpose (it is a test
        # suite): pydicom's complaints about them say nothing about the pixels used here
        warnings.simplefilter("ignore", UserWarning)
        all_series = load_ct(get_testdata_file(name))
    out = []
    for series in all_series:
        spacing = series.pixel_spacing_mm
        for hu in series.hu:
            out.append((np.maximum(hu, -1024.0), float(spacing[0]) if spacing else 0.5))
    return out


def _augment(hu: np.ndarray, pixel_mm: float, size: int,
             rng: np.random.Generator) -> Tuple[np.ndarray, float]:
    """Random flip/90° rotation, random square crop of 75-100 %, resize to ``size``²."""
    img = np.rot90(hu, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    n = img.shape[0]
    side = int(round(n * rng.uniform(0.75, 1.0)))
    r, c = (int(rng.integers(0, n - side + 1)) for _ in range(2))
    crop = torch.from_numpy(np.ascontiguousarray(img[r:r + side, c:c + side]))
    resized = F.interpolate(crop[None, None].double(), size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)[0, 0]
    return resized.float().numpy(), pixel_mm * side / size


def phantom(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random procedural body-like slice, float32 ``[size, size]`` HU."""
    from scipy.ndimage import gaussian_filter  # ~0.2 s: only a build of the dataset needs it

    yy, xx = (np.mgrid[:size, :size] + 0.5) / size - 0.5

    def ellipse(cy, cx, ry, rx, angle):
        ca, sa = np.cos(angle), np.sin(angle)
        y, x = yy - cy, xx - cx
        return ((ca * x + sa * y) / rx) ** 2 + ((-sa * x + ca * y) / ry) ** 2 <= 1.0

    img = np.full((size, size), -1000.0)
    ry, rx = rng.uniform(0.30, 0.42), rng.uniform(0.36, 0.46)
    img[ellipse(0, 0, ry, rx, 0)] = -100.0                        # subcutaneous fat
    img[ellipse(0, 0, ry * 0.9, rx * 0.9, 0)] = rng.uniform(20, 50)  # muscle / soft tissue
    for _ in range(int(rng.integers(1, 3))):                       # lung-like regions
        if rng.random() < 0.5:
            cy, cx = rng.uniform(-0.1, 0.1), rng.choice([-1, 1]) * rng.uniform(0.12, 0.2)
            img[ellipse(cy, cx, ry * 0.5, rx * 0.3, rng.uniform(0, np.pi))] = -850.0
    for _ in range(int(rng.integers(2, 5))):                       # organs
        cy, cx = rng.uniform(-0.15, 0.15, size=2)
        img[ellipse(cy, cx, rng.uniform(0.04, 0.14), rng.uniform(0.04, 0.14),
                    rng.uniform(0, np.pi))] = rng.choice([-80.0, 30.0, 60.0, 80.0, 120.0])
    for _ in range(int(rng.integers(1, 4))):                       # bone
        cy, cx = rng.uniform(-0.25, 0.25, size=2)
        r = rng.uniform(0.02, 0.05)
        img[ellipse(cy, cx, r, r * rng.uniform(0.8, 1.5), rng.uniform(0, np.pi))] = \
            rng.uniform(600, 1300)
    body = img > -900
    texture = gaussian_filter(rng.standard_normal((size, size)), 2.0)
    texture *= 8.0 / max(texture.std(), 1e-12)
    img = np.where(body, img + texture, img)
    return gaussian_filter(img, 0.7).astype(np.float32)           # partial-volume edges


# ------------------------------------------------------------------------------ build

@dataclass(frozen=True)
class BuiltinRecipe:
    """What a build makes; part of the cache key through :meth:`key`."""

    seed: int = 0
    size: int = 256
    ld_per_source: int = 12
    nd_per_source: int = 8
    test_per_slice: int = 8
    i0: float = 5e4
    views: int = 360
    layout: str = "domains"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    def key(self) -> str:
        fields = dict(self.__dict__, version=RECIPE_VERSION)
        if fields["layout"] == "domains":  # added later: the builds made before keep their key
            del fields["layout"]
        blob = json.dumps(fields, sort_keys=True)
        return f"builtin-v{RECIPE_VERSION}-seed{self.seed}-{self.size}px-" + \
            hashlib.sha256(blob.encode()).hexdigest()[:10]


def _plan(recipe: BuiltinRecipe, rng: np.random.Generator):
    """{"ld" | "nd" | "test": [(hu [size, size], pixel_mm)]} in a fixed order; with the
    ``same-anatomy`` layout "ld" pools every training source and "nd" is empty."""
    size = recipe.size
    items: Dict[str, List[Tuple[np.ndarray, float]]] = {"ld": [], "nd": [], "test": []}
    if recipe.layout == "same-anatomy":
        plan = (("ld", LD_SOURCES + ND_SOURCES, recipe.ld_per_source),
                ("test", TEST_SOURCES, recipe.test_per_slice))
    else:
        plan = (("ld", LD_SOURCES, recipe.ld_per_source),
                ("nd", ND_SOURCES, recipe.nd_per_source),
                ("test", TEST_SOURCES, recipe.test_per_slice))
    for key, sources, count in plan:
        for name in sources:
            for hu, pixel_mm in _real_slices(name):
                for _ in range(count):
                    items[key].append(_augment(hu, pixel_mm, size, rng))
        # a quarter of the split (a third of the real ones) is procedural phantoms
        for _ in range(max(1, len(items[key]) // 3)):
            items[key].append((phantom(size, rng), PHANTOM_PIXEL_MM))
    return items


def build(root: Path, recipe: BuiltinRecipe, progress: bool = True,
          device: Optional[str] = None, batch: int = 8) -> dict:
    """Build the dataset of ``recipe`` into the (new, empty) folder ``root``; returns the
    manifest (also written to ``root/manifest.json``). ``batch`` slices are simulated
    together (the projector's sampling grids are shared by the batch)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(recipe.seed)
    items = _plan(recipe, rng)
    to_simulate = len(items["ld"]) + len(items["test"])
    bar = tqdm(total=to_simulate, desc="pdml built-in dataset (simulating low dose)",
               unit="slice", disable=not progress)
    pooled = recipe.layout == "same-anatomy"
    made = LAYOUT_SPLITS[recipe.layout]
    for split in made:
        (root / split).mkdir(parents=True, exist_ok=True)
    files: Dict[str, str] = {}

    def save(split: str, index: int, hu: np.ndarray) -> None:
        path = root / split / f"{index:05d}.npy"
        np.save(path, np.ascontiguousarray(hu, dtype=np.float32))
        files[f"{split}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()

    for index, (hu, _) in enumerate(items["nd"]):
        save("train/nd", index, BUILTIN_ND_SHIFT(hu))
    for split_key, want_truth in (("ld", pooled), ("test", True)):
        slices = items[split_key]
        for start in range(0, len(slices), batch):
            chunk = slices[start:start + batch]
            # one seed per slice: a slice's noise does not depend on the batching
            seeds = [recipe.seed * 1_000_003 + (0 if split_key == "ld" else 500_000) + i
                     for i in range(start, start + len(chunk))]
            result = simulate_low_dose(np.stack([hu for hu, _ in chunk]), i0=recipe.i0,
                                       views=recipe.views, seed=seeds,
                                       pixel_size_mm=[mm for _, mm in chunk],
                                       return_clean=want_truth, device=device)
            prefix = "train" if split_key == "ld" else "test"
            for j in range(len(chunk)):
                if want_truth:
                    save(f"{prefix}/ld", start + j, result[0][j])
                    save(f"{prefix}/truth", start + j, result[1][j])
                else:
                    save(f"{prefix}/ld", start + j, result[j])
            bar.update(len(chunk))
    bar.close()
    manifest = {"version": RECIPE_VERSION, "recipe": recipe.__dict__,
                "ld_sources": LD_SOURCES + ND_SOURCES if pooled else LD_SOURCES,
                "nd_sources": () if pooled else ND_SOURCES,
                "test_sources": TEST_SOURCES,
                "nd_shift": None if pooled else BUILTIN_ND_SHIFT.__dict__,
                "counts": {s: sum(1 for k in files if k.startswith(s + "/")) for s in made},
                "sha256": files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def builtin_dataset(root: Optional[os.PathLike] = None, seed: int = 0, size: int = 256, *,
                    rebuild: bool = False, progress: bool = True,
                    device: Optional[str] = None, **recipe_overrides) -> BuiltinDataset:
    """The built-in dataset for ``seed`` and ``size``, built on first use and cached.

    ``root``: the folder holding the cached builds (default :func:`cache_dir`); the build
    lives in ``root / recipe.key()``. ``rebuild``: build again even if cached.
    ``recipe_overrides``: other :class:`BuiltinRecipe` fields (``i0``, ``views``,
    ``ld_per_source``, ...). The build happens in a temporary folder renamed into place
    when complete, so an interrupted build never leaves a half dataset behind.
    """
    recipe = BuiltinRecipe(seed=seed, size=size, **recipe_overrides)
    base = Path(root) if root is not None else cache_dir()
    target = base / recipe.key()
    manifest_path = target / "manifest.json"
    if manifest_path.is_file() and not rebuild:
        return BuiltinDataset(target, json.loads(manifest_path.read_text()))
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.key()}-", dir=base))
    try:
        manifest = build(tmp, recipe, progress=progress, device=device)
        if rebuild and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)    # atomic; fails if another process got there first
        except OSError:
            if not manifest_path.is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)   # an identical build finished first
            manifest = json.loads(manifest_path.read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuiltinDataset(target, manifest)
