"""Loader throughput: clips/s from HDF5 shards against the same clips from per-file JPEG folders.

CPU mode (default): ClipDataset over DATA/shards against the same sampling reading
DATA/frames/<video>/img_*.jpg and DATA/flow/<video>/flow_[xy]_*.jpg one file each, with the same
DataLoader workers, the same OpenCV decode and the same crop/flip/normalise. Two passes each:
"cold" (every file of DATA first evicted from the page cache with posix_fadvise(DONTNEED) after
a sync, since dropping all caches needs privileges a container lacks: the reads then go to the
disk, or to whatever cache the hypervisor keeps below it) and "warm" (the same clips again). An
I/O-only pass (bytes read, no decode) shows what the shards change.

GPU mode (--gpu): JpegClipDataset workers read bytes only; the main process decodes each batch
with nvjpeg (torchvision.io.decode_jpeg on a list, device="cuda") and crops, flips and
normalises on the GPU (decode_clip_batch). Reports nvjpeg's bare images/s, loader clips/s for
16x112x112 RGB and for RGB+flow, the CPU-decode loader on the same machine, and the largest
difference between GPU and CPU decoded clips.

Without --data a synthetic DATA is generated first: textured 256x256 RGB frames translating a
few px per frame and smooth quantized flow fields, written as JPEG (quality 95) into the frames
and flow layout with done ledgers, then packed by the real shards stage. It stands in for the
frames and flow stages, whose cost is not what is measured here.

    python benchmarks/loader_bench.py                         # CPU, synthetic DATA
    python benchmarks/loader_bench.py --data data/demo        # CPU, an existing DATA
    python benchmarks/loader_bench.py --gpu --videos 240      # GPU (one H200)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.datasets import (ClipDataset, JpegClipDataset, ShardVideo,  # noqa: E402
                               collate_jpeg_clips, decode_clip_batch, read_jpegs)
from pipeline.jpeg import GRAY, RGB, decode_cpu, gpu_decode_available  # noqa: E402
from preprocess.dataset_index import DatasetIndex, VideoEntry  # noqa: E402
from preprocess.layout import DataLayout, flow_names, frame_name  # noqa: E402
from preprocess.ledger import DONE, Ledger, Record  # noqa: E402
from preprocess.shards import build_shards  # noqa: E402


# --- synthetic DATA ---------------------------------------------------------------------------

def _synthetic_video(args) -> None:
    root, vid, n, size, seed = args
    layout = DataLayout(root)
    rng = np.random.default_rng(seed)
    tex = cv2.GaussianBlur(rng.integers(0, 256, (size, 2 * size, 3), dtype=np.uint8), (0, 0), 2)
    tex = cv2.addWeighted(tex, 2.0, np.full_like(tex, 128), -1.0, 0)   # restore contrast
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    fdir, odir = layout.frames_video_dir(vid), layout.flow_video_dir(vid)
    fdir.mkdir(parents=True, exist_ok=True)
    odir.mkdir(parents=True, exist_ok=True)
    q95 = [cv2.IMWRITE_JPEG_QUALITY, 95]
    dx = int(rng.integers(1, 6))
    for k in range(1, n + 1):
        frame = np.ascontiguousarray(np.roll(tex, k * dx, axis=1)[:, :size])
        cv2.imwrite(str(fdir / frame_name(k)), frame, q95)
        if k < n:
            phase = rng.uniform(0, 6.28, 2)
            fx = dx + 2 * np.sin(6 * xx + phase[0]) + rng.normal(0, 0.3, xx.shape)
            fy = 1.5 * np.cos(5 * yy + phase[1]) + rng.normal(0, 0.3, xx.shape)
            for name, f in zip(flow_names(k), (fx, fy)):
                q = np.rint((np.clip(f, -20, 20) + 20) * 255 / 40).astype(np.uint8)
                cv2.imwrite(str(odir / name), q, q95)


def make_synthetic(root: Path, videos: int, frames: int, size: int, jobs: int) -> Path:
    """A DATA with frames, flow, index, done ledgers, and shards built by the real stage."""
    from joblib import Parallel, delayed
    layout = DataLayout(root)
    entries = [VideoEntry(f"C{i % 8}/v_{i:05d}", f"C{i % 8}", i % 8, f"C{i % 8}/v_{i:05d}.avi",
                          (1 + i % 2, 1, 2)) for i in range(videos)]
    Parallel(n_jobs=jobs)(delayed(_synthetic_video)((str(root), e.video_id, frames, size, i))
                          for i, e in enumerate(entries))
    layout.meta_dir.mkdir(parents=True, exist_ok=True)
    DatasetIndex("folders", str(root / "videos"), tuple(f"C{c}" for c in range(8)),
                 tuple(entries), ()).save(layout.index_path)
    Ledger(layout.ledger_path("frames")).append(
        [Record(e.video_id, DONE, "", {"frames": frames}) for e in entries])
    Ledger(layout.ledger_path("flow")).append(
        [Record(e.video_id, DONE, "", {"frames": frames, "flows": frames - 1}) for e in entries])
    summary = build_shards(root, shard_bytes=64 << 20, jobs=jobs, progress=False)
    if not summary.ok:
        raise RuntimeError(summary.report())
    return root


# --- the per-file baseline --------------------------------------------------------------------

class FolderClipDataset(ClipDataset):
    """ClipDataset's sampling and transforms, reading one JPEG file per frame or flow image."""

    def read(self, video: ShardVideo, modality: str, indices) -> np.ndarray:
        layout = DataLayout(self.data)
        if modality == "rgb":
            folder = layout.frames_video_dir(video.video_id)
            return decode_cpu([_read_file(folder / frame_name(i + 1)) for i in indices], RGB)
        folder = layout.flow_video_dir(video.video_id)
        g = decode_cpu([_read_file(folder / n) for i in indices for n in flow_names(i + 1)],
                       GRAY)[..., 0]
        return g.reshape(len(indices), 2, *g.shape[1:]).transpose(0, 2, 3, 1)


