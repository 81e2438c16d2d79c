"""The decoded-slice cache: DICOM decoded once into memory-mapped arrays on disk.

A store holds every CT slice of a list of files (:func:`pdml.data.load_ct` per file), in
HU as float32, and, when asked, its wavelet high band (:func:`pdml.data.wavelet_split`
of the whole slice, exactly as the trainer splits it) beside it. Later runs (and every
rank of a torchrun job) map the arrays read-only: a crop reads only its own rows, so
resident memory does not grow with the number of slices.

Folder ``<cache>/slices/<key>/`` (``<cache>``: :func:`pdml.data.cache_dir`):

- ``hu-<H>x<W>.f32`` (and ``high-<H>x<W>.f32``): raw little-endian float32
  ``[S_shape, H, W]``, one file per slice size;
- ``index.json``: one record per slice (:class:`SliceRecord` fields, its CRC-32s);
- ``manifest.json``: the key, the settings, the sources, the counts per size and the
  SHA-256 of ``index.json``; written last.

``key``: a SHA-256 of every source file's absolute path, size and modification time
(ns) and of the settings that change the arrays (the wavelet and its level, the store's
format version). A changed, added or removed file gives another key: the store of the
old files is stale and is removed when the new one is built for the same sources.
The build writes into a temporary folder with plain file writes (no mapping, so the
build's resident memory stays at one slice), fsyncs, and renames the folder into place
(atomic; a concurrent builder's folder wins and ours is dropped). Opening checks the
manifest, the index's SHA-256, every array file's exact size and the CRC-32 of up to
:data:`CHECKED_SLICES` slices spread over the store; a store that fails is reported,
removed and rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from pdml.data.builtin import cache_dir
from pdml.data.dicom_read import DicomReadError, load_ct
from pdml.data.wavelet import wavelet_split

STORE_VERSION = 1
CHECKED_SLICES = 32
"""Slices whose CRC-32 is checked each time a store is opened (spread evenly)."""


class StoreWarning(UserWarning):
    """A cached store was stale or damaged and is rebuilt; the message says why."""


@dataclass(frozen=True)
class SliceRecord:
    """One cached slice: where it came from and where it lies along the patient.

    ``file``: source path; ``frame``: frame of a multi-frame file or None; ``patient``:
    PatientID ("" when absent); ``frame_of_reference``: FrameOfReferenceUID or "";
    ``series``: SeriesInstanceUID; ``description``: SeriesDescription; ``position``:
    ImagePositionPatient along the slice normal in mm, or None; ``spacing``: PixelSpacing
    (row, column) in mm or None; ``shape``: (H, W); ``row``: index in its size's array.
    """
    file: str
    frame: Optional[int]
    patient: str
    frame_of_reference: str
    series: str
    description: str
    position: Optional[float]
    spacing: Optional[tuple]
    shape: tuple
    row: int

    @property
    def name(self) -> str:
        """The file (and frame) as messages name the slice."""
        return self.file + (f" (frame {self.frame})" if self.frame is not None else "")


class SliceStack:
    """Read-only ``[S, H, W]`` float32 view of chosen rows of a memory-mapped array:
    ``stack[i]`` is the mapped slice ``[H, W]`` (no copy), ``len``, ``shape``, ``ndim``,
    ``dtype`` as an array's; ``np.asarray(stack)`` copies all of it."""

    def __init__(self, array: np.ndarray, rows: Sequence[int]):
        self.array, self.rows = array, list(rows)
        self.shape = (len(self.rows), *array.shape[1:])
        self.ndim, self.dtype = 3, array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[self.rows[i]]

    def __array__(self, dtype=None, copy=None):
        out = np.stack([self.array[r] for r in self.rows]) if self.rows else \
            np.empty(self.shape, np.float32)
        return out.astype(dtype, copy=False) if dtype is not None else out


def _along_normal(position, orientation) -> Optional[float]:
    if position is None:
        return None
    if orientation is None:
        return float(position[2])
    normal = np.cross(np.array(orientation[:3]), np.array(orientation[3:]))
    return float(np.dot(normal, position))


def _stat_lines(files: Sequence[Path]) -> list[str]:
    lines = []
    for f in files:
        st = f.stat()
        lines.append(f"{f.resolve()}\t{st.st_size}\t{st.st_mtime_ns}")
    return lines


