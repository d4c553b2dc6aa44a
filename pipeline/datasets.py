"""PyTorch datasets over the HDF5 shards (format: preprocess/shards.py) for every model here.

Clips for the 3D networks follow IMRS (seed 000, section 4.2.2) after Hara et al. (2018):
16 consecutive frames from a random start, one random 112x112 crop and one random horizontal
flip shared by RGB and flow (the flip also inverts x-flow, q -> 255 - q), RGB minus the
ActivityNet mean [114.7748, 107.7354, 99.4750] on 0..255 RGB with no division by a std (Hara's
3D-ResNets `get_mean(norm_value=1)`), flow minus 127.5.

Time alignment. Flow k goes from frame k to frame k+1, so a video of N frames has N - 1 flows.
Clip frame t pairs with flow t; a clip starting at s uses frames and flows s .. s+T-1, so the
usable length is U = N - 1 and the valid starts are 0 .. U - T, for every modality (the last
frame, which has no flow, is never used; RGB-only and flow-only datasets cut the same windows,
as distillation against cached teacher features needs). A video with U < T loops its U usable
indices (0, 1, .., U-1, 0, 1, ..), Hara's LoopPadding. A one-frame video (U = 0) cannot form a
clip and is left out of every dataset (`skipped` counts them).

MAT-EffNet (seed 004) inputs are TSN-style (Wang et al., 2016): L segments, one snippet per
segment (random within it in training, its centre in evaluation); each snippet gives one RGB
frame (its first) and a stack of 10 consecutive flow pairs as 20 channels interleaved per time,
x_t, y_t, x_t+1, y_t+1, ...; 224x224 crops and the same flip rule. Being ImageNet-pretrained
2D nets, they get ImageNet normalisation by default: RGB (x - mean) / std with torchvision's
values on 0..255, flow (q - 127.5) / 57.63 (TSN's flow std 0.226 on 0..1).

Workers: h5py files are opened lazily in the process that reads (first __getitem__ there) and
kept per process; a changed pid (a forked DataLoader worker) opens its own, never using a
handle inherited through fork. Datasets are plain map-style, so any sampler works
(DistributedSampler included). Random draws use torch's generator, which DataLoader seeds per
worker. Every JPEG read is checked against its CRC-32 (a damaged shard raises ShardError).

GPU decode. JpegClipDataset draws exactly as ClipDataset but hands over the clip's JPEG bytes;
`decode_clip_batch` then decodes the whole batch with nvjpeg and cuts the views on the GPU
(pipeline/jpeg.py). On one H200 this sustains about 2,150 clips/s of 16x112x112 RGB with 12
reading workers (benchmarks/loader_bench.py --gpu).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from preprocess.layout import DataLayout
from preprocess.shards import ShardError, check_crc, open_shard, read_table, shard_paths

from .jpeg import GRAY, RGB, decode, decode_cpu

MODALITIES = ("rgb", "flow")
SUBSETS = ("train", "test", "all")
TRAIN, TEST = 1, 2


@dataclass(frozen=True)
class Normalization:
    """x -> (x - mean) / std per channel, on 0..255 values (RGB order) and flow codes."""
    rgb_mean: tuple[float, float, float]
    rgb_std: tuple[float, float, float]
    flow_mean: float
    flow_std: float


ACTIVITYNET = Normalization((114.7748, 107.7354, 99.4750), (1.0, 1.0, 1.0), 127.5, 1.0)
"""Hara et al.'s ActivityNet mean, no std; flow centred at 127.5 (seed 000, section 4.2.2)."""
IMAGENET = Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 127.5, 57.63)
"""torchvision's ImageNet statistics on 0..255; flow as TSN (mean 0.5, std 0.226 on 0..1)."""


# --- the shards' video list -----------------------------------------------------------------

@dataclass(frozen=True)
class ShardVideo:
    """One video in the shards: where it is and what it holds."""
    index: int                 # position in the list this came from (the datasets' "video")
    video_id: str
    class_name: str
    label: int
    splits: tuple[int, int, int]
    n_frames: int
    n_flows: int
    shard: str                 # path of the shard file
    row: int                   # row in the shard's per-video table
    frame_start: int
    flow_start: int