def _read_file(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8)


class BytesOnly(torch.utils.data.Dataset):
    """I/O only: the clip's JPEG bytes from the shards or from the files, not decoded."""

    def __init__(self, clips: ClipDataset, files: bool):
        self.clips, self.files = clips, files

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        start, _ = self.clips.draw(i)
        v = self.clips.videos[i]
        idx = range(start, start + min(self.clips.clip_len, v.n_flows))
        n = 0
        for m in self.clips.modalities:
            if not self.files:
                n += sum(len(j) for j in read_jpegs(v, m, idx))
                continue
            layout = DataLayout(self.clips.data)
            for k in idx:
                if m == "rgb":
                    n += len(_read_file(layout.frames_video_dir(v.video_id) / frame_name(k + 1)))
                else:
                    for name in flow_names(k + 1):
                        n += len(_read_file(layout.flow_video_dir(v.video_id) / name))
        return n


# --- measuring --------------------------------------------------------------------------------

def evict(root: Path) -> int:
    """Drop DATA's files from the page cache (sync, then POSIX_FADV_DONTNEED on each)."""
    os.sync()
    n = 0
    for sub in ("frames", "flow", "shards"):
        for dirpath, _, files in os.walk(root / sub):
            for name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                n += 1
    return n


def clips_per_s(ds, *, clips: int, workers: int, batch: int, seed: int, collate=None,
                on_batch=None) -> float:
    """Clips/s over `clips` random clips, timed from the first batch (worker start excluded)."""
    clips = max(clips, 4 * batch)              # the first batch is not timed
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, replacement=True, num_samples=clips, generator=gen)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                        collate_fn=collate, prefetch_factor=4 if workers else None,
                        worker_init_fn=_one_thread)
    it = iter(loader)
    first = next(it)
    if on_batch:
        on_batch(first)
    t0, n = time.perf_counter(), 0
    for b in it:
        if on_batch:
            on_batch(b)
        n += _batch_len(b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _batch_len(b) -> int:
    if isinstance(b, dict):
        return len(b["label"])
    return len(b)


def _one_thread(_):
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def cpu_bench(data: Path, a) -> dict:
    mods = tuple(a.modalities.split(","))
    shards = ClipDataset(data, subset="all", modalities=mods, clip_len=a.clip_len, crop=a.crop)
    folders = FolderClipDataset(data, subset="all", modalities=mods, clip_len=a.clip_len,
                                crop=a.crop)
    run = dict(clips=a.clips, workers=a.workers, batch=a.batch, seed=a.seed)
    res = {"videos": len(shards.videos), "workers": a.workers, "batch": a.batch,
           "clips": a.clips, "modalities": list(mods)}
    for name, ds in (("folders", folders), ("shards", shards)):
        evict(data)
        res[f"{name}_cold"] = clips_per_s(ds, **run)
        res[f"{name}_warm"] = clips_per_s(ds, **run)
    for name, files in (("folders", True), ("shards", False)):
        evict(data)
        res[f"{name}_io_cold"] = clips_per_s(BytesOnly(shards, files), **run)
        res[f"{name}_io_warm"] = clips_per_s(BytesOnly(shards, files), **run)
    for k in ("cold", "warm", "io_cold", "io_warm"):
        res[f"ratio_{k}"] = res[f"shards_{k}"] / res[f"folders_{k}"]
    return res


def gpu_bench(data: Path, a) -> dict:
    if not gpu_decode_available():
        raise SystemExit("--gpu needs CUDA and torchvision (torchvision.io.decode_jpeg)")
    from torchvision.io import ImageReadMode, decode_jpeg
    res = {"device": torch.cuda.get_device_name(), "workers": a.workers, "clips": a.clips,
           "cpus": os.cpu_count()}
    rgb_only = JpegClipDataset(data, subset="all", modalities=("rgb",), clip_len=a.clip_len,
                               crop=a.crop)
    both = JpegClipDataset(data, subset="all", clip_len=a.clip_len, crop=a.crop)
    res["videos"] = len(rgb_only.videos)
    sample = collate_jpeg_clips([both[i % len(both)] for i in range(128)])
    res["rgb_jpeg_bytes_mean"] = float(sample["rgb_sizes"].float().mean())
    res["flow_jpeg_bytes_mean"] = float(sample["flow_sizes"].float().mean())
    for m, mode in (("rgb", ImageReadMode.RGB), ("flow", ImageReadMode.GRAY)):
        bufs = list(torch.split(sample[f"{m}_jpeg"], sample[f"{m}_sizes"].tolist()))
        for n in (256, 1024, 2048):
            batch = (bufs * (n // len(bufs) + 1))[:n]
            for _ in range(2):
                decode_jpeg(batch, mode=mode, device="cuda")
            torch.cuda.synchronize()
            t0, reps = time.perf_counter(), max(2, 8192 // n)
            for _ in range(reps):
                decode_jpeg(batch, mode=mode, device="cuda")
            torch.cuda.synchronize()
            res[f"nvjpeg_{m}_images_per_s_batch{n}"] = reps * n / (time.perf_counter() - t0)
    print(json.dumps(res, indent=1), flush=True)

    def gpu_step(batch):
        decode_clip_batch(batch, crop=a.crop, device="cuda")

    for b in (32, 64, 128):
        run = dict(clips=a.clips, workers=a.workers, batch=b, seed=a.seed)
        res[f"gpu_rgb_clips_per_s_batch{b}"] = clips_per_s(
            rgb_only, collate=collate_jpeg_clips, on_batch=gpu_step, **run)
        print(f"gpu rgb batch {b}: {res[f'gpu_rgb_clips_per_s_batch{b}']:.0f} clips/s", flush=True)
    run = dict(clips=a.clips, workers=a.workers, batch=64, seed=a.seed)
    res["gpu_rgb_flow_clips_per_s_batch64"] = clips_per_s(
        both, collate=collate_jpeg_clips, on_batch=gpu_step, **run)
    cpu_rgb = ClipDataset(data, subset="all", modalities=("rgb",), clip_len=a.clip_len,
                          crop=a.crop)
    res["cpu_decode_rgb_clips_per_s_batch64"] = clips_per_s(cpu_rgb, **run)
    cpu_both = ClipDataset(data, subset="all", clip_len=a.clip_len, crop=a.crop)
    res["cpu_decode_rgb_flow_clips_per_s_batch64"] = clips_per_s(cpu_both, **run)
    torch.manual_seed(0)
    batch = collate_jpeg_clips([both[i] for i in range(min(32, len(both)))])
    cpu = decode_clip_batch(batch, crop=a.crop)
    gpu = decode_clip_batch(batch, crop=a.crop, device="cuda")
    for m in ("rgb", "flow"):
        d = (gpu[m].cpu() - cpu[m]).abs()
        res[f"gpu_vs_cpu_{m}_max_abs"] = float(d.max())
        res[f"gpu_vs_cpu_{m}_mean_abs"] = float(d.mean())
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="an existing DATA with frames, flow and shards")
    p.add_argument("--gpu", action="store_true", help="GPU decode mode (CUDA + torchvision)")
    p.add_argument("--videos", type=int, default=48, help="synthetic videos")
    p.add_argument("--frames", type=int, default=40, help="frames per synthetic video")
    p.add_argument("--size", type=int, default=256, help="synthetic frame size")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="generation workers")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--clips", type=int, default=400, help="clips timed per measurement")
    p.add_argument("--clip-len", type=int, default=16)
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--modalities", default="rgb,flow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        data = a.data
        if data is None:
            t0 = time.perf_counter()
            data = make_synthetic(Path(tmp) / "data", a.videos, a.frames, a.size, a.jobs)
            print(f"synthetic DATA: {a.videos} videos x {a.frames} frames at {a.size}px in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        res = gpu_bench(data, a) if a.gpu else cpu_bench(data, a)
    for k, v in res.items():
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
