"""HDF5 shards: whole videos' RGB and flow JPEGs packed for fast training reads (stage `shards`).

Why: a clip is 16 RGB frames and 16 flow pairs, 48 small files on disk; read from a shard it is
two contiguous byte ranges of one open file. The JPEG bytes are stored exactly as the frames and
flow stages wrote them (never re-encoded), so a shard decodes to the same pixels as the folders.
The clip sampling that reads them follows Hara et al. (2018) and IMRS (seed 000, section 4.2.2);
see pipeline/datasets.py.

Shard format (version 1)
------------------------

``DATA/shards/shard_00000.h5``, ``shard_00001.h5``, ... Each shard holds whole videos; the
datasets of a shard are flat, in its root group, contiguous and uncompressed (so a read is one
``pread``), written with ``libver=("v110", "v110")`` and no timestamps.

Root attributes:

| attribute | type | meaning |
|---|---|---|
| ``format`` | str | ``"twostream-shards"`` |
| ``format_version`` | int | ``1`` |
| ``shard`` | int | the shard's number (its file name's) |
| ``plan_digest`` | str | sha256 of what the shard was planned to hold (see Resuming) |
| ``left_out`` | str | JSON ``{video_id: reason}`` of planned videos that failed while packing |

Per-video table, one row per video, ordered by video id (``V`` rows):

| dataset | dtype, shape | meaning |
|---|---|---|
| ``video_id`` | UTF-8 str, (V,) | ``"<class>/<video stem>"`` |
| ``class_name`` | UTF-8 str, (V,) | the class folder |
| ``label`` | int32, (V,) | 0-based label (position in the dataset index's classes) |
| ``splits`` | int8, (V, 3) | per official split 1..3: 0 unused, 1 train, 2 test |
| ``n_frames`` | int32, (V,) | N, RGB frames of the video |
| ``n_flows`` | int32, (V,) | N - 1, flow pairs (pair k goes from frame k to frame k+1) |
| ``frame_start`` | int64, (V,) | first row of the video in ``rgb_offsets`` |
| ``flow_start`` | int64, (V,) | first pair of the video; its x image is row 2*flow_start |
| ``sha256`` | ascii S64, (V,) | checksum of the video, hex (below) |

Payload, for F frames and P flow pairs in the shard:

| dataset | dtype, shape | meaning |
|---|---|---|
| ``rgb`` | uint8, (sum of RGB JPEG sizes,) | the ``img_00001.jpg`` ... files, concatenated |
| ``rgb_offsets`` | int64, (F+1,) | RGB JPEG i is ``rgb[rgb_offsets[i]:rgb_offsets[i+1]]`` |
| ``rgb_crc32`` | uint32, (F,) | zlib CRC-32 of each RGB JPEG |
| ``flow`` | uint8, (sum of flow JPEG sizes,) | flow_x_00001, flow_y_00001, flow_x_00002, ... |
| ``flow_offsets`` | int64, (2P+1,) | flow JPEG j is ``flow[flow_offsets[j]:flow_offsets[j+1]]`` |
| ``flow_crc32`` | uint32, (2P,) | zlib CRC-32 of each flow JPEG |

Flow images are interleaved x, y per pair, so a clip's flows are one contiguous range. A video's
checksum is the sha256 over, in order, each RGB JPEG then each flow JPEG (x1, y1, x2, ...), each
preceded by its length as 8-byte little-endian. Readers check the CRC-32 of every JPEG they read
(a flipped byte is an error naming shard, video and frame, never garbage pixels); HDF5 refuses a
truncated file at open; `pipeline verify` checks everything and decodes every JPEG.

Assignment and resuming
-----------------------

Videos done in both the frames and the flow ledgers are taken in video-id order and packed
greedily: a shard is closed before the video that would take it past ``shard_bytes`` (a video
larger than that gets a shard of its own). The assignment is therefore a function of the index,
the upstream ledgers and the JPEG sizes. Videos failed or pending upstream are left out, and the
shards ledger records them as failed with the upstream reason (per video, for `pipeline status`).

Each shard's ``plan_digest`` hashes the format version, the frames and flow stages' recorded
parameters, and its videos' ids, labels, splits and JPEG sizes. A shard is written under a
temporary name (``.tmp-shard_...``) and renamed when complete; a rerun keeps every shard whose
digest matches its plan and rebuilds the others, and removes shards beyond the plan. Killed at
any moment, a rerun therefore gives files byte-identical to an uninterrupted run (HDF5 writes
no timestamps with ``track_times=False`` and a pinned ``libver``; the tests compare bytes after
a SIGKILL mid-shard, and between 1 and 2 workers).

Bad input and damage. A video whose JPEG cannot be read, is truncated (no JPEG end marker) or
changed since planning is left out of its shard (``left_out``) and recorded as failed naming
the file; the shard's other videos are packed. `pipeline verify` names each damaged shard and
video; deleting those shard files and rerunning `pipeline shards` rebuilds exactly them. A
full disk stops the stage with "No space left on device" and no partial shard: each shard's
space is reserved (posix_fallocate) before HDF5 writes into it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .atomic import _fsync_dir, clean_stale_temps, remove_published, tmp_sibling
from .dataset_index import DatasetIndex
from .layout import SHARD_PATTERN, DataLayout, flow_names, frame_name
from .ledger import DONE, FAILED, Ledger, Record, StageLock, check_params, read_params
from .runner import (FATAL, STORAGE_ERRNOS, StageSummary, StorageFull, ensure_writable,
                     run_parallel)

STAGE = "shards"
FORMAT = "twostream-shards"
FORMAT_VERSION = 1
LIBVER = ("v110", "v110")
DEFAULT_SHARD_BYTES = 1 << 30
WRITE_BATCH_BYTES = 64 << 20
SHARD_NAME_RE = re.compile(r"^shard_(\d{5,})\.h5$")
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


class ShardError(RuntimeError):
    """A shard that cannot be read as written: truncated, corrupted, or of another format."""


@dataclass(frozen=True)
class ShardConfig:
    """The stage's parameters (recorded in DATA/meta/shards.params.json)."""
    shard_bytes: int = DEFAULT_SHARD_BYTES

    def params(self) -> dict:
        return {"format_version": FORMAT_VERSION, "shard_bytes": self.shard_bytes}


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '200MB', '65536' -> bytes (binary and decimal suffixes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 1GiB, 200MB, 65536)")
    base = 1024 if m.group(3) or not m.group(2) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    n = int(float(m.group(1)) * base ** power)
    if n < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return n


