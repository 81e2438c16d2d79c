"""What a run trains and evaluates on: training crops, held-out slices, the sample order."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pdml.training.config import TrainConfig, TrainError
from pdml.training.distributed import DistInfo, barrier
from pdml.training.networks import to_network


@dataclass
class ValItem:
    """One held-out slice: ``ld`` float32 ``[H, W]`` HU, ``nd`` its ND reference or None."""
    ld: np.ndarray
    nd: Optional[np.ndarray]
    name: str = ""


@dataclass
class RunData:
    """What a run trains and evaluates on.

    ``train``: ``len()`` and ``get(epoch, index) -> (ld, nd)`` crops ``[1, crop, crop]``
    float32 in the networks' scale (the high-frequency part when the wavelet split is on),
    the two unpaired (:class:`HighFrequencyCrops`); ``val``: the slices evaluated, in HU;
    ``val_source``: where they come from: "held-out" (the built-in dataset's test split,
    with its truth), "validation" (``--val-ldct/--val-ndct``, paired) or "training" (LD
    training slices, without a reference).
    """
    train: Any
    val: list = field(default_factory=list)
    val_source: str = "held-out"


class HighFrequencyCrops:
    """Training crops of the wavelet high-frequency part of whole slices, in the networks'
    scale.

    Wraps :class:`pdml.data.UnpairedCTDataset` built on the high-frequency part (HU) of
    every slice: the split is made once on whole slices, exactly as at inference, then
    cropped. The dataset maps HU to the unit window (``(hu + 1000) / 2000``), and
    :func:`pdml.training.networks.to_network` maps that to what the networks see. Without
    the wavelet split the crops are of the whole slices. With ``cfg.supervised`` the ND
    slices are the LD slices' references and each pair is cropped at the same place
    (:class:`pdml.data.PairedCropDataset`).
    Item ``i`` (after ``set_epoch``): ``(ld [1, c, c], nd [1, c, c])`` float32.
    """

    def __init__(self, ld_hu: np.ndarray, nd_hu: np.ndarray, cfg: TrainConfig):
        from pdml.data import PairedCropDataset, UnpairedCTDataset, wavelet_split

        if cfg.wavelet:
            ld_hu = wavelet_split(ld_hu, cfg.wavelet_name, cfg.wavelet_level)[1]
            nd_hu = wavelet_split(nd_hu, cfg.wavelet_name, cfg.wavelet_level)[1]
        self.cfg = cfg
        try:
            kind = PairedCropDataset if cfg.supervised else UnpairedCTDataset
            self.dataset = kind(ld_hu, nd_hu, crop=cfg.crop, margin=cfg.crop_margin, flip=True,
                                seed=cfg.seed)
        except ValueError as e:
            raise TrainError(f"training data: {e}") from None

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.dataset.set_epoch(epoch)
        item = self.dataset[index]
        return to_network(item["ld"], self.cfg), to_network(item["nd"], self.cfg)


def _read_folder(flag: str, folder: Optional[str]) -> np.ndarray:
    """All CT slices of a DICOM (or .npy) folder or file as float32 [S, H, W] HU;
    TrainError if unusable. Files skipped by the reader are passed over quietly; header
    warnings (a missing RescaleIntercept) are summarised in one warning per folder; slices
    at the same position are warned about, naming the folder and the files."""
    from pdml.data import DicomHeaderWarning, DuplicatePositionWarning, read_slices

    path = Path(folder)
    if not path.exists():
        raise TrainError(f"{flag} {folder}: no such folder or file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # load_ct's per-file warnings: summarised below
        try:
            slices = read_slices(path)
        except FileNotFoundError as e:  # NoCTImagesError: a folder without CT images
            raise TrainError(f"{flag} {folder}: {e}") from None
        except ValueError as e:
            raise TrainError(f"{flag} {folder}: {e}") from None
    header = [str(w.message) for w in caught if issubclass(w.category, DicomHeaderWarning)]
    if header:
        warnings.warn(f"{flag} {folder}: {len(header)} file(s) with an incomplete header "
                      f"(first: {header[0]})", DicomHeaderWarning, stacklevel=2)
    for w in caught:
        if issubclass(w.category, DuplicatePositionWarning):
            warnings.warn(f"{flag} {folder}: {w.message}", DuplicatePositionWarning, stacklevel=2)
    return slices


def _spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``."""
    count = min(count, total)
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, count)})


