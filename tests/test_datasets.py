"""Datasets over shards built by the real frames, flow and shards stages from tiny videos."""
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from pipeline import datasets
from pipeline.datasets import (ACTIVITYNET, ClipDataset, EvalClipDataset,
                               JpegClipDataset, Normalization, SegmentDataset, View,
                               clip_indices, collate_jpeg_clips, decode_clip_batch, list_videos,
                               make_clip, read_frames)
from pipeline.jpeg import decode, decode_cpu, gpu_decode_available
from preprocess.dataset_index import DatasetIndex
from preprocess.flow import compute_flow
from preprocess.flow_quant import dequantize
from preprocess.frames import extract_frames
from preprocess.layout import DataLayout, flow_names, frame_name
from preprocess.shards import build_shards
from tests.test_shards import write_video

SIZE, T, CROP = 48, 4, 32
RAW = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.0, 1.0)   # values as decoded


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Textures moving right (+4 px/frame at 64 px wide, +3 at 48) or left; a 3-frame video."""
    root = tmp_path_factory.mktemp("datasets")
    videos = root / "videos"
    specs = [("Left", -4, 9), ("Left", -4, 8), ("Left", -4, 7), ("Right", 4, 9), ("Right", 4, 10),
             ("Right", 4, 6), ("Right", 4, 3)]
    for i, (cls, dx, n) in enumerate(specs):
        write_video(videos / cls / f"v_{cls}_{i}.avi", n, dx, seed=i)
    out = root / "data"
    extract_frames(videos, out, size=SIZE, progress=False)
    compute_flow(out, backend="auto", progress=False)     # opencv here; torch on a GPU
    build_shards(out, shard_bytes=20_000, progress=False)     # several shards
    return out


def from_files(data: Path, video_id: str, start: int, t: int):
    """The clip decoded straight from DATA/frames and DATA/flow: (T,H,W,3) RGB, (T,H,W,2)."""
    layout = DataLayout(data)
    rgb = [cv2.cvtColor(cv2.imread(str(layout.frames_video_dir(video_id) / frame_name(k))),
                        cv2.COLOR_BGR2RGB) for k in range(start + 1, start + t + 1)]
    flow = [np.stack([cv2.imread(str(layout.flow_video_dir(video_id) / n), cv2.IMREAD_GRAYSCALE)
                      for n in flow_names(k)], -1) for k in range(start + 1, start + t + 1)]
    return np.stack(rgb), np.stack(flow)


def test_eval_clips_are_exactly_the_decoded_files(data):
    ds = EvalClipDataset(data, subset="all", clip_len=T, crop=CROP, norm=RAW)
    assert ds.skipped == 0 and len(ds.videos) == 7
    lo = (SIZE - CROP) // 2
    expected = [(v.index, s) for v in ds.videos for s in range(0, v.n_flows - T + 1, T)]
    expected += [(v.index, 0) for v in ds.videos if v.n_flows < T]
    assert sorted(ds.clips) == sorted(expected)
    for i in range(len(ds)):
        item = ds[i]
        v = ds.videos[item["video"]]
        assert item["label"] == v.label
        if v.n_flows < T:
            continue
        rgb, flow = from_files(data, v.video_id, item["start"], T)
        assert item["rgb"].shape == (3, T, CROP, CROP) and item["rgb"].dtype == torch.float32
        assert torch.equal(item["rgb"], torch.from_numpy(rgb[:, lo:lo + CROP, lo:lo + CROP])
                           .permute(3, 0, 1, 2).float())
        assert torch.equal(item["flow"], torch.from_numpy(flow[:, lo:lo + CROP, lo:lo + CROP])
                           .permute(3, 0, 1, 2).float())


def test_normalisation_is_hara_mean_and_flow_minus_127_5(data):
    v = list_videos(data)[0]
    raw = EvalClipDataset(data, subset="all", clip_len=T, crop=CROP, norm=RAW)[0]
    norm = EvalClipDataset(data, subset="all", clip_len=T, crop=CROP)[0]
    mean = torch.tensor([114.7748, 107.7354, 99.4750]).view(3, 1, 1, 1)
    assert ACTIVITYNET.rgb_std == (1.0, 1.0, 1.0)
    assert torch.allclose(norm["rgb"], raw["rgb"] - mean)
    assert torch.equal(norm["flow"], raw["flow"] - 127.5)
    assert v.n_frames == v.n_flows + 1


def test_flip_mirrors_both_and_inverts_x_flow_physically(data):
    right = next(v for v in list_videos(data) if v.class_name == "Right" and v.n_flows >= T)
    idx = clip_indices(0, T, right.n_flows)
    rgb, flow = read_frames(right, "rgb", idx), read_frames(right, "flow", idx)
    box = View(0.5, 0.5).crop_box(SIZE, SIZE, CROP)
    plain = make_clip(rgb, flow, crop_box=box, flip=False, norm=RAW)
    flipped = make_clip(rgb, flow, crop_box=box, flip=True, norm=RAW)
    assert torch.equal(flipped["rgb"], plain["rgb"].flip(-1))
    assert torch.equal(flipped["flow"][1], plain["flow"][1].flip(-1))
    assert torch.equal(flipped["flow"][0], 255 - plain["flow"][0].flip(-1))
    # Physics: the texture moves right by ~3 px/frame at 48 px; flipped, it moves left.
    inner = (slice(None), slice(6, -6), slice(6, -6))
    assert dequantize(plain["flow"][0][inner]).mean() == pytest.approx(3.0, abs=0.5)
    assert dequantize(flipped["flow"][0][inner]).mean() == pytest.approx(-3.0, abs=0.5)
    assert abs(float(dequantize(flipped["flow"][1][inner]).mean())) < 0.3


def test_training_clip_is_one_view_of_both_modalities(data):
    ds = ClipDataset(data, subset="all", clip_len=T, crop=CROP, norm=RAW)
    flips = set()
    for seed, i in enumerate(list(range(len(ds))) * 3):
        torch.manual_seed(seed)
        start, view = ds.draw(i)
        torch.manual_seed(seed)
        item = ds[i]
        v = ds.videos[i]
        assert item["start"] == start and 0 <= start <= max(0, v.n_flows - T)
        if v.n_flows < T:
            continue
        rgb, flow = from_files(data, v.video_id, start, T)
        want = make_clip(rgb, flow, crop_box=view.crop_box(SIZE, SIZE, CROP), flip=view.flip,
                         norm=RAW)
        assert torch.equal(item["rgb"], want["rgb"]) and torch.equal(item["flow"], want["flow"])
        flips.add(view.flip)
    assert flips == {True, False}


def test_labels_and_splits_follow_the_index(data):
    index = DatasetIndex.load(DataLayout(data).index_path)
    by_id = index.by_id()
    for split in (1, 2, 3):
        train = ClipDataset(data, split=split, subset="train", clip_len=T, crop=CROP)
        test = EvalClipDataset(data, split=split, subset="test", clip_len=T, crop=CROP)
        assert {v.video_id for v in train.videos} == {
            v.video_id for v in index.videos if v.splits[split - 1] == 1}
        assert {v.video_id for v in test.videos} == {
            v.video_id for v in index.videos if v.splits[split - 1] == 2}
        for v in train.videos + test.videos:
            assert v.label == by_id[v.video_id].label
            assert v.class_name == by_id[v.video_id].class_name
    assert index.classes == ("Left", "Right")
    assert {v.label for v in list_videos(data) if v.class_name == "Right"} == {1}


def test_short_video_loops_its_usable_frames(data):
    ds = ClipDataset(data, subset="all", clip_len=T, crop=CROP, norm=RAW, train=False)
    i = next(v.index for v in ds.videos if v.n_flows < T)
    v = ds.videos[i]
    assert v.n_frames == 3 and v.n_flows == 2
    assert clip_indices(0, T, v.n_flows) == [0, 1, 0, 1]
    item = ds[i]
    assert torch.equal(item["rgb"][:, 0], item["rgb"][:, 2])
    assert torch.equal(item["flow"][:, 1], item["flow"][:, 3])
    assert not torch.equal(item["rgb"][:, 0], item["rgb"][:, 1])


class _Probe(torch.utils.data.Dataset):
    """Which process read, and which shard handles it used."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.ds[i]
        return (os.getpid(), datasets._SHARDS.pid, [id(s) for s in datasets._SHARDS.open.values()],
                [id(s) for s in datasets._SHARDS.inherited])


