"""The `flow` stage: TV-L1 between consecutive frames, clipped, quantized and stored as JPEG.

Seed 000 section 4.2.1: TV-L1 (Zach et al. 2007) with OpenCV's default parameters on the 256x256
frames, truncated to [-20, 20] and mapped onto 0..255 (`preprocess.flow_quant`), saved as JPEG.

Flow k goes from frame k to frame k+1 (both converted with BGR2GRAY), so N frames give N-1
pairs DATA/flow/<class>/<video>/flow_x_0000k.jpg and flow_y_0000k.jpg. A one-frame video gets
an empty, published flow folder and `{"flows": 0}` in the ledger: not an error. The items are
the videos of DATA/meta/index.json; a video whose frames failed (a video the split files list
but the disk lacks included) is recorded as failed with "frames failed: <reason>", one whose
frames are not there yet as "frames not extracted yet", and both are retried by the next run.

Crash safety is the frames stage's: one folder per video published atomically (a final name
means complete), the ledger written by the parent alone, a rerun redoes exactly what is not
done. The recorded parameters are the backend and its TV-L1 parameters, the JPEG quality, the
quantization and the parameters of the frames they were computed from: another backend into
the same DATA is refused unless --force. The opencv backends run one video per joblib worker;
the torch backend runs a per-device pipeline instead (`preprocess.flow_pipeline`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from .atomic import publishing_dir
from .flow_backends import backend_params, pair_flow, resolve_backend
from .flow_quant import describe as describe_quantization
from .flow_quant import quantize
from .layout import DataLayout, flow_names, frame_name
from .ledger import DONE, Ledger, read_params
from .runner import StageSummary, run_stage

STAGE = "flow"
FRAMES_STAGE = "frames"


def read_gray(path: Path) -> np.ndarray:
    """A frame JPEG as uint8 grayscale (BGR2GRAY, as the paper's OpenCV pipeline does)."""
    with open(path, "rb") as f:
        data = f.read()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: not a decodable JPEG ({len(data)} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def encode_jpeg(q: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", q, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding of a {q.shape} flow image failed")
    return buf.tobytes()


def write_flow_pair(folder: Path, k: int, qx: np.ndarray, qy: np.ndarray, quality: int) -> None:
    """Write quantized flow k (uint8 H x W each) into `folder` (a not-yet-published folder)."""
    for name, q in zip(flow_names(k), (qx, qy)):
        with open(folder / name, "wb") as f:
            f.write(encode_jpeg(q, quality))


def published_info(final: Path, n_frames: int) -> dict:
    """Ledger info of a flow folder already published (by a run killed before its ledger write)."""
    n_flows = sum(1 for p in final.iterdir() if p.name.startswith("flow_x_"))
    if n_flows != max(n_frames - 1, 0):
        raise RuntimeError(f"{final} holds {n_flows} flow pairs but the frames ledger says "
                           f"{n_frames} frames; remove that folder to have it redone")
    return {"frames": n_frames, "flows": n_flows}


def check_same_size(path: Path, img: np.ndarray, shape: tuple[int, ...]) -> None:
    if img.shape != shape:
        raise ValueError(f"{path}: frame is {img.shape[1]}x{img.shape[0]}, the video's first "
                         f"frame {shape[1]}x{shape[0]}")


@dataclass(frozen=True)
class PairwiseWork:
    """One video's flow with a pairwise backend (opencv, opencv-cuda), in a joblib worker."""
    data: str
    backend: str
    jpeg_quality: int
    frame_counts: Mapping[str, int]

    def __call__(self, video_id: str) -> dict:
        layout = DataLayout(self.data)
        n = self.frame_counts[video_id]
        final = layout.flow_video_dir(video_id)
        if final.is_dir():
            return published_info(final, n)
        frames = layout.frames_video_dir(video_id)
        with publishing_dir(final) as tmp:
            if n >= 2:
                prev = read_gray(frames / frame_name(1))
                for k in range(1, n):
                    path = frames / frame_name(k + 1)
                    nxt = read_gray(path)
                    check_same_size(path, nxt, prev.shape)
                    flow = pair_flow(self.backend, prev, nxt)
                    write_flow_pair(tmp, k, quantize(flow[..., 0]), quantize(flow[..., 1]),
                                    self.jpeg_quality)
                    prev = nxt
        return {"frames": n, "flows": max(n - 1, 0)}


def _frames_state(layout: DataLayout, video_ids: Sequence[str]
                  ) -> tuple[dict[str, int], dict[str, str]]:
    """Frame counts of the videos whose frames are done; the reason for every other video."""
    records = Ledger(layout.ledger_path(FRAMES_STAGE)).load()
    counts, not_ready = {}, {}
    for vid in video_ids:
        rec = records.get(vid)
        if rec is None:
            not_ready[vid] = "frames not extracted yet"
        elif rec.status != DONE:
            not_ready[vid] = f"frames failed: {rec.reason}"
        elif not layout.frames_video_dir(vid).is_dir():
            not_ready[vid] = (f"frames not extracted yet ({layout.frames_video_dir(vid)} is "
                              f"missing though the frames ledger says done)")
        else:
            counts[vid] = int(rec.info["frames"])
    return counts, not_ready


def flow_params(layout: DataLayout, backend: str, jpeg_quality: int) -> dict:
    return {**backend_params(backend), "jpeg_quality": int(jpeg_quality),
            "quantization": describe_quantization(),
            "frames": read_params(layout.params_path(FRAMES_STAGE))}


def compute_flow(data: Path, *, backend: str = "auto", jobs: int = 1, jpeg_quality: int = 95,
                 force: bool = False, progress: bool = True, scheduler: str | None = None,
                 devices: Sequence[str] | None = None, pipeline=None) -> StageSummary:
    """Compute the flow of every video of DATA's index whose frames are extracted.

    `backend`: "auto" | "opencv" | "opencv-cuda" | "torch" (see preprocess.flow_backends).
    `jobs`: worker processes for the opencv backends; for torch, the JPEG decode/encode threads
    per device (at least 2). `scheduler`: a dask.distributed address (opencv backends only).
    `devices`: torch devices to use (default: every visible GPU, else the CPU); `pipeline`: a
    `flow_pipeline.PipelineConfig` for the torch backend (batch and chunk sizes).
    """
    from .dataset_index import DatasetIndex

    layout = DataLayout(data)
    if not layout.index_path.exists():
        raise FileNotFoundError(f"{layout.index_path} does not exist: run `pipeline frames` "
                                f"into {layout.root} first")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be 1..100, not {jpeg_quality}")
    name = resolve_backend(backend)
    index = DatasetIndex.load(layout.index_path)
    items = [v.video_id for v in index.videos]
    counts, not_ready = _frames_state(layout, items)
    frames_records = Ledger(layout.ledger_path(FRAMES_STAGE)).load()
    for m in index.missing:  # listed by the split files, absent on disk: failed in every stage
        rec = frames_records.get(m.video_id)
        not_ready[m.video_id] = "frames failed: " + (
            rec.reason if rec is not None and rec.status != DONE else f"{m.path}: {m.reason}")
    ready = [v for v in items if v in counts]
    params = flow_params(layout, name, jpeg_quality)
    published = _Published(layout)

    if name != "torch":
        work = PairwiseWork(str(layout.root), name, int(jpeg_quality), counts)
        return run_stage(STAGE, layout, ready, work, params, jobs=jobs, force=force,
                         known_failures=not_ready, published=published, progress=progress,
                         scheduler=scheduler)
    if scheduler:
        raise ValueError("--scheduler runs the opencv flow backends on a cluster; the torch "
                         "backend uses this machine's GPUs")
    from .flow_pipeline import run_torch_stage
    return run_torch_stage(layout, ready, counts, params, jobs=jobs, force=force,
                           known_failures=not_ready, published=published, progress=progress,
                           jpeg_quality=int(jpeg_quality), devices=devices, config=pipeline)


@dataclass(frozen=True)
class _Published:
    layout: DataLayout

    def __call__(self, video_id: str) -> bool:
        return self.layout.flow_video_dir(video_id).is_dir()
