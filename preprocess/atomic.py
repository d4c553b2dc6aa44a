"""Atomic publication: write under a temporary name in the same folder, then `os.replace`.

A final name therefore always means complete; anything named with TMP_PREFIX is debris from an
interrupted run and is removed by the next run of that stage (which holds the stage lock).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


def tmp_sibling(final: Path) -> Path:
    """A unique temporary name next to `final` (same filesystem, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def open_atomic(final: Path, *, fsync: bool = True) -> Iterator:
    """A binary file object whose content appears at `final` only when the block completes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    try:
        with open(tmp, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(final.parent)


def write_bytes_atomic(final: Path, data: bytes, *, fsync: bool = True) -> None:
    with open_atomic(final, fsync=fsync) as f:
        f.write(data)


def write_text_atomic(final: Path, text: str) -> None:
    write_bytes_atomic(final, text.encode("utf-8"))


def write_json_atomic(final: Path, obj) -> None:
    write_text_atomic(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def publishing_dir(final: Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `final` in one rename.

    On any exception the temporary folder is removed and `final` is untouched. An existing
    `final` is never overwritten: the caller decides to skip or to remove it first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            for child in tmp.iterdir():
                fd = os.open(child, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(tmp)
        if final.exists():
            raise FileExistsError(f"{final} already exists; refusing to overwrite a published output")
        os.rename(tmp, final)
        if fsync:
            _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_published(final: Path) -> None:
    """Remove a published file or folder so that no half-removed state keeps its final name."""
    final = Path(final)
    if not final.exists():
        return
    trash = tmp_sibling(final)
    os.rename(final, trash)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def clean_stale_temps(root: Path, *, max_depth: int | None = None) -> int:
    """Remove every TMP_PREFIX entry under `root` (call only while holding the stage lock).

    `max_depth` bounds the search to entries that many levels below `root`: the per-video
    outputs sit at <class>/<video> (depth 2), and listing every frame file of UCF101 (2.5 M)
    on each run would cost minutes for nothing.
    """
    root = Path(root)
    if not root.exists():
        return 0
    removed = 0
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        if max_depth is not None and len(Path(dirpath).parts) - base_depth + 1 >= max_depth:
            # entries below this folder are deeper than max_depth: look at, but not into, them
            descend = []
        else:
            descend = None
        for name in list(dirnames):
            if name.startswith(TMP_PREFIX):
                # Renamed away first: a writer that still holds this folder (a cluster task
                # whose driver was killed) can then no longer publish it half deleted.
                trash = tmp_sibling(Path(dirpath) / name)
                try:
                    os.rename(Path(dirpath) / name, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                except FileNotFoundError:
                    pass  # its writer published it meanwhile, complete
                dirnames.remove(name)
                removed += 1
        for name in filenames:
            if name.startswith(TMP_PREFIX):
                (Path(dirpath) / name).unlink(missing_ok=True)
                removed += 1
        if descend is not None:
            dirnames[:] = descend
    return removed
