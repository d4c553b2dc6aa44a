"""Cached frozen-teacher features for IMRS distillation (seed 000 section 3.3, eq. 8).

Eq. 8 needs fc_Flow, the flow teacher's pooled feature, for the very clip the RGB student sees.
Running the teacher during distillation reads flow and doubles the forward cost; instead the
stage `teacher-features` runs it once over a fixed grid of inputs and stores the results:
temporal windows (starts 0, stride, 2*stride, ...) x spatial views (centre + 4 corners, each
unflipped and flipped). The distillation dataset samples one (window, view) per video per
epoch and returns the RGB clip cut by exactly that view with its cached target, so training
reads no flow and runs no teacher (`--online-teacher` runs it instead, on the same grid).

Storage: DATA/features/<key>.h5. Features are float16 (half the size; relative error <= 2^-11,
far below what eq. 8's MSE and KL terms resolve), logits float32. The key is a sha256 of the
teacher's model.pt bytes, the per-video checksums the shards carry (preprocess/shards.py), the
view grid and the clip geometry; a cache whose key differs from the one the current teacher,
shards and views give is refused, saying which of them changed.

Crash safety: each video's results are published as DATA/features/<key>.parts/<video>.h5 (temp
file + rename) as soon as its windows are done, so a rerun redoes only unfinished videos; when
none is left the parts are merged into <key>.h5 (again temp + rename) and removed. Videos that
fail (a damaged shard) are recorded in the parts' ledger, listed in the cache's `left_out`,
retried by the next run, and skipped by distillation with a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from preprocess.atomic import clean_stale_temps, tmp_sibling
from preprocess.layout import DataLayout
from preprocess.ledger import DONE, FAILED, Ledger, Record, StageLock
from preprocess.runner import StageSummary, ensure_writable
from preprocess.shards import open_shard, read_table, shard_paths
from .config import FeatureConfig, TrainConfig
from .datasets import ACTIVITYNET, ClipDataset, ShardVideo, View, clip_indices, make_clip
from .precision import apply_precision, autocast

STAGE = "teacher-features"
FORMAT = "twostream-teacher-features"
FORMAT_VERSION = 1


class StaleCache(ValueError):
    """The cache on disk was made from another teacher, other shards or another view grid."""


# ----------------------------------------------------------------------------- the grid

def views(spec: FeatureConfig) -> list[View]:
    """The spatial views, in cache order: for each crop position, each flip setting."""
    return [View(top, left, flip) for top, left in spec.crops for flip in spec.flips]


def window_starts(n_flows: int, clip_len: int, stride: int) -> list[int]:
    """Starts 0, stride, ... <= U - T (ClipDataset's valid range); [0] when U < T (looped)."""
    return list(range(0, max(0, n_flows - clip_len) + 1, stride))


def teacher_clip_geometry(teacher: TrainConfig) -> dict:
    return {"clip_len": teacher.clip_len, "crop": teacher.crop}


# ----------------------------------------------------------------------------- the key

@dataclass(frozen=True)
class CacheKey:
    """What a cache was computed from; its digest names the file."""
    teacher_run: str
    teacher_sha256: str
    videos_sha256: str        # sha256 over the cached videos' ids and shard checksums
    grid: str                 # JSON of the view grid, clip geometry, normalisation, amp
    split: int
    subset: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]

    def differences(self, other: "CacheKey") -> list[str]:
        names = {"teacher_sha256": "the teacher checkpoint changed",
                 "videos_sha256": "the shards' videos or their contents changed",
                 "grid": "the view grid or clip geometry changed",
                 "split": "another split", "subset": "another subset", "teacher_run": ""}
        return [names[k] or f"teacher run {getattr(other, k)!r} vs {getattr(self, k)!r}"
                for k in names if getattr(self, k) != getattr(other, k)]


def shard_checksums(layout: DataLayout) -> dict[str, str]:
    """video_id -> the sha256 the shards stage recorded for its JPEGs."""
    out = {}
    for p in shard_paths(layout):
        with open_shard(p) as f:
            t = read_table(f)
        for vid, sha in zip(t["video_id"], t["sha256"]):
            out[str(vid)] = sha.decode() if isinstance(sha, bytes) else str(sha)
    return out


def _grid_json(spec: FeatureConfig, teacher: TrainConfig) -> str:
    return json.dumps({"stride": spec.stride, "crops": [list(c) for c in spec.crops],
                       "flips": list(spec.flips), "amp": spec.amp,
                       "norm": asdict(ACTIVITYNET), **teacher_clip_geometry(teacher),
                       "format_version": FORMAT_VERSION}, sort_keys=True)


