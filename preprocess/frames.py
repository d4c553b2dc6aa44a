"""The frames stage: every frame of every video as a JPEG, 256x256 by default (IMRS section 4.2.1).

    DATA/frames/<class>/<video>/img_00001.jpg, img_00002.jpg, ...   (names: preprocess.layout)
    DATA/meta/index.json                                            (the dataset index)

IMRS 4.2.1 extracts all frames with OpenCV, resizes them to 256x256 and stores JPEG. Two resize
modes: "squash" (the paper's: every frame to size x size, aspect ignored) and "short-side" (the
short side of the *display* frame, i.e. after the sample aspect ratio, to `size`, the long side
in proportion: what Kinetics-pretrained teachers saw). Both use INTER_AREA, which averages
pixels when shrinking (no aliasing of 1080p sources) and interpolates bilinearly when enlarging
(`resize_frame`: large shrinks in two box-filter steps, for speed). All frames of a video get
the output size of its first frame.

Crash safety: a video's frames are written into a `.tmp-` folder that is renamed to the final
folder once complete (atomic.publishing_dir), so a final folder always holds a whole video; a
final folder without a ledger record (killed between rename and ledger write) is adopted as done
and never rewritten. Durability: before the rename the filesystem is flushed once per video
(syncfs(2), falling back to fsync of every file where syncfs is missing), so a final folder
survives a power loss complete; one flush per video instead of one fsync per frame keeps the
guarantee at a fraction of the cost (see benchmarks/frames_bench.py).

The recorded parameters (DATA/meta/frames.params.json) are the dataset kind, the resolved
videos folder, size, resize mode and JPEG quality: rerunning with another of any of them is
refused unless `force`. The dataset index is rewritten by every run that is not refused.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .atomic import publishing_dir
from .dataset_index import DatasetIndex, build_index
from .layout import DataLayout, frame_name
from .ledger import StageLock, check_params, read_params
from .runner import StageSummary, ensure_writable, run_stage
from .video import VideoReader

STAGE = "frames"
RESIZE_MODES = ("squash", "short-side")


@dataclass(frozen=True)
class FramesConfig:
    size: int = 256              # IMRS 4.2.1: 256x256
    resize: str = "squash"       # "squash" (the paper) or "short-side"
    jpeg_quality: int = 95

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be at least 1, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, "
                             f"got {self.resize!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")


def output_size(width: int, height: int, config: FramesConfig, *,
                sar: tuple[int, int] = (1, 1), rotation: int = 0) -> tuple[int, int]:
    """(width, height) of the stored frames for a decoded width x height frame."""
    if config.resize == "squash":
        return config.size, config.size
    # The sample aspect ratio stretches the coded width, which is the height once rotated.
    stretch = sar[0] / sar[1]
    disp_w, disp_h = (width, height * stretch) if rotation % 180 else (width * stretch, height)
    scale = config.size / min(disp_w, disp_h)
    return max(1, int(disp_w * scale + 0.5)), max(1, int(disp_h * scale + 0.5))


def resize_frame(frame: np.ndarray, dsize: tuple[int, int]) -> np.ndarray:
    """INTER_AREA to `dsize` (width, height), in two steps when shrinking 4x or more.

    OpenCV's INTER_AREA is slow for fractional factors (~5 ms a 1080p frame) but fast for exact
    integer ones; a large shrink therefore first averages whole kx x ky blocks (k dividing the
    side), then INTER_AREA the small rest: still a box filter without aliasing, within ~3 grey
    levels of the one-step result, at 2-4x less time on HD sources.
    """
    h, w = frame.shape[:2]
    if (w, h) == dsize:
        return frame
    kx, ky = _divisor_at_most(w, w // dsize[0]), _divisor_at_most(h, h // dsize[1])
    if kx * ky >= 4:
        frame = cv2.resize(frame, (w // kx, h // ky), interpolation=cv2.INTER_AREA)
    return cv2.resize(frame, dsize, interpolation=cv2.INTER_AREA)


def _divisor_at_most(n: int, m: int) -> int:
    """The largest divisor of n that is at most m (1 when m < 1)."""
    return next((k for k in range(m, 1, -1) if n % k == 0), 1)


def write_video_frames(src: Path, final: Path, config: FramesConfig) -> dict:
    """Decode `src` to its end and publish its frames as the folder `final`; return ledger info.

    Raises VideoError (naming the file) for unreadable, empty or truncated videos; nothing is
    published then.
    """
    encode = [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality]
    with VideoReader(src) as video, publishing_dir(final, fsync=False) as tmp:
        info = video.info
        dsize = None
        for k, frame in enumerate(video, 1):
            if dsize is None:
                dsize = output_size(frame.shape[1], frame.shape[0], config, sar=info.sar,
                                    rotation=info.rotation)
            frame = resize_frame(frame, dsize)
            ok, jpeg = cv2.imencode(".jpg", frame, encode)
            if not ok:
                raise RuntimeError(f"{src}: JPEG encoding of frame {k} failed")
            with open(tmp / frame_name(k), "wb") as f:
                f.write(jpeg)
        flush_to_disk(tmp)
    record = {"frames": video.frames, "width": dsize[0], "height": dsize[1],
              "source_width": info.width, "source_height": info.height,
              "fps": round(info.fps, 3), "rotation": info.rotation,
              "sar": f"{info.sar[0]}:{info.sar[1]}", "codec": info.codec}
    if info.container_frames != video.frames:
        record["container_frames"] = info.container_frames
    if video.messages:
        record["ffmpeg"] = video.messages[:3]
    return record


def flush_to_disk(folder: Path) -> None:
    """Make everything written into `folder` durable: one syncfs, else fsync per file."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            for entry in os.scandir(folder):
                f = os.open(entry.path, os.O_RDONLY)
                try:
                    os.fsync(f)
                finally:
                    os.close(f)
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


