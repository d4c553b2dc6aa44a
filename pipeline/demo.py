"""`pipeline demo`: the whole chain on the generated demo dataset, on a 2-core CPU in minutes.

videos (preprocess.demo_data) -> frames -> TV-L1 flow (OpenCV, CPU) -> shards -> flow teacher
(tiny 3D-ResNeXt+CE, seed 000 eq. 7) -> teacher features -> IMRS student (eq. 8) -> RGB-only
baseline (same budget as the student) -> MAT-EffNet spatial and temporal (seed 004) -> evaluate.

Each step is the function its CLI command calls, and each is resumable (stages by their
ledgers, runs by their checkpoints), so rerunning the demo after a crash redoes only what is
unfinished. The demo's sizes and schedules are `DemoConfig` (overridable by a TOML file with
top-level keys and one table per run: [teacher], [rgb], [distill], [spatial], [temporal]): the
demo videos differ only in motion, 6 classes, 24 training and 12 test videos in split 1, 14
frames each, so clips are 8 frames. Frames are the stage default 256x256, so `make frames flow
shards` and `make demo` share their work; TV-L1 on the CPU is most of the demo's time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from preprocess.layout import DataLayout
from .config import FeatureConfig, TrainConfig, apply_overrides, load_train_config, read_toml


@dataclass(frozen=True)
class DemoRun:
    """The schedule of one demo training run (everything else: the kind's defaults)."""
    epochs: int
    batch_size: int
    lr: float
    patience: int = 10    # ReduceLROnPlateau, in epochs (an epoch here is a few steps)


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    classes: tuple[str, ...] = ()  # () = all of preprocess.demo_data's classes
    videos_per_class: int = 6
    frames: int = 14
    frame_size: int = 256          # the frames stage's default, so `make frames` is shared
    flow_backend: str = "opencv"   # the CPU reference TV-L1
    clip_len: int = 8              # the videos have 13 flows
    crop: int = 112
    mat_crop: int = 112            # MAT-EffNet crops (224 in seed 004): a CPU budget
    segments: int = 2              # MAT-EffNet L
    stride: int = 4                # teacher-feature windows: starts 0 and 4
    workers: int = 1
    # Tuned on a 2-core CPU (an epoch is 3 steps of 8 clips, well under a second): the teacher
    # reaches 100% on the 12 test videos; the RGB runs share one budget; MAT-EffNet from
    # scratch needs more steps than its paper's fine-tuning lr of 1e-2 gives.
    teacher: DemoRun = DemoRun(epochs=30, batch_size=8, lr=0.05)
    distill: DemoRun = DemoRun(epochs=40, batch_size=8, lr=0.05, patience=20)
    rgb: DemoRun = DemoRun(epochs=40, batch_size=8, lr=0.05, patience=20)  # the student's
    spatial: DemoRun = DemoRun(epochs=20, batch_size=8, lr=0.05, patience=20)
    temporal: DemoRun = DemoRun(epochs=60, batch_size=8, lr=0.05, patience=30)

    def train_config(self, kind: str) -> TrainConfig:
        run: DemoRun = getattr(self, kind)
        opts = dict(arch="tiny", epochs=run.epochs, batch_size=run.batch_size, lr=run.lr,
                    plateau_patience=run.patience, workers=self.workers, seed=self.seed,
                    checkpoint_every=10)
        if kind in ("spatial", "temporal"):
            opts.update(crop=self.mat_crop, segments=self.segments)
        else:
            opts.update(clip_len=self.clip_len, crop=self.crop)
        return load_train_config(kind, options=opts)

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(stride=self.stride, workers=self.workers)


RUN_KINDS = ("teacher", "distill", "rgb", "spatial", "temporal")


def load_demo_config(path: Path | None) -> DemoConfig:
    """DemoConfig with a TOML file's overrides: top-level keys, and a table per run."""
    cfg = DemoConfig()
    if path is None:
        return cfg
    data = read_toml(path)
    tables = {k: data.pop(k) for k in list(data) if k in RUN_KINDS}
    cfg = apply_overrides(cfg, data, str(path))
    for kind, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [{kind}] must be a table")
        cfg = replace(cfg, **{kind: apply_overrides(getattr(cfg, kind), table,
                                                    f"{path} [{kind}]")})
    return cfg


class DemoFailed(RuntimeError):
    """A stage of the demo left videos failed; the message names them."""


def _stage(summary, log) -> None:
    log(summary.report())
    if not summary.ok:
        raise DemoFailed(f"{summary.stage} failed for {len(summary.failed)} videos; rerun the "
                         f"demo to retry them")


def run_demo(data: Path, videos: Path, *, jobs: int = 2, cfg: DemoConfig = DemoConfig(),
             progress: bool = True, log: Callable[[str], None] = print):
    """Run (or resume) every step; return the evaluation rows."""
    from preprocess.demo_data import generate_demo_dataset
    from preprocess.flow import compute_flow
    from preprocess.frames import extract_frames
    from preprocess.shards import build_shards
    from .evaluate import EvalConfig, evaluate
    from .features import compute_teacher_features
    from .train import train_run

    data, videos = Path(data), Path(videos)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def step(name: str, fn) -> object:
        log(f"== demo: {name}")
        t = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t
        return out

    extra = {"classes": cfg.classes} if cfg.classes else {}
    step("demo videos", lambda: log(str(generate_demo_dataset(
        videos, seed=cfg.seed, videos_per_class=cfg.videos_per_class, frames=cfg.frames,
        **extra))))
    step("frames", lambda: _stage(extract_frames(
        videos, data, dataset="ucf101", splits=videos / "splits", jobs=jobs,
        size=cfg.frame_size, progress=progress), log))
    step("flow", lambda: _stage(compute_flow(data, backend=cfg.flow_backend, jobs=jobs,
                                             progress=progress), log))
    step("shards", lambda: _stage(build_shards(data, jobs=jobs, progress=progress), log))
    teacher = cfg.train_config("teacher")
    step("train-teacher", lambda: train_run(data, teacher, progress=progress, log=log))
    spec = cfg.feature_config()
    step("teacher-features", lambda: _stage(compute_teacher_features(
        data, teacher=teacher.name, spec=spec, progress=progress), log))
    for kind in ("distill", "rgb", "spatial", "temporal"):
        run_cfg = cfg.train_config(kind)
        step(f"train {kind}", lambda c=run_cfg: train_run(data, c, feature_spec=spec,
                                                          progress=progress, log=log))
    rows = step("evaluate", lambda: evaluate(
        data, runs=[cfg.train_config(k).name for k in RUN_KINDS],
        cfg=EvalConfig(workers=cfg.workers, progress=progress), log=lambda s: None))
    log("\n".join(f"  {name}: {sec:.1f} s" for name, sec in times.items()))
    log(f"demo finished in {time.perf_counter() - t0:.0f} s; results in "
        f"{DataLayout(data).runs_dir / 'results.md'}\n")
    from .evaluate import results_markdown
    log(results_markdown(rows))
    acc = {r.runs: r.top1 for r in rows if len(r.runs) == 1}
    imrs, rgb = acc[(cfg.train_config("distill").name,)], acc[(cfg.train_config("rgb").name,)]
    chance = 100 / rows[0].scores.probs.shape[1]
    if 100 * max(imrs, rgb) <= chance:
        verdict = "neither IMRS (distilled) nor RGB-only is above chance"
    else:
        verdict = f"IMRS (distilled) {'beats' if imrs > rgb else 'does not beat'} RGB-only"
    log(f"{verdict}: {100 * imrs:.1f}% vs {100 * rgb:.1f}% top-1 on {rows[0].videos} test "
        f"videos (chance {chance:.1f}%)")
    return rows