def build_data(cfg: TrainConfig, info: DistInfo) -> RunData:
    """The run's training crops and held-out slices.

    - no ``--ldct/--ndct``: the built-in dataset (:func:`pdml.data.builtin_dataset`, built
      once by rank 0 and cached; ``--builtin-layout``); held-out: its test split
      (simulated LD and clean truth);
    - ``--ldct/--ndct``: unpaired folders; held-out: ``--val-ldct/--val-ndct`` when given
      (paired), else a few LD training slices without a reference.

    ``--nd-offset-hu``: the ND training slices' CT numbers get that offset
    (:class:`pdml.data.AcquisitionShift`); the held-out slices never do.
    """
    from pdml.data import builtin_dataset

    val: list[ValItem] = []
    val_source = "held-out"
    if cfg.ldct is None:
        if info.is_main:
            builtin_dataset(size=cfg.builtin_size, progress=cfg.progress,
                            layout=cfg.builtin_layout)
        barrier(info)
        ds = builtin_dataset(size=cfg.builtin_size, progress=False, layout=cfg.builtin_layout)
        # same-anatomy: the ND domain is the LD slices' own noiseless reconstruction, drawn
        # independently of the LD crops (UnpairedCTDataset), so nothing pairs them
        ld = ds.load("train/ld")
        nd = ds.load("train/truth" if cfg.builtin_layout == "same-anatomy" else "train/nd")
        test_ld, test_truth = ds.load("test/ld"), ds.load("test/truth")
        for i in _spread(cfg.val_slices, len(test_ld)):
            val.append(ValItem(test_ld[i], test_truth[i], f"builtin test {i}"))
    else:
        ld, nd = _read_folder("--ldct", cfg.ldct), _read_folder("--ndct", cfg.ndct)
        if cfg.val_ldct is not None:
            v_ld, v_nd = _read_folder("--val-ldct", cfg.val_ldct), _read_folder("--val-ndct", cfg.val_ndct)
            if v_ld.shape != v_nd.shape:
                raise TrainError(f"--val-ldct and --val-ndct must hold paired slices of the same "
                                 f"shape, got {v_ld.shape} and {v_nd.shape}")
            val_source = "validation"
            for i in _spread(cfg.val_slices, len(v_ld)):
                val.append(ValItem(v_ld[i], v_nd[i], f"val {i}"))
        else:
            val_source = "training"
            for i in _spread(cfg.val_slices, len(ld)):
                val.append(ValItem(ld[i], None, f"train LD {i}"))
    if cfg.nd_offset_hu != 0:
        from pdml.data import AcquisitionShift

        nd = AcquisitionShift(offset_hu=cfg.nd_offset_hu)(nd)
    sources = ((f"the built-in {side} slices (--builtin-size {cfg.builtin_size})", arr)
               for side, arr in (("LD", ld), ("ND", nd))) if cfg.ldct is None else \
        ((f"--ldct {cfg.ldct}", ld), (f"--ndct {cfg.ndct}", nd))
    for what, arr in sources:
        if min(arr.shape[1:]) < cfg.crop:
            raise TrainError(f"--crop {cfg.crop} is larger than {what}: "
                             f"{arr.shape[1]}x{arr.shape[2]} px")
    return RunData(train=HighFrequencyCrops(ld, nd, cfg), val=val, val_source=val_source)


class IndexStream:
    """The endless, resumable sample order of one rank over a dataset.

    Epoch ``e`` is the order of a :class:`~torch.utils.data.DistributedSampler` with
    ``set_epoch(e)``; sample ``p`` of the stream is a pure function of ``(seed, rank, p)``,
    so a resumed run picks up the exact same samples without replaying the loader.
    """

    def __init__(self, dataset_len: int, info: DistInfo, seed: int):
        from torch.utils.data import DistributedSampler

        if dataset_len < info.world:
            raise TrainError(f"the dataset has {dataset_len} samples, fewer than the "
                             f"{info.world} ranks")
        self.sampler = DistributedSampler(range(dataset_len), num_replicas=info.world,
                                          rank=info.rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.per_epoch = len(self.sampler)
        self._epoch, self._order = -1, []

    def positions(self, start: int, count: int) -> list[tuple[int, int]]:
        """``(epoch, dataset index)`` of stream samples ``start .. start + count - 1``."""
        out = []
        for p in range(start, start + count):
            epoch, pos = divmod(p, self.per_epoch)
            if epoch != self._epoch:
                self.sampler.set_epoch(epoch)
                self._epoch, self._order = epoch, list(iter(self.sampler))
            out.append((epoch, self._order[pos]))
        return out