def current_key(data: Path, teacher_run: str, spec: FeatureConfig,
                videos: Sequence[ShardVideo] | None = None,
                teacher_sha: str | None = None) -> tuple[CacheKey, TrainConfig]:
    """The key the teacher, shards and view grid give now (and the teacher's config)."""
    from .train import RunPaths, file_sha256, run_config
    layout = DataLayout(data)
    paths = RunPaths(layout.run_dir(teacher_run))
    if not paths.model.exists():
        raise FileNotFoundError(f"teacher run {teacher_run}: {paths.model} does not exist "
                                f"(run `pipeline train-teacher` first)")
    teacher = run_config(paths.dir)
    if teacher.kind != "teacher":
        raise ValueError(f"run {teacher_run} is a {teacher.kind} run, not a flow teacher")
    if videos is None:
        videos = _cache_videos(data, teacher.split, spec.subset)
    sums = shard_checksums(layout)
    h = hashlib.sha256()
    for v in videos:
        h.update(f"{v.video_id}\0{sums[v.video_id]}\n".encode())
    return CacheKey(teacher_run, teacher_sha or file_sha256(paths.model), h.hexdigest(),
                    _grid_json(spec, teacher), teacher.split, spec.subset), teacher


def _cache_videos(data: Path, split: int, subset: str) -> list[ShardVideo]:
    return ClipDataset(data, split=split, subset=subset, modalities=("flow",)).videos


def cache_path(layout: DataLayout, key: CacheKey) -> Path:
    return layout.features_dir / f"{key.digest}.h5"


def parts_dir(layout: DataLayout, key: CacheKey) -> Path:
    return layout.features_dir / f"{key.digest}.parts"


def _part_path(parts: Path, video_id: str) -> Path:
    return parts / f"{video_id}.h5"


# ----------------------------------------------------------------------------- computing

