"""What a run trains and evaluates on: training crops, held-out slices, the sample order."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from pdml.data import (AcquisitionShift, PairedCropDataset, UnpairedCTDataset, builtin_dataset,
                       read_slices, wavelet_split)
from pdml.data.layouts import (LayoutError, expand_sources, folder_layout, patient_layout,
                               source_files, split_patients)
from pdml.data.pairing import PairingError, describe_unmatched, pair_by_position
from pdml.data.store import StoreWarning, open_store
from pdml.training.config import TrainConfig, TrainError
from pdml.training.distributed import DistInfo, barrier
from pdml.training.networks import to_network
from pdml.training.sources import uses_dicom


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
    with its truth), "validation" (``--val-ldct/--val-ndct`` or the validation patients,
    paired) or "training" (LD training slices, without a reference). ``patients``: the
    patient split of DICOM sources (``{"train", "val", "test": [names], "slices":
    {patient: {"ld": n, "nd": n}}}``), None for the built-in data; ``cache``: the folder
    of the decoded-slice store used, or None.
    """
    train: Any
    val: list = field(default_factory=list)
    val_source: str = "held-out"
    patients: Optional[dict] = None
    cache: Optional[str] = None


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
    ``split_done``: ``ld_hu``/``nd_hu`` already are the high band (the decoded-slice
    store keeps it beside each slice: :class:`pdml.data.store.SliceStack`, read per crop).
    Item ``i`` (after ``set_epoch``): ``(ld [1, c, c], nd [1, c, c])`` float32.
    """

    def __init__(self, ld_hu, nd_hu, cfg: TrainConfig, split_done: bool = False):
        if cfg.wavelet and not split_done:
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


def _read_npy(flag: str, sources) -> np.ndarray:
    """Slices of ``.npy`` sources (files, folders of ``.npy``) as float32 [S, H, W] HU."""
    try:
        return read_slices([str(p) for p in sources])
    except (ValueError, OSError) as e:
        raise TrainError(f"{flag} {' '.join(map(str, sources))}: {e}") from None


def _is_npy(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".npy") or (path.is_dir() and any(path.glob("*.npy")))


def _spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``."""
    count = min(count, total)
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, count)})


def _store(cfg: TrainConfig, info: DistInfo, roots: list[Path]):
    """The decoded-slice store (:mod:`pdml.data.store`) of every file under ``roots``: built
    by rank 0 (with a progress bar), then opened read-only by every rank."""
    files = source_files(roots)
    if not files:
        raise TrainError(f"no files under {', '.join(map(str, roots))}")
    wavelet = (cfg.wavelet_name, cfg.wavelet_level) if cfg.wavelet else None
    store = None
    if info.is_main:
        with tqdm(total=len(files), desc="decoding DICOM (once; cached)", unit="file",
                  disable=not cfg.progress, leave=False) as bar:
            with warnings.catch_warnings():
                warnings.simplefilter("always", StoreWarning)
                try:
                    store = open_store(files, roots, wavelet,
                                       progress=lambda n: bar.update(n - bar.n))
                except OSError as e:   # an unwritable or full cache folder
                    raise TrainError(f"data cache (PDML_CACHE_DIR): {e}") from None
    barrier(info)
    if store is None:
        store = open_store(files, roots, wavelet, build=False)
    return store


def _pairs(store, ld_idx, nd_idx, cfg: TrainConfig, flags: tuple) -> list[ValItem]:
    """The held-out LD/ND pairs by position (:mod:`pdml.data.pairing`), ``val_slices`` of
    them spread evenly; unmatched slices are warned about by name."""
    try:
        pairing = pair_by_position([store.records[i] for i in ld_idx],
                                   [store.records[i] for i in nd_idx],
                                   cfg.pair_tolerance_mm, names=flags)
    except PairingError as e:
        raise TrainError(str(e)) from None
    for line in describe_unmatched(pairing, flags):
        warnings.warn(line, stacklevel=3)
    if not pairing.pairs:
        raise TrainError(f"{flags[0]} and {flags[1]}: no slice pairs (same patient, same "
                         f"position to {cfg.pair_tolerance_mm:g} mm)")
    out = []
    for k in _spread(cfg.val_slices, len(pairing.pairs)):
        i, j = pairing.pairs[k]
        li, ni = ld_idx[i], nd_idx[j]
        out.append(ValItem(np.array(store.slice(li)), np.array(store.slice(ni)),
                           store.records[li].name))
    return out