class ShardIndex:
    """Every video in DATA/shards, sorted by video id; `select` filters by split and subset."""

    def __init__(self, videos: Sequence[ShardVideo]):
        self.videos = tuple(videos)

    @classmethod
    def load(cls, data: Path) -> "ShardIndex":
        paths = shard_paths(DataLayout(data))
        if not paths:
            raise FileNotFoundError(f"no shards in {DataLayout(data).shards_dir}: run "
                                    f"`pipeline shards --data {data}` first")
        rows = []
        seen: dict[str, str] = {}
        for p in paths:
            with open_shard(p) as f:
                t = read_table(f)
            for r, vid in enumerate(t["video_id"]):
                if vid in seen:
                    raise ShardError(f"video {vid} is in both {seen[vid]} and {p.name}: the "
                                     f"shards stage did not finish; rerun `pipeline shards`")
                seen[vid] = p.name
                rows.append((vid, t["class_name"][r], int(t["label"][r]),
                             tuple(int(s) for s in t["splits"][r]), int(t["n_frames"][r]),
                             int(t["n_flows"][r]), str(p), r, int(t["frame_start"][r]),
                             int(t["flow_start"][r])))
        rows.sort()
        return cls([ShardVideo(i, *row) for i, row in enumerate(rows)])

    def select(self, split: int = 1, subset: str = "all") -> list[ShardVideo]:
        """Videos of `subset` ("train", "test" or "all") in official split 1..3, re-indexed."""
        if subset not in SUBSETS:
            raise ValueError(f"subset {subset!r}: expected one of {', '.join(SUBSETS)}")
        if split not in (1, 2, 3):
            raise ValueError(f"split {split!r}: expected 1, 2 or 3")
        want = {"train": TRAIN, "test": TEST}.get(subset)
        chosen = [v for v in self.videos if want is None or v.splits[split - 1] == want]
        return [replace(v, index=i) for i, v in enumerate(chosen)]


def list_videos(data: Path, split: int = 1, subset: str = "all") -> list[ShardVideo]:
    """Per-video metadata (shard file, row, label, n_frames, n_flows, ...) of a subset."""
    return ShardIndex.load(data).select(split, subset)


# --- reading (per process) ------------------------------------------------------------------

class _OpenShard:
    def __init__(self, path: str):
        self.f = open_shard(Path(path))
        self.name = Path(path).name
        t = read_table(self.f)
        self.offsets = {"rgb": t["rgb_offsets"], "flow": t["flow_offsets"]}
        self.crc = {"rgb": t["rgb_crc32"], "flow": t["flow_crc32"]}
        self.payload = {"rgb": self.f["rgb"], "flow": self.f["flow"]}


class _ProcessShards:
    """Open shards of this process; a fork (new pid) starts afresh, never reusing a handle."""

    def __init__(self):
        self.pid = None
        self.open: dict[str, _OpenShard] = {}
        self.inherited: list[_OpenShard] = []

    def get(self, path: str) -> _OpenShard:
        if self.pid != os.getpid():
            # Keep (never close or use) handles a fork copied from the parent.
            self.inherited.extend(self.open.values())
            self.open, self.pid = {}, os.getpid()
        shard = self.open.get(path)
        if shard is None:
            shard = self.open[path] = _OpenShard(path)
        return shard


