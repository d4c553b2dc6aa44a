"""The flow stage on real files: videos written by OpenCV, the real frames stage, then flow.

Frames are made at --size 64 from 64x64 sources (the squash keeps the motion in pixels), so CPU
TV-L1 stays cheap; a few 256x256 pairs check the real size.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from preprocess.flow import compute_flow
from preprocess.flow_backends import (BackendUnavailable, opencv_cuda_available,
                                      pair_flow, resolve_backend)
from shared_data import SHARED_DATA
from preprocess.tvl1_params import TVL1Params
from preprocess.flow_pipeline import DevicePipeline, PipelineConfig, WorkerPool
from preprocess.flow_quant import dequantize
from preprocess.frames import extract_frames
from preprocess.layout import DataLayout, flow_names, frame_name
from preprocess.ledger import DONE, Ledger, ParamsMismatch
from preprocess.runner import stage_status

REPO = Path(__file__).resolve().parents[1]
MIDDLEBURY = SHARED_DATA / "flow/middlebury"


def translating(n: int, size: int, dx: int, dy: int, seed: int = 0) -> list[np.ndarray]:
    """n BGR frames of a smooth random texture whose content moves (dx, dy) px per frame."""
    rng = np.random.default_rng(seed)
    pad = 4 + n * max(abs(dx), abs(dy))
    tex = rng.integers(0, 256, (size + 2 * pad, size + 2 * pad, 3)).astype(np.uint8)
    tex = cv2.GaussianBlur(tex, (0, 0), 1.5)
    return [tex[pad - t * dy:pad - t * dy + size, pad - t * dx:pad - t * dx + size].copy()
            for t in range(n)]


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(f)
    vw.release()


def make_data(tmp: Path, videos: dict[str, list[np.ndarray]], size: int = 64,
              extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the videos ("Class/stem" -> frames) and run the real frames stage into DATA."""
    src = tmp / "videos"
    for vid, frames in videos.items():
        write_video(src / f"{vid}.avi", frames)
    for rel, data in (extra_files or {}).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    data = tmp / "data"
    extract_frames(src, data, dataset="folders", size=size, progress=False)
    return data


def read_flows(data: Path, vid: str) -> list[np.ndarray]:
    """Every stored flow of a video, decoded to pixels: (H, W, 2) each."""
    d = DataLayout(data).flow_video_dir(vid)
    out, k = [], 1
    while (d / flow_names(k)[0]).exists():
        fx, fy = (cv2.imread(str(d / n), cv2.IMREAD_GRAYSCALE) for n in flow_names(k))
        out.append(np.stack([dequantize(fx), dequantize(fy)], axis=-1))
        k += 1
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def no_temps(root: Path) -> bool:
    return not any(p.name.startswith(".tmp-") for p in root.rglob("*"))


def interior_median(flow: np.ndarray, margin: int = 8) -> np.ndarray:
    return np.median(flow[margin:-margin, margin:-margin].reshape(-1, 2), axis=0)


# --- the reference backend ----------------------------------------------------------------------

def test_config_is_opencvs_default():
    alg = cv2.optflow.DualTVL1OpticalFlow_create()
    c = TVL1Params()
    assert (alg.getTau(), alg.getLambda(), alg.getTheta(), alg.getScalesNumber(),
            alg.getWarpingsNumber(), alg.getEpsilon(), alg.getInnerIterations(),
            alg.getOuterIterations(), alg.getScaleStep(), alg.getGamma(),
            alg.getMedianFiltering()) == pytest.approx(
        (c.tau, c.lambda_, c.theta, c.nscales, c.warps, c.epsilon, c.inner_iterations,
         c.outer_iterations, c.scale_step, c.gamma, c.median_filtering))


def test_cached_opencv_instance_keeps_no_state_between_videos():
    # OpenCV's calc() lowers the scale count for a tiny image and keeps it lowered.
    gray = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in translating(2, 64, 2, 1, seed=9)]
    tiny = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in translating(2, 16, 1, 0, seed=9)]
    fresh = cv2.optflow.DualTVL1OpticalFlow_create().calc(gray[0], gray[1], None)
    pair_flow("opencv", tiny[0], tiny[1])
    assert np.array_equal(pair_flow("opencv", gray[0], gray[1]), fresh)


