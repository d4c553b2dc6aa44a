"""Helpers of the fault-injection and cluster tests: tiny real videos, damaged copies, a driver
that SIGKILLs a pipeline process at a chosen moment, and whole-tree comparison.

The contract under test is DESIGN.md "Stages": a final name means complete, the parent alone
writes the ledger, a rerun redoes exactly what is unfinished, and its result equals an
uninterrupted run's. Everything here works on real files: videos written by OpenCV, stages run
as `python -m pipeline.cli` processes (so a kill is a real SIGKILL of a real process group).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

from preprocess.atomic import TMP_PREFIX
from preprocess.layout import DataLayout

REPO = Path(__file__).resolve().parents[1]
SOURCE_SIZE = (48, 32)  # (width, height) of the generated videos: decoding costs nothing


# --- tiny real videos -------------------------------------------------------------------------

def moving_texture(n: int, *, size: tuple[int, int] = SOURCE_SIZE, dx: int = 1, dy: int = 0,
                   seed: int = 0) -> list[np.ndarray]:
    """n BGR frames of a smooth random texture translating (dx, dy) px per frame."""
    w, h = size
    rng = np.random.default_rng(seed)
    pad = 4 + n * max(abs(dx), abs(dy), 1)
    tex = rng.integers(0, 256, (h + 2 * pad, w + 2 * pad, 3)).astype(np.uint8)
    tex = cv2.GaussianBlur(tex, (0, 0), 1.5)
    return [tex[pad - t * dy:pad - t * dy + h, pad - t * dx:pad - t * dx + w].copy()
            for t in range(n)]


def write_avi(path: Path, frames: Sequence[np.ndarray], fps: float = 25) -> Path:
    """An MJPG AVI (the codec every OpenCV build can write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened(), f"OpenCV cannot write MJPG to {path}"
    for f in frames:
        vw.write(f)
    vw.release()
    return path


def tiny_dataset(root: Path, *, classes: Sequence[str] = ("Left", "Up"), per_class: int = 3,
                 frames: int | Sequence[int] = 6) -> list[str]:
    """Write `classes` x `per_class` tiny videos in the folders layout; return their ids.

    `frames` may vary per video (cycled), so that videos differ in length and outputs in size.
    """
    counts = [frames] if isinstance(frames, int) else list(frames)
    ids = []
    for c, cls in enumerate(classes):
        dx, dy = ((1, 0), (0, -1), (-1, 1))[c % 3]
        for k in range(per_class):
            n = counts[(c * per_class + k) % len(counts)]
            stem = f"v_{cls}_g{k:02d}"
            write_avi(Path(root) / cls / f"{stem}.avi",
                      moving_texture(n, dx=dx, dy=dy, seed=100 * c + k))
            ids.append(f"{cls}/{stem}")
    return sorted(ids)


# --- damage -----------------------------------------------------------------------------------

def truncated_copy(src: Path, dst: Path, fraction: float) -> Path:
    """The first `fraction` of a file's bytes, as a download cut short leaves it."""
    data = Path(src).read_bytes()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(data[:int(len(data) * fraction)])
    return Path(dst)


def avi_claiming_frames(src: Path, dst: Path, claimed: int) -> Path:
    """A copy of an AVI whose headers (avih dwTotalFrames, strh dwLength) claim `claimed` frames."""
    data = bytearray(Path(src).read_bytes())
    assert data[:4] == b"RIFF" and data[8:12] == b"AVI " and data[24:28] == b"avih", src
    struct.pack_into("<I", data, 48, claimed)              # MainAVIHeader.dwTotalFrames
    strh = data.find(b"strh")
    assert strh > 0, f"{src} has no stream header"
    struct.pack_into("<I", data, strh + 8 + 32, claimed)   # AVIStreamHeader.dwLength
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


# --- running stages as processes --------------------------------------------------------------

def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def _env(extra: dict[str, str] | None) -> dict[str, str] | None:
    return None if not extra else {**os.environ, **extra}


def run_pipeline(*args: str, timeout: float = 120, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """Run `pipeline ARGS` to its end (`env`: extra variables); output captured as text."""
    return subprocess.run(pipeline_cmd(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=_env(env))


@dataclass
class Killed:
    moment: str          # which condition fired (or "exited" if the process ended first)
    returncode: int
    seconds: float
    output: str


def run_and_kill(args: Sequence[str], when: Callable[[], bool], *, moment: str = "",
                 timeout: float = 60, poll: float = 0.002,
                 env: dict[str, str] | None = None) -> Killed:
    """Start `pipeline ARGS` in its own process group; SIGKILL the whole group once `when()`.

    The group is killed, workers included, as a node crash or `scancel` does. If the process
    ends before the condition fires, that is reported (moment "exited") so a test can tell a
    kill from a run that was too quick to interrupt.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(pipeline_cmd(*args), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=_env(env))
    fired = "exited"
    try:
        while proc.poll() is None:
            if when():
                os.killpg(proc.pid, signal.SIGKILL)
                fired = moment or "condition"
                break
            if time.monotonic() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(f"pipeline {' '.join(map(str, args))} ran past {timeout}s")
            time.sleep(poll)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_group_gone(proc.pid)
    return Killed(fired, proc.returncode, time.monotonic() - t0, out)


def wait_group_gone(pgid: int, timeout: float = 10) -> None:
    """Wait until no process of group `pgid` is left (killed workers are reaped by init)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise TimeoutError(f"processes of group {pgid} still alive {timeout}s after SIGKILL")


# --- moments to kill at -----------------------------------------------------------------------

def ledger_records(data: Path, stage: str) -> int:
    """Complete lines in a stage's ledger (a torn last line is not counted)."""
    path = DataLayout(data).ledger_path(stage)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.split(b"\n")[:-1] if b'"item"' in line)


def any_tmp(root: Path) -> bool:
    return bool(tmp_entries(root))


def after_records(data: Path, stage: str, n: int) -> Callable[[], bool]:
    return lambda: ledger_records(data, stage) >= n


def after_path(path: Path) -> Callable[[], bool]:
    return lambda: Path(path).exists()


# --- trees and ledgers ------------------------------------------------------------------------

def tmp_entries(root: Path) -> list[str]:
    """Every file or folder under `root` named as an unpublished temporary (atomic.TMP_PREFIX)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(TMP_PREFIX))


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of the bytes ("<dir>" for folders), for every entry under root."""
    root = Path(root)
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tree_diff(a: Path, b: Path) -> list[str]:
    """Human-readable differences between two trees (empty: byte-identical)."""
    da, db = tree_digest(a), tree_digest(b)
    diff = [f"only in {a}: {k}" for k in sorted(set(da) - set(db))]
    diff += [f"only in {b}: {k}" for k in sorted(set(db) - set(da))]
    diff += [f"differs: {k}" for k in sorted(set(da) & set(db)) if da[k] != db[k]]
    return diff


def load_ledger(data: Path, stage: str) -> dict[str, dict]:
    """The stage's ledger as item -> last record (dict), the way ledger.Ledger reads it."""
    from preprocess.ledger import Ledger
    return {k: {"status": r.status, "reason": r.reason, "info": r.info}
            for k, r in Ledger(DataLayout(data).ledger_path(stage)).load().items()}


def ledger_summary(data: Path, stage: str, keys: Iterable[str] = ()) -> dict[str, tuple]:
    """item -> (status, the named info fields): what must agree between two runs' ledgers.

    Informational fields (timings, "adopted") may differ between a resumed and an uninterrupted
    run; the fields named in `keys` (frame and flow counts, shard and row) may not.
    """
    keys = tuple(keys)
    return {k: (r["status"],) + tuple(r["info"].get(f) for f in keys)
            for k, r in load_ledger(data, stage).items()}


def index_ids(data: Path) -> list[str]:
    idx = json.loads(DataLayout(data).index_path.read_text())
    return sorted(v["video_id"] for v in idx["videos"]) + sorted(
        m["video_id"] for m in idx["missing"])


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return Path(dst)