_SHARDS = _ProcessShards()


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted unique indices -> [lo, hi) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def read_jpegs(video: ShardVideo, modality: str, indices: Sequence[int]) -> list[np.ndarray]:
    """The stored JPEG bytes of frames (modality "rgb") or flow pairs ("flow") at `indices`.

    Indices are 0-based frame numbers, or pair numbers (pair k: frame k -> k+1). For "rgb" one
    buffer per index; for "flow" two per index, x then y. Each is CRC-checked.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}: expected 'rgb' or 'flow'")
    count = video.n_frames if modality == "rgb" else video.n_flows
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise IndexError(f"{video.video_id}: {modality} index {bad[0]} outside 0..{count - 1}")
    shard = _SHARDS.get(video.shard)
    offs, crcs, payload = shard.offsets[modality], shard.crc[modality], shard.payload[modality]
    per, base = (1, video.frame_start) if modality == "rgb" else (2, 2 * video.flow_start)
    pieces: dict[int, np.ndarray] = {}
    for lo, hi in _runs(indices):
        a, b = base + per * lo, base + per * hi
        try:
            buf = payload[offs[a]:offs[b]]
        except OSError as e:
            raise ShardError(f"{shard.name}: video {video.video_id}: cannot read "
                             f"{modality} {lo}..{hi - 1} ({e})") from None
        for j in range(a, b):
            jpeg = buf[offs[j] - offs[a]:offs[j + 1] - offs[a]]
            check_crc(jpeg, crcs[j], f"{shard.name}: video {video.video_id}: {modality} "
                                     f"JPEG {(j - base) // per + 1}")
            pieces[j] = jpeg
    return [pieces[base + per * i + k] for i in indices for k in range(per)]


def decode_frames(jpegs: Sequence, modality: str, device=None) -> torch.Tensor:
    """Decode `read_jpegs` output -> uint8 (T, H, W, 3) RGB or (T, H, W, 2) flow x, y."""
    if modality == "rgb":
        return decode(jpegs, RGB, device)
    g = decode(jpegs, GRAY, device)                     # (2T, H, W, 1), x y x y ...
    t, h, w = g.shape[0] // 2, g.shape[1], g.shape[2]
    return g.reshape(t, 2, h, w).permute(0, 2, 3, 1)


def read_frames(video: ShardVideo, modality: str, indices: Sequence[int]) -> np.ndarray:
    """Decoded frames at `indices` (CPU): uint8 (T, H, W, 3) RGB, or (T, H, W, 2) flow x, y.

    The flow array is a strided view (x and y planes stay apart): copying it whole would cost
    more than the crop that follows needs.
    """
    jpegs = read_jpegs(video, modality, indices)
    if modality == "rgb":
        return decode_cpu(jpegs, RGB)
    g = decode_cpu(jpegs, GRAY)[..., 0]
    return g.reshape(len(indices), 2, *g.shape[1:]).transpose(0, 2, 3, 1)


# --- views and clips ------------------------------------------------------------------------

@dataclass(frozen=True)
class View:
    """A spatial view drawn before the frame size is known: crop position as fractions of the
    free range (0 = top/left, 1 = bottom/right) and a horizontal flip."""
    top: float = 0.5
    left: float = 0.5
    flip: bool = False

    def crop_box(self, height: int, width: int, crop: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) in pixels for frames of `height` x `width`."""
        if crop > height or crop > width:
            raise ValueError(f"crop {crop} is larger than the frames ({height}x{width})")
        top = min(int(self.top * (height - crop + 1)), height - crop)
        left = min(int(self.left * (width - crop + 1)), width - crop)
        return top, left, crop, crop


CENTRE = View()


def random_view() -> View:
    u = torch.rand(3)
    return View(float(u[0]), float(u[1]), bool(u[2] < 0.5))