def _dicom_data(cfg: TrainConfig, info: DistInfo) -> "RunData":
    """Training crops and held-out slices of DICOM sources, through the decoded-slice store
    (see :func:`build_data`)."""
    try:
        if cfg.patients is not None:
            roots = {"--patients": expand_sources("--patients", cfg.patients)}
        else:
            roots = {"--ldct": expand_sources("--ldct", cfg.ldct),
                     "--ndct": expand_sources("--ndct", cfg.ndct)}
        if cfg.val_ldct is not None:
            roots["--val-ldct"] = expand_sources("--val-ldct", cfg.val_ldct)
            roots["--val-ndct"] = expand_sources("--val-ndct", cfg.val_ndct)
        if cfg.patients is None and all(_is_npy(p) for p in roots["--ldct"] + roots["--ndct"]):
            return _npy_data(cfg, roots)
        store = _store(cfg, info, sorted({p for paths in roots.values() for p in paths}))
        if not store.records:
            raise TrainError(f"no CT images under {', '.join(map(str, store.manifest['roots']))} "
                             f"({store.manifest['files']} files looked at)")
        if cfg.patients is not None:
            groups = patient_layout(store, roots["--patients"], cfg.ld_series, cfg.nd_series)
        else:
            groups = folder_layout(store, roots["--ldct"], roots["--ndct"])
        split = split_patients(sorted(groups), cfg.val_patients, cfg.test_patients,
                               cfg.val_fraction, cfg.test_fraction, cfg.seed)
    except (LayoutError, FileNotFoundError) as e:
        raise TrainError(str(e)) from None
    band = "high" if cfg.wavelet else "hu"
    train = {d: [i for p in split["train"] for i in groups[p][d]] for d in ("ld", "nd")}
    flag = "--patients" if cfg.patients is not None else None
    for dose in ("ld", "nd"):
        if not train[dose]:
            raise TrainError(f"{flag or '--' + dose + 'ct'}: no {dose.upper()} slices of the "
                             f"training patients ({', '.join(split['train'])})")
        shapes = sorted({store.records[i].shape for i in train[dose]})
        if len(shapes) > 1:
            raise TrainError(f"{flag or '--' + dose + 'ct'}: {dose.upper()} slices of different "
                             f"sizes {', '.join(f'{h}x{w}' for h, w in shapes)}; train on one size")
    if cfg.val_ldct is not None:
        vgroups = folder_layout(store, roots["--val-ldct"], roots["--val-ndct"],
                                "--val-ldct/--val-ndct")
        val = _pairs(store, [i for g in vgroups.values() for i in g["ld"]],
                     [i for g in vgroups.values() for i in g["nd"]], cfg,
                     ("--val-ldct", "--val-ndct"))
        source = "validation"
    elif split["val"]:
        val = _pairs(store, [i for p in split["val"] for i in groups[p]["ld"]],
                     [i for p in split["val"] for i in groups[p]["nd"]], cfg,
                     ("LD", "ND"))
        source = "validation"
    else:
        val = [ValItem(np.array(store.slice(train["ld"][k])), None,
                       store.records[train["ld"][k]].name)
               for k in _spread(cfg.val_slices, len(train["ld"]))]
        source = "training"
    ld, nd = store.stack(train["ld"], band), store.stack(train["nd"], band)
    for what, arr in (("ld", ld), ("nd", nd)):
        if min(arr.shape[1:]) < cfg.crop:
            source = (f"--patients {' '.join(cfg.patients)}" if cfg.patients is not None else
                      f"--{what}ct {' '.join(getattr(cfg, what + 'ct'))}")
            raise TrainError(f"--crop {cfg.crop} is larger than the {what.upper()} training "
                             f"slices of {source}: {arr.shape[1]}x{arr.shape[2]} px")
    counts = {p: {d: len(groups[p][d]) for d in ("ld", "nd")} for p in sorted(groups)}
    return RunData(train=HighFrequencyCrops(ld, nd, cfg, split_done=True), val=val,
                   val_source=source, patients={**split, "slices": counts},
                   cache=str(store.folder))