_syncfs = _load_syncfs()


@dataclass(frozen=True)
class _ExtractVideo:
    """The per-video work, sent to workers: small, so it pickles cheaply for every task.

    The video's source path comes from DATA/meta/index.json, read once per worker process.
    """
    layout: DataLayout
    config: FramesConfig

    def __call__(self, video_id: str) -> dict:
        final = self.layout.frames_video_dir(video_id)
        if final.is_dir():
            # Published by a run killed before its ledger write: a final name means complete.
            frames = sum(1 for e in os.scandir(final) if e.name.startswith("img_"))
            return {"frames": frames, "adopted": True}
        return write_video_frames(_source_path(self.layout.index_path, video_id), final,
                                  self.config)


_index_cache: dict = {}


def _source_path(index_path: Path, video_id: str) -> Path:
    st = os.stat(index_path)
    key = (str(index_path), st.st_ino, st.st_mtime_ns, st.st_size)
    if _index_cache.get("key") != key:
        index = DatasetIndex.load(index_path)
        _index_cache.clear()
        _index_cache.update(key=key, root=Path(index.videos_root),
                            paths={v.video_id: v.path for v in index.videos})
    return _index_cache["root"] / _index_cache["paths"][video_id]


def frames_params(videos: Path, dataset: str, config: FramesConfig) -> dict:
    """The parameters that shape the frames stage's outputs (recorded, compared on reruns)."""
    return {"dataset": dataset, "videos": str(Path(videos).resolve()), **asdict(config)}


def extract_frames(videos: Path, data: Path, *, dataset: str = "folders",
                   splits: Path | None = None, jobs: int = 1, size: int = 256,
                   resize: str = "squash", jpeg_quality: int = 95, force: bool = False,
                   progress: bool = True, scheduler: str | None = None) -> StageSummary:
    """Run the frames stage for the videos under `videos` into DATA; return its summary.

    `dataset` and `splits` are those of preprocess.dataset_index.build_index. Listed videos
    missing on disk, and videos that cannot be decoded completely, are recorded as failed with
    their reason; the others complete. `scheduler` runs the videos on a Dask cluster.
    """
    config = FramesConfig(size=size, resize=resize, jpeg_quality=jpeg_quality)
    layout = DataLayout(data)
    index = build_index(Path(videos), dataset, splits)
    params = frames_params(videos, dataset, config)
    _save_index(layout, index, params, force=force)
    missing = {m.video_id: f"{m.path}: {m.reason}" for m in index.missing}
    return run_stage(STAGE, layout, _largest_first(index),
                     _ExtractVideo(layout, config), params, jobs=jobs, force=force,
                     known_failures=missing,
                     published=lambda video_id: layout.frames_video_dir(video_id).is_dir(),
                     progress=progress, scheduler=scheduler)


def _largest_first(index: DatasetIndex) -> list[str]:
    """Video ids, largest file first: a long video started last would leave the other workers
    idle while it finishes (longest-processing-time-first scheduling). Outputs don't depend on it.
    """
    root = Path(index.videos_root)

    def size(path: str) -> int:
        try:
            return (root / path).stat().st_size
        except OSError:
            return 0
    return [v.video_id for v in sorted(index.videos, key=lambda v: (-size(v.path), v.video_id))]


def _save_index(layout: DataLayout, index: DatasetIndex, params: dict, *, force: bool) -> None:
    """Write index.json, unless the run is about to be refused for changed parameters.

    Done under the stage lock so that a refused or concurrent run never replaces the index
    that describes the existing outputs; run_stage then takes the lock again for the work.
    """
    ensure_writable(layout.root)
    ensure_writable(layout.meta_dir)
    path = layout.params_path(STAGE)
    with StageLock(layout.lock_path(STAGE), STAGE):
        recorded = read_params(path)
        if not force and recorded is not None and recorded != _canonical(params):
            check_params(path, STAGE, params, force=False)  # raises ParamsMismatch, explained
        index.save(layout.index_path)


def _canonical(params: dict) -> dict:
    return json.loads(json.dumps(params, sort_keys=True))
