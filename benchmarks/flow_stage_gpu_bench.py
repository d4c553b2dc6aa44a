"""Whole-stage speed of `compute_flow(backend="torch")` on GPUs (issue 8: goal >= 500 pairs/s).

Writes a few hundred short synthetic 256x256 videos (textures moving by a known (dx, dy) per
video, MJPG), runs the real frames stage on them, then times the whole flow stage (JPEG decode,
TV-L1, quantize, JPEG encode, atomic publish, ledger) for each batch size asked, on a fresh DATA
each time; also the bare `tvl1_flow` on one batch, and a check that the stored flow decodes to
the known motion. One call on the device:

    python3 benchmarks/flow_stage_gpu_bench.py --videos 300 --frames 33 --batch-pairs 256 512
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocess.flow import compute_flow, read_gray  # noqa: E402
from preprocess.flow_pipeline import PipelineConfig, default_devices  # noqa: E402
from preprocess.flow_quant import dequantize  # noqa: E402
from preprocess.frames import extract_frames  # noqa: E402
from preprocess.layout import DataLayout, flow_names, frame_name  # noqa: E402


def motion(i: int) -> tuple[int, int]:
    return (i % 7) - 3, (i // 7) % 5 - 2


def write_video(args: tuple[Path, int, int, int]) -> None:
    path, i, n, size = args
    dx, dy = motion(i)
    rng = np.random.default_rng(i)
    pad = 4 + n * 3
    tex = cv2.GaussianBlur(rng.integers(0, 256, (size + 2 * pad, size + 2 * pad, 3),
                                        dtype=np.uint8), (0, 0), 2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (size, size))
    for t in range(n):
        vw.write(tex[pad - t * dy:pad - t * dy + size, pad - t * dx:pad - t * dx + size])
    vw.release()


def make_frames(work: Path, videos: int, frames: int, size: int, jobs: int) -> Path:
    src = work / "videos"
    tasks = [(src / f"C{i % 10}" / f"v_{i:04d}.avi", i, frames, size) for i in range(videos)]
    with ProcessPoolExecutor(jobs) as ex:
        list(ex.map(write_video, tasks, chunksize=8))
    data = work / "frames_only"
    t = time.perf_counter()
    summary = extract_frames(src, data, dataset="folders", size=size, jobs=jobs,
                             progress=False)
    print(f"frames stage: {summary.line()} in {time.perf_counter() - t:.1f} s")
    return data


def fresh_copy(frames_data: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(frames_data, dst, copy_function=os.link)  # frames are only read
    return dst


def bare_batch(frames_data: Path, batch: int, device: str) -> float:
    import torch
    from preprocess.tvl1_torch import tvl1_flow
    layout = DataLayout(frames_data)
    vids = sorted(p.relative_to(layout.frames_dir).as_posix()
                  for p in layout.frames_dir.glob("*/*"))
    gray = []
    for vid in vids:
        d = layout.frames_video_dir(vid)
        gray += [(read_gray(d / frame_name(k)), read_gray(d / frame_name(k + 1)))
                 for k in (1, 2)]
        if len(gray) >= batch:
            break
    prev = torch.from_numpy(np.stack([a for a, _ in gray[:batch]])).to(device).float()
    nxt = torch.from_numpy(np.stack([b for _, b in gray[:batch]])).to(device).float()
    tvl1_flow(prev, nxt)
    torch.cuda.synchronize()
    t = time.perf_counter()
    tvl1_flow(prev, nxt)
    torch.cuda.synchronize()
    return len(prev) / (time.perf_counter() - t)


def check_motion(data: Path, n_videos: int) -> float:
    """Largest error of the median interior flow against the known motion, over some videos."""
    layout = DataLayout(data)
    worst = 0.0
    for i in range(0, n_videos, max(1, n_videos // 20)):
        d = layout.flow_video_dir(f"C{i % 10}/v_{i:04d}")
        fx, fy = (cv2.imread(str(d / n), cv2.IMREAD_GRAYSCALE) for n in flow_names(1))
        m = max(4, fx.shape[0] // 8)
        med = [np.median(dequantize(q)[m:-m, m:-m]) for q in (fx, fy)]
        worst = max(worst, float(np.abs(np.subtract(med, motion(i))).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=300)
    ap.add_argument("--frames", type=int, default=33, help="frames per video (pairs + 1)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-pairs", type=int, nargs="+", default=[256])
    ap.add_argument("--chunk-pairs", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=max(2, (os.cpu_count() or 2) // 2),
                    help="decode/encode threads per device")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")

    import torch
    devices = default_devices()
    print(f"torch {torch.__version__}, devices {devices}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
          + f", {os.cpu_count()} cores")
    try:
        from preprocess import tvl1_triton
        print(f"tvl1_triton available: {tvl1_triton.available()}")
    except ImportError:
        print("tvl1_triton: not present (PyTorch reference path)")
    work = args.work or Path(tempfile.mkdtemp(prefix="flow_gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    frames_data = make_frames(work, args.videos, args.frames, args.size, os.cpu_count() or 2)
    n_pairs = args.videos * (args.frames - 1)

    for batch in args.batch_pairs:
        if devices[0].startswith("cuda"):
            print(f"bare tvl1_flow, one batch of {batch}: "
                  f"{bare_batch(frames_data, batch, devices[0]):.0f} pairs/s")
        data = fresh_copy(frames_data, work / f"data_b{batch}")
        cfg = PipelineConfig(batch_pairs=batch, chunk_pairs=min(args.chunk_pairs, batch))
        t = time.perf_counter()
        summary = compute_flow(data, backend="torch", jobs=args.jobs, progress=False,
                               pipeline=cfg)
        elapsed = time.perf_counter() - t
        print(f"stage, batch {batch}: {summary.line()}; {n_pairs} pairs in {elapsed:.1f} s = "
              f"{n_pairs / elapsed:.0f} pairs/s (goal >= 500); worst median error against the "
              f"known motion {check_motion(data, args.videos):.3f} px")
        if torch.cuda.is_available():
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
            torch.cuda.reset_peak_memory_stats()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
