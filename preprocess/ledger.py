"""Per-stage bookkeeping: the ledger of every item, the recorded parameters, the stage lock.

The ledger is append-only JSON lines, written by the parent process alone and fsynced per
batch; the last record of an item wins, and a torn last line (a kill mid-write) is ignored.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from .atomic import write_json_atomic, write_text_atomic

DONE = "done"
FAILED = "failed"


@dataclass(frozen=True)
class Record:
    item: str
    status: str  # DONE or FAILED
    reason: str = ""
    info: dict = field(default_factory=dict)


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, Record]:
        records: dict[str, Record] = {}
        if not self.path.exists():
            return records
        with open(self.path, "r", encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn write from a killed run
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if d.get("reset"):
                    records.clear()
                    continue
                records[d["item"]] = Record(d["item"], d["status"], d.get("reason", ""),
                                            d.get("info", {}))
        return records

    def append(self, records: Iterable[Record]) -> None:
        lines = "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in records)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def reset(self) -> None:
        """Forget every record (used with --force), atomically."""
        write_text_atomic(self.path, json.dumps({"reset": True}) + "\n")

    def _drop_torn_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)


class ParamsMismatch(RuntimeError):
    """Rerunning a stage with other parameters into the same DATA."""


def check_params(path: Path, stage: str, params: dict, *, force: bool) -> bool:
    """Record `params` for a stage, or refuse if different ones shaped the existing outputs.

    Returns True when the existing outputs must be discarded (parameters changed under force).
    """
    path = Path(path)
    canonical = json.loads(json.dumps(params, sort_keys=True))
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded == canonical:
            return False
        if not force:
            diffs = sorted(k for k in set(recorded) | set(canonical)
                           if recorded.get(k) != canonical.get(k))
            detail = "; ".join(f"{k}: recorded {recorded.get(k)!r}, now {canonical.get(k)!r}"
                               for k in diffs)
            raise ParamsMismatch(
                f"{stage}: the outputs in {path.parent.parent} were made with other parameters "
                f"({detail}). Use another DATA folder, or --force to redo the stage with the new "
                f"parameters (its existing outputs are deleted).")
        write_json_atomic(path, canonical)
        return True
    write_json_atomic(path, canonical)
    return False


def read_params(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


class StageLocked(RuntimeError):
    """Another process runs the same stage on the same DATA."""


class StageLock:
    """An exclusive, non-blocking flock on DATA/meta/<stage>.lock; released at process death."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage, self.fd = Path(path), stage, None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StageLocked(
                    f"another `pipeline {self.stage}` is running on {self.path.parent.parent} "
                    f"(lock {self.path}); wait for it to finish") from None
            raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
