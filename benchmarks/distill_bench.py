"""End-to-end distillation speed: `pipeline distill` with cached teacher features against
`--online-teacher`, through the real training loop reading real shards.

train_bench.py times the model step alone on tensors already on the GPU. This benchmark adds
what the cache saves beyond the teacher's forward pass: in online mode every clip also reads and
decodes 32 flow JPEGs and carries a (2, 16, 112, 112) flow tensor to the device; with the cache
it reads a 2048-float feature vector. Steps:

1. a synthetic DATA (loader_bench.make_synthetic: textured 256x256 frames, smooth quantized
   flow, JPEG, packed by the real shards stage);
2. `train-teacher` for one step (the weights do not matter to the timing) and
   `teacher-features` over the training videos (5 crops x 2 flips, stride 8);
3. `distill` for `--steps` steps, then `distill --online-teacher` for as many, each in a fresh
   run folder; the time of each step is taken in the loop's on_step hook and the first
   `--skip` steps (cuDNN autotuning, worker start) are left out.

    python benchmarks/distill_bench.py                       # CUDA: ResNeXt-101, batch 32
    python benchmarks/distill_bench.py --device cpu --arch tiny --batch 4 --steps 6 --skip 2 \\
        --videos 16 --workers 2                               # smoke test on a CPU

Prints steps/s and clips/s of both and the ratio (goal >= 1.3x); --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loader_bench import make_synthetic  # noqa: E402
from pipeline.config import FeatureConfig, load_train_config  # noqa: E402
from pipeline.features import compute_teacher_features  # noqa: E402
from pipeline.train import train_run  # noqa: E402


def timed_run(data: Path, kind: str, options: dict) -> list[float]:
    """Train `kind` with `options`; the wall time of each step as the loop reports it."""
    stamps: list[float] = []
    cfg = load_train_config(kind, options=options)
    t0 = time.perf_counter()
    train_run(data, cfg, progress=False, on_step=lambda epoch, done: stamps.append(
        time.perf_counter()), log=lambda s: None)
    return [b - a for a, b in zip([t0] + stamps, stamps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="101", choices=["101", "50", "tiny"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=8, help="first steps left out of the timing")
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--amp", default="auto", help="TrainConfig.amp of the runs")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student")
    ap.add_argument("--root", type=Path, help="where the synthetic DATA goes [a temp dir]")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="distill_bench_"))
    t = time.perf_counter()
    make_synthetic(root, args.videos, args.frames, 256, os.cpu_count() or 1)
    print(f"synthetic DATA: {args.videos} videos x {args.frames} frames in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    common = dict(arch=args.arch, batch_size=args.batch, workers=args.workers,
                  device=args.device, amp=args.amp, epochs=1)
    t = time.perf_counter()
    timed_run(root, "teacher", dict(common, name="teacher_split1", steps_per_epoch=1))
    spec = FeatureConfig(device=args.device, workers=args.workers, batch_size=args.batch,
                         amp="bf16" if args.device != "cpu" else "off")
    feats = compute_teacher_features(root, spec=spec, progress=False)
    print(f"teacher and features ({feats.report()}) in "
          f"{time.perf_counter() - t:.1f} s", flush=True)

    rows = {}
    for mode, online in (("cached", False), ("online", True)):
        steps = timed_run(root, "distill", dict(common, name=f"distill_{mode}",
                                                steps_per_epoch=args.steps,
                                                online_teacher=online, compile=args.compile))
        kept = steps[args.skip:]
        per_step = statistics.median(kept)
        rows[mode] = {"steps": len(kept), "median_step_s": round(per_step, 4),
                      "mean_step_s": round(statistics.fmean(kept), 4),
                      "clips_per_s": round(args.batch / statistics.fmean(kept), 1)}
        print(f"distill {mode}: {json.dumps(rows[mode])}", flush=True)

    ratio = rows["online"]["mean_step_s"] / rows["cached"]["mean_step_s"]
    summary = {"device": args.device, "arch": args.arch, "batch": args.batch,
               "workers": args.workers, "amp": args.amp, "compile": args.compile,
               "videos": args.videos, **rows, "cached_speedup": round(ratio, 2)}
    print(f"\nIMRS distillation from shards, 3D-ResNeXt-{args.arch}+CE, batch {args.batch}, "
          f"{args.workers} loader workers, {args.device}")
    for mode, r in rows.items():
        print(f"  {mode:<7} {r['mean_step_s'] * 1000:8.1f} ms/step  {r['clips_per_s']:8.1f} "
              f"clips/s")
    print(f"cached features vs online teacher: {ratio:.2f}x faster (goal >= 1.3x)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
