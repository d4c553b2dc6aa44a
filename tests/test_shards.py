"""The shards stage and verify, on DATA made by the real frames and flow stages from tiny videos."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from preprocess.atomic import TMP_PREFIX
from preprocess.dataset_index import DatasetIndex
from preprocess.flow import compute_flow
from preprocess.frames import extract_frames
from preprocess.layout import DataLayout, flow_names, frame_name
from preprocess.ledger import DONE, FAILED, Ledger, ParamsMismatch
from preprocess.runner import stage_status
from preprocess.shards import (ShardError, build_shards, parse_size, shard_paths, verify,
                               verify_shards)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32          # frames made at 32x32: cheap CPU TV-L1


def write_video(path: Path, n: int, dx: int, seed: int, size=(64, 48)) -> None:
    """A texture translating dx px/frame, MJPG in AVI."""
    w, h = size
    rng = np.random.default_rng(seed)
    tex = cv2.GaussianBlur(rng.integers(0, 256, (h, 4 * w, 3), dtype=np.uint8), (5, 5), 1.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    for k in range(n):
        wr.write(np.ascontiguousarray(np.roll(tex, k * dx, axis=1)[:, :w]))
    wr.release()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """DATA with frames and flow done: 6 videos, a one-frame video, and a zero-byte file."""
    root = tmp_path_factory.mktemp("shards")
    videos = root / "videos"
    for i, (cls, n) in enumerate([("Jump", 5), ("Jump", 7), ("Jump", 6), ("Run", 8), ("Run", 4),
                                  ("Walk", 6)]):
        write_video(videos / cls / f"v_{cls}_{i}.avi", n, 2 + i % 3, seed=i)
    write_video(videos / "Walk" / "v_single.avi", 1, 0, seed=9)
    (videos / "Walk" / "v_empty.avi").write_bytes(b"")
    data = root / "data"
    extract_frames(videos, data, size=SIZE, progress=False)
    compute_flow(data, backend="opencv", progress=False)
    return data


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def shard_bytes(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shard_paths(DataLayout(data))}


def test_round_trip_every_jpeg_as_stored(upstream, tmp_path):
    data = copy_data(upstream, tmp_path / "d")
    summary = build_shards(data, progress=False)
    index = DatasetIndex.load(DataLayout(data).index_path)
    assert summary.done_now == 7 and summary.total == 8
    assert set(summary.failed) == {"Walk/v_empty"}
    assert summary.failed["Walk/v_empty"].startswith("frames failed: ")
    layout = DataLayout(data)
    [path] = shard_paths(layout)
    with h5py.File(path, "r") as f:
        ids = [s.decode() for s in f["video_id"][()]]
        assert ids == sorted(v.video_id for v in index.videos if v.video_id != "Walk/v_empty")
        by_id = index.by_id()
        ro, fo = f["rgb_offsets"][()], f["flow_offsets"][()]
        for row, vid in enumerate(ids):
            n, p = int(f["n_frames"][row]), int(f["n_flows"][row])
            assert p == max(n - 1, 0)
            assert int(f["label"][row]) == by_id[vid].label
            assert tuple(f["splits"][row]) == tuple(by_id[vid].splits)
            assert f["class_name"][row].decode() == by_id[vid].class_name
            a, c = int(f["frame_start"][row]), 2 * int(f["flow_start"][row])
            h = hashlib.sha256()
            files = [layout.frames_video_dir(vid) / frame_name(k) for k in range(1, n + 1)]
            files += [layout.flow_video_dir(vid) / name
                      for k in range(1, p + 1) for name in flow_names(k)]
            stored = [f["rgb"][ro[a + i]:ro[a + i + 1]].tobytes() for i in range(n)]
            stored += [f["flow"][fo[c + j]:fo[c + j + 1]].tobytes() for j in range(2 * p)]
            assert len(files) == len(stored)
            for file, blob in zip(files, stored):
                raw = file.read_bytes()
                assert blob == raw, file          # the JPEG exactly as the stage wrote it
                h.update(len(raw).to_bytes(8, "little") + raw)
            assert f["sha256"][row].decode() == h.hexdigest()
    # Per-video ledger records, so `pipeline status` shows the stage per video.
    recs = Ledger(layout.ledger_path("shards")).load()
    assert recs["Walk/v_single"].status == DONE and recs["Walk/v_single"].info["flows"] == 0
    assert recs["Walk/v_empty"].status == FAILED
    st = stage_status(layout, "shards", [v.video_id for v in index.videos])
    assert st["done"] == 7 and set(st["failed"]) == {"Walk/v_empty"} and st["pending"] == 0
    assert verify_shards(data) == []


def test_bounded_deterministic_assignment_byte_identical(upstream, tmp_path):
    a = copy_data(upstream, tmp_path / "a")
    b = copy_data(upstream, tmp_path / "b")
    bound = 12_000
    build_shards(a, shard_bytes=bound, progress=False)
    build_shards(b, shard_bytes=bound, jobs=2, progress=False)
    assert shard_bytes(a) == shard_bytes(b)      # byte-identical, whatever the worker count
    layout = DataLayout(a)
    order = []
    for p in shard_paths(layout):
        with h5py.File(p, "r") as f:
            size = f["rgb"].shape[0] + f["flow"].shape[0]
            ids = [s.decode() for s in f["video_id"][()]]
            assert size <= bound or len(ids) == 1
            order += ids
    assert len(shard_paths(layout)) > 2 and order == sorted(order)


def test_kill_mid_shard_then_rerun_equals_uninterrupted(upstream, tmp_path):
    ref = copy_data(upstream, tmp_path / "ref")
    build_shards(ref, shard_bytes=1, progress=False)   # one video per shard
    work = copy_data(upstream, tmp_path / "work")
    layout = DataLayout(work)
    # The 4th video's 2nd frame becomes a FIFO: the stage blocks inside that video's shard
    # (its temporary file open), where it is killed -9.
    victim = layout.frames_video_dir("Run/v_Run_3") / frame_name(2)
    content = victim.read_bytes()
    victim.unlink()
    os.mkfifo(victim)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "shards", "--data", str(work),
                             "--shard-size", "1"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = [r for r in Ledger(layout.ledger_path("shards")).load().values()
                    if r.status == DONE]
            tmps = [p for p in layout.shards_dir.glob(TMP_PREFIX + "*")]
            if len(done) == 3 and tmps:
                break
            assert proc.poll() is None, "the stage ended before reaching the FIFO"
            time.sleep(0.02)
        else:
            pytest.fail("the stage never reached the 4th shard")
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in shard_paths(layout)) == [f"shard_0000{k}.h5" for k in range(3)]
    assert list(layout.shards_dir.glob(TMP_PREFIX + "*"))   # killed mid-write
    victim.unlink()
    victim.write_bytes(content)
    kept = {p.name: p.stat().st_mtime_ns for p in shard_paths(layout)}
    summary = build_shards(work, shard_bytes=1, progress=False)
    assert summary.already_done == 3 and summary.done_now == 4
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(layout)[:3]} == kept
    assert shard_bytes(work) == shard_bytes(ref)
    assert not list(layout.shards_dir.glob(TMP_PREFIX + "*"))
    assert (Ledger(layout.ledger_path("shards")).load()
            == Ledger(DataLayout(ref).ledger_path("shards")).load())


def test_lost_ledger_keeps_published_shards(upstream, tmp_path):
    """Killed between a shard's rename and its ledger write: the shard is complete, kept."""
    data = copy_data(upstream, tmp_path / "d")
    build_shards(data, shard_bytes=1, progress=False)
    layout = DataLayout(data)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shard_paths(layout)}
    records = Ledger(layout.ledger_path("shards")).load()
    layout.ledger_path("shards").unlink()
    summary = build_shards(data, shard_bytes=1, progress=False)
    assert summary.done_now == 0 and summary.already_done == 7
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shard_paths(layout)} == before
    assert Ledger(layout.ledger_path("shards")).load() == records