def test_workers_open_their_own_shard_handles(data):
    ds = EvalClipDataset(data, subset="all", clip_len=T, crop=CROP)
    for i in range(len(ds)):
        ds[i]      # the parent opens every shard before the workers fork
    parent = {id(s) for s in datasets._SHARDS.open.values()}
    assert len(parent) > 1
    loader = DataLoader(_Probe(ds), batch_size=None, num_workers=2)
    for pid, recorded_pid, opened, inherited in loader:
        assert pid != os.getpid() and recorded_pid == pid
        assert opened and not parent & set(opened)
        assert parent <= set(inherited)


def test_workers_yield_every_sample_once_per_epoch(data):
    ds = EvalClipDataset(data, subset="all", clip_len=T, crop=CROP)
    seen = []
    for batch in DataLoader(ds, batch_size=3, num_workers=2, shuffle=True):
        seen += list(zip(batch["video"].tolist(), batch["start"].tolist()))
        assert batch["rgb"].shape[1:] == (3, T, CROP, CROP)
    assert sorted(seen) == sorted(ds.clips)
    # DistributedSampler: two ranks together cover the videos once (padding aside).
    train = ClipDataset(data, subset="all", clip_len=T, crop=CROP)
    got = []
    for rank in (0, 1):
        sampler = DistributedSampler(train, num_replicas=2, rank=rank, shuffle=True, seed=1)
        for batch in DataLoader(train, batch_size=2, sampler=sampler, num_workers=2):
            got += batch["video"].tolist()
    assert sorted(set(got)) == list(range(len(train))) and len(got) == 8