def make_clip(rgb=None, flow=None, *, crop_box: tuple[int, int, int, int], flip: bool,
              norm: Normalization = ACTIVITYNET) -> dict[str, torch.Tensor]:
    """Crop, flip and normalise decoded frames into network inputs, on their device.

    rgb: uint8 (T, H, W, 3) RGB; flow: uint8 (T, H, W, 2) x, y codes (numpy or torch).
    Returns {"rgb": float32 (3, T, h, w), "flow": float32 (2, T, h, w)} for those given. The
    flip mirrors both and inverts x-flow (q -> 255 - q, i.e. the motion's sign).
    """
    top, left, h, w = crop_box
    out = {}
    for name, frames in (("rgb", rgb), ("flow", flow)):
        if frames is None:
            continue
        x = torch.as_tensor(frames)[:, top:top + h, left:left + w]   # (T, h, w, C), a view
        if flip:
            x = x.flip(2)
        # One strided uint8 -> float32 copy into (C, T, h, w), then in-place arithmetic.
        y = torch.empty((x.shape[3], x.shape[0], h, w), dtype=torch.float32, device=x.device)
        y.copy_(x.permute(3, 0, 1, 2))
        if name == "rgb":
            y.sub_(torch.tensor(norm.rgb_mean, device=y.device).view(3, 1, 1, 1))
            if any(sd != 1.0 for sd in norm.rgb_std):
                y.div_(torch.tensor(norm.rgb_std, device=y.device).view(3, 1, 1, 1))
        else:
            if flip:
                y[0].neg_().add_(255.0)                                 # q -> 255 - q
            y.sub_(norm.flow_mean)
            if norm.flow_std != 1.0:
                y.div_(norm.flow_std)
        out[name] = y
    return out


def clip_indices(start: int, clip_len: int, usable: int) -> list[int]:
    """`clip_len` indices from `start`, looping over start..usable-1 when too few (Hara)."""
    if usable < 1:
        raise ValueError("a clip needs at least one usable frame (a flow pair)")
    span = usable - start
    return [start + i % span for i in range(clip_len)]


