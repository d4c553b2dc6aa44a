"""Video-level evaluation, late fusion, the results table and its figures.

Protocol (seed 000 section 4.2.2 tests with batch 1 on whole videos; Hara et al. 2018 average
the clip scores of every non-overlapping 16-frame centre-cropped clip of a video): a video's
score is the mean softmax over its clips; top-1 and top-5 accuracy are over the test videos of
a split. MAT-EffNet scores one L-segment sample per video (seed 004 section 4.2). Fusions average
the softmax scores of two models (seed 004 section 3.3: spatial + temporal; seed 000's IMRS can
likewise be fused with the flow teacher).

Outputs: DATA/runs/<run>/scores_split<k>.npz (video scores, recomputed when the run's model.pt
changes), DATA/runs/results.md and results.csv, DATA/runs/confusion/<row>.png and
DATA/runs/training_curves.png.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from preprocess.atomic import TMP_PREFIX, write_bytes_atomic, write_text_atomic
from preprocess.layout import DataLayout
from preprocess.ledger import StageLock
from .plots import Panel, charts_image, confusion_matrix_image, write_png
from .precision import apply_precision, autocast
from .train import RunPaths, file_sha256, read_log, run_config

# How each kind of run is named in the results table.
DISPLAY = {"teacher": "Flow teacher (3D-ResNeXt+CE)", "rgb": "RGB-only (3D-ResNeXt+CE)",
           "distill": "IMRS (distilled RGB)", "spatial": "MAT-EffNet spatial",
           "temporal": "MAT-EffNet temporal"}
# Default fusions, by kind, when a split has exactly one run of each.
DEFAULT_FUSIONS = (("spatial", "temporal", "MAT-EffNet fused (spatial+temporal)"),
                   ("distill", "teacher", "IMRS + flow teacher"))


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 8
    workers: int = 2
    device: str = "auto"
    amp: str = "auto"          # auto (bf16 on CUDA) | bf16 | tf32 | off: pipeline/precision.py
    progress: bool = True


@dataclass
class VideoScores:
    """Per-video mean softmax scores of one model (or fusion) on one split's test videos."""
    videos: np.ndarray        # (V,) int: positions in the dataset index
    labels: np.ndarray        # (V,) int
    probs: np.ndarray         # (V, K) float32
    clips: np.ndarray         # (V,) int: clips averaged per video

    def save(self, path: Path, fingerprint: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, videos=self.videos, labels=self.labels, probs=self.probs,
                 clips=self.clips, fingerprint=np.array(fingerprint))
        write_bytes_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> "VideoScores | None":
        if not Path(path).exists():
            return None
        with np.load(path) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return cls(z["videos"], z["labels"], z["probs"], z["clips"])


def aggregate(video: np.ndarray, label: np.ndarray, probs: np.ndarray) -> VideoScores:
    """Clip rows (video index, label, softmax) -> one mean-softmax row per video, sorted."""
    video, label, probs = np.asarray(video), np.asarray(label), np.asarray(probs, np.float64)
    ids, inverse, counts = np.unique(video, return_inverse=True, return_counts=True)
    sums = np.zeros((len(ids), probs.shape[1]))
    np.add.at(sums, inverse, probs)
    labels = np.zeros(len(ids), np.int64)
    labels[inverse] = label
    return VideoScores(ids.astype(np.int64), labels, (sums / counts[:, None]).astype(np.float32),
                       counts.astype(np.int64))


def fuse(*scores: VideoScores) -> VideoScores:
    """Late average fusion: the mean of the models' video softmax scores (same videos)."""
    first = scores[0]
    for s in scores[1:]:
        if not np.array_equal(s.videos, first.videos) or not np.array_equal(s.labels,
                                                                             first.labels):
            raise ValueError("cannot fuse scores over different test videos")
    probs = np.mean([s.probs for s in scores], axis=0).astype(np.float32)
    return VideoScores(first.videos, first.labels, probs, first.clips)


def topk_accuracy(scores: VideoScores, k: int) -> float:
    k = min(k, scores.probs.shape[1])
    top = np.argsort(-scores.probs, axis=1, kind="stable")[:, :k]
    return float((top == scores.labels[:, None]).any(axis=1).mean()) if len(top) else 0.0