def test_segments_tsn_sampling_and_interleaved_flow_stack(data):
    ds = SegmentDataset(data, subset="all", num_segments=3, new_length=2, crop=CROP,
                        train=False, norm=RAW)
    v = max(ds.videos, key=lambda v: v.n_flows)       # 9 flows
    item = ds[v.index]
    assert item["rgb"].shape == (3, 3, CROP, CROP) and item["flow"].shape == (3, 4, CROP, CROP)
    assert v.n_flows == 9      # snippet starts 0..7 in segments [0, 2), [2, 5), [5, 8)
    starts = [0, 3, 6]         # their centres
    lo = (SIZE - CROP) // 2
    for s, t in enumerate(starts):
        rgb, flow = from_files(data, v.video_id, t, 2)
        crop = (slice(lo, lo + CROP), slice(lo, lo + CROP))
        assert torch.equal(item["rgb"][s], torch.from_numpy(rgb[0][crop]).permute(2, 0, 1).float())
        for k in range(2):     # channels x_t, y_t, x_t+1, y_t+1
            for c in range(2):
                assert torch.equal(item["flow"][s, 2 * k + c],
                                   torch.from_numpy(flow[k][crop][..., c]).float())
    train = SegmentDataset(data, subset="all", num_segments=3, new_length=10, crop=CROP)
    out = train[0]   # 10-pair stacks from 8 flows loop
    assert out["flow"].shape == (3, 20, CROP, CROP) and out["rgb"].shape == (3, 3, CROP, CROP)


def test_batched_jpeg_path_equals_per_item_path(data):
    clips = ClipDataset(data, subset="all", clip_len=T, crop=CROP)
    jpegs = JpegClipDataset(data, subset="all", clip_len=T, crop=CROP)
    order = list(range(len(clips)))
    torch.manual_seed(7)
    want = [clips[i] for i in order]
    torch.manual_seed(7)
    batch = collate_jpeg_clips([jpegs[i] for i in order])
    got = decode_clip_batch(batch, crop=CROP)
    assert torch.equal(got["rgb"], torch.stack([w["rgb"] for w in want]))
    assert torch.equal(got["flow"], torch.stack([w["flow"] for w in want]))
    assert batch["video"].tolist() == order


def test_cpu_decode_is_rgb_and_errors_name_the_buffer(data):
    v = list_videos(data)[0]
    path = DataLayout(data).frames_video_dir(v.video_id) / frame_name(1)
    raw = path.read_bytes()
    img = decode_cpu([raw])[0]
    assert np.array_equal(img, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    assert torch.equal(decode([raw]), torch.from_numpy(decode_cpu([raw])))
    with pytest.raises(ValueError, match="JPEG 1 of 2"):
        decode_cpu([raw, b"not a jpeg"])


@pytest.mark.gpu
def test_gpu_decode_matches_cpu_within_jpeg_tolerance(data):
    """nvjpeg and libjpeg-turbo agree on grey (flow) JPEGs; on colour they differ by chroma
    upsampling (4:2:0): on an H200, mean 3.7 and max 27 levels on these chroma-rich textures
    (torchvision's own test allows a mean of 2 on photographs). A swapped channel order, a wrong
    crop or flip would be tens of levels on average."""
    assert gpu_decode_available()
    ds = JpegClipDataset(data, subset="all", clip_len=T, crop=CROP)
    torch.manual_seed(3)
    batch = collate_jpeg_clips([ds[i] for i in range(len(ds))])
    cpu = decode_clip_batch(batch, crop=CROP)
    gpu = decode_clip_batch(batch, crop=CROP, device="cuda")
    flow = (gpu["flow"].cpu() - cpu["flow"]).abs()
    assert flow.max() <= 1
    rgb = (gpu["rgb"].cpu() - cpu["rgb"]).abs()
    assert rgb.mean() < 5 and rgb.max() <= 48, (rgb.mean(), rgb.max())