def test_changed_parameters_refused_then_forced(upstream, tmp_path):
    data = copy_data(upstream, tmp_path / "d")
    build_shards(data, progress=False)
    with pytest.raises(ParamsMismatch, match="shard_bytes"):
        build_shards(data, shard_bytes=1, progress=False)
    assert len(shard_paths(DataLayout(data))) == 1
    summary = build_shards(data, shard_bytes=1, force=True, progress=False)
    assert summary.done_now == 7 and len(shard_paths(DataLayout(data))) == 7
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "shards", "--data", str(data)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "shard_bytes" in r.stderr


def test_truncated_jpeg_on_disk_leaves_only_that_video_out(upstream, tmp_path):
    data = copy_data(upstream, tmp_path / "d")
    layout = DataLayout(data)
    bad = layout.flow_video_dir("Jump/v_Jump_1") / flow_names(3)[1]
    bad.write_bytes(bad.read_bytes()[:-40])
    summary = build_shards(data, progress=False)
    assert summary.done_now == 6
    assert str(bad) in summary.failed["Jump/v_Jump_1"]
    assert "not a complete JPEG" in summary.failed["Jump/v_Jump_1"]
    with h5py.File(shard_paths(layout)[0], "r") as f:
        assert "Jump/v_Jump_1" not in [s.decode() for s in f["video_id"][()]]
        assert "Jump/v_Jump_1" in json.loads(f.attrs["left_out"])
    assert verify_shards(data) == []


