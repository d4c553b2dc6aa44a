"""Video-level evaluation, fusion, the results table and its PNG figures."""
from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import load_train_config
from pipeline.datasets import EvalClipDataset
from pipeline.evaluate import (EvalConfig, VideoScores, aggregate, confusion_matrix, evaluate,
                               fuse, score_run, topk_accuracy)
from pipeline.plots import Panel, charts_image, confusion_matrix_image
from pipeline.train import RunPaths, load_trained, train_run
from tests.test_train_data import CLIP_LEN, CROP, copy_data, tiny_data

EVAL = EvalConfig(workers=0, progress=False, device="cpu")


def test_clip_scores_average_per_video_and_topk():
    video = np.array([4, 4, 9, 9, 9, 2])
    label = np.array([1, 1, 0, 0, 0, 2])
    probs = np.array([[.1, .8, .1], [.5, .4, .1], [.2, .7, .1], [.6, .3, .1], [.7, .2, .1],
                      [.5, .1, .4]])
    s = aggregate(video, label, probs)
    assert s.videos.tolist() == [2, 4, 9] and s.clips.tolist() == [1, 2, 3]
    np.testing.assert_allclose(s.probs[1], [.3, .6, .1], atol=1e-6)
    np.testing.assert_allclose(s.probs[2], [.5, .4, .1], atol=1e-6)
    assert topk_accuracy(s, 1) == pytest.approx(2 / 3)      # video 2 predicts class 0
    assert topk_accuracy(s, 2) == 1.0 and topk_accuracy(s, 5) == 1.0
    assert confusion_matrix(s, 3).tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    other = VideoScores(s.videos, s.labels, np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]],
                                                     np.float32), s.clips)
    f = fuse(s, other)
    np.testing.assert_allclose(f.probs, (s.probs + other.probs) / 2)
    assert topk_accuracy(f, 1) == 1.0
    with pytest.raises(ValueError, match="different test videos"):
        fuse(s, VideoScores(s.videos[:2], s.labels[:2], s.probs[:2], s.clips[:2]))


def test_pngs_are_drawn_and_decode():
    img = confusion_matrix_image(np.array([[3, 1], [0, 4]]), ["Walk", "Run"], "title")
    assert img.ndim == 3 and img.dtype == np.uint8
    # the colour of a cell follows its row-normalised rate: the diagonal 4/4 is darker
    chart = charts_image([Panel("loss", "ce", {"a": ([1, 2, 3], [1.0, 0.5, 0.2])}),
                          Panel("empty", "x")])
    assert chart.shape[0] == 320 and chart.shape[1] > 2 * 480
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix_image(np.zeros((2, 2)), ["a"], "")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = copy_data(tiny_data(tmp_path_factory), tmp_path_factory.mktemp("evaluate") / "data")
    opts = dict(arch="tiny", epochs=1, batch_size=3, workers=0, crop=CROP, lr=0.05,
                device="cpu", deterministic=True)
    for kind in ("teacher", "rgb"):
        train_run(d, load_train_config(kind, options=dict(opts, clip_len=CLIP_LEN)),
                  progress=False, log=lambda s: None)
    for kind in ("spatial", "temporal"):
        train_run(d, load_train_config(kind, options=dict(opts, segments=2)), progress=False,
                  log=lambda s: None)
    return d


def test_video_score_is_the_mean_softmax_of_all_its_clips(trained):
    scores = score_run(trained, "teacher_split1", cfg=EVAL)
    model, cfg = load_trained(RunPaths(trained / "runs" / "teacher_split1").dir)
    ds = EvalClipDataset(trained, split=1, subset="test", modalities=("flow",),
                         clip_len=CLIP_LEN, crop=CROP)
    assert len(scores.videos) == 3 and scores.clips.sum() == len(ds)
    for j, v in enumerate(scores.videos):
        clips = [ds[i] for i, (video, _) in enumerate(ds.clips) if video == v]
        with torch.no_grad():
            p = torch.softmax(model(torch.stack([c["flow"] for c in clips])), 1).mean(0)
        np.testing.assert_allclose(scores.probs[j], p.numpy(), rtol=1e-5, atol=1e-6)
        assert scores.labels[j] == clips[0]["label"]
    cache = trained / "runs" / "teacher_split1" / "scores_split1.npz"
    assert cache.exists()
    # a changed model.pt invalidates the cached scores
    saved = torch.load(RunPaths(cache.parent).model, weights_only=False)
    saved["state_dict"]["fc.bias"] += torch.tensor([5.0, 0.0, 0.0])
    torch.save(saved, RunPaths(cache.parent).model)
    assert (score_run(trained, "teacher_split1", cfg=EVAL).probs[:, 0] > 0.9).all()


def test_evaluate_writes_table_csv_confusion_and_curves(trained):
    rows = evaluate(trained, cfg=EVAL, log=lambda s: None)
    names = [r.model for r in rows]
    assert names == ["Flow teacher (3D-ResNeXt+CE)", "RGB-only (3D-ResNeXt+CE)",
                     "MAT-EffNet spatial", "MAT-EffNet temporal",
                     "MAT-EffNet fused (spatial+temporal)"]
    fused = rows[-1]
    np.testing.assert_allclose(fused.scores.probs, (rows[2].scores.probs
                                                    + rows[3].scores.probs) / 2, rtol=1e-6)
    runs = trained / "runs"
    md = (runs / "results.md").read_text()
    assert "| MAT-EffNet fused (spatial+temporal) | spatial_split1+temporal_split1 | 1 |" in md
    table = list(csv.DictReader((runs / "results.csv").open()))
    assert [r["run"] for r in table][:2] == ["teacher_split1", "rgb_split1"]
    assert all(0 <= float(r["top1"]) <= float(r["top5"]) <= 1 for r in table)
    assert float(table[0]["top5"]) == 1.0                   # 3 classes: top-5 is everything
    for r in rows:
        img = cv2.imread(str(runs / "confusion" / f"{r.slug}.png"))
        assert img is not None and img.shape[0] > 50
    curves = cv2.imread(str(runs / "training_curves.png"))
    assert curves is not None and curves.shape[1] > 1000
    # an explicit fusion of two runs (IMRS + flow style) and a bad one
    rows = evaluate(trained, runs=["teacher_split1", "rgb_split1"],
                    fusions=["rgb_split1+teacher_split1"], cfg=EVAL, log=lambda s: None)
    assert rows[-1].runs == ("rgb_split1", "teacher_split1")
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate(trained, runs=["nope"], cfg=EVAL, log=lambda s: None)
