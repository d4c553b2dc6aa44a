"""Training-step speed of the full 3D-ResNeXt-101+CE (seed 000 Table 1) at batch 32, 16x112x112.

Two questions, on synthetic input tensors already on the device (the model step alone; data
loading is benchmarks/loader_bench.py's subject), through pipeline.train.train_step, the very
step the training loop runs (SGD with momentum and weight decay, cross-entropy or eq. 8):

1. Student/teacher training clips/s in each precision of pipeline/precision.py: strict fp32
   (`--amp off`, the "fp32 eager" baseline), TF32 (PyTorch's default for fp32 convolutions) and
   bf16 autocast, each with the default (channels-first) and the channels_last_3d memory
   format; with --compile, bf16 torch.compile'd too. Goal: bf16 >= 2x fp32 eager.
2. IMRS distillation step time with cached teacher features (a (32, 2048) target tensor)
   against --online-teacher (the frozen flow ResNeXt-101+CE run on a (32, 2, 16, 112, 112) flow
   batch under no_grad each step), in training's default path (bf16, its memory-format rule)
   and compiled. Goal: cached >= 1.3x faster. benchmarks/distill_bench.py times the same
   through the real loop reading shards.

    python benchmarks/train_bench.py --compile           # CUDA (one H200): the figures
    python benchmarks/train_bench.py --device cpu --arch tiny --batch 4 --steps 2   # smoke test

Prints a table and writes JSON (--out). Timings: `--warmup` untimed steps (cuDNN autotuning),
then `--steps` timed steps between device synchronisations; the median of `--repeats` runs.

Measured on one H200 (torch 2.11, cuDNN autotuned, 2026-11-21), clips/s at batch 32, ncdhw /
channels_last_3d: strict fp32 209 / 198; TF32 542 / 656; bf16 679 / 737; bf16 compiled
984 / 1095. bf16 eager is 3.53x strict fp32 (compiled 5.25x) and 1.12x the best TF32 (1.67x).
Before models/grouped_conv.py, bf16 ran at 566 / 551 (compiled 767): cuDNN's bf16 forward for
ResNeXt-101's three 4-channels-per-group convolutions took 3.7 ms each. Distillation step,
cached vs online teacher: 1.33x in bf16 channels_last_3d eager, 1.49x compiled.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_train_config  # noqa: E402
from pipeline.precision import apply_precision  # noqa: E402
from pipeline.train import (FeaturesAndLogits, Task, _use_channels_last, build_model,  # noqa: E402
                            cross_entropy_loss, eq8_loss, online_teacher, set_deterministic,
                            train_step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(kind: str, n: int, classes: int, device, channels_last: bool, dim: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    batch = {"label": torch.randint(0, classes, (n,), generator=g).to(device),
             "rgb": torch.randn(n, 3, 16, 112, 112, generator=g).to(device)
             .contiguous(memory_format=fmt)}
    if kind == "online":
        batch["flow"] = torch.randn(n, 2, 16, 112, 112, generator=g).to(device) \
            .contiguous(memory_format=fmt)
    if kind == "cached":
        batch["teacher_features"] = torch.randn(n, dim, generator=g).to(device)
    return batch


def time_steps(kind: str, args, device: torch.device, amp: str, channels_last: bool,
               compile_model: bool = False, profile: bool = False) -> dict:
    """clips/s and ms/step of `kind` ("ce", "cached", "online") in one configuration.

    `amp` is TrainConfig.amp: "off" (strict fp32), "tf32" or "bf16" (pipeline/precision.py).
    """
    cfg = load_train_config("distill" if kind != "ce" else "rgb",
                            options={"arch": args.arch, "batch_size": args.batch, "amp": amp})
    bf16 = apply_precision(amp, device)
    torch.manual_seed(0)
    student = build_model(cfg, args.classes).to(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    student = student.to(memory_format=fmt)
    prepare = None
    if kind == "online":
        tcfg = load_train_config("teacher", options={"arch": args.arch})
        prepare = online_teacher(build_model(tcfg, args.classes), amp=amp)
    loss = cross_entropy_loss if kind == "ce" else eq8_loss(cfg)
    net = FeaturesAndLogits(student)
    task = Task(torch.compile(net) if compile_model else net, None, None, loss, "rgb", prepare)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    batch = _batch(kind, args.batch, args.classes, device, channels_last, student.num_features)
    for _ in range(args.warmup):
        train_step(task.model, task, dict(batch), opt, bf16)
    runs = []
    for _ in range(args.repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            train_step(task.model, task, dict(batch), opt, bf16)
        _sync(device)
        runs.append((time.perf_counter() - t) / args.steps)
    step = statistics.median(runs)
    if profile:  # where a step's GPU time goes
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                train_step(task.model, task, dict(batch), opt, bf16)
            _sync(device)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14,
                                        max_name_column_width=70), flush=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    del task, opt, student, batch, prepare
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"kind": kind, "amp": {"off": "fp32"}.get(amp, amp),
            "format": ("channels_last_3d" if channels_last else "ncdhw")
            + ("+compile" if compile_model else ""),
            "ms_per_step": round(1000 * step, 2), "clips_per_s": round(args.batch / step, 1),
            "peak_gib": round(peak, 2), "runs_ms": [round(1000 * r, 2) for r in runs]}


def _best(rows: list[dict], amp: str, compiled: bool) -> dict:
    return max((r for r in rows if r["amp"] == amp and r["format"].endswith("+compile")
                == compiled), key=lambda r: r["clips_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="101", choices=["101", "50", "tiny"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=101)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--compile", action="store_true",
                    help="Also time torch.compile'd bf16 steps (training's --compile).")
    ap.add_argument("--profile", action="store_true",
                    help="Print the top GPU kernels of a bf16 step.")
    args = ap.parse_args()
    device = torch.device(args.device)
    set_deterministic(False, device)  # cudnn.benchmark on CUDA, as training runs
    cuda = device.type == "cuda"
    rows = []
    for amp in ("off", "tf32", "bf16") if cuda else ("off",):
        for cl in (False, True):
            rows.append(time_steps("ce", args, device, amp, cl))
            print(json.dumps(rows[-1]), flush=True)
    if cuda and args.compile:
        for cl in (False, True):
            rows.append(time_steps("ce", args, device, "bf16", cl, compile_model=True))
            print(json.dumps(rows[-1]), flush=True)
    if cuda and args.profile:
        time_steps("ce", args, device, "bf16", False, profile=True)

    # distillation in training's default path (bf16 eager on CUDA, its memory-format rule),
    # and compiled when timed
    default_amp = "bf16" if cuda else "off"
    default_cl = _use_channels_last(load_train_config("distill", options={"amp": default_amp}),
                                    device)
    setups = [(default_amp, default_cl, False)]
    if cuda and args.compile:
        best_c = _best(rows, "bf16", True)
        setups.append(("bf16", best_c["format"].startswith("channels_last_3d"), True))
    distill = []
    for amp, cl, comp in setups:
        pair = [time_steps(k, args, device, amp, cl, compile_model=comp)
                for k in ("cached", "online")]
        for r in pair:
            print(json.dumps(r), flush=True)
        distill.append({"setup": f"{pair[0]['amp']} {pair[0]['format']}",
                        "cached_ms": pair[0]["ms_per_step"], "online_ms": pair[1]["ms_per_step"],
                        "speedup": round(pair[1]["ms_per_step"] / pair[0]["ms_per_step"], 2)})

    fp32 = _best(rows, "fp32", False)
    ratios = {}
    if cuda:
        tf32 = _best(rows, "tf32", False)
        for label, r in [("bf16 eager", _best(rows, "bf16", False))] + (
                [("bf16 compiled", _best(rows, "bf16", True))] if args.compile else []):
            ratios[label] = {"clips_per_s": r["clips_per_s"], "format": r["format"],
                             "vs_fp32": round(r["clips_per_s"] / fp32["clips_per_s"], 2),
                             "vs_tf32": round(r["clips_per_s"] / tf32["clips_per_s"], 2)}
    summary = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "torch": torch.__version__, "arch": args.arch, "batch": args.batch,
               "train_rows": rows, "bf16_speedups": ratios, "distill": distill}
    print(f"\n3D-ResNeXt-{args.arch}+CE, batch {args.batch}, 16x112x112, {summary['device']}")
    print(f"{'step':<10}{'precision':<11}{'format':<26}{'ms/step':>9}{'clips/s':>9}{'GiB':>7}")
    for r in rows:
        print(f"{r['kind']:<10}{r['amp']:<11}{r['format']:<26}{r['ms_per_step']:>9}"
              f"{r['clips_per_s']:>9}{r['peak_gib']:>7}")
    if cuda:
        print(f"fp32 eager (strict, the baseline): {fp32['clips_per_s']} clips/s "
              f"({fp32['format']}); tf32 eager: {tf32['clips_per_s']} ({tf32['format']})")
    for label, r in ratios.items():
        print(f"{label} ({r['format']}): {r['clips_per_s']} clips/s = {r['vs_fp32']}x fp32 eager "
              f"(goal >= 2x), {r['vs_tf32']}x tf32 eager")
    for d in distill:
        print(f"distillation step, {d['setup']}: cached features {d['cached_ms']} ms, online "
              f"teacher {d['online_ms']} ms: {d['speedup']}x faster (goal >= 1.3x)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
