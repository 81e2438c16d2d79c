"""Checkpoint files: the format tag and version, atomic writes, save and load.

Checkpoints hold only tensors and primitive containers, so
``torch.load(path, weights_only=True)`` reads them. Writes are atomic (tmp file, fsync,
``os.replace``): a killed run leaves the old file or the new one, never a torn one.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from pdml.models.heads import linear_weight_from_conv
from pdml.training.config import TrainError

CHECKPOINT_FORMAT = "pdml-train-checkpoint"
CHECKPOINT_VERSION = 2
"""Version 2: the projection heads are row MLPs (linear weights ``[out, in]``). Version 1
(1×1-conv heads, weights ``[out, in, 1, 1]``) is migrated on load
(:func:`migrate_checkpoint`)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old or the new file,
    never a partial one: tmp file in the same folder, fsync, ``os.replace``, fsync folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a pdml-train checkpoint with ``weights_only=True``; TrainError if it is not one."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise TrainError(f"{path} is a folder without checkpoints/last.pt")
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, another format, pickled objects...
        raise TrainError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a pdml-train checkpoint (no format tag "
                         f"{CHECKPOINT_FORMAT!r}); it was written by another program or model")
    if ckpt.get("version") not in range(1, CHECKPOINT_VERSION + 1):
        raise TrainError(f"{path} has checkpoint version {ckpt.get('version')}, "
                         f"this pdml reads versions 1 to {CHECKPOINT_VERSION}")
    try:
        return migrate_checkpoint(ckpt)
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"{path}: cannot migrate checkpoint version {ckpt.get('version')} "
                         f"to {CHECKPOINT_VERSION}: {type(e).__name__}: {e}") from None


def migrate_checkpoint(ckpt: dict) -> dict:
    """Bring a checkpoint dict of an older version to :data:`CHECKPOINT_VERSION` (in place).

    1 -> 2: the head weights ``[out, in, 1, 1]`` become ``[out, in]``, and so do the
    generator optimizer's state tensors of those parameters (Adam's ``exp_avg`` and
    ``exp_avg_sq``). The heads' parameters are the last ones of the generator optimizer
    (the trainer builds it from the generator's parameters, then the heads', in the order
    of the heads' state_dict); KeyError/ValueError if the checkpoint does not fit that.
    """
    if ckpt["version"] == 1:
        heads = ckpt["model"]["heads"]
        opt = ckpt["optimizer"]["generator"]
        params = [i for group in opt["param_groups"] for i in group["params"]]
        if len(params) < len(heads):
            raise ValueError(f"the generator optimizer has {len(params)} parameters, fewer "
                             f"than the {len(heads)} head tensors")
        tail = params[len(params) - len(heads):]
        for index, key in zip(tail, list(heads)):
            old_shape = tuple(heads[key].shape)
            heads[key] = linear_weight_from_conv(heads[key])
            for name, value in opt["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor) and tuple(value.shape) == old_shape:
                    opt["state"][index][name] = linear_weight_from_conv(value)
        ckpt["version"] = 2
    return ckpt
