"""The demo dataset: real decodable videos whose class shows only in the motion, byte-identical
for one seed, published atomically, with UCF101-format split files."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from preprocess.atomic import TMP_PREFIX
from preprocess.dataset_index import build_index
from preprocess.demo_data import DEFAULT_CLASSES, MOTIONS, generate_demo_dataset

SMALL = dict(classes=("RiseFast", "SlideSlow"), videos_per_class=6, frames=4, size=(64, 48))


def decode(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def measured_motion(frames: list[np.ndarray]) -> tuple[float, float]:
    """Median (dx, dy) px/frame over moving pixels (Farneback), over all consecutive pairs."""
    gray = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
    dx, dy = [], []
    for a, b in zip(gray, gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        moving = np.hypot(flow[..., 0], flow[..., 1]) > 0.5
        dx.append(flow[..., 0][moving])
        dy.append(flow[..., 1][moving])
    return float(np.median(np.concatenate(dx))), float(np.median(np.concatenate(dy)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("demo") / "videos"
    return out, generate_demo_dataset(out, seed=0)


def test_layout_and_decoded_videos(demo):
    out, summary = demo
    assert summary.created and summary.classes == DEFAULT_CLASSES == tuple(sorted(MOTIONS))
    assert (summary.videos, summary.frames_per_video, summary.size, summary.flow_pairs) == (
        36, 14, (128, 96), 468)
    assert sorted(p.name for p in out.iterdir()) == sorted([*DEFAULT_CLASSES, "splits",
                                                             "demo.json"])
    for c in DEFAULT_CLASSES:
        names = sorted(p.name for p in (out / c).iterdir())
        assert names == [f"v_{c}_g{g:02d}_c{k:02d}.avi" for g in (1, 2, 3) for k in (1, 2)]
        for name in names:
            frames = decode(out / c / name)
            assert len(frames) == 14
            assert all(f.shape == (96, 128, 3) and f.dtype == np.uint8 for f in frames)
    assert not any(p.name.startswith(TMP_PREFIX) for p in out.parent.iterdir())


def test_class_is_in_the_motion(demo):
    out, _ = demo
    speeds = {}
    for c in DEFAULT_CLASSES:
        want_dx, want_dy = MOTIONS[c]
        for video in sorted((out / c).iterdir()):
            dx, dy = measured_motion(decode(video))
            if want_dx is None:   # sideways: left or right, chosen per video
                assert abs(dy) < 0.3 and abs(abs(dx) - want_dy) < 0.35 * want_dy, (video, dx, dy)
            else:
                assert abs(dx) < 0.3 and abs(dy - want_dy) < 0.35 * abs(want_dy), (video, dx, dy)
            speeds.setdefault(c, []).append(np.hypot(dx, dy))
    assert min(speeds["RiseFast"] + speeds["FallFast"] + speeds["SlideFast"]) > \
        2 * max(speeds["RiseSlow"] + speeds["FallSlow"] + speeds["SlideSlow"])


def test_a_single_frame_says_nothing_about_the_class(demo):
    out, _ = demo
    firsts, labels = [], []
    for label, c in enumerate(DEFAULT_CLASSES):
        for video in sorted((out / c).iterdir()):
            firsts.append(decode(video)[0].astype(np.float32))
            labels.append(label)
    # Videos of one class look different...
    for label in range(len(DEFAULT_CLASSES)):
        same = [f for f, lab in zip(firsts, labels) if lab == label]
        assert min(np.abs(a - b).mean() for i, a in enumerate(same) for b in same[i + 1:]) > 20
    # ...and a nearest-neighbour guess from the first frame is no better than chance (1/6).
    small = np.stack([cv2.resize(f, (16, 12), interpolation=cv2.INTER_AREA).ravel()
                      for f in firsts])
    dist = np.linalg.norm(small[:, None] - small[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    hits = sum(labels[int(np.argmin(dist[i]))] == labels[i] for i in range(len(labels)))
    assert hits / len(labels) <= 0.25


def test_splits_parse_as_ucf101(demo):
    out, _ = demo
    index = build_index(out, "ucf101")   # finds out/splits by itself
    assert index.classes == DEFAULT_CLASSES and len(index.videos) == 36 and index.missing == ()
    for k in (1, 2, 3):
        roles = Counter(v.splits[k - 1] for v in index.videos)
        assert roles == {1: 24, 2: 12}
        tested = {v.video_id.split("_")[-2] for v in index.videos if v.splits[k - 1] == 2}
        assert tested == {f"g{k:02d}"}   # whole groups, as in UCF101
    assert (out / "splits" / "testlist01.txt").read_bytes().startswith(
        b"FallFast/v_FallFast_g01_c01.avi\r\n")
    train = (out / "splits" / "trainlist01.txt").read_bytes()
    assert b"FallFast/v_FallFast_g02_c01.avi 1\r\n" in train
    # The splits/ folder holds no videos, so the same tree is also a plain folders dataset.
    assert build_index(out).classes == DEFAULT_CLASSES


def test_same_seed_same_bytes_and_rerun_keeps_what_is_there(demo, tmp_path):
    out, _ = demo
    again = generate_demo_dataset(tmp_path / "again", seed=0)
    assert again.created and digest(tmp_path / "again") == digest(out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert not generate_demo_dataset(out, seed=0).created
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    a = generate_demo_dataset(tmp_path / "s1", seed=1, **SMALL)
    b = generate_demo_dataset(tmp_path / "s2", seed=2, **SMALL)
    assert a.videos == b.videos == 12
    da, db = digest(tmp_path / "s1"), digest(tmp_path / "s2")
    assert da.keys() == db.keys()
    assert all(da[k] != db[k] for k in da if k.endswith(".avi"))


def test_refuses_other_parameters_or_foreign_folders(tmp_path):
    generate_demo_dataset(tmp_path / "d", seed=1, **SMALL)
    with pytest.raises(ValueError, match="other parameters .*seed: 1 there, 2 asked"):
        generate_demo_dataset(tmp_path / "d", seed=2, **SMALL)
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="is not a demo dataset"):
        generate_demo_dataset(tmp_path / "mine")
    with pytest.raises(ValueError, match="distinct names"):
        generate_demo_dataset(tmp_path / "x", classes=("Spin",))
    with pytest.raises(ValueError, match="3 groups"):
        generate_demo_dataset(tmp_path / "x", videos_per_class=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "mine"]


def test_cli_demo_data(tmp_path):
    runner = CliRunner()
    first = runner.invoke(cli, ["demo-data", "--out", str(tmp_path / "v"), "--seed", "3"])
    assert first.exit_code == 0, first.output
    assert "wrote" in first.output and "36 videos x 14 frames" in first.output
    second = runner.invoke(cli, ["demo-data", "--out", str(tmp_path / "v"), "--seed", "3"])
    assert second.exit_code == 0 and "already complete" in second.output
    clash = runner.invoke(cli, ["demo-data", "--out", str(tmp_path / "v"), "--seed", "4"])
    assert clash.exit_code != 0 and "other parameters" in clash.output