def store_key(files: Sequence[Path], settings: dict) -> str:
    """The store's key: SHA-256 (32 hex digits) of the files' paths, sizes, mtimes and
    ``settings``."""
    h = hashlib.sha256(json.dumps({"version": STORE_VERSION, "settings": settings},
                                  sort_keys=True).encode())
    for line in _stat_lines(files):
        h.update(line.encode() + b"\n")
    return h.hexdigest()[:32]


class SliceStore:
    """An opened store: ``records`` (list of :class:`SliceRecord`), ``skipped``
    (``[(file, reason)]`` of files that are not usable CT images), and the mapped arrays.

    ``stack(indices, band)`` -> :class:`SliceStack` of those records (one size),
    ``band`` "hu" or "high"; ``slice(index, band)`` -> one mapped ``[H, W]``.
    """

    def __init__(self, folder: Path, manifest: dict, records: list, skipped: list):
        self.folder, self.manifest = folder, manifest
        self.records: list[SliceRecord] = records
        self.skipped = skipped
        self._arrays: dict[tuple, np.ndarray] = {}

    def _array(self, band: str, shape: tuple) -> np.ndarray:
        key = (band, tuple(shape))
        if key not in self._arrays:
            if band == "high" and not self.manifest["settings"].get("wavelet"):
                raise ValueError("this store holds no wavelet high band")
            count = self.manifest["groups"][_group(shape)]
            self._arrays[key] = np.memmap(self.folder / f"{band}-{_group(shape)}.f32",
                                          dtype="<f4", mode="r", shape=(count, *shape))
        return self._arrays[key]

    def slice(self, index: int, band: str = "hu") -> np.ndarray:
        rec = self.records[index]
        return self._array(band, rec.shape)[rec.row]

    def stack(self, indices: Sequence[int], band: str = "hu") -> SliceStack:
        shapes = {self.records[i].shape for i in indices}
        if len(shapes) > 1:
            raise ValueError(f"slices of different sizes {sorted(shapes)} in one stack")
        shape = shapes.pop() if shapes else (0, 0)
        if not indices:
            return SliceStack(np.empty((0, *shape), np.float32), [])
        return SliceStack(self._array(band, shape), [self.records[i].row for i in indices])


def _group(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a, dtype="<f4").tobytes())


