"""PyTorch datasets over CT slices.

Sources (``read_slices``): a NumPy array ``[S, H, W]`` / ``[H, W]`` in HU, a ``.npy`` file,
a folder of ``.npy`` files (each ``[H, W]`` or ``[S, H, W]``, HU, sorted by name), a DICOM
file or folder (read with :func:`pdml.data.load_ct`, all series concatenated), or a list
of any of these.

Items are float32 tensors on the unit scale of :func:`pdml.data.hu_to_unit`
(``[-1000, 1000]`` HU -> ``[0, 1]``), NOT clipped (bone above 1000 HU stays above 1), so
no information is lost; map back with :func:`pdml.data.unit_to_hu`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from pdml.data.dicom_read import load_ct
from pdml.data.hu import HU_WINDOW, hu_to_unit
from pdml.data.store import SliceStack

SliceSource = Union[np.ndarray, str, os.PathLike, Sequence]


def read_slices(source: SliceSource) -> np.ndarray:
    """All slices of ``source`` (see the module doc) as float32 ``[S, H, W]`` HU; a
    :class:`pdml.data.store.SliceStack` (mapped slices of the decoded-slice store) is
    returned as it is, so crops read the store and nothing is loaded."""
    if isinstance(source, SliceStack):
        return source
    if isinstance(source, np.ndarray):
        arr = source[None] if source.ndim == 2 else source
        if arr.ndim != 3:
            raise ValueError(f"slice array must be [S, H, W] or [H, W], got {source.shape}")
        return arr.astype(np.float32, copy=False)
    if isinstance(source, torch.Tensor):
        return read_slices(source.detach().cpu().numpy())
    if isinstance(source, (list, tuple)):
        parts = [read_slices(s) for s in source]
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"slices of different sizes {sorted(shapes)} in one source")
        return np.concatenate(parts)
    path = Path(source)
    if path.suffix == ".npy" and path.is_file():
        return read_slices(np.load(path))
    if path.is_dir():
        npys = sorted(path.glob("*.npy"))
        if npys:
            return read_slices([np.load(p) for p in npys])
    series = load_ct(path)
    return read_slices([s.hu for s in series])


def _crop_origin(size: int, crop: int, margin: int, rng: np.random.Generator) -> int:
    if crop > size:
        raise ValueError(f"crop {crop} is larger than the image side {size}")
    margin = min(margin, (size - crop) // 2)   # small images: shrink the margin to fit
    return int(rng.integers(margin, size - crop - margin + 1))


def random_crop_flip(hu: np.ndarray, crop: int, margin: int, flip: bool,
                     rng: np.random.Generator) -> np.ndarray:
    """A ``crop``² patch of ``hu`` ``[H, W]`` at a random place at least ``margin`` px from
    the border, randomly flipped left-right and up-down when ``flip``."""
    r = _crop_origin(hu.shape[0], crop, margin, rng)
    c = _crop_origin(hu.shape[1], crop, margin, rng)
    patch = hu[r:r + crop, c:c + crop]
    if flip and rng.random() < 0.5:
        patch = patch[:, ::-1]
    if flip and rng.random() < 0.5:
        patch = patch[::-1, :]
    return np.ascontiguousarray(patch)


class UnpairedCTDataset(Dataset):
    """Unpaired low-dose / full-dose patches for unsupervised training.

    Item ``i``: ``{"ld": [1, crop, crop], "nd": [1, crop, crop]}`` float32, unit scale
    (see module doc). ``ld`` is a patch of LD slice ``i % S_ld``, ``nd`` a patch of a
    randomly drawn ND slice (the domains are unpaired); crops keep ``margin`` px from the
    border (the paper: 128² crops, 30 px margin); random flips when ``flip``.
    ``length``: items per epoch (default ``max(S_ld, S_nd)``). Randomness is a function of
    ``(seed, epoch, i)`` only: call :meth:`set_epoch` each epoch for fresh crops; results do
    not depend on DataLoader workers.
    """

    def __init__(self, ld: SliceSource, nd: SliceSource, crop: int = 128, margin: int = 30,
                 flip: bool = True, window=HU_WINDOW, length: Optional[int] = None,
                 seed: int = 0):
        self.ld, self.nd = read_slices(ld), read_slices(nd)
        for name, arr in (("ld", self.ld), ("nd", self.nd)):
            if len(arr) == 0:
                raise ValueError(f"{name}: no slices")
            if min(arr.shape[1:]) < crop:
                raise ValueError(f"{name}: slices {arr.shape[1:]} smaller than crop {crop}")
        self.crop, self.margin, self.flip, self.window = crop, margin, flip, window
        self.length = length or max(len(self.ld), len(self.nd))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        ld = random_crop_flip(self.ld[i % len(self.ld)], self.crop, self.margin, self.flip, rng)
        nd_index = int(rng.integers(len(self.nd)))
        nd = random_crop_flip(self.nd[nd_index], self.crop, self.margin, self.flip, rng)
        to_tensor = lambda a: torch.from_numpy(hu_to_unit(a, self.window, clip=False)[None])  # noqa: E731
        return {"ld": to_tensor(ld), "nd": to_tensor(nd)}


class PairedCropDataset(UnpairedCTDataset):
    """Paired training patches: item ``i`` = ``{"ld": [1, crop, crop], "nd": [1, crop,
    crop]}`` float32 unit scale (see module doc), the SAME place (and flips) of LD slice
    ``i % S`` and of its reference ``nd[i % S]`` (same shape). For supervised training
    (an upper bound); arguments and randomness as in :class:`UnpairedCTDataset`
    (``length`` default: ``S``).
    """

    def __init__(self, ld: SliceSource, nd: SliceSource, crop: int = 128, margin: int = 30,
                 flip: bool = True, window=HU_WINDOW, length: Optional[int] = None,
                 seed: int = 0):
        super().__init__(ld, nd, crop, margin, flip, window, length, seed)
        if self.ld.shape != self.nd.shape:
            raise ValueError(f"paired slices must have one shape, got ld {self.ld.shape} and "
                             f"nd {self.nd.shape}")

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        k = i % len(self.ld)
        # two generators of one seed draw the same place and flips for both images
        crops = [random_crop_flip(img[k], self.crop, self.margin, self.flip,
                                  np.random.default_rng([self.seed, self.epoch, i]))
                 for img in (self.ld, self.nd)]
        return {name: torch.from_numpy(hu_to_unit(c, self.window, clip=False)[None])
                for name, c in zip(("ld", "nd"), crops)}


class PairedCTDataset(Dataset):
    """Paired evaluation slices: item ``i`` = ``{"ld": [1, H, W], "truth": [1, H, W],
    "index": i}``, float32 unit scale (see module doc), whole slices (no crop)."""

    def __init__(self, ld: SliceSource, truth: SliceSource, window=HU_WINDOW):
        self.ld, self.truth = read_slices(ld), read_slices(truth)
        if self.ld.shape != self.truth.shape:
            raise ValueError(f"ld {self.ld.shape} and truth {self.truth.shape} differ")
        self.window = window

    def __len__(self) -> int:
        return len(self.ld)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        unit = lambda a: torch.from_numpy(hu_to_unit(a, self.window, clip=False)[None])  # noqa: E731
        return {"ld": unit(self.ld[i]), "truth": unit(self.truth[i]), "index": i}