def _npy_data(cfg: TrainConfig, roots: dict) -> "RunData":
    """Training data of ``.npy`` sources (in memory, no patients, no store)."""
    ld, nd = _read_npy("--ldct", roots["--ldct"]), _read_npy("--ndct", roots["--ndct"])
    val, source = [], "training"
    if cfg.val_ldct is not None:
        v_ld, v_nd = _read_npy("--val-ldct", roots["--val-ldct"]), _read_npy("--val-ndct", roots["--val-ndct"])
        if v_ld.shape != v_nd.shape:
            raise TrainError(f"--val-ldct and --val-ndct (.npy, paired by order) must hold "
                             f"slices of one shape, got {v_ld.shape} and {v_nd.shape}")
        val = [ValItem(v_ld[i], v_nd[i], f"val {i}") for i in _spread(cfg.val_slices, len(v_ld))]
        source = "validation"
    else:
        val = [ValItem(ld[i], None, f"train LD {i}") for i in _spread(cfg.val_slices, len(ld))]
    for what, arr in (("--ldct", ld), ("--ndct", nd)):
        if min(arr.shape[1:]) < cfg.crop:
            raise TrainError(f"--crop {cfg.crop} is larger than {what} "
                             f"{' '.join(map(str, roots[what]))}: "
                             f"{arr.shape[1]}x{arr.shape[2]} px")
    return RunData(train=HighFrequencyCrops(ld, nd, cfg), val=val, val_source=source)


def build_data(cfg: TrainConfig, info: DistInfo) -> RunData:
    """The run's training crops and held-out slices.

    - no DICOM sources: the built-in dataset (:func:`pdml.data.builtin_dataset`, built
      once by rank 0 and cached; ``--builtin-layout``); held-out: its test split
      (simulated LD and clean truth); ``--nd-offset-hu`` shifts its ND training slices
      (:class:`pdml.data.AcquisitionShift`), never the held-out ones;
    - ``--ldct/--ndct`` or ``--patients`` (:mod:`pdml.data.layouts`): every file decoded
      once into the decoded-slice store (:mod:`pdml.data.store`, with the wavelet high
      band), split by patient; training crops read the mapped store; held-out:
      ``--val-ldct/--val-ndct`` or the validation patients, LD and ND paired by position
      (:mod:`pdml.data.pairing`), else a few LD training slices without a reference.
      ``.npy`` sources are read into memory (no patients, pairs by order).
    """
    if uses_dicom(cfg):
        return _dicom_data(cfg, info)
    val: list[ValItem] = []
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
    if cfg.nd_offset_hu != 0:
        nd = AcquisitionShift(offset_hu=cfg.nd_offset_hu)(nd)
    for side, arr in (("LD", ld), ("ND", nd)):
        if min(arr.shape[1:]) < cfg.crop:
            raise TrainError(f"--crop {cfg.crop} is larger than the built-in {side} slices "
                             f"(--builtin-size {cfg.builtin_size}): {arr.shape[1]}x{arr.shape[2]} px")
    return RunData(train=HighFrequencyCrops(ld, nd, cfg), val=val, val_source="held-out")


class IndexStream:
    """The endless, resumable sample order of one rank over a dataset.

    Epoch ``e`` is the order of a :class:`~torch.utils.data.DistributedSampler` with
    ``set_epoch(e)``; sample ``p`` of the stream is a pure function of ``(seed, rank, p)``,
    so a resumed run picks up the exact same samples without replaying the loader.
    """

    def __init__(self, dataset_len: int, info: DistInfo, seed: int):
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
