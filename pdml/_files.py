"""Atomic file writes: a reader, or a crash, sees the old file or the new one, never a
partial one. The one writer of every file pdml puts out whole (checkpoints, run records,
figures, ``pdml-eval``'s report, derived DICOM slices).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

TEMP_NAME = re.compile(r"\..+\.tmp-[0-9]+")
"""The temporary names of :func:`atomic_write_bytes`: ``.NAME.tmp-PID`` (a killed writer's
leftovers are removed by :func:`pdml.training.rundir.remove_stale_temp_files`)."""


def atomic_write_bytes(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old or the new file,
    never a partial one: tmp file in the same folder, fsync, ``os.replace``, fsync folder.
    ``replace=False``: a hard link instead of the replace, so an existing ``path`` is never
    clobbered (``FileExistsError``). A failed write removes its tmp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)   # atomic, and FileExistsError where path exists
            os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
