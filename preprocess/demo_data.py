"""A small real video dataset whose classes differ only in motion, for the end-to-end demo.

Each video shows 2-4 textured objects sliding over a static textured background (mild sensor
noise on every frame). Textures, colours, object count, sizes and start positions are drawn at
random per video, independently of the class, and objects wrap around the frame edges, so no
single frame says anything about the class: only the motion does, which is what a flow stream
must learn (Simonyan & Zisserman, two-stream ConvNets, 2014).

Classes are direction x speed, chosen to survive horizontal-flip augmentation (the papers flip
frames left-right at random): up, down, or sideways (left or right at random per video), each
slow or fast. Speeds are px/frame at the source size; after the frames stage resizes 128x96 to
256x256 they are about 3 px (slow) and 7-9 px (fast), well inside TV-L1's range.

Default size, chosen so the demo chain fits ~10 min on 2 CPU cores (OpenCV TV-L1 with default
parameters at 256x256 takes 0.6-1.1 s per pair on one core here): 6 classes x 6 videos
(3 groups x 2 clips) x 14 frames of 128x96 at 25 fps = 36 videos, 504 frames, 468 flow pairs,
about 3.3 min of flow with 2 jobs. Split 1 trains on 24 videos and tests on 12.

Layout is UCF101's: ``<out>/<Class>/v_<Class>_gXX_cYY.avi`` plus ``<out>/splits/classInd.txt``,
``trainlist0{1,2,3}.txt`` (with label column) and ``testlist0{1,2,3}.txt`` (without), CRLF like
the official files. As in UCF101, groups decide the split: split k tests the k-th block of
groups, so the three splits differ and no group is in both train and test of one split.

Videos are MJPG in AVI: this OpenCV build (FFmpeg backend) writes it byte-identically for the
same frames and decodes it back everywhere; H.264 writers are missing in pip wheels. The same
seed therefore gives byte-identical files. ``<out>/demo.json`` records the parameters; the
whole folder is generated under a temporary name and renamed, so an existing ``out`` with the
same parameters is complete and is kept as it is.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .atomic import publishing_dir

# name -> (dx, dy) in px/frame at the source size; dx = None means left or right per video.
MOTIONS: dict[str, tuple[float | None, float]] = {
    "FallFast": (0.0, 3.5),
    "FallSlow": (0.0, 1.25),
    "RiseFast": (0.0, -3.5),
    "RiseSlow": (0.0, -1.25),
    "SlideFast": (None, 3.5),
    "SlideSlow": (None, 1.5),
}
DEFAULT_CLASSES = tuple(sorted(MOTIONS))
CLIPS_PER_GROUP = 2
FPS = 25.0
FOURCC = "MJPG"
GENERATOR_VERSION = 1
PARAMS_FILE = "demo.json"


@dataclass(frozen=True)
class DemoSummary:
    out: Path
    classes: tuple[str, ...]
    videos: int
    frames_per_video: int
    size: tuple[int, int]      # (width, height) of the source videos
    created: bool              # False when an identical demo dataset was already there

    @property
    def flow_pairs(self) -> int:
        return self.videos * (self.frames_per_video - 1)

    def __str__(self) -> str:
        verb = "wrote" if self.created else "already complete:"
        return (f"{verb} {self.out}: {len(self.classes)} classes, {self.videos} videos x "
                f"{self.frames_per_video} frames of {self.size[0]}x{self.size[1]} "
                f"({self.flow_pairs} flow pairs); splits in {self.out / 'splits'}")


def velocity(class_name: str, rng: np.random.Generator) -> tuple[float, float]:
    """The class's (dx, dy) in px/frame; sideways classes pick left or right from `rng`."""
    dx, dy = MOTIONS[class_name]
    if dx is None:
        dx, dy = (dy if rng.random() < 0.5 else -dy), 0.0
    return dx, dy


def _smooth_texture(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Random colour field with detail of about `cell` px, float32 (h, w, 3) in [0, 1]."""
    gh, gw = max(2, round(h / cell)), max(2, round(w / cell))
    field = cv2.resize(rng.random((gh, gw, 3), dtype=np.float32), (w, h),
                       interpolation=cv2.INTER_CUBIC)
    lo, hi = field.min(), field.max()
    return (field - lo) / max(hi - lo, 1e-6)


def _colourise(rng: np.random.Generator, field: np.ndarray) -> np.ndarray:
    """Map a [0, 1] field between two random colours, contrast kept high for flow."""
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    b = np.where(np.abs(b - a) < 80, (a + 128) % 256, b)
    return (a + field * (b - a)).astype(np.float32)


def render_frames(class_name: str, rng: np.random.Generator, *, frames: int,
                  size: tuple[int, int]) -> list[np.ndarray]:
    """One video's frames, BGR uint8 (H, W, 3): appearance from `rng`, motion from the class."""
    w, h = size
    background = _colourise(rng, _smooth_texture(rng, h, w, rng.uniform(6, 14)))
    # Static clutter so the background itself has edges (which must not move in the flow).
    for _ in range(int(rng.integers(4, 9))):
        p = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        q = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(background, p, q, tuple(float(c) for c in rng.uniform(0, 255, 3)),
                 int(rng.integers(1, 3)), cv2.LINE_AA)
    base_v = velocity(class_name, rng)
    objects = []
    for _ in range(int(rng.integers(2, 5))):
        layer = _colourise(rng, _smooth_texture(rng, h, w, rng.uniform(2.5, 5)))
        mask = np.zeros((h, w), np.float32)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.08, 0.2) * w, rng.uniform(0.1, 0.25) * h
        if rng.random() < 0.5:
            cv2.ellipse(mask, (round(cx), round(cy)), (round(rx), round(ry)),
                        float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(mask, (round(cx - rx), round(cy - ry)), (round(cx + rx), round(cy + ry)),
                          1.0, -1, cv2.LINE_AA)
        # Roll the shape so it may start across an edge: it wraps around while it moves.
        mask = np.roll(mask, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1))
        speed = rng.uniform(0.9, 1.1)
        objects.append((layer, mask, base_v[0] * speed, base_v[1] * speed))
    noise_rng = np.random.default_rng(rng.integers(0, 2**63))
    out = []
    for t in range(frames):
        frame = background.copy()
        for layer, mask, dx, dy in objects:
            m = np.float32([[1, 0, dx * t], [0, 1, dy * t]])
            moved = cv2.warpAffine(layer, m, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_WRAP)
            alpha = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_WRAP)[..., None]
            frame = frame * (1 - alpha) + moved * alpha
        frame += noise_rng.normal(0, 2.0, frame.shape).astype(np.float32)
        out.append(np.clip(frame + 0.5, 0, 255).astype(np.uint8))
    return out


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float = FPS) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {FOURCC} video {path} with this build")
    try:
        for f in frames:
            writer.write(f)
    finally:
        writer.release()


