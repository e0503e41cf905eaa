"""Writing files whole or not at all, for every part of rigtrain: a reader (another process,
a resumed run, a user's script) never sees half a file, and a crash leaves the old file or
the new one. At the bottom of the house: imports nothing from rigtrain."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path


def write_json(path: Path, value, *, indent: int | None = 1, durable: bool = False) -> None:
    """`value` as JSON into `path`, through a temporary file beside it and a rename (atomic
    on POSIX within one filesystem). The temporary name carries the process id, so two
    processes writing the same file never mix their halves. `durable`: the file's bytes and
    then its name are on the disk when this returns, so a power cut cannot leave the name
    without the bytes (a rename may reach the disk before the data it points at)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write(json.dumps(value, indent=indent))
            if durable:
                f.flush()
                _flush(f.fileno())
        os.replace(tmp, path)
        if durable:
            sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sync_folder(folder: Path) -> None:
    """The folder's entries (names created, renamed or deleted in it) onto the disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _flush(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """Every file under `folder`, the folders' entries, and the folder's own entry in its
    parent onto the disk: what was written there survives a power cut. Linux flushes a
    file's dirty pages whoever wrote them, so one process can do it for files other
    processes wrote."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), reverse=True):  # a folder's files before the folder
        if path.is_dir():
            sync_folder(path)
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            _flush(fd)
        finally:
            os.close(fd)
    sync_folder(folder)
    sync_folder(folder.parent)


# What a filesystem that cannot flush says (a Windows drive under WSL2, some FUSE and network
# filesystems refuse fsync on a folder): there is nothing more to do there, and a save must
# not fail for it. A disk that is full or failing (ENOSPC, EIO) is an error like any other.
CANNOT_FLUSH = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM, errno.EACCES}


def _flush(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in CANNOT_FLUSH:
            raise