def _payload_position(path: Path, row: int) -> int:
    """File offset of the middle of the first RGB JPEG of the video at `row`."""
    with h5py.File(path, "r") as f:
        ro = f["rgb_offsets"][()]
        a = int(f["frame_start"][row])
        return f["rgb"].id.get_offset() + int(ro[a] + ro[a + 1]) // 2


def test_verify_names_damaged_shard_and_video_and_rebuild(upstream, tmp_path):
    ref = copy_data(upstream, tmp_path / "ref")
    build_shards(ref, shard_bytes=1, progress=False)
    data = copy_data(ref, tmp_path / "d")
    layout = DataLayout(data)
    paths = shard_paths(layout)
    flipped, truncated = paths[1], paths[4]
    with h5py.File(flipped, "r") as f:
        victim = f["video_id"][0].decode()
    pos = _payload_position(flipped, 0)
    blob = bytearray(flipped.read_bytes())
    blob[pos] ^= 0x55
    flipped.write_bytes(bytes(blob))
    os.truncate(truncated, truncated.stat().st_size - 100)

    report = verify(data)
    assert not report.ok and report.damaged == [flipped, truncated]
    text = report.report()
    assert f"{flipped.name}: video {victim}: checksum mismatch" in text
    assert f"{flipped.name}: video {victim}: frame 1: CRC-32 mismatch" in text
    assert f"{truncated.name}: cannot be opened" in text and "truncated" in text
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", "--data", str(data)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and victim in r.stdout and truncated.name in r.stdout

    # Readers never see garbage: the flipped JPEG is a ShardError, the truncated file too.
    from pipeline.datasets import ShardIndex, ShardVideo, read_frames
    with pytest.raises(ShardError, match=truncated.name):
        ShardIndex.load(data)
    with h5py.File(flipped, "r") as f:
        n, p = int(f["n_frames"][0]), int(f["n_flows"][0])
    video = ShardVideo(0, victim, "", 0, (0, 0, 0), n, p, str(flipped), 0, 0, 0)
    with pytest.raises(ShardError, match=f"{flipped.name}: video {victim}: rgb JPEG 1"):
        read_frames(video, "rgb", [0, 1])
    read_frames(video, "rgb", [1])   # the undamaged frames still read

    for p in report.damaged:
        p.unlink()
    summary = build_shards(data, shard_bytes=1, progress=False)
    assert summary.done_now == 2 and summary.already_done == 5
    assert verify_shards(data) == [] and shard_bytes(data) == shard_bytes(ref)


def test_parse_size():
    assert parse_size("1GiB") == 1 << 30 and parse_size("200MB") == 200_000_000
    assert parse_size("65536") == 65536 and parse_size("1.5k") == 1500
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")


def test_verify_checks_counts_against_tables_and_frames_ledger(upstream, tmp_path):
    data = copy_data(upstream, tmp_path / "d")
    build_shards(data, shard_bytes=1, progress=False)
    paths = shard_paths(DataLayout(data))
    with h5py.File(paths[2], "r+") as f:      # a table that disagrees with the payload
        f["n_frames"][0] = f["n_frames"][0] + 1
        vid = f["video_id"][0].decode()
    problems = verify_shards(data)
    assert f"{paths[2].name}: frame counts do not match the offset tables" in problems
    assert any(p.startswith(f"{paths[2].name}: video {vid} holds") for p in problems)
