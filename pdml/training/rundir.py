"""Output folders of the console scripts: can they be written, the lock one trainer holds
on its run folder, and the temporary files a killed trainer left there.

Lock: ``RUN_DIR/.pdml-train.lock``, an exclusive ``fcntl.flock`` that rank 0 holds while a
run lives (the other ranks of a torchrun job never write the run folder, so they take no
lock; if rank 0 is refused, it exits before joining the job and torchrun stops the rest).
The kernel drops a flock when its process dies, SIGKILL included, so the lock of a dead
trainer is simply taken over; a second live trainer gets a TrainError naming the holder.
The holder removes the file before it lets go, and a taker checks, once it holds the
lock, that the file it locked is still the one at the path (else it retries): a file
removed under a waiting taker cannot make two holders.
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from pdml._files import TEMP_NAME
from pdml.training.config import TrainError

LOCK_NAME = ".pdml-train.lock"


def check_writable_folder(path, flag: str) -> None:
    """TrainError naming ``flag`` unless ``path`` is a folder this process can write into,
    or does not exist yet and can be created. Creates nothing that stays.

    The test is an actual write (a probe file in the nearest existing folder, removed at
    once): ``os.access`` says yes to root whatever the mode bits and knows nothing of
    read-only mounts.
    """
    path = Path(path)
    existing = path
    while not existing.is_dir():
        if existing.exists() or existing.is_symlink():
            where = "" if existing == path else f" ({existing} is a file)"
            raise TrainError(f"{flag} {path} is not a folder{where}")
        if existing.parent == existing:
            break
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".pdml-write-probe-", dir=existing)
    except OSError as e:
        raise TrainError(f"{flag} {path}: cannot write into {existing} "
                         f"({e.strerror or type(e).__name__})") from None
    os.close(fd)
    os.unlink(probe)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "pid unknown"


class RunLock:
    """The exclusive lock on a run folder (:meth:`acquire`, :meth:`release`)."""

    def __init__(self, path: Path, fd: Optional[int], created_folder: bool):
        self.path, self._fd, self.created_folder = path, fd, created_folder

    @classmethod
    def acquire(cls, run_dir, flag: str = "--out") -> "RunLock":
        """Create ``run_dir`` if needed and lock it; TrainError if another live trainer
        holds it or the folder cannot be made."""
        run_dir = Path(run_dir)
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainError(f"{flag} {run_dir}: cannot create the run folder "
                             f"({e.strerror or type(e).__name__})") from None
        path = run_dir / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise TrainError(f"{flag} {run_dir}: cannot create its lock file "
                                 f"({e.strerror or type(e).__name__})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise TrainError(f"{run_dir} is in use by another pdml-train ({holder}); "
                                 "wait for it to end or stop it, or choose another --out"
                                 ) from None
            except OSError as e:  # a file system without locks: run, but say so
                warnings.warn(f"{run_dir}: cannot lock the run folder ({e.strerror}); "
                              "nothing stops a second trainer from using it")
                os.close(fd)
                return cls(path, None, created)
            try:
                st_path, st_fd = os.stat(path), os.fstat(fd)
                same = (st_path.st_dev, st_path.st_ino) == (st_fd.st_dev, st_fd.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its previous holder removed the file: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        return cls(path, fd, created)

    def release(self, remove_empty_folder: bool = False) -> None:
        """Remove the lock file, then let go of the lock. ``remove_empty_folder``: also
        remove the run folder when :meth:`acquire` created it and it is empty again (a
        run that failed while setting up leaves nothing behind)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
        if remove_empty_folder and self.created_folder:
            try:
                self.path.parent.rmdir()
            except OSError:
                pass  # not empty: it holds a run


def remove_stale_temp_files(run_dir) -> list[Path]:
    """Remove the temporary files of :func:`pdml._files.atomic_write_bytes` (``.NAME.tmp-PID``)
    in ``run_dir`` and its ``checkpoints/`` and ``figures/``; -> the removed paths. Call it
    holding the run's lock: only the holder writes there, so every such file is a killed
    writer's leftover."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints", Path(run_dir) / "figures"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if TEMP_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
