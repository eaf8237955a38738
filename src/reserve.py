"""Disk space a run sets aside at its start, so that a full disk cannot take its last records with it.

Each run allocates :data:`RESERVE_BYTES` in its output directory, and another beside its SQLite store when that
is on another filesystem (:func:`reserve_space`). A disk with no room for them is too full to train on: the run
ends FAILED before training, with the free space in the error (:class:`DiskFullError`). When a disk fills during
the run (:func:`is_disk_full` on its error), the reserve is freed first, so the cause can be written: beside the
output as :data:`RECORD_NAME` (:func:`write_record`), and then to the store.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

# Enough for SQLite to write a status and error tags (its journal and a few pages) and for the record, with
# room to spare for MLflow's own writes on the way out.
RESERVE_BYTES = 4 * 1024 * 1024
RESERVE_NAME = ".lora_sweeps_reserve"
RECORD_NAME = "run_failed.json"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded")


class DiskFullError(OSError):
    """No room on a disk the run writes to for its reserve: the disk is nearly full."""


def is_disk_full(error: BaseException) -> bool:
    """Whether an error, or one it was raised from or during, is a full disk (``ENOSPC``, SQLite's "database or
    disk is full", a quota)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error).lower() for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def sqlite_dir(uri: str) -> Optional[Path]:
    """The directory of a SQLite store (its database and, by default, ``mlruns/``); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).expanduser().resolve().parent


def reserve_paths(output_dir: Optional[str], uri: str, run_id: str) -> list[Path]:
    """Where a run's reserve files go: its output directory, and its SQLite store's directory if that is on
    another filesystem (named after the run there, as every run of the store shares the directory)."""
    paths, devices = [], set()
    for directory, name in ((output_dir, RESERVE_NAME), (sqlite_dir(uri), f"{RESERVE_NAME}-{run_id}")):
        try:
            device = os.stat(directory).st_dev if directory else None
        except OSError:
            continue  # not made yet: the run fails on its own when it writes there
        if device is not None and device not in devices:
            devices.add(device)
            paths.append(Path(directory) / name)
    return paths


def _allocate(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
            return
        except AttributeError:  # no posix_fallocate on this platform
            pass
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        chunk = b"\0" * (1024 * 1024)  # real blocks: a sparse file would set nothing aside
        for offset in range(0, size, len(chunk)):
            f.write(chunk[: size - offset])
        f.flush()
        os.fsync(f.fileno())


def reserve_space(paths: Sequence[Path], size: int = RESERVE_BYTES) -> list[Path]:
    """Allocate the reserve files; raises :class:`DiskFullError` (none left behind) when a disk has no room.

    Any other failure (a filesystem that refuses the file) leaves that place without a reserve."""
    made: list[Path] = []
    for path in paths:
        try:
            _allocate(path, size)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if is_disk_full(exc):
                release(made)
                free = shutil.disk_usage(path.parent).free
                raise DiskFullError(
                    errno.ENOSPC,
                    f"No space left on device: {path.parent} has {free / 2**20:.1f} MiB free, less than the "
                    f"{size / 2**20:.0f} MiB a run sets aside there to record how it ends; free some space",
                ) from exc
            continue
        made.append(path)
    return made


def release(paths: Sequence[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def write_record(output_dir: Optional[str], record: dict[str, Any]) -> Optional[Path]:
    """The record of how a run ended, beside its output; None if it could not be written."""
    if not output_dir:
        return None
    path = Path(output_dir) / RECORD_NAME
    try:
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path
    except OSError:
        path.unlink(missing_ok=True)  # not an empty or half-written record
        return None
