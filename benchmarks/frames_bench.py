"""Frames stage throughput against ffmpeg, per core and with 2 jobs (IMRS section 4.2.1 step).

    python benchmarks/frames_bench.py [--repeat 3] [--long 6 --long-frames 1000] [--profile]

Same videos for both: the real files of /work/shared/data/videos that decode, plus generated
longer UCF101-like clips (320x240 MPEG-4 Part 2 in AVI). The reference is

    ffmpeg -threads 1 -i V -vf scale=256:256 -q:v 2 -threads 1 -filter_threads 1 img_%05d.jpg

one process per core (1 job: one at a time; 2 jobs: two in parallel). The stage runs as users
run it (`pipeline frames` in a child process: index, ledger, atomic publish, one syncfs per
video, 256x256 squash, JPEG quality 95), start-up included (printed on its own at the end).
Throughput is source frames decoded per second for both (ffmpeg's image2 output may duplicate
or drop a frame for timestamp gaps; its file count is printed too). Each figure is the best
of --repeat interleaved runs, files in the page cache (read once before timing). Wall time
gives frames/s and the 2-job scaling, which need idle cores; CPU time (user+sys of the child
processes) gives frames per CPU-second, a per-core comparison a busy machine distorts less.
--profile splits one process's time per frame into decode, resize, JPEG encode, file write,
and the flush (syncfs once per video, or fsync per file).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from preprocess.frames import FramesConfig, flush_to_disk, output_size  # noqa: E402
from preprocess.ledger import Ledger  # noqa: E402
from preprocess.layout import DataLayout, frame_name  # noqa: E402
from preprocess.video import VideoError, VideoReader  # noqa: E402

REAL = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "videos"


def collect_videos(root: Path, n_long: int, long_frames: int) -> list[Path]:
    """Copy the decodable real videos into root/real/ and write the long ones into root/long/."""
    out = []
    for src in sorted(REAL.glob("*.*")):
        if src.suffix == ".json":
            continue
        try:
            with VideoReader(src):
                pass
        except VideoError:
            continue  # the zero-byte and HTML files: nothing to time
        dst = root / "real" / f"{src.stem}_{src.suffix[1:]}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        out.append(dst)
    rng = np.random.default_rng(0)
    for k in range(n_long):
        dst = root / "long" / f"v_long_{k:02d}.avi"
        dst.parent.mkdir(parents=True, exist_ok=True)
        w = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"XVID"), 25, (320, 240))
        scene = cv2.GaussianBlur(rng.integers(0, 256, (480, 960, 3), dtype=np.uint8), (0, 0), 3)
        for t in range(long_frames):  # a panning, slowly brightening textured scene
            x, y = (3 * t) % 640, (t // 2) % 240
            frame = cv2.resize(scene[y:y + 240, x:x + 320], (320, 240))
            w.write(cv2.convertScaleAbs(frame, alpha=1.0, beta=(t % 50) - 25))
        w.release()
        out.append(dst)
    return out


def warm(videos: list[Path]) -> None:
    for v in videos:
        v.read_bytes()


class Timing:
    """Wall seconds and CPU seconds (user+sys of the finished child processes) of a run."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._t, self._ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wall = time.perf_counter() - self._t
        self.cpu = (ru.ru_utime - self._ru.ru_utime) + (ru.ru_stime - self._ru.ru_stime)


def time_stage(videos_root: Path, work: Path, jobs: int) -> tuple[Timing, int]:
    """`pipeline frames` as a user runs it, in a child process (its workers are its children)."""
    data = work / f"DATA_j{jobs}"
    shutil.rmtree(data, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "frames", "--videos", str(videos_root),
           "--data", str(data), "--jobs", str(jobs)]
    with Timing() as t:
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"stage failed on benchmark videos:\n{run.stdout}{run.stderr}")
    frames = sum(r.info["frames"] for r in Ledger(DataLayout(data).ledger_path("frames"))
                 .load().values())
    shutil.rmtree(data)
    return t, frames


def ffmpeg_cmd(video: Path, out: Path) -> list[str]:
    return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1",
            "-i", str(video), "-vf", "scale=256:256", "-q:v", "2", "-threads", "1",
            "-filter_threads", "1", str(out / "img_%05d.jpg")]


def time_ffmpeg(videos: list[Path], work: Path, procs: int) -> tuple[Timing, int]:
    outs = [work / f"ff_{procs}" / f"{i:03d}" for i in range(len(videos))]
    for o in outs:
        shutil.rmtree(o, ignore_errors=True)
        o.mkdir(parents=True)

    def one(i: int) -> int:
        subprocess.run(ffmpeg_cmd(videos[i], outs[i]), check=True)
        return len(os.listdir(outs[i]))

    with Timing() as t, ThreadPoolExecutor(procs) as pool:  # `procs` ffmpeg processes at once
        written = sum(pool.map(one, range(len(videos))))
    shutil.rmtree(work / f"ff_{procs}")
    return t, written