def shard_name(k: int) -> str:
    return SHARD_PATTERN.format(k)


def shard_paths(layout: DataLayout) -> list[Path]:
    """The published shards (temporary files excluded), in order."""
    d = layout.shards_dir
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if SHARD_NAME_RE.match(p.name))


# --- planning -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class VideoPlan:
    """One video to pack: where its JPEGs are and how large they were when planned.

    Sizes are compact arrays and paths are derived on use: a UCF101 plan has millions of JPEGs.
    """
    video_id: str
    class_name: str
    label: int
    splits: tuple[int, int, int]
    frames_dir: str
    flow_dir: str
    rgb_sizes: np.ndarray               # int64 (N,)
    flow_sizes: np.ndarray              # int64 (2(N-1),): x1, y1, x2, y2, ...

    @property
    def n_frames(self) -> int:
        return len(self.rgb_sizes)

    @property
    def n_flows(self) -> int:
        return len(self.flow_sizes) // 2

    @property
    def nbytes(self) -> int:
        return int(self.rgb_sizes.sum() + self.flow_sizes.sum())

    def rgb_paths(self) -> list[str]:
        return [os.path.join(self.frames_dir, frame_name(k)) for k in range(1, self.n_frames + 1)]

    def flow_paths(self) -> list[str]:
        return [os.path.join(self.flow_dir, name)
                for k in range(1, self.n_flows + 1) for name in flow_names(k)]

    def identity(self) -> list:
        sizes = np.concatenate([self.rgb_sizes, self.flow_sizes]).astype("<i8").tobytes()
        return [self.video_id, self.class_name, self.label, list(self.splits),
                hashlib.sha256(sizes + struct.pack("<q", self.n_frames)).hexdigest()]


