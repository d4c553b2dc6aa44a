"""Tiny real DATA for the training tests, built once per session by the real stages.

Three classes of a texture translating left, right or down (3 px/frame) in 40x32 MJPG videos of
8 frames: frames (32x32), TV-L1 flow (OpenCV) and shards, 12 videos ("folders" splits: 9 train,
3 test in split 1). Imported by tests/test_train*.py, test_features.py and test_evaluate.py
(as `tests.test_train_data`, one module object, so the data is built once).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from preprocess.flow import compute_flow
from preprocess.frames import extract_frames
from preprocess.shards import build_shards

MOTION = {"Down": (0, 3), "Left": (-3, 0), "Right": (3, 0)}
VIDEOS_PER_CLASS, FRAMES, SIZE = 4, 8, 32
CLIP_LEN, CROP = 4, 24
_BUILT: dict[str, Path] = {}


def write_translating_video(path: Path, dx: int, dy: int, seed: int, n: int = FRAMES,
                            size: tuple[int, int] = (40, 32)) -> None:
    w, h = size
    rng = np.random.default_rng(seed)
    tex = cv2.GaussianBlur(rng.integers(0, 256, (3 * h, 3 * w, 3), dtype=np.uint8), (5, 5), 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    for k in range(n):
        out.write(np.ascontiguousarray(np.roll(tex, (k * dy, k * dx), axis=(0, 1))[:h, :w]))
    out.release()


def tiny_data(tmp_path_factory) -> Path:
    """The session's tiny DATA (read-only by convention: copy it before training into it)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        root = tmp_path_factory.mktemp("train_data")
        for j, (c, (dx, dy)) in enumerate(MOTION.items()):
            for i in range(VIDEOS_PER_CLASS):
                write_translating_video(root / "videos" / c / f"v_{c}_{i}.avi", dx, dy,
                                        seed=10 * j + i)
        data = root / "data"
        for summary in (extract_frames(root / "videos", data, size=SIZE, progress=False),
                        compute_flow(data, backend="opencv", jobs=2, progress=False),
                        build_shards(data, progress=False)):
            assert summary.ok, summary.report()
        _BUILT[key] = data
    return _BUILT[key]


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