def _build(folder: Path, key: str, files: Sequence[Path], settings: dict, roots: list,
           progress: Optional[Callable[[int], None]]) -> None:
    """Decode ``files`` into ``folder`` (new, empty); see the module doc."""
    wavelet = settings.get("wavelet")
    handles: dict[str, dict] = {}
    records, skipped = [], []
    try:
        for n, f in enumerate(files):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # per-file notes: the layouts report
                    series_list = load_ct(f)
            except (DicomReadError, OSError) as e:
                skipped.append([str(f), str(e)])
                continue
            for series in series_list:
                for k, sl in enumerate(series.slices):
                    hu = np.ascontiguousarray(series.hu[k], dtype="<f4")
                    g = _group(hu.shape)
                    if g not in handles:
                        handles[g] = {"count": 0, "hu": open(folder / f"hu-{g}.f32", "wb")}
                        if wavelet:
                            handles[g]["high"] = open(folder / f"high-{g}.f32", "wb")
                    h = handles[g]
                    h["hu"].write(hu.tobytes())
                    rec = SliceRecord(
                        file=str(f), frame=sl.frame,
                        patient=str(sl.header.get("PatientID", "") or ""),
                        frame_of_reference=str(sl.header.get("FrameOfReferenceUID", "") or ""),
                        series=series.series_uid, description=series.description,
                        position=_along_normal(sl.position, sl.orientation),
                        spacing=tuple(sl.pixel_spacing) if sl.pixel_spacing else None,
                        shape=tuple(hu.shape), row=h["count"])
                    entry = {**asdict(rec), "crc": _crc(hu)}
                    if wavelet:
                        high = np.ascontiguousarray(
                            wavelet_split(hu[None], wavelet[0], wavelet[1])[1][0], dtype="<f4")
                        h["high"].write(high.tobytes())
                        entry["crc_high"] = _crc(high)
                    h["count"] += 1
                    records.append(entry)
            if progress is not None:
                progress(n + 1)
        for h in handles.values():
            for name in ("hu", "high"):
                if name in h:
                    h[name].flush()
                    os.fsync(h[name].fileno())
    finally:
        for h in handles.values():
            for name in ("hu", "high"):
                if name in h:
                    h[name].close()
    index = json.dumps({"records": records, "skipped": skipped}).encode()
    _write_synced(folder / "index.json", index)
    manifest = {"version": STORE_VERSION, "key": key,
                "settings": settings, "roots": roots, "files": len(files),
                "groups": {g: h["count"] for g, h in handles.items()},
                "index_sha256": hashlib.sha256(index).hexdigest()}
    _write_synced(folder / "manifest.json", json.dumps(manifest, indent=1).encode())


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _open(folder: Path, key: str) -> SliceStore:
    """The store in ``folder``; ValueError saying what is wrong when it is damaged."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        index_bytes = (folder / "index.json").read_bytes()
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable manifest or index ({type(e).__name__})") from None
    if manifest.get("version") != STORE_VERSION or manifest.get("key") != key:
        raise ValueError("manifest of another version or key")
    if hashlib.sha256(index_bytes).hexdigest() != manifest.get("index_sha256"):
        raise ValueError("index.json does not match its SHA-256 in the manifest")
    index = json.loads(index_bytes)
    wavelet = manifest["settings"].get("wavelet")
    for g, count in manifest["groups"].items():
        h, w = map(int, g.split("x"))
        for band in ("hu", "high") if wavelet else ("hu",):
            path = folder / f"{band}-{g}.f32"
            size = path.stat().st_size if path.exists() else -1
            if size != count * h * w * 4:
                raise ValueError(f"{path.name} has {size} bytes, {count * h * w * 4} expected")
    fields = set(SliceRecord.__dataclass_fields__)
    records = [SliceRecord(**{k: (tuple(v) if k in ("spacing", "shape") and v is not None
                                  else v) for k, v in e.items() if k in fields})
               for e in index["records"]]
    store = SliceStore(folder, manifest, records, [tuple(s) for s in index["skipped"]])
    for i in sorted({int(round(v)) for v in np.linspace(0, len(records) - 1,
                                                         min(CHECKED_SLICES, len(records)))}):
        entry = index["records"][i]
        if _crc(store.slice(i)) != entry["crc"] or (
                wavelet and _crc(store.slice(i, "high")) != entry["crc_high"]):
            raise ValueError(f"slice {i} ({entry['file']}) does not match its CRC-32")
    return store


def _remove(folder: Path) -> None:
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def open_store(files: Sequence[Path], roots: Iterable[str], wavelet: Optional[tuple] = None,
               cache: Optional[Path] = None, build: bool = True,
               progress: Optional[Callable[[int], None]] = None) -> SliceStore:
    """The store of ``files`` (sorted paths), built when missing, stale or damaged.

    ``roots``: the sources the files were found under (a store of the same roots and
    settings but another key is stale and removed after the build); ``wavelet``:
    ``(name, level)`` to store the high band too, None for HU only; ``cache``: the cache
    folder (default :func:`pdml.data.cache_dir`); ``build``: False to only open (a
    torchrun rank other than 0, after rank 0 built it): FileNotFoundError when missing;
    ``progress``: called with the number of files decoded. A damaged store gives one
    :class:`StoreWarning` and is rebuilt.
    """
    settings = {"wavelet": list(wavelet) if wavelet else None}
    roots = sorted(str(Path(r).resolve()) for r in roots)
    base = Path(cache) if cache is not None else cache_dir()
    base = base / "slices"
    key = store_key(files, settings)
    folder = base / key
    if folder.exists():
        try:
            return _open(folder, key)
        except ValueError as e:
            if not build:
                raise FileNotFoundError(f"data cache {folder} is damaged ({e})") from None
            warnings.warn(f"data cache {folder} is damaged ({e}); rebuilding it", StoreWarning,
                          stacklevel=2)
            _remove(folder)
    elif not build:
        raise FileNotFoundError(f"data cache {folder} is missing")
    stale = []
    for other in base.glob("*/manifest.json") if base.exists() else []:
        try:
            m = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if m.get("roots") == roots and m.get("settings") == settings and m.get("key") != key:
            stale.append(other.parent)
    if stale:
        warnings.warn(f"data cache: the files under {', '.join(roots)} changed since "
                      f"{stale[0]} was built; rebuilding", StoreWarning, stacklevel=2)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".part", dir=base))
    try:
        _build(tmp, key, files, settings, roots, progress)
        try:
            os.rename(tmp, folder)
        except OSError:   # another process built it meanwhile: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in stale:
        _remove(old)
    return _open(folder, key)