@dataclass(frozen=True)
class ShardPlan:
    index: int
    videos: tuple[VideoPlan, ...]
    digest: str

    @property
    def name(self) -> str:
        return shard_name(self.index)


def _upstream_reason(frames: Record | None, flow: Record | None) -> str | None:
    if frames is None:
        return "frames not extracted yet"
    if frames.status != DONE:
        return f"frames failed: {frames.reason}"
    if flow is None:
        return "flow not computed yet"
    if flow.status != DONE:
        return f"flow failed: {flow.reason}"
    return None


def _frame_count(layout: DataLayout, video_id: str, frames: Record) -> int:
    n = frames.info.get("frames") if frames.info else None
    if isinstance(n, int) and n >= 1:
        return n
    folder = layout.frames_video_dir(video_id)  # older ledgers: count the published folder
    return sum(1 for p in folder.iterdir() if p.name.startswith("img_") and p.suffix == ".jpg")


def _plan_video(layout: DataLayout, entry, frames: Record, flow: Record) -> VideoPlan:
    n = _frame_count(layout, entry.video_id, frames)
    if n < 1:
        raise ValueError(f"{layout.frames_video_dir(entry.video_id)} holds no frames")
    flows = flow.info.get("flows") if flow.info else None
    if flows is not None and flows != n - 1:
        raise ValueError(f"the flow ledger has {flows} pairs for {n} frames (expected {n - 1}): "
                         f"the frames were redone after the flow; rerun `pipeline flow --force`")
    fdir, odir = layout.frames_video_dir(entry.video_id), layout.flow_video_dir(entry.video_id)
    plan = VideoPlan(entry.video_id, entry.class_name, entry.label, tuple(entry.splits),
                     str(fdir), str(odir), np.empty(n, np.int64), np.empty(2 * (n - 1), np.int64))
    for paths, sizes in ((plan.rgb_paths(), plan.rgb_sizes), (plan.flow_paths(), plan.flow_sizes)):
        for i, p in enumerate(paths):
            try:
                sizes[i] = os.stat(p).st_size
            except FileNotFoundError:
                raise FileNotFoundError(f"{p} is missing (the ledgers say the video is "
                                        f"done)") from None
    return plan


def plan_shards(layout: DataLayout, index: DatasetIndex, shard_bytes: int
                ) -> tuple[list[ShardPlan], dict[str, str]]:
    """Deterministic assignment of eligible videos to shards, and the reasons of the others."""
    frames = Ledger(layout.ledger_path("frames")).load()
    flow = Ledger(layout.ledger_path("flow")).load()
    upstream = hashlib.sha256(json.dumps(
        {"frames": read_params(layout.params_path("frames")),
         "flow": read_params(layout.params_path("flow"))}, sort_keys=True).encode()).hexdigest()
    failed: dict[str, str] = {m.video_id: m.reason for m in index.missing}
    groups: list[list[VideoPlan]] = []
    size = 0
    for entry in sorted(index.videos, key=lambda v: v.video_id):
        reason = _upstream_reason(frames.get(entry.video_id), flow.get(entry.video_id))
        if reason is not None:
            failed[entry.video_id] = reason
            continue
        try:
            v = _plan_video(layout, entry, frames[entry.video_id], flow[entry.video_id])
        except (OSError, ValueError) as e:
            failed[entry.video_id] = f"{type(e).__name__}: {e}"
            continue
        if not groups or (groups[-1] and size + v.nbytes > shard_bytes):
            groups.append([])
            size = 0
        groups[-1].append(v)
        size += v.nbytes
    plans = []
    for k, videos in enumerate(groups):
        ident = {"format_version": FORMAT_VERSION, "upstream": upstream, "shard": k,
                 "videos": [v.identity() for v in videos]}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        plans.append(ShardPlan(k, tuple(videos), digest))
    return plans, failed


# --- writing --------------------------------------------------------------------------------

class _VideoFailed(Exception):
    def __init__(self, video_id: str, reason: str):
        super().__init__(reason)
        self.video_id, self.reason = video_id, reason