class _WindowViews(Dataset):
    """Item j: every view of one window of one video, read and decoded once.

    -> {"flow": float32 (n_views, 2, T, crop, crop), "video": int, "window": int}
    """

    def __init__(self, base: ClipDataset, todo: Sequence[int], spec: FeatureConfig):
        self.base, self.views = base, views(spec)
        self.items = [(i, w, s) for i in todo
                      for w, s in enumerate(window_starts(base.videos[i].n_flows,
                                                          base.clip_len, spec.stride))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> dict:
        i, w, start = self.items[j]
        v = self.base.videos[i]
        try:
            flow = self.base.read(v, "flow", clip_indices(start, self.base.clip_len, v.n_flows))
            h, wd = flow.shape[1], flow.shape[2]
            clips = [make_clip(flow=flow, crop_box=view.crop_box(h, wd, self.base.crop),
                               flip=view.flip, norm=self.base.norm)["flow"]
                     for view in self.views]
            return {"flow": torch.stack(clips), "video": i, "window": w, "error": ""}
        except Exception as e:  # reported per video by the stage, the others go on
            return {"flow": torch.zeros(0), "video": i, "window": w,
                    "error": f"{type(e).__name__}: {e}"}


def _write_h5(path: Path, rows: Sequence[dict], attrs: dict) -> None:
    """Write a cache (or one video's part) to a temp sibling and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        n_views = rows[0]["features"].shape[1] if rows else 0
        dim = rows[0]["features"].shape[2] if rows else 0
        k = rows[0]["logits"].shape[2] if rows else 0
        counts = np.array([len(r["starts"]) for r in rows], np.int64)
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            s = h5py.string_dtype("utf-8")
            f.create_dataset("video_id", data=np.array([r["video_id"] for r in rows], object),
                             dtype=s)
            f.create_dataset("sha256", data=np.array([r["sha256"] for r in rows], object),
                             dtype=s)
            f.create_dataset("n_windows", data=counts)
            f.create_dataset("window_offset",
                             data=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
            f.create_dataset("starts", data=np.concatenate(
                [r["starts"] for r in rows]).astype(np.int32) if rows else np.zeros(0, np.int32))
            total = int(counts.sum())
            feats = f.create_dataset("features", (total, n_views, dim), np.float16,
                                     chunks=(1, n_views, dim) if total else None)
            logits = f.create_dataset("logits", (total, n_views, k), np.float32,
                                      chunks=(1, n_views, k) if total else None)
            pos = 0
            for r in rows:
                n = len(r["starts"])
                feats[pos:pos + n] = r["features"]
                logits[pos:pos + n] = r["logits"]
                pos += n
            for name, value in attrs.items():
                f.attrs[name] = value
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_rows(path: Path) -> list[dict]:
    with h5py.File(path, "r") as f:
        ids = [x.decode() if isinstance(x, bytes) else x for x in f["video_id"][()]]
        shas = [x.decode() if isinstance(x, bytes) else x for x in f["sha256"][()]]
        n, off = f["n_windows"][()], f["window_offset"][()]
        starts, feats, logits = f["starts"][()], f["features"][()], f["logits"][()]
    return [{"video_id": ids[i], "sha256": shas[i], "starts": starts[off[i]:off[i] + n[i]],
             "features": feats[off[i]:off[i] + n[i]], "logits": logits[off[i]:off[i] + n[i]]}
            for i in range(len(ids))]


def _key_attrs(key: CacheKey, spec: FeatureConfig) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "key": key.digest,
            "key_json": json.dumps(asdict(key), sort_keys=True),
            "views": json.dumps([asdict(v) for v in views(spec)]),
            "feature_dtype": "float16", "logit_dtype": "float32"}


@dataclass
class FeatureSummary(StageSummary):
    cache: Path | None = None


def compute_teacher_features(data: Path, *, teacher: str = "teacher_split1",
                             spec: FeatureConfig = FeatureConfig(), progress: bool = True,
                             on_video=None) -> FeatureSummary:
    """Run the frozen teacher over the grid for every video not yet cached; merge when done.

    `on_video(video_id)` runs after each video's part is published (progress hooks, tests).
    """
    from tqdm import tqdm
    from .train import DistInfo, load_trained, resolve_device
    layout = DataLayout(data)
    ensure_writable(layout.meta_dir)
    with StageLock(layout.lock_path(STAGE), STAGE):
        key, tcfg = current_key(data, teacher, spec)
        base = ClipDataset(data, split=tcfg.split, subset=spec.subset, modalities=("flow",),
                           clip_len=tcfg.clip_len, crop=tcfg.crop, train=False)
        final = cache_path(layout, key)
        summary = FeatureSummary(STAGE, total=len(base.videos), cache=final)
        parts = parts_dir(layout, key)
        ensure_writable(layout.features_dir)
        clean_stale_temps(layout.features_dir)
        if final.exists() and not _left_out(final):
            shutil.rmtree(parts, ignore_errors=True)  # a run killed right after its merge
            summary.already_done = len(base.videos)
            return summary
        ensure_writable(parts)
        ledger = Ledger(parts / "ledger.jsonl")
        cached = set(_cached_ids(final)) if final.exists() else set()
        todo = [i for i, v in enumerate(base.videos)
                if v.video_id not in cached and not _part_path(parts, v.video_id).exists()]
        summary.already_done = len(base.videos) - len(todo)
        sums = shard_checksums(layout)
        if todo:
            device = resolve_device(spec.device, DistInfo())
            model, _ = load_trained(layout.run_dir(teacher), device)
            amp = apply_precision(spec.amp, device) and device.type == "cuda"
            items = _WindowViews(base, todo, spec)
            loader = DataLoader(items, batch_size=None, num_workers=spec.workers,
                                pin_memory=device.type == "cuda")
            pending: dict[int, dict] = {}
            bar = tqdm(total=len(todo), desc=STAGE, unit="video", disable=not progress,
                       file=sys.stderr, dynamic_ncols=True)
            try:
                for item in loader:
                    i = int(item["video"])
                    v = base.videos[i]
                    n_windows = len(window_starts(v.n_flows, base.clip_len, spec.stride))
                    acc = pending.setdefault(i, {"feats": [], "logits": [], "error": ""})
                    if item["error"]:
                        acc["error"] = acc["error"] or item["error"]
                    else:
                        f, lg = _teacher_forward(model, item["flow"], device, amp,
                                                 spec.batch_size)
                        acc["feats"].append(f)
                        acc["logits"].append(lg)
                    if int(item["window"]) + 1 < n_windows:
                        continue
                    del pending[i]
                    if acc["error"]:
                        ledger.append([Record(v.video_id, FAILED, acc["error"])])
                        summary.failed[v.video_id] = acc["error"]
                    else:
                        row = {"video_id": v.video_id, "sha256": sums[v.video_id],
                               "starts": np.array(window_starts(v.n_flows, base.clip_len,
                                                                spec.stride)),
                               "features": np.stack(acc["feats"]).astype(np.float16),
                               "logits": np.stack(acc["logits"]).astype(np.float32)}
                        _write_h5(_part_path(parts, v.video_id), [row], _key_attrs(key, spec))
                        ledger.append([Record(v.video_id, DONE, "", {"windows": n_windows})])
                        summary.done_now += 1
                    bar.update(1)
                    if on_video is not None:
                        on_video(v.video_id)
            finally:
                bar.close()
        left = dict(summary.failed)
        _merge(final, parts, base.videos, key, spec, left)
        if not left:
            shutil.rmtree(parts, ignore_errors=True)
        return summary


@torch.no_grad()
def _teacher_forward(model, clips: torch.Tensor, device, amp: bool, batch_size: int):
    """(n_views, 2, T, h, w) -> features (n_views, D), logits (n_views, K) as float32 numpy."""
    feats, logits = [], []
    for lo in range(0, clips.shape[0], batch_size):
        x = clips[lo:lo + batch_size].to(device, non_blocking=True)
        with autocast(device, amp):
            f = model.forward_features(x)
            lg = model.forward_head(f)
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def _cached_ids(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return [x.decode() if isinstance(x, bytes) else x for x in f["video_id"][()]]


def _left_out(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs.get("left_out", "{}"))


def _merge(final: Path, parts: Path, videos: Sequence[ShardVideo], key: CacheKey,
           spec: FeatureConfig, left_out: dict[str, str]) -> None:
    """One cache file from the existing cache (if any) and the parts, in video order."""
    rows: dict[str, dict] = {}
    if final.exists():
        rows.update({r["video_id"]: r for r in _read_rows(final)})
    for v in videos:
        p = _part_path(parts, v.video_id)
        if v.video_id not in rows and p.exists():
            rows.update({r["video_id"]: r for r in _read_rows(p)})
    ordered = [rows[v.video_id] for v in videos if v.video_id in rows]
    attrs = _key_attrs(key, spec)
    attrs["left_out"] = json.dumps(left_out, sort_keys=True)
    _write_h5(final, ordered, attrs)


# ----------------------------------------------------------------------------- reading

def spec_of(key: CacheKey) -> FeatureConfig:
    """The grid a cache was made with (runtime fields at their defaults)."""
    grid = json.loads(key.grid)
    return FeatureConfig(stride=grid["stride"], crops=tuple(tuple(c) for c in grid["crops"]),
                         flips=tuple(grid["flips"]), subset=key.subset, amp=grid["amp"])


def _cache_keys(layout: DataLayout, teacher_run: str) -> list[tuple[Path, CacheKey]]:
    found = []
    for p in sorted(layout.features_dir.glob("*.h5")) if layout.features_dir.exists() else []:
        try:
            with h5py.File(p, "r") as f:
                key = CacheKey(**json.loads(f.attrs["key_json"]))
        except (OSError, KeyError, TypeError, ValueError):
            continue
        if key.teacher_run == teacher_run:
            found.append((p, key))
    return found


def find_cache(data: Path, teacher_run: str, spec: FeatureConfig | None = None) -> Path:
    """The cache of `teacher_run` valid for the current teacher and shards, or StaleCache.

    With `spec`, the cache of exactly that grid; without, any valid one (the newest), whatever
    its grid (stride, views, precision), which the distillation dataset then reads from it.
    """
    from .train import RunPaths, file_sha256
    layout = DataLayout(data)
    model = RunPaths(layout.run_dir(teacher_run)).model
    sha = file_sha256(model) if model.exists() else None
    found = _cache_keys(layout, teacher_run)
    if spec is not None:
        key, _ = current_key(data, teacher_run, spec, teacher_sha=sha)
        if cache_path(layout, key).exists():
            return cache_path(layout, key)
        stale = [(p, key.differences(k)) for p, k in found]
    else:
        if sha is None:
            current_key(data, teacher_run, FeatureConfig())  # raises: no such teacher run
        valid, stale = [], []
        for p, k in found:
            now, _ = current_key(data, teacher_run, spec_of(k), teacher_sha=sha)
            (valid if now == k else stale).append((p, now.differences(k)))
        if valid:
            return max(valid, key=lambda pk: pk[0].stat().st_mtime)[0]
    if stale:
        detail = "; ".join(f"{p.name}: {', '.join(d)}" for p, d in stale)
        raise StaleCache(f"the teacher-feature cache for {teacher_run} is stale ({detail}); "
                         f"run `pipeline teacher-features --data {data} --teacher "
                         f"{teacher_run}` again")
    raise FileNotFoundError(f"no teacher-feature cache for {teacher_run} in "
                            f"{layout.features_dir}: run `pipeline teacher-features --data "
                            f"{data} --teacher {teacher_run}` first")


class _OpenCache:
    def __init__(self, path: Path):
        self.f = h5py.File(path, "r")
        self.features, self.logits = self.f["features"], self.f["logits"]


class DistillDataset(ClipDataset):
    """IMRS training items: one (window, view) of the grid per video per epoch.

    Item: {"rgb": float32 (3, T, crop, crop) cut by that view, "label", "video", "start",
    "window", "view", and either "teacher_features" float32 (D,) + "teacher_logits" (K,) from
    the cache, or, with `online=True`, "flow" float32 (2, T, crop, crop) of the same view for a
    teacher run during training}. Draws use torch's RNG (seeded per item by the training loop).
    """

    def __init__(self, data, *, split: int, clip_len: int, crop: int,
                 spec: FeatureConfig | None = None, cache: Path | None = None,
                 online: bool = False, log=print):
        if online:
            spec = spec or FeatureConfig()
        elif cache is None:
            raise ValueError("DistillDataset needs a cache unless online=True")
        else:  # the grid is the cache's own
            with h5py.File(cache, "r") as f:
                spec = spec_of(CacheKey(**json.loads(f.attrs["key_json"])))
        super().__init__(data, split=split, subset=spec.subset,
                         modalities=("rgb", "flow") if online else ("rgb",),
                         clip_len=clip_len, crop=crop, train=True)
        self.spec, self.views, self.online, self.cache = spec, views(spec), online, cache
        self._rows: dict[str, int] = {}
        if not online:
            with h5py.File(cache, "r") as f:
                grid = json.loads(json.loads(f.attrs["key_json"])["grid"])
                if (grid["clip_len"], grid["crop"]) != (clip_len, crop):
                    raise StaleCache(f"{cache}: cached for {grid['clip_len']}-frame "
                                     f"{grid['crop']}px clips, the student uses {clip_len}-frame "
                                     f"{crop}px clips")
                ids = [x.decode() if isinstance(x, bytes) else x for x in f["video_id"][()]]
                offsets = f["window_offset"][()]
                left = json.loads(f.attrs.get("left_out", "{}"))
            self._rows = {vid: int(off) for vid, off in zip(ids, offsets)}
            missing = [v.video_id for v in self.videos if v.video_id not in self._rows]
            if missing:
                log(f"distill: {len(missing)} videos have no cached teacher features and are "
                    f"skipped ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})"
                    + (f"; the cache lists failures: {left}" if left else ""))
                kept = [v for v in self.videos if v.video_id in self._rows]
                self.videos = [dataclasses.replace(v, index=i) for i, v in enumerate(kept)]
        self._pid, self._open = None, None

    def _cache(self) -> _OpenCache:
        if self._pid != os.getpid():  # never use an h5py handle inherited through fork
            self._pid, self._open = os.getpid(), _OpenCache(self.cache)
        return self._open

    def draw(self, i: int) -> tuple[int, int, int]:
        v = self.videos[i]
        starts = window_starts(v.n_flows, self.clip_len, self.spec.stride)
        w = int(torch.randint(0, len(starts), ()).item())
        k = int(torch.randint(0, len(self.views), ()).item())
        return w, starts[w], k

    def __getitem__(self, i: int) -> dict:
        v = self.videos[i]
        w, start, k = self.draw(i)
        idx = clip_indices(start, self.clip_len, v.n_flows)
        frames = {m: self.read(v, m, idx) for m in self.modalities}
        rgb = frames["rgb"]
        view = self.views[k]
        box = view.crop_box(rgb.shape[1], rgb.shape[2], self.crop)
        item = make_clip(rgb, frames.get("flow"), crop_box=box, flip=view.flip, norm=self.norm)
        item.update(label=v.label, video=v.index, start=start, window=w, view=k)
        if not self.online:
            c = self._cache()
            row = self._rows[v.video_id] + w
            item["teacher_features"] = torch.from_numpy(c.features[row, k].astype(np.float32))
            item["teacher_logits"] = torch.from_numpy(c.logits[row, k])
        return item