def profile(videos: list[Path], work: Path) -> None:
    """Per-frame milliseconds of each step in one process, the stage's own calls.

    CPU time (this thread) and wall time per step: they differ by waiting (disk, other load).
    """
    config = FramesConfig()
    quality = [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality]
    cv2.setNumThreads(1)
    steps = ("decode", "resize", "encode", "write", "syncfs", "fsync_each")
    cpu, wall = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0.0)

    def clock():
        return time.thread_time(), time.perf_counter()

    def add(step, start):
        c, w = clock()
        cpu[step] += c - start[0]
        wall[step] += w - start[1]
        return c, w

    n = 0
    for v in videos:
        out = Path(tempfile.mkdtemp(dir=work))
        with VideoReader(v) as video:
            it = iter(video)
            while True:
                t = clock()
                frame = next(it, None)
                t = add("decode", t)
                if frame is None:
                    break
                dsize = output_size(frame.shape[1], frame.shape[0], config)
                small = cv2.resize(frame, dsize, interpolation=cv2.INTER_AREA)
                t = add("resize", t)
                jpeg = cv2.imencode(".jpg", small, quality)[1]
                t = add("encode", t)
                n += 1
                with open(out / frame_name(n), "wb") as f:
                    f.write(jpeg)
                add("write", t)
        t = clock()
        flush_to_disk(out)
        add("syncfs", t)
        # The alternative: an fsync per frame file (rewritten first, so they are dirty again).
        for p in out.iterdir():
            p.write_bytes(p.read_bytes())
        t = clock()
        for p in out.iterdir():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        add("fsync_each", t)
        shutil.rmtree(out)
    print(f"\nprofile over {n} frames at 256x256, one process, ms per frame:")
    print(f"  {'step':<12}{'CPU':>8}{'wall':>8}")
    for step in steps:
        print(f"  {step:<12}{1e3 * cpu[step] / n:8.3f}{1e3 * wall[step] / n:8.3f}")
    used = steps[:5]
    print(f"  {'stage sum':<12}{1e3 * sum(cpu[k] for k in used) / n:8.3f}"
          f"{1e3 * sum(wall[k] for k in used) / n:8.3f}   (syncfs once per video; "
          f"fsync_each is the per-file alternative, not in the sum)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--long", type=int, default=6, help="generated long videos")
    ap.add_argument("--long-frames", type=int, default=1000)
    ap.add_argument("--jobs", default="1,2")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder [a temp dir]")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="frames_bench_", dir=args.work))
    try:
        videos_root = work / "videos"
        videos = collect_videos(videos_root, args.long, args.long_frames)
        warm(videos)
        have_ffmpeg = shutil.which("ffmpeg") is not None
        print(f"{len(videos)} videos ({args.long} generated x {args.long_frames} frames), "
              f"{os.cpu_count()} cores, OpenCV {cv2.__version__}")
        if not have_ffmpeg:
            print("ffmpeg NOT FOUND: stage figures only, no ratios "
                  "(apt-get install ffmpeg to compare)")
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        job_counts = [int(j) for j in args.jobs.split(",")]
        stage_runs = {j: [] for j in job_counts}
        ref_runs = {j: [] for j in job_counts}
        for _ in range(args.repeat):  # interleaved, so that other load hits both alike
            for jobs in job_counts:
                stage_runs[jobs].append(time_stage(videos_root, work, jobs))
                if have_ffmpeg:
                    ref_runs[jobs].append(time_ffmpeg(videos, work, jobs))

        def best(runs):
            return min(t.wall for t, _ in runs), min(t.cpu for t, _ in runs), runs[0][1]
        stage = {j: best(r) for j, r in stage_runs.items()}
        ref = {j: best(r) for j, r in ref_runs.items() if r}
        print(f"load average after: {os.getloadavg()[0]:.2f} (figures from wall time need "
              f"idle cores; CPU-time figures hold on a busy machine)")
        print(f"\n{'':<24}{'frames':>7}{'wall s':>8}{'frames/s':>9}{'CPU s':>8}"
              f"{'frames/CPU-s':>13}")
        for jobs, (wall, cpu, n) in stage.items():
            print(f"{f'stage, {jobs} job(s)':<24}{n:>7}{wall:>8.2f}{n / wall:>9.0f}{cpu:>8.2f}"
                  f"{n / cpu:>13.0f}")
            if jobs in ref:
                fwall, fcpu, written = ref[jobs]
                print(f"{f'ffmpeg, {jobs} process(es)':<24}{n:>7}{fwall:>8.2f}{n / fwall:>9.0f}"
                      f"{fcpu:>8.2f}{n / fcpu:>13.0f}   ({written} files written)")
                print(f"    stage/ffmpeg: {fwall / wall:.2f}x by wall time, "
                      f"{fcpu / cpu:.2f}x per CPU second")
        tiny = work / "tiny" / "A"
        tiny.mkdir(parents=True)
        for k in range(2):
            w = cv2.VideoWriter(str(tiny / f"{k}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                                (64, 48))
            w.write(np.zeros((48, 64, 3), np.uint8))
            w.release()
        for jobs in stage:
            runs = [time_stage(tiny.parent, work, jobs)[0] for _ in range(args.repeat)]
            print(f"fixed start-up cost, {jobs} job(s) (2 one-frame videos): "
                  f"{min(r.wall for r in runs):.2f} s wall, {min(r.cpu for r in runs):.2f} s CPU")
        if 1 in stage and 2 in stage:
            print(f"scaling 2 jobs / 1 job (wall): stage {stage[1][0] / stage[2][0]:.2f}x"
                  + (f", ffmpeg {ref[1][0] / ref[2][0]:.2f}x" if ref else ""))
        if args.profile:
            profile(videos, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