def read_flo(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    assert np.frombuffer(raw[:4], np.float32)[0] == np.float32(202021.25)
    w, h = np.frombuffer(raw[4:12], np.int32)
    return np.frombuffer(raw[12:], np.float32).reshape(h, w, 2)


@pytest.mark.parametrize("seq, reference", [("RubberWhale", 0.156), ("Dimetrodon", 0.180)])
def test_cpu_backend_matches_opencvs_endpoint_error_on_middlebury(seq, reference):
    gray = [cv2.cvtColor(cv2.imread(str(MIDDLEBURY / seq / f"frame1{i}.png")),
                         cv2.COLOR_BGR2GRAY) for i in (0, 1)]
    gt = read_flo(MIDDLEBURY / seq / "flow10.flo")
    valid = (np.abs(gt) < 1e9).all(axis=-1)
    flow = pair_flow(resolve_backend("opencv"), gray[0], gray[1])
    epe = np.sqrt(((flow - gt) ** 2).sum(-1))[valid].mean()
    assert abs(epe - reference) < 0.0015, epe
    zero_baseline = np.sqrt((gt ** 2).sum(-1))[valid].mean()
    assert epe < zero_baseline / 5


# --- the stage, opencv backend -------------------------------------------------------------------

def test_translation_gives_the_known_flow_and_n_minus_1_pairs(tmp_path):
    data = make_data(tmp_path, {"Right/v_a": translating(7, 64, 2, -1, seed=1),
                                "Left/v_b": translating(5, 64, -3, 2, seed=2)})
    summary = compute_flow(data, backend="opencv", jobs=2, progress=False)
    assert summary.ok and summary.done_now == 2
    for vid, n, motion in (("Right/v_a", 7, (2, -1)), ("Left/v_b", 5, (-3, 2))):
        flows = read_flows(data, vid)
        assert len(flows) == n - 1
        names = sorted(p.name for p in DataLayout(data).flow_video_dir(vid).iterdir())
        assert names == sorted(sum((list(flow_names(k)) for k in range(1, n)), []))
        for f in flows:
            assert f.shape == (64, 64, 2)
            np.testing.assert_allclose(interior_median(f), motion, atol=0.2)
    ledger = Ledger(DataLayout(data).ledger_path("flow")).load()
    assert ledger["Right/v_a"].info == {"frames": 7, "flows": 6}
    params = (data / "meta" / "flow.params.json").read_text()
    assert '"backend": "opencv"' in params and '"jpeg_quality": 95' in params


def test_real_size_pairs(tmp_path):
    data = make_data(tmp_path, {"C/v_256": translating(3, 256, 4, 3, seed=3)}, size=256)
    assert compute_flow(data, backend="opencv", progress=False).ok
    flows = read_flows(data, "C/v_256")
    assert len(flows) == 2
    for f in flows:
        assert f.shape == (256, 256, 2)
        inner = f[24:-24, 24:-24].reshape(-1, 2)
        np.testing.assert_allclose(np.median(inner, axis=0), (4, 3), atol=0.1)
        assert (np.abs(inner - (4, 3)).max(axis=1) < 0.5).mean() > 0.95


def test_one_frame_video_has_no_flow_and_is_not_an_error(tmp_path):
    data = make_data(tmp_path, {"C/v_one": translating(1, 64, 1, 0),
                                "C/v_two": translating(2, 64, 1, 0)})
    summary = compute_flow(data, backend="opencv", progress=False)
    assert summary.ok and summary.done_now == 2
    layout = DataLayout(data)
    assert layout.flow_video_dir("C/v_one").is_dir()
    assert list(layout.flow_video_dir("C/v_one").iterdir()) == []
    rec = Ledger(layout.ledger_path("flow")).load()["C/v_one"]
    assert rec.status == DONE and rec.info == {"frames": 1, "flows": 0}
    assert len(read_flows(data, "C/v_two")) == 1


def test_videos_whose_frames_failed_or_are_pending(tmp_path):
    data = make_data(tmp_path, {"C/v_ok": translating(3, 64, 1, 0),
                                "C/v_later": translating(3, 64, 0, 1)},
                     extra_files={"C/v_empty.avi": b""})
    layout = DataLayout(data)
    # A frames run killed before v_later: its frames ledger has no record of it.
    frames_ledger = Ledger(layout.ledger_path("frames"))
    kept = [r for r in frames_ledger.load().values() if r.item != "C/v_later"]
    frames_ledger.reset()
    frames_ledger.append(kept)
    shutil.rmtree(layout.frames_video_dir("C/v_later"))

    summary = compute_flow(data, backend="opencv", progress=False)
    assert summary.done_now == 1 and not summary.ok
    assert summary.failed["C/v_later"] == "frames not extracted yet"
    assert summary.failed["C/v_empty"].startswith("frames failed: ")
    assert "v_empty.avi" in summary.failed["C/v_empty"]
    status = stage_status(layout, "flow", ["C/v_ok", "C/v_later", "C/v_empty"])
    assert status["done"] == 1 and set(status["failed"]) == {"C/v_later", "C/v_empty"}

    extract_frames(tmp_path / "videos", data, dataset="folders", size=64, progress=False)
    summary = compute_flow(data, backend="opencv", progress=False)
    assert summary.done_now == 1 and summary.already_done == 1
    assert set(summary.failed) == {"C/v_empty"}
    assert len(read_flows(data, "C/v_later")) == 2


def test_video_listed_by_the_splits_but_missing_on_disk_is_failed(tmp_path):
    src, data = tmp_path / "videos", tmp_path / "data"
    write_video(src / "Left" / "v_Left_g01_c01.avi", translating(3, 32, -1, 0))
    (src / "splits").mkdir()
    (src / "splits" / "classInd.txt").write_text("1 Left\r\n")
    for k in (1, 2, 3):
        (src / "splits" / f"trainlist0{k}.txt").write_text(
            "Left/v_Left_g01_c01.avi 1\r\nLeft/v_Left_g02_c01.avi 1\r\n")
        (src / "splits" / f"testlist0{k}.txt").write_text("")
    extract_frames(src, data, dataset="ucf101", size=32, progress=False)
    summary = compute_flow(data, backend="opencv", progress=False)
    assert summary.done_now == 1 and list(summary.failed) == ["Left/v_Left_g02_c01"]
    reason = summary.failed["Left/v_Left_g02_c01"]
    assert reason.startswith("frames failed: ") and "v_Left_g02_c01.avi" in reason
    rec = Ledger(DataLayout(data).ledger_path("flow")).load()["Left/v_Left_g02_c01"]
    assert rec.status == "failed" and rec.reason == reason


def test_bad_frame_fails_that_video_only_naming_the_file(tmp_path):
    data = make_data(tmp_path, {"C/v_good": translating(4, 64, 1, 1),
                                "C/v_bad": translating(4, 64, 1, 1)})
    layout = DataLayout(data)
    bad = layout.frames_video_dir("C/v_bad") / frame_name(3)
    bad.write_bytes(b"this is not a JPEG")
    summary = compute_flow(data, backend="opencv", jobs=2, progress=False)
    assert summary.done_now == 1 and set(summary.failed) == {"C/v_bad"}
    assert str(bad) in summary.failed["C/v_bad"] and "not a decodable JPEG" in \
        summary.failed["C/v_bad"]
    assert not layout.flow_video_dir("C/v_bad").exists() and no_temps(layout.flow_dir)
    good = tree_bytes(layout.flow_dir)

    result = CliRunner().invoke(cli, ["flow", "--data", str(data), "--backend", "opencv"])
    assert result.exit_code == 1 and "FAILED C/v_bad" in result.output
    assert tree_bytes(layout.flow_dir) == good  # nothing produced is rewritten


def test_another_backend_is_refused_unless_forced(tmp_path):
    data = make_data(tmp_path, {"C/v": translating(2, 32, 1, 0)}, size=32)
    assert compute_flow(data, backend="opencv", progress=False).ok
    with pytest.raises(ParamsMismatch, match="backend: recorded 'opencv', now 'torch'"):
        compute_flow(data, backend="torch", progress=False)
    result = CliRunner().invoke(cli, ["flow", "--data", str(data), "--backend", "torch"])
    assert result.exit_code != 0 and "backend: recorded 'opencv'" in result.output
    with pytest.raises(ParamsMismatch, match="jpeg_quality"):
        compute_flow(data, backend="opencv", jpeg_quality=80, progress=False)
    summary = compute_flow(data, backend="torch", force=True, progress=False)
    assert summary.ok and summary.done_now == 1
    assert '"backend": "torch"' in (data / "meta" / "flow.params.json").read_text()
    np.testing.assert_allclose(interior_median(read_flows(data, "C/v")[0], 6), (1, 0),
                               atol=0.2)


def test_backend_choice_and_unavailable_backends(tmp_path):
    expected = "torch" if torch.cuda.is_available() else \
        "opencv-cuda" if opencv_cuda_available() else "opencv"
    assert resolve_backend("auto") == expected
    with pytest.raises(ValueError, match="unknown flow backend 'tvl1'"):
        resolve_backend("tvl1")
    with pytest.raises(FileNotFoundError, match="run `pipeline frames`"):
        compute_flow(tmp_path / "empty", backend="opencv", progress=False)
    if not opencv_cuda_available():
        data = make_data(tmp_path, {"C/v": translating(2, 32, 1, 0)}, size=32)
        with pytest.raises(BackendUnavailable, match="needs an OpenCV built with CUDA"):
            compute_flow(data, backend="opencv-cuda", progress=False)
        assert not (data / "meta" / "flow.params.json").exists()  # refused before any work


def test_kill_then_rerun_equals_an_uninterrupted_run(tmp_path):
    videos = {f"C{i % 2}/v_{i}": translating(10, 64, 1 + i % 3, i % 2, seed=i)
              for i in range(5)}
    data = make_data(tmp_path, videos)
    clean = tmp_path / "clean"
    shutil.copytree(data, clean)
    assert compute_flow(clean, backend="opencv", progress=False).ok

    ledger = DataLayout(data).ledger_path("flow")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "flow", "--data", str(data),
                             "--backend", "opencv", "--jobs", "2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = sum(r.status == DONE for r in Ledger(ledger).load().values())
            if done >= 1:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = sum(r.status == DONE for r in Ledger(ledger).load().values())
    assert 1 <= killed_at < len(videos), killed_at

    summary = compute_flow(data, backend="opencv", jobs=2, progress=False)
    assert summary.ok and summary.already_done + summary.done_now == len(videos)
    assert summary.already_done >= killed_at
    layout, clean_layout = DataLayout(data), DataLayout(clean)
    assert no_temps(layout.flow_dir)
    assert tree_bytes(layout.flow_dir) == tree_bytes(clean_layout.flow_dir)


def test_folder_published_before_its_ledger_record_counts_as_done(tmp_path):
    data = make_data(tmp_path, {"C/v": translating(3, 32, 1, 0)}, size=32)
    layout = DataLayout(data)
    assert compute_flow(data, backend="opencv", progress=False).ok
    before = tree_bytes(layout.flow_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in layout.flow_dir.rglob("*.jpg")}
    Ledger(layout.ledger_path("flow")).reset()  # the kill came between rename and ledger write
    summary = compute_flow(data, backend="opencv", progress=False)
    assert summary.done_now == 1 and summary.ok
    assert Ledger(layout.ledger_path("flow")).load()["C/v"].info == {"frames": 3, "flows": 2}
    assert tree_bytes(layout.flow_dir) == before
    assert {p: p.stat().st_mtime_ns for p in layout.flow_dir.rglob("*.jpg")} == mtimes


# --- the torch backend's pipeline, on the CPU ----------------------------------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Frames of three 32x32 videos (2, 4 and 1 frames) for the torch pipeline tests."""
    tmp = tmp_path_factory.mktemp("torchflow")
    return make_data(tmp, {"A/v_1": translating(4, 32, 1, 0, seed=5),
                           "A/v_2": translating(2, 32, 0, -1, seed=6),
                           "B/v_3": translating(1, 32, 1, 1, seed=7)}, size=32)


def test_torch_backend_through_the_stage(small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    summary = compute_flow(data, backend="torch", progress=False)
    assert summary.ok and summary.done_now == 3
    assert len(read_flows(data, "A/v_1")) == 3 and len(read_flows(data, "A/v_2")) == 1
    assert list(DataLayout(data).flow_video_dir("B/v_3").iterdir()) == []
    for f in read_flows(data, "A/v_1"):
        np.testing.assert_allclose(interior_median(f, 6), (1, 0), atol=0.2)
    np.testing.assert_allclose(interior_median(read_flows(data, "A/v_2")[0], 6), (0, -1),
                               atol=0.2)
    info = Ledger(DataLayout(data).ledger_path("flow")).load()
    assert info["A/v_1"].info == {"frames": 4, "flows": 3}
    assert info["B/v_3"].info == {"frames": 1, "flows": 0}

    # The same videos through OpenCV agree to a quantization step almost everywhere.
    ref = tmp_path / "ref"
    shutil.copytree(small_data, ref)
    assert compute_flow(ref, backend="opencv", progress=False).ok
    for vid in ("A/v_1", "A/v_2"):
        for a, b in zip(read_flows(data, vid), read_flows(ref, vid)):
            assert (np.abs(a - b) <= 40 / 255 + 1e-4).mean() > 0.95


def run_pipeline(pipe, counts: dict[str, int]) -> dict:
    futures = {vid: pipe.submit(vid, n) for vid, n in counts.items()}
    try:
        return {vid: f.result(timeout=120) for vid, f in futures.items()}
    finally:
        pipe.close()


def test_pipeline_streams_long_videos_in_chunks_and_matches_one_batch(small_data, tmp_path):
    counts = {"A/v_1": 4, "A/v_2": 2, "B/v_3": 1}
    whole, tiny = tmp_path / "whole", tmp_path / "tiny"
    for d in (whole, tiny):
        shutil.copytree(small_data, d)
    run_pipeline(DevicePipeline("cpu", whole, PipelineConfig()), counts)
    # chunks of one pair, batches of two, at most two chunks in memory
    cfg = PipelineConfig(batch_pairs=2, chunk_pairs=1, chunks_in_flight=2, io_threads=2)
    infos = run_pipeline(DevicePipeline("cpu", tiny, cfg), counts)
    assert infos["A/v_1"] == {"frames": 4, "flows": 3}
    assert tree_bytes(tiny / "flow") == tree_bytes(whole / "flow")
    assert no_temps(tiny / "flow")


class _SmallDevice(DevicePipeline):
    """A device that runs out of memory for batches of more than one pair."""

    def _flow(self, prev, nxt):
        if len(prev) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return super()._flow(prev, nxt)


def test_pipeline_halves_its_batch_when_out_of_memory(small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    pipe = _SmallDevice("cpu", data, PipelineConfig(batch_pairs=4, chunk_pairs=4))
    infos = run_pipeline(pipe, {"A/v_1": 4, "A/v_2": 2})
    assert pipe._batch == 1 and infos["A/v_1"] == {"frames": 4, "flows": 3}
    for f in read_flows(data, "A/v_1"):
        np.testing.assert_allclose(interior_median(f, 6), (1, 0), atol=0.2)


def test_pipeline_failure_fails_only_that_video(small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    bad = DataLayout(data).frames_video_dir("A/v_1") / frame_name(2)
    bad.write_bytes(b"\xff\xd8 truncated")
    pipe = DevicePipeline("cpu", data, PipelineConfig(chunk_pairs=1))
    futures = {vid: pipe.submit(vid, n) for vid, n in {"A/v_1": 4, "A/v_2": 2}.items()}
    with pytest.raises(ValueError, match="img_00002.jpg: not a decodable JPEG"):
        futures["A/v_1"].result(timeout=120)
    assert futures["A/v_2"].result(timeout=120) == {"frames": 2, "flows": 1}
    pipe.close()
    assert not DataLayout(data).flow_video_dir("A/v_1").exists()
    assert no_temps(data / "flow")


def test_worker_processes_per_device_and_a_dead_worker(small_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(small_data, d)
    assert compute_flow(one, backend="torch", progress=False).ok
    # two "devices": one spawned worker process each, fed by the parent
    summary = compute_flow(two, backend="torch", devices=["cpu", "cpu"], progress=False)
    assert summary.ok and summary.done_now == 3
    assert tree_bytes(two / "flow") == tree_bytes(one / "flow")

    pool = WorkerPool(["cpu"], two, PipelineConfig())
    try:
        os.kill(pool._procs[0].pid, signal.SIGKILL)
        pool._procs[0].join()
        fut = pool.submit("A/v_1", 4)
        with pytest.raises(RuntimeError, match="died|every flow worker"):
            fut.result(timeout=30)
        with pytest.raises(RuntimeError, match="every flow worker process has died"):
            pool.submit("A/v_2", 2).result(timeout=30)
    finally:
        pool.close()