def video_name(class_name: str, group: int, clip: int) -> str:
    return f"v_{class_name}_g{group:02d}_c{clip:02d}.avi"


def tested_groups(split: int, groups: int) -> range:
    """Groups tested in `split` (1..3): the split-th block of about a quarter of the groups."""
    block = max(1, groups // 4)
    return range((split - 1) * block + 1, split * block + 1)


def generate_demo_dataset(out: Path, *, seed: int = 0, classes: Sequence[str] = DEFAULT_CLASSES,
                          videos_per_class: int = 6, frames: int = 14,
                          size: tuple[int, int] = (128, 96)) -> DemoSummary:
    """Write the demo dataset to `out` (see the module docstring), or keep an identical one.

    `classes` are names from MOTIONS; `videos_per_class` is rounded up to whole groups of
    CLIPS_PER_GROUP clips and needs at least 3 groups so the three splits differ; `size` is
    (width, height). Raises ValueError when `out` exists with other content or parameters.
    """
    out = Path(out)
    classes = tuple(sorted(classes))
    unknown = [c for c in classes if c not in MOTIONS]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"demo classes must be distinct names from {', '.join(MOTIONS)}; "
                         f"got {', '.join(classes) or 'none'}")
    groups = math.ceil(videos_per_class / CLIPS_PER_GROUP)
    if groups < 3 or frames < 2 or min(size) < 16:
        raise ValueError("the demo needs videos_per_class >= 5 (3 groups of 2 clips), "
                         "frames >= 2 and a size of at least 16x16")
    params = {"version": GENERATOR_VERSION, "seed": seed, "classes": list(classes),
              "groups": groups, "clips_per_group": CLIPS_PER_GROUP, "frames": frames,
              "size": list(size), "fps": FPS, "fourcc": FOURCC}
    summary = DemoSummary(out, classes, len(classes) * groups * CLIPS_PER_GROUP, frames,
                          (int(size[0]), int(size[1])), created=True)
    if out.exists():
        _check_existing(out, params)
        return replace(summary, created=False)
    try:
        with publishing_dir(out) as tmp:
            _write_all(tmp, params)
    except FileExistsError:
        # Another process published the same folder meanwhile: fine if it is the same demo.
        _check_existing(out, params)
        return replace(summary, created=False)
    return summary


def _check_existing(out: Path, params: dict) -> None:
    recorded_path = out / PARAMS_FILE
    if not recorded_path.is_file():
        raise ValueError(f"{out} exists and is not a demo dataset (no {PARAMS_FILE}); choose "
                         f"another --out or remove it")
    recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    if recorded != json.loads(json.dumps(params)):
        diffs = ", ".join(f"{k}: {recorded.get(k)!r} there, {params[k]!r} asked"
                          for k in params if recorded.get(k) != params[k])
        raise ValueError(f"{out} holds a demo dataset made with other parameters ({diffs}); "
                         f"choose another --out or remove it")


def _write_all(root: Path, params: dict) -> None:
    classes, groups, frames = params["classes"], params["groups"], params["frames"]
    size = tuple(params["size"])
    for c in classes:
        (root / c).mkdir()
        for g in range(1, groups + 1):
            for k in range(1, CLIPS_PER_GROUP + 1):
                # Seeded per video, so a video does not change when classes are added.
                rng = np.random.default_rng([params["seed"], g, k, *c.encode()])
                write_video(root / c / video_name(c, g, k),
                            render_frames(c, rng, frames=frames, size=size))
    splits = root / "splits"
    splits.mkdir()
    crlf = "\r\n"
    (splits / "classInd.txt").write_bytes(
        "".join(f"{i} {c}{crlf}" for i, c in enumerate(classes, 1)).encode())
    for split in (1, 2, 3):
        tested = set(tested_groups(split, groups))
        train, test = [], []
        for i, c in enumerate(classes, 1):
            for g in range(1, groups + 1):
                for k in range(1, CLIPS_PER_GROUP + 1):
                    rel = f"{c}/{video_name(c, g, k)}"
                    if g in tested:
                        test.append(rel + crlf)
                    else:
                        train.append(f"{rel} {i}{crlf}")
        (splits / f"trainlist0{split}.txt").write_bytes("".join(train).encode())
        (splits / f"testlist0{split}.txt").write_bytes("".join(test).encode())
    (root / PARAMS_FILE).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n",
                                    encoding="utf-8")