def confusion_matrix(scores: VideoScores, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (scores.labels, scores.probs.argmax(axis=1)), 1)
    return m


# ----------------------------------------------------------------------------- scoring runs

@torch.no_grad()
def score_run(data: Path, run: str, *, split: int | None = None,
              cfg: EvalConfig = EvalConfig()) -> VideoScores:
    """The run's video scores on its split's test videos, cached beside its model.pt."""
    from .train import build_eval_dataset, load_trained, resolve_device, DistInfo
    layout = DataLayout(data)
    paths = RunPaths(layout.run_dir(run))
    if not paths.model.exists():
        raise FileNotFoundError(f"run {run}: {paths.model} does not exist (train it first)")
    train_cfg = run_config(paths.dir)
    split = split or train_cfg.split
    fingerprint = f"{file_sha256(paths.model)}/split{split}"
    cache = paths.dir / f"scores_split{split}.npz"
    cached = VideoScores.load(cache, fingerprint)
    if cached is not None:
        return cached
    _clean_temps_here(paths.dir)  # a finished run's folder: only a killed score write's debris
    device = resolve_device(cfg.device, DistInfo())
    model, train_cfg = load_trained(paths.dir, device)
    dataset = build_eval_dataset(layout, train_cfg, split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size,
                                         num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda")
    amp = apply_precision(cfg.amp, device)
    key = train_cfg.modality
    rows_v, rows_l, rows_p = [], [], []
    from tqdm import tqdm
    for batch in tqdm(loader, desc=f"evaluate {run}", unit="batch", disable=not cfg.progress,
                      leave=False):
        x = batch[key].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        rows_p.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        rows_v.append(batch["video"].numpy())
        rows_l.append(batch["label"].numpy())
    if not rows_p:
        raise ValueError(f"run {run}: split {split} has no test videos in {data}")
    scores = aggregate(np.concatenate(rows_v), np.concatenate(rows_l), np.concatenate(rows_p))
    scores.save(cache, fingerprint)
    return scores


# ----------------------------------------------------------------------------- the report

@dataclass
class ResultRow:
    model: str
    runs: tuple[str, ...]
    split: int
    top1: float
    top5: float
    videos: int
    scores: VideoScores

    @property
    def slug(self) -> str:
        name = "+".join(self.runs)
        return name if name.endswith(f"split{self.split}") else f"{name}_split{self.split}"


def find_runs(layout: DataLayout) -> list[str]:
    """Completed runs under DATA/runs (those with a model.pt), sorted by name."""
    if not layout.runs_dir.exists():
        return []
    return sorted(p.name for p in layout.runs_dir.iterdir()
                  if p.is_dir() and RunPaths(p).model.exists() and RunPaths(p).config.exists())


def default_fusions(layout: DataLayout, runs: Sequence[str]) -> list[tuple[str, str, str]]:
    """(run a, run b, label) for each split with exactly one run of both kinds of a pair."""
    by_split: dict[int, dict[str, list[str]]] = {}
    for r in runs:
        c = run_config(layout.run_dir(r))
        by_split.setdefault(c.split, {}).setdefault(c.kind, []).append(r)
    out = []
    for split, kinds in sorted(by_split.items()):
        for a, b, label in DEFAULT_FUSIONS:
            if len(kinds.get(a, [])) == 1 and len(kinds.get(b, [])) == 1:
                out.append((kinds[a][0], kinds[b][0], label))
    return out


def evaluate(data: Path, *, runs: Sequence[str] | None = None,
             fusions: Sequence[str] | None = None, cfg: EvalConfig = EvalConfig(),
             log=print) -> list[ResultRow]:
    """Score runs and fusions ("a+b"), write the table and figures, return the rows."""
    with StageLock(DataLayout(data).lock_path("evaluate"), "evaluate"):
        return _evaluate(data, runs, fusions, cfg, log)


def _evaluate(data: Path, runs, fusions, cfg: EvalConfig, log) -> list[ResultRow]:
    layout = DataLayout(data)
    runs = list(runs) if runs else find_runs(layout)
    order = {k: i for i, k in enumerate(DISPLAY)}
    runs.sort(key=lambda r: (run_config(layout.run_dir(r)).split,
                             order[run_config(layout.run_dir(r)).kind], r))
    if not runs:
        raise FileNotFoundError(f"no trained runs under {layout.runs_dir}")
    from preprocess.dataset_index import DatasetIndex
    classes = DatasetIndex.load(layout.index_path).classes
    rows: list[ResultRow] = []
    scores: dict[str, VideoScores] = {}
    for r in runs:
        c = run_config(layout.run_dir(r))
        scores[r] = score_run(data, r, cfg=cfg)
        rows.append(_row(DISPLAY[c.kind], (r,), c.split, scores[r]))
    pairs = ([(*f.split("+", 1), "fusion " + f) for f in fusions] if fusions is not None
             else default_fusions(layout, runs))
    for a, b, label in pairs:
        for r in (a, b):
            if r not in scores:
                scores[r] = score_run(data, r, cfg=cfg)
        split_a, split_b = run_config(layout.run_dir(a)).split, run_config(layout.run_dir(b)).split
        if split_a != split_b:
            raise ValueError(f"cannot fuse {a} (split {split_a}) with {b} (split {split_b})")
        rows.append(_row(label, (a, b), split_a, fuse(scores[a], scores[b])))
    write_report(layout, rows, classes)
    log(results_markdown(rows))
    return rows


def _clean_temps_here(folder: Path) -> None:
    """Temporary files a killed report left in `folder` itself (runs' own folders are theirs)."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_file():
                p.unlink(missing_ok=True)


def _row(model: str, runs: tuple[str, ...], split: int, s: VideoScores) -> ResultRow:
    return ResultRow(model, runs, split, topk_accuracy(s, 1), topk_accuracy(s, 5), len(s.videos), s)


def results_markdown(rows: Sequence[ResultRow]) -> str:
    lines = ["| model | run | split | top-1 (%) | top-5 (%) | test videos |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {'+'.join(r.runs)} | {r.split} | {100 * r.top1:.1f} | "
                     f"{100 * r.top5:.1f} | {r.videos} |")
    return "\n".join(lines) + "\n"


def results_csv(rows: Sequence[ResultRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "run", "split", "top1", "top5", "videos"])
    for r in rows:
        w.writerow([r.model, "+".join(r.runs), r.split, f"{r.top1:.4f}", f"{r.top5:.4f}",
                    r.videos])
    return buf.getvalue()


def write_report(layout: DataLayout, rows: Sequence[ResultRow], classes: Sequence[str]) -> None:
    runs_dir = layout.runs_dir
    _clean_temps_here(runs_dir)
    _clean_temps_here(runs_dir / "confusion")
    write_text_atomic(runs_dir / "results.md", "# Results (video-level accuracy)\n\n"
                      + results_markdown(rows))
    write_text_atomic(runs_dir / "results.csv", results_csv(rows))
    for r in rows:
        title = f"{r.model}, split {r.split}: top-1 {100 * r.top1:.1f}%"
        write_png(runs_dir / "confusion" / f"{r.slug}.png",
                  confusion_matrix_image(confusion_matrix(r.scores, len(classes)), classes, title))
    names = sorted({name for r in rows for name in r.runs})
    write_png(runs_dir / "training_curves.png", training_curves_image(layout, names))


def training_curves_image(layout: DataLayout, runs: Sequence[str]) -> np.ndarray:
    """Cross-entropy and clip accuracy per epoch of each run, training and validation."""
    loss = Panel("cross-entropy per epoch", "cross-entropy")
    acc = Panel("clip accuracy per epoch", "accuracy")
    for i, r in enumerate(runs):  # one colour per run: training solid, validation dashed
        hist = read_log(RunPaths(layout.run_dir(r)).log)
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        # distillation logs eq. 8's total as train_loss; its CE term is what compares
        series = {"train": ([h.get("train_ce", h.get("train_loss")) for h in hist],
                            [h.get("train_acc") for h in hist])}
        if "val_loss" in hist[0]:
            series["val"] = ([h.get("val_loss") for h in hist], [h.get("val_acc") for h in hist])
        for part, (losses, accs) in series.items():
            name = f"{r} {part}"
            loss.series[name], acc.series[name] = (ep, losses), (ep, accs)
            loss.styles[name] = acc.styles[name] = (i, part == "val")
    return charts_image([loss, acc], width=560, height=380)
