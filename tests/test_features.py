"""Teacher-feature cache: exact targets per (window, view), resumable, keyed, used by distill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.config import FeatureConfig, load_train_config
from pipeline.datasets import ClipDataset, clip_indices, make_clip, read_frames
from pipeline.features import (DistillDataset, StaleCache, compute_teacher_features, find_cache,
                               views, window_starts)
from pipeline.train import RunPaths, load_trained, read_log, seeded, train_run
from preprocess.layout import DataLayout
from preprocess.shards import read_table, shard_paths
from tests.test_train_data import CLIP_LEN, CROP, copy_data, tiny_data

REPO = Path(__file__).resolve().parents[1]
SPEC = FeatureConfig(stride=2, workers=0, device="cpu")
QUIET = dict(progress=False, log=lambda s: None)


def tiny(kind, **kw):
    opts = dict(arch="tiny", epochs=1, batch_size=3, workers=0, clip_len=CLIP_LEN, crop=CROP,
                lr=0.05, deterministic=True, device="cpu")
    opts.update(kw)
    return load_train_config(kind, options=opts)


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """Tiny DATA with a trained tiny flow teacher and its feature cache."""
    d = copy_data(tiny_data(tmp_path_factory), tmp_path_factory.mktemp("features") / "data")
    train_run(d, tiny("teacher"), **QUIET)
    summary = compute_teacher_features(d, teacher="teacher_split1", spec=SPEC, progress=False)
    assert summary.ok and summary.done_now == 9
    return d


def test_grid_is_windows_by_centre_and_corners_by_flip():
    assert window_starts(7, 4, 2) == [0, 2] and window_starts(20, 16, 8) == [0]
    assert window_starts(3, 4, 2) == [0]                 # shorter than a clip: one looped window
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    vs = views(FeatureConfig())
    assert len(vs) == 10 and len({(v.top, v.left, v.flip) for v in vs}) == 10
    assert (vs[0].top, vs[0].left, vs[0].flip, vs[1].flip) == (0.5, 0.5, False, True)


def test_every_cached_feature_is_the_teacher_on_that_views_flow_clip(taught):
    """Stored float16 (features) and float32 (logits): equal to a fresh teacher run."""
    cache = find_cache(taught, "teacher_split1", SPEC)
    teacher, _ = load_trained(RunPaths(taught / "runs" / "teacher_split1").dir)
    ds = DistillDataset(taught, split=1, clip_len=CLIP_LEN, crop=CROP, cache=cache)
    assert ds.spec.stride == 2 and ds.views == views(SPEC)  # the grid read from the cache
    grid = views(SPEC)
    with h5py.File(cache, "r") as f:
        assert f["features"].dtype == np.float16 and f["logits"].dtype == np.float32
        ids = [x.decode() for x in f["video_id"][()]]
        assert ids == [v.video_id for v in ds.videos] and len(ids) == 9
        off, feats, logits = f["window_offset"][()], f["features"][()], f["logits"][()]
        assert json_list(f.attrs["left_out"]) == {}
    for i, v in enumerate(ds.videos):
        for w, start in enumerate(window_starts(v.n_flows, CLIP_LEN, SPEC.stride)):
            flow = read_frames(v, "flow", clip_indices(start, CLIP_LEN, v.n_flows))
            clips = torch.stack([make_clip(flow=flow, crop_box=g.crop_box(32, 32, CROP),
                                           flip=g.flip)["flow"] for g in grid])
            with torch.no_grad():
                f_ = teacher.forward_features(clips)
                l_ = teacher.forward_head(f_)
            np.testing.assert_allclose(feats[off[i] + w], f_.numpy(), rtol=2e-3, atol=1e-4)
            np.testing.assert_allclose(logits[off[i] + w], l_.numpy(), rtol=1e-5, atol=1e-5)


def json_list(s):
    return json.loads(s)


def test_distill_items_cut_rgb_by_the_drawn_view_and_match_online_teacher(taught):
    cache = find_cache(taught, "teacher_split1", SPEC)
    teacher, _ = load_trained(RunPaths(taught / "runs" / "teacher_split1").dir)
    cached = DistillDataset(taught, split=1, spec=SPEC, clip_len=CLIP_LEN, crop=CROP,
                            cache=cache)
    online = DistillDataset(taught, split=1, spec=SPEC, clip_len=CLIP_LEN, crop=CROP,
                            online=True)
    assert cached.modalities == ("rgb",) and online.modalities == ("rgb", "flow")
    drawn = set()
    for seed in range(12):
        i = seed % len(cached)
        with seeded(seed):
            a = cached[i]
        with seeded(seed):
            b = online[i]
        assert (a["window"], a["view"], a["start"]) == (b["window"], b["view"], b["start"])
        drawn.add((a["window"], a["view"]))
        v, g = cached.videos[i], views(SPEC)[a["view"]]
        rgb = read_frames(v, "rgb", clip_indices(a["start"], CLIP_LEN, v.n_flows))
        expect = make_clip(rgb, crop_box=g.crop_box(32, 32, CROP), flip=g.flip)["rgb"]
        assert torch.equal(a["rgb"], expect) and torch.equal(a["rgb"], b["rgb"])
        with torch.no_grad():
            live = teacher.forward_features(b["flow"][None])[0]
        torch.testing.assert_close(a["teacher_features"], live, rtol=2e-3, atol=1e-4)
    assert len(drawn) > 3                                   # the grid is sampled, not one view


def test_distill_trains_from_the_cache_without_reading_flow(taught, tmp_path, monkeypatch):
    d = copy_data(taught, tmp_path / "data")
    read = DistillDataset.read
    modalities = []

    def spy(self, video, modality, indices):
        modalities.append(modality)
        return read(self, video, modality, indices)

    monkeypatch.setattr(DistillDataset, "read", spy)
    cached = train_run(d, tiny("distill", name="imrs"), feature_spec=SPEC, **QUIET)
    assert set(modalities) == {"rgb"} and len(modalities) >= 9
    modalities.clear()
    online = train_run(d, tiny("distill", name="imrs_online", online_teacher=True),
                       feature_spec=SPEC, **QUIET)
    assert "flow" in modalities
    a, b = cached.history[0], online.history[0]
    assert set(a) >= {"train_loss", "train_ce", "train_feature", "train_kl"}
    # the same draws and the same targets (to float16): the same training, online or cached
    for k in ("train_loss", "train_ce", "train_feature", "train_kl"):
        assert a[k] == pytest.approx(b[k], rel=1e-2), k
    assert read_log(RunPaths(d / "runs" / "imrs").log)[0]["train_clips"] == 9


def test_stale_cache_is_refused_saying_what_changed(taught, tmp_path):
    d = copy_data(taught, tmp_path / "data")
    with pytest.raises(StaleCache, match="view grid or clip geometry changed"):
        find_cache(d, "teacher_split1", FeatureConfig(stride=3, workers=0))
    (d / "runs" / "teacher_split1").rename(d / "runs" / "teacher_b")
    with pytest.raises(FileNotFoundError, match="no teacher-feature cache for teacher_b"):
        find_cache(d, "teacher_b", SPEC)
    (d / "runs" / "teacher_b").rename(d / "runs" / "teacher_split1")
    assert find_cache(d, "teacher_split1") == find_cache(d, "teacher_split1", SPEC)
    model_pt = RunPaths(d / "runs" / "teacher_split1").model
    saved = torch.load(model_pt, weights_only=False)
    saved["state_dict"]["fc.bias"] += 1.0                  # the teacher changed
    torch.save(saved, model_pt)
    with pytest.raises(StaleCache, match="teacher checkpoint changed"):
        find_cache(d, "teacher_split1", SPEC)
    with pytest.raises(StaleCache, match="teacher checkpoint changed"):
        find_cache(d, "teacher_split1")                     # any grid: none is valid now
    with pytest.raises(StaleCache, match="run `pipeline teacher-features"):
        train_run(d, tiny("distill"), feature_spec=SPEC, **QUIET)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from pipeline.config import FeatureConfig
    from pipeline.features import compute_teacher_features
    done = []
    def on_video(video_id):
        done.append(video_id)
        if len(done) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
    compute_teacher_features(sys.argv[1], teacher="teacher_split1", progress=False,
                             spec=FeatureConfig(stride=2, workers=0, device="cpu"),
                             on_video=on_video)
""")