def segment_starts(usable: int, num_segments: int, new_length: int, train: bool) -> list[int]:
    """TSN sampling: one snippet start per equal segment (random in training, else centre)."""
    n = max(1, usable - new_length + 1)          # valid snippet starts
    starts = []
    for s in range(num_segments):
        lo = (s * n) // num_segments
        hi = max(lo + 1, ((s + 1) * n) // num_segments)
        starts.append(int(torch.randint(lo, hi, ()).item()) if train else (lo + hi - 1) // 2)
    return starts


def _check(modalities, clip_len) -> tuple[str, ...]:
    mods = tuple(modalities)
    if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
        raise ValueError(f"modalities {modalities!r}: a non-empty subset of {MODALITIES}")
    if clip_len < 1:
        raise ValueError("clip_len must be at least 1")
    return mods


class _ShardVideos(Dataset):
    """The videos of a subset with at least one flow pair (see the module docstring)."""

    def __init__(self, data, split: int, subset: str):
        self.data = Path(data)
        chosen = list_videos(data, split, subset)
        usable = [v for v in chosen if v.n_flows >= 1]
        self.skipped = len(chosen) - len(usable)
        self.videos = [replace(v, index=i) for i, v in enumerate(usable)]

    @property
    def labels(self) -> list[int]:
        return [v.label for v in self.videos]

    def read(self, video: ShardVideo, modality: str, indices: Sequence[int]) -> np.ndarray:
        """Decoded frames of `video` (see read_frames); the one place items read from."""
        return read_frames(video, modality, indices)


class ClipDataset(_ShardVideos):
    """One clip per video per epoch (Hara et al.; seed 000, section 4.2.2).

    Training: random start in 0..U-T, random crop, random flip. train=False: the centre clip
    and centre crop. Item: {"rgb": float32 (3, T, crop, crop), "flow": float32 (2, T, crop,
    crop), "label": int, "video": int (index in `videos`), "start": int}, modalities present.
    """

    def __init__(self, data, *, split: int = 1, subset: str = "train",
                 modalities: Sequence[str] = MODALITIES, clip_len: int = 16, crop: int = 112,
                 train: bool = True, norm: Normalization = ACTIVITYNET):
        super().__init__(data, split, subset)
        self.modalities = _check(modalities, clip_len)
        self.clip_len, self.crop, self.train, self.norm = clip_len, crop, train, norm

    def __len__(self) -> int:
        return len(self.videos)

    def draw(self, i: int) -> tuple[int, View]:
        """The clip start and view of item i (random in training)."""
        u = self.videos[i].n_flows
        if self.train:
            start = int(torch.randint(0, max(1, u - self.clip_len + 1), ()).item())
            return start, random_view()
        return max(0, (u - self.clip_len) // 2), CENTRE

    def __getitem__(self, i: int) -> dict:
        start, view = self.draw(i)
        return _clip_item(self, self.videos[i], start, view)


class EvalClipDataset(_ShardVideos):
    """Every non-overlapping clip of every video, centre crop, for video-level accuracy.

    Clips start at 0, T, 2T, ... while they fit in U (a tail shorter than T is not used); a
    video with U < T gives one looped clip. Items as ClipDataset's; average the clips' scores
    per "video" for the video's prediction.
    """

    def __init__(self, data, *, split: int = 1, subset: str = "test",
                 modalities: Sequence[str] = MODALITIES, clip_len: int = 16, crop: int = 112,
                 norm: Normalization = ACTIVITYNET):
        super().__init__(data, split, subset)
        self.modalities = _check(modalities, clip_len)
        self.clip_len, self.crop, self.norm = clip_len, crop, norm
        self.clips = [(v.index, s) for v in self.videos
                      for s in range(0, max(1, v.n_flows - clip_len + 1), clip_len)]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        video, start = self.clips[i]
        return _clip_item(self, self.videos[video], start, CENTRE)


def _clip_item(ds, video: ShardVideo, start: int, view: View) -> dict:
    idx = clip_indices(start, ds.clip_len, video.n_flows)
    frames = {m: ds.read(video, m, idx) for m in ds.modalities}
    any_frames = next(iter(frames.values()))
    box = view.crop_box(any_frames.shape[1], any_frames.shape[2], ds.crop)
    item = make_clip(frames.get("rgb"), frames.get("flow"), crop_box=box, flip=view.flip,
                     norm=ds.norm)
    item.update(label=video.label, video=video.index, start=start)
    return item


class SegmentDataset(_ShardVideos):
    """MAT-EffNet inputs (seed 004; TSN sampling): L snippets per video.

    Item: {"rgb": float32 (L, 3, crop, crop), "flow": float32 (L, 2*new_length, crop, crop)
    with channels x_t, y_t, x_t+1, y_t+1, ..., "label": int, "video": int}.
    """

    def __init__(self, data, *, split: int = 1, subset: str = "train",
                 modalities: Sequence[str] = MODALITIES, num_segments: int = 3,
                 new_length: int = 10, crop: int = 224, train: bool = True,
                 norm: Normalization = IMAGENET):
        super().__init__(data, split, subset)
        self.modalities = _check(modalities, new_length)
        if num_segments < 1:
            raise ValueError("num_segments must be at least 1")
        self.num_segments, self.new_length = num_segments, new_length
        self.crop, self.train, self.norm = crop, train, norm

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        v = self.videos[i]
        starts = segment_starts(v.n_flows, self.num_segments, self.new_length, self.train)
        view = random_view() if self.train else CENTRE
        rgb = self.read(v, "rgb", starts) if "rgb" in self.modalities else None
        flow = None
        if "flow" in self.modalities:
            idx = [j for t in starts for j in clip_indices(t, self.new_length, v.n_flows)]
            flow = self.read(v, "flow", idx)
        ref = rgb if rgb is not None else flow
        box = view.crop_box(ref.shape[1], ref.shape[2], self.crop)
        clip = make_clip(rgb, flow, crop_box=box, flip=view.flip, norm=self.norm)
        item = {"label": v.label, "video": v.index}
        if "rgb" in clip:
            item["rgb"] = clip["rgb"].permute(1, 0, 2, 3).contiguous()     # (L, 3, h, w)
        if "flow" in clip:
            f = clip["flow"].view(2, self.num_segments, self.new_length, self.crop, self.crop)
            item["flow"] = f.permute(1, 2, 0, 3, 4).reshape(
                self.num_segments, 2 * self.new_length, self.crop, self.crop)
        return item


# --- batched GPU decode ---------------------------------------------------------------------

class JpegClipDataset(ClipDataset):
    """ClipDataset's sampling, but items carry the undecoded JPEGs and the drawn view, so the
    whole batch is decoded at once on the GPU by `decode_clip_batch` (workers only read bytes).

    Item: {"<m>_jpeg": uint8 (bytes,) the clip's JPEGs back to back, "<m>_sizes": int64 (T,) or
    (2T,) for flow (x, y per pair), "view": float32 (3,) top, left, flip, "label", "video",
    "start"}. Tensors, so DataLoader workers hand them over in shared memory. Collate with
    `collate_jpeg_clips`.
    """

    def __getitem__(self, i: int) -> dict:
        start, view = self.draw(i)
        v = self.videos[i]
        idx = clip_indices(start, self.clip_len, v.n_flows)
        item = {}
        for m in self.modalities:
            jpegs = read_jpegs(v, m, idx)
            item[f"{m}_jpeg"] = torch.from_numpy(np.concatenate(jpegs))
            item[f"{m}_sizes"] = torch.tensor([len(j) for j in jpegs], dtype=torch.int64)
        item.update(view=torch.tensor([view.top, view.left, float(view.flip)]), label=v.label,
                    video=v.index, start=start)
        return item


def collate_jpeg_clips(items: list[dict]) -> dict:
    """Concatenate JpegClipDataset items: bytes and sizes back to back, views (B, 3)."""
    out = {}
    for k in items[0]:
        if k.endswith("_jpeg") or k.endswith("_sizes"):
            out[k] = torch.cat([it[k] for it in items])
        elif k == "view":
            out[k] = torch.stack([it[k] for it in items])
        else:
            out[k] = torch.tensor([it[k] for it in items])
    return out


def decode_clip_batch(batch: dict, *, crop: int = 112, device=None,
                      norm: Normalization = ACTIVITYNET) -> dict[str, torch.Tensor]:
    """Decode a collated JpegClipDataset batch on `device` (nvjpeg on CUDA) and cut its views.

    Returns {"rgb": float32 (B, 3, T, crop, crop), "flow": float32 (B, 2, T, crop, crop)}, equal
    to stacking ClipDataset items with the same draws (within JPEG-decoder tolerance on GPU).
    """
    out = {}
    views = batch["view"]
    b = views.shape[0]
    for m in MODALITIES:
        if f"{m}_jpeg" not in batch:
            continue
        jpegs = torch.split(batch[f"{m}_jpeg"], batch[f"{m}_sizes"].tolist())
        frames = decode_frames(jpegs, m, device)                      # (B*T, H, W, C)
        t = frames.shape[0] // b
        frames = frames.reshape(b, t, *frames.shape[1:])              # (B, T, H, W, C)
        h, w = frames.shape[2], frames.shape[3]
        boxes = [View(float(v[0]), float(v[1])).crop_box(h, w, crop) for v in views]
        dev = frames.device
        ar = torch.arange(crop, device=dev)
        rows = torch.tensor([bx[0] for bx in boxes], device=dev)[:, None] + ar    # (B, crop)
        flips = (views[:, 2] > 0.5).to(dev)
        cols = torch.tensor([bx[1] for bx in boxes], device=dev)[:, None] + ar
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=dev)[:, None, None]
        x = frames.permute(0, 2, 3, 1, 4)[bi, rows[:, :, None], cols[:, None, :]]  # (B,h,w,T,C)
        x = x.permute(0, 4, 3, 1, 2).float()                          # (B, C, T, h, w)
        if m == "rgb":
            mean = torch.tensor(norm.rgb_mean, device=dev).view(1, 3, 1, 1, 1)
            std = torch.tensor(norm.rgb_std, device=dev).view(1, 3, 1, 1, 1)
            out[m] = (x - mean) / std
        else:
            x[:, 0] = torch.where(flips[:, None, None, None], 255.0 - x[:, 0], x[:, 0])
            out[m] = (x - norm.flow_mean) / norm.flow_std
    return out