def _read_jpeg(path: str, size: int, video_id: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _VideoFailed(video_id, f"cannot read {path}: {e.strerror}") from None
    if len(data) != size:
        raise _VideoFailed(video_id, f"{path} changed size while packing "
                                     f"({size} planned, {len(data)} read)")
    if not (data.startswith(_SOI) and data.rstrip(b"\0").endswith(_EOI)):
        raise _VideoFailed(video_id, f"{path} is not a complete JPEG (no start/end marker)")
    return data


class _Payload:
    """Append JPEGs of one modality into a preallocated uint8 dataset, in large writes."""

    def __init__(self, f: h5py.File, name: str, total: int, count: int):
        self.ds = f.create_dataset(name, shape=(total,), dtype=np.uint8, track_times=False)
        self.offsets = np.zeros(count + 1, np.int64)
        self.crc = np.zeros(count, np.uint32)
        self.i = 0
        self.pos = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def add(self, data: bytes) -> None:
        self.crc[self.i] = zlib.crc32(data)
        self.offsets[self.i + 1] = self.offsets[self.i] + len(data)
        self.i += 1
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= WRITE_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            buf = np.frombuffer(b"".join(self.pending), np.uint8)
            self.ds[self.pos:self.pos + len(buf)] = buf
            self.pos += len(buf)
            self.pending, self.pending_bytes = [], 0


def _checksum_update(h, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


class _ReservedFile:
    """A file whose disk space is reserved up front, handed to HDF5 as an empty file object.

    Why: HDF5 meeting ENOSPC mid-write (h5py 3.16 / HDF5 2.0) fails the file's close and then
    crashes the process when the half-closed objects are freed. Reserving the shard's size with
    posix_fallocate first turns a full disk into a plain OSError before HDF5 writes a byte.
    `reserve` must bound the file's final size; the unused tail is cut off at `finish`.
    """

    def __init__(self, path: Path, reserve: int):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(self.fd, 0, reserve)
        except BaseException:
            os.close(self.fd)
            raise
        self.reserve, self.pos, self.size = reserve, 0, 0

    # the file-object methods h5py's "fileobj" driver uses
    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (self.pos if whence == 1 else self.size if whence == 2 else 0)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else max(0, min(n, self.size - self.pos))
        data = os.pread(self.fd, n, self.pos) if n else b""
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        data = os.pread(self.fd, n, self.pos) if n else b""
        memoryview(buf)[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.pos + len(view) > self.reserve:
            raise OSError(errno.ENOSPC, "shard larger than its reserved space")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.pos + done)
        self.pos += done
        self.size = max(self.size, self.pos)
        return done

    def truncate(self, size: int | None = None) -> int:
        self.size = self.pos if size is None else size
        return self.size

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        """Cut the reserved tail, make the file durable, close it."""
        try:
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def abandon(self) -> None:
        os.close(self.fd)


def _reserve_bytes(videos: Sequence[VideoPlan]) -> int:
    """An upper bound on a shard file's size: payload, tables, HDF5 metadata (generously)."""
    payload = sum(int(v.rgb_sizes.sum() + v.flow_sizes.sum()) for v in videos)
    jpegs = sum(v.n_frames + 2 * v.n_flows for v in videos)
    names = sum(len(v.video_id.encode()) + len(v.class_name.encode()) for v in videos)
    return payload + 16 * jpegs + 256 * len(videos) + 2 * names + (1 << 20)


def _write_shard(path: Path, plan: ShardPlan, left_out: dict[str, str]) -> list[VideoPlan]:
    videos = [v for v in plan.videos if v.video_id not in left_out]
    target = _ReservedFile(path, _reserve_bytes(videos))
    try:
        _write_hdf5(target, plan, videos, left_out)
    except BaseException:
        target.abandon()
        raise
    target.finish()
    return videos


def _write_hdf5(target, plan: ShardPlan, videos: list[VideoPlan], left_out: dict[str, str]
                ) -> None:
    n_f = sum(v.n_frames for v in videos)
    n_p = sum(v.n_flows for v in videos)
    str_dt = h5py.string_dtype("utf-8")
    with h5py.File(target, "w", libver=LIBVER, track_order=False) as f:
        rgb = _Payload(f, "rgb", int(sum(v.rgb_sizes.sum() for v in videos)), n_f)
        flow = _Payload(f, "flow", int(sum(v.flow_sizes.sum() for v in videos)), 2 * n_p)
        digests = []
        for v in videos:
            h = hashlib.sha256()
            for p, s in zip(v.rgb_paths(), v.rgb_sizes):
                data = _read_jpeg(p, int(s), v.video_id)
                _checksum_update(h, data)
                rgb.add(data)
            for p, s in zip(v.flow_paths(), v.flow_sizes):
                data = _read_jpeg(p, int(s), v.video_id)
                _checksum_update(h, data)
                flow.add(data)
            digests.append(h.hexdigest().encode("ascii"))
        rgb.flush()
        flow.flush()

        def table(name, data, dtype):
            f.create_dataset(name, data=np.asarray(data, dtype=dtype), dtype=dtype,
                             track_times=False)

        n_frames = [v.n_frames for v in videos]
        n_flows = [v.n_flows for v in videos]
        table("video_id", [v.video_id for v in videos], str_dt)
        table("class_name", [v.class_name for v in videos], str_dt)
        table("label", [v.label for v in videos], np.int32)
        table("splits", np.array([v.splits for v in videos], np.int8).reshape(-1, 3), np.int8)
        table("n_frames", n_frames, np.int32)
        table("n_flows", n_flows, np.int32)
        table("frame_start", np.concatenate([[0], np.cumsum(n_frames)[:-1]]).astype(np.int64)
              if videos else [], np.int64)
        table("flow_start", np.concatenate([[0], np.cumsum(n_flows)[:-1]]).astype(np.int64)
              if videos else [], np.int64)
        table("sha256", digests, "S64")
        table("rgb_offsets", rgb.offsets, np.int64)
        table("rgb_crc32", rgb.crc, np.uint32)
        table("flow_offsets", flow.offsets, np.int64)
        table("flow_crc32", flow.crc, np.uint32)
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["shard"] = plan.index
        f.attrs["plan_digest"] = plan.digest
        f.attrs["left_out"] = json.dumps(left_out, sort_keys=True)


def build_one_shard(plan: ShardPlan, final: str) -> list[Record]:
    """Write one planned shard atomically; return a ledger record per planned video.

    A video that fails while packing (unreadable, truncated JPEG, changed since planning) is
    left out and the shard is written again without it; the others are packed regardless.
    """
    final = Path(final)
    left_out: dict[str, str] = {}
    while True:
        tmp = tmp_sibling(final)
        try:
            packed = _write_shard(tmp, plan, left_out)
        except _VideoFailed as e:
            tmp.unlink(missing_ok=True)
            left_out[e.video_id] = e.reason
            continue
        except Exception as e:  # the shard's fault, not a video's: all its videos fail
            tmp.unlink(missing_ok=True)
            if _storage_error(e):
                what = os.strerror(e.errno) if getattr(e, "errno", None) else str(e)
                return [Record(final.name, FATAL, f"{what} while writing {final}")]
            reason = f"writing {final.name} failed: {type(e).__name__}: {e}"
            return [Record(v.video_id, FAILED, reason) for v in plan.videos]
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return _records(final.name, packed, left_out)


def _storage_error(e: Exception) -> bool:
    """A full or read-only disk (HDF5 reports errno only inside its message)."""
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
        return True
    return any(os.strerror(n) in str(e) for n in STORAGE_ERRNOS)


def _records(name: str, packed: Sequence, left_out: dict[str, str]) -> list[Record]:
    recs = [Record(v.video_id, DONE, "", {"shard": name, "row": i, "frames": v.n_frames,
                                          "flows": v.n_flows})
            for i, v in enumerate(packed)]
    recs += [Record(vid, FAILED, reason) for vid, reason in sorted(left_out.items())]
    return recs


@dataclass(frozen=True)
class _Packed:
    video_id: str
    n_frames: int
    n_flows: int


def _published_records(path: Path, plan: ShardPlan) -> list[Record] | None:
    """Records of an existing shard if it is complete and matches its plan, else None."""
    try:
        with h5py.File(path, "r") as f:
            if (f.attrs.get("format") != FORMAT or f.attrs.get("format_version") != FORMAT_VERSION
                    or f.attrs.get("plan_digest") != plan.digest):
                return None
            ids = [s.decode() if isinstance(s, bytes) else s for s in f["video_id"][()]]
            packed = [_Packed(i, int(a), int(b))
                      for i, a, b in zip(ids, f["n_frames"][()], f["n_flows"][()])]
            left_out = json.loads(f.attrs["left_out"])
    except (OSError, KeyError, ValueError):
        return None
    return _records(path.name, packed, left_out)


# --- the stage ------------------------------------------------------------------------------

def build_shards(data: Path, *, shard_bytes: int = DEFAULT_SHARD_BYTES, jobs: int = 1,
                 force: bool = False, progress: bool = True,
                 scheduler: str | None = None) -> StageSummary:
    """Pack every video done upstream into shards under DATA/shards; return the summary.

    One shard per worker (joblib, or tasks on a dask.distributed `scheduler`); the parent alone
    writes the ledger, per video, as each shard is published. See the module docstring.
    """
    from tqdm import tqdm

    layout = DataLayout(data)
    if not layout.index_path.exists():
        raise FileNotFoundError(f"{layout.index_path} does not exist: run `pipeline frames` "
                                f"(then `pipeline flow`) on {layout.root} first")
    config = ShardConfig(shard_bytes=shard_bytes)
    ensure_writable(layout.root)
    ensure_writable(layout.meta_dir)
    with StageLock(layout.lock_path(STAGE), STAGE):
        ledger = Ledger(layout.ledger_path(STAGE))
        if check_params(layout.params_path(STAGE), STAGE, config.params(), force=force):
            remove_published(layout.shards_dir)
            ledger.reset()
        ensure_writable(layout.shards_dir)
        clean_stale_temps(layout.shards_dir)
        index = DatasetIndex.load(layout.index_path)
        plans, upstream_failed = plan_shards(layout, index, shard_bytes)

        planned = {p.name for p in plans}
        for p in shard_paths(layout):
            if p.name not in planned:
                remove_published(p)  # the plan shrank: this shard's videos are gone upstream

        records = ledger.load()
        summary = StageSummary(STAGE, total=len(index.videos) + len(index.missing))
        new = [Record(v, FAILED, r) for v, r in sorted(upstream_failed.items())]
        todo: list[ShardPlan] = []
        for plan in plans:
            done = _published_records(layout.shards_dir / plan.name, plan)
            if done is None:
                todo.append(plan)
                continue
            new += done
            summary.already_done += sum(r.status == DONE for r in done)
        ledger.append([r for r in new if records.get(r.item) != r])
        summary.failed.update({r.item: r.reason for r in new if r.status == FAILED})

        bar = tqdm(total=sum(len(p.videos) for p in todo), desc=STAGE, unit="video",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        try:
            if todo:
                results = run_parallel(build_one_shard,
                                       [(p, str(layout.shards_dir / p.name)) for p in todo],
                                       jobs=jobs, scheduler=scheduler)
                for recs in results:
                    if recs and recs[0].status == FATAL:  # its videos stay pending
                        raise StorageFull(f"{STAGE}: {recs[0].reason}; {summary.done_now} "
                                          f"videos packed before it. Free space and rerun.")
                    ledger.append(recs)
                    for r in recs:
                        if r.status == DONE:
                            summary.done_now += 1
                        else:
                            summary.failed[r.item] = r.reason
                    bar.update(len(recs))
        finally:
            bar.close()
        return summary


# --- reading and verifying ------------------------------------------------------------------

TABLE_FIELDS = ("video_id", "class_name", "label", "splits", "n_frames", "n_flows",
                "frame_start", "flow_start", "sha256")


def open_shard(path: Path, **kwargs) -> h5py.File:
    """Open a shard read-only, with an error naming it when it is truncated or not a shard."""
    try:
        f = h5py.File(path, "r", **kwargs)
    except OSError as e:
        raise ShardError(f"{Path(path).name}: cannot be opened as HDF5 ({e}); the file is "
                         f"truncated or corrupted") from None
    if f.attrs.get("format") != FORMAT or f.attrs.get("format_version") != FORMAT_VERSION:
        found = (f.attrs.get("format"), f.attrs.get("format_version"))
        f.close()
        raise ShardError(f"{Path(path).name}: not a {FORMAT} v{FORMAT_VERSION} shard "
                         f"(found {found})")
    return f


def read_table(f: h5py.File) -> dict[str, np.ndarray]:
    """The per-video table of an open shard (strings decoded), plus offsets and CRCs."""
    try:
        out = {k: f[k][()] for k in TABLE_FIELDS + ("rgb_offsets", "rgb_crc32",
                                                       "flow_offsets", "flow_crc32")}
    except (KeyError, OSError) as e:
        raise ShardError(f"{f.filename}: its tables cannot be read ({e})") from None
    for k in ("video_id", "class_name"):
        out[k] = np.array([s.decode() if isinstance(s, bytes) else s for s in out[k]],
                          dtype=object)
    return out


def check_crc(data: np.ndarray, expected: int, where: str) -> None:
    if zlib.crc32(data) != int(expected):
        raise ShardError(f"{where}: CRC-32 mismatch, the shard is corrupted (`pipeline "
                         f"verify` lists the damage and how to rebuild)")


def _verify_one(path: str) -> tuple[list[str], int]:
    """Problems found in one shard (each naming the shard and video) and its video count."""
    import cv2
    cv2.setNumThreads(1)
    name = Path(path).name
    try:
        f = open_shard(Path(path))
    except ShardError as e:
        return [str(e)], 0
    problems: list[str] = []
    with f:
        try:
            t = read_table(f)
            rgb, flow = f["rgb"], f["flow"]
        except (ShardError, KeyError) as e:
            return [f"{name}: {e}"], 0
        ro, fo = t["rgb_offsets"], t["flow_offsets"]
        for off, ds, label in ((ro, rgb, "rgb"), (fo, flow, "flow")):
            if off[0] != 0 or np.any(np.diff(off) <= 0) or off[-1] != ds.shape[0]:
                problems.append(f"{name}: {label}_offsets do not tile the {label} payload")
        if problems:
            return problems, len(t["video_id"])
        n_f = np.cumsum(np.concatenate([[0], t["n_frames"]]))
        n_p = np.cumsum(np.concatenate([[0], t["n_flows"]]))
        if (list(n_f[:-1]) != list(t["frame_start"]) or list(n_p[:-1]) != list(t["flow_start"])
                or n_f[-1] != len(ro) - 1 or 2 * n_p[-1] != len(fo) - 1):
            return [f"{name}: frame counts do not match the offset tables"], len(t["video_id"])
        for row, vid in enumerate(t["video_id"]):
            where = f"{name}: video {vid}"
            nf, np_ = int(t["n_frames"][row]), int(t["n_flows"][row])
            if np_ != nf - 1:
                problems.append(f"{where}: {np_} flow pairs for {nf} frames (expected {nf - 1})")
            a, b = int(t["frame_start"][row]), int(t["frame_start"][row]) + nf
            c, d = 2 * int(t["flow_start"][row]), 2 * (int(t["flow_start"][row]) + np_)
            try:
                rgb_bytes = rgb[ro[a]:ro[b]]
                flow_bytes = flow[fo[c]:fo[d]]
            except OSError as e:
                problems.append(f"{where}: cannot be read ({e})")
                continue
            h = hashlib.sha256()
            bad: list[str] = []
            shape = None
            for kind, buf, offs, crcs, lo, hi, flag in (
                    ("frame", rgb_bytes, ro, t["rgb_crc32"], a, b, cv2.IMREAD_COLOR),
                    ("flow image", flow_bytes, fo, t["flow_crc32"], c, d, cv2.IMREAD_GRAYSCALE)):
                base = offs[lo]
                for i in range(lo, hi):
                    jpeg = buf[offs[i] - base:offs[i + 1] - base]
                    _checksum_update(h, jpeg.tobytes())
                    k = i - lo
                    label = (f"frame {k + 1}" if kind == "frame"
                             else f"flow_{'xy'[k % 2]} {k // 2 + 1}")
                    if zlib.crc32(jpeg) != int(crcs[i]):
                        bad.append(f"{label}: CRC-32 mismatch")
                        continue
                    img = cv2.imdecode(jpeg, flag)
                    if img is None:
                        bad.append(f"{label}: does not decode as JPEG")
                    elif kind == "frame":
                        shape = shape or img.shape
                        if img.shape != shape:
                            bad.append(f"{label}: size {img.shape} differs from {shape}")
            if h.hexdigest().encode() != t["sha256"][row]:
                problems.append(f"{where}: checksum mismatch (stored "
                                f"{t['sha256'][row].decode()[:16]}..., computed "
                                f"{h.hexdigest()[:16]}...)")
            if bad:
                more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
                problems.append(f"{where}: " + "; ".join(bad[:3]) + more)
        return problems, len(t["video_id"])


@dataclass
class VerifyReport:
    shards: int = 0
    videos: int = 0
    problems: list[str] = field(default_factory=list)
    damaged: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        head = (f"verify: {self.shards} shards, {self.videos} videos, "
                f"{len(self.problems)} problems")
        lines = [head] + [f"  DAMAGED {p}" for p in self.problems]
        if self.damaged:
            names = " ".join(str(p) for p in self.damaged)
            lines.append(f"(to rebuild only the damaged shards: rm {names}; then rerun "
                         f"`pipeline shards` with the same DATA)")
        return "\n".join(lines)


def verify(data: Path, *, jobs: int = 1) -> VerifyReport:
    """Open every shard, check offsets, counts, checksums and that every JPEG decodes.

    Also checks the shards ledger against the shards: a video recorded as packed must be in
    the shard the ledger names, and no video may be in two shards.
    """
    from joblib import Parallel, delayed

    layout = DataLayout(data)
    paths = shard_paths(layout)
    rep = VerifyReport(shards=len(paths))
    if not paths:
        rep.problems.append(f"{layout.shards_dir}: no shards (run `pipeline shards`)")
        return rep
    results = Parallel(n_jobs=max(1, min(jobs, len(paths))))(
        delayed(_verify_one)(str(p)) for p in paths)
    unreadable = set()
    for path, (problems, n) in zip(paths, results):
        rep.problems += problems
        rep.videos += n
        if problems:
            rep.damaged.append(path)
        if n == 0 and problems:
            unreadable.add(path.name)
    rep.problems += _check_ledger(layout, [p for p in paths if p.name not in unreadable],
                                  unreadable)
    return rep


def _check_ledger(layout: DataLayout, paths: Iterable[Path], unreadable: set[str]) -> list[str]:
    """Shards against the ledgers: each video in one shard, where the shards ledger says, with
    the frame count the frames ledger recorded."""
    where: dict[str, str] = {}
    frames_in_shard: dict[str, int] = {}
    problems = []
    for p in paths:
        try:
            with open_shard(p) as f:
                ids = [s.decode() if isinstance(s, bytes) else s for s in f["video_id"][()]]
                counts = [int(n) for n in f["n_frames"][()]]
        except (ShardError, KeyError, OSError):
            continue  # already reported by _verify_one
        for vid, n in zip(ids, counts):
            if vid in where:
                problems.append(f"{p.name}: video {vid} is also in {where[vid]}")
            where[vid] = p.name
            frames_in_shard[vid] = n
    for vid, rec in Ledger(layout.ledger_path(STAGE)).load().items():
        if (rec.status == DONE and rec.info.get("shard") not in unreadable
                and where.get(vid) != rec.info.get("shard")):
            problems.append(f"{rec.info.get('shard')}: video {vid} recorded as packed there "
                            f"but found in {where.get(vid, 'no shard')}")
    for vid, rec in Ledger(layout.ledger_path("frames")).load().items():
        n = rec.info.get("frames") if rec.status == DONE and rec.info else None
        if vid in frames_in_shard and n is not None and n != frames_in_shard[vid]:
            problems.append(f"{where[vid]}: video {vid} holds {frames_in_shard[vid]} frames, "
                            f"the frames ledger says {n} (rerun `pipeline shards`)")
    return problems


def verify_shards(data: Path, *, jobs: int = 1) -> list[str]:
    """The problems `verify` finds, one line each naming the shard and the video (empty: OK)."""
    return verify(data, jobs=jobs).problems