def test_killed_stage_reruns_only_unfinished_videos_and_equals_a_straight_run(taught, tmp_path):
    d = copy_data(taught, tmp_path / "data")
    for p in (d / "features").iterdir():
        p.unlink()                                          # start from no cache
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", KILLER, str(d)], env=env, capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert p.returncode == -signal.SIGKILL, p.stderr
    parts = [x for x in (d / "features").iterdir() if x.name.endswith(".parts")]
    assert len(parts) == 1 and not list((d / "features").glob("*.h5"))
    published = {str(x.relative_to(parts[0]))[:-3] for x in parts[0].rglob("*.h5")}
    assert len(published) == 4
    computed = []
    summary = compute_teacher_features(d, teacher="teacher_split1", spec=SPEC, progress=False,
                                       on_video=computed.append)
    assert (summary.already_done, summary.done_now, summary.ok) == (4, 5, True)
    assert len(computed) == 5 and not published & set(computed)  # only the unfinished ones
    assert not parts[0].exists()                            # merged, then removed
    again = find_cache(d, "teacher_split1", SPEC)
    straight = find_cache(taught, "teacher_split1", SPEC)
    assert again.name == straight.name
    with h5py.File(again, "r") as a, h5py.File(straight, "r") as b:
        for k in ("video_id", "n_windows", "starts", "features", "logits"):
            assert np.array_equal(a[k][()], b[k][()]), k


def test_a_damaged_video_fails_alone_is_skipped_by_distill_and_retried(taught, tmp_path):
    d = copy_data(taught, tmp_path / "data")
    for p in (d / "features").iterdir():
        p.unlink()
    victim = ClipDataset(d, subset="train", modalities=("flow",)).videos[4].video_id
    shard = shard_paths(DataLayout(d))[0]
    with h5py.File(shard, "r+") as f:
        t = read_table(f)
        row = list(t["video_id"]).index(victim)
        pos = int(t["flow_offsets"][2 * int(t["flow_start"][row]) + 3]) + 40
        original = int(f["flow"][pos])
        f["flow"][pos] = original ^ 0xFF
    # a worker process reads the shards, so no handle stays open here across the repair
    spec = FeatureConfig(stride=2, workers=1, device="cpu")
    summary = compute_teacher_features(d, teacher="teacher_split1", spec=spec, progress=False)
    assert list(summary.failed) == [victim] and summary.done_now == 8
    assert "CRC-32" in summary.failed[victim]
    assert "shard_00000.h5" in summary.failed[victim]
    logs = []
    ds = DistillDataset(d, split=1, spec=SPEC, clip_len=CLIP_LEN, crop=CROP,
                        cache=summary.cache, log=logs.append)
    assert len(ds) == 8 and victim in logs[0]
    with h5py.File(shard, "r+") as f:                      # repaired: the rerun retries it
        f["flow"][pos] = original
    again = compute_teacher_features(d, teacher="teacher_split1", spec=spec, progress=False)
    assert again.ok and again.done_now == 1 and again.already_done == 8
    with h5py.File(again.cache, "r") as f:
        assert len(f["video_id"]) == 9 and json_list(f.attrs["left_out"]) == {}
