"""The training loop on real shards: data order, resumable checkpoints, SIGTERM, kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.config import load_train_config
from pipeline.datasets import ClipDataset
from pipeline.train import (EpochBatchSampler, RunConfigMismatch, RunPaths, SeededItems,
                            build_model, load_trained, read_log, seed_all, train_run)
from tests.test_train_data import CLIP_LEN, CROP, copy_data, tiny_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def tiny_cfg(kind="teacher", **kw):
    opts = dict(arch="tiny", epochs=2, batch_size=3, workers=0, clip_len=CLIP_LEN, crop=CROP,
                lr=0.05, deterministic=True, device="cpu")
    if kind in ("spatial", "temporal"):
        opts.update(clip_len=None, segments=2)
    opts.update(kw)
    return load_train_config(kind, options=opts)


def test_sampler_order_is_a_function_of_seed_and_epoch_and_ranks_split_it():
    a = EpochBatchSampler(10, 4, seed=3)
    a.set_epoch(2)
    batches = [[i for _, i in b] for b in a]
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    assert len(set(sum(batches, []))) == 8                         # no repeats in an epoch
    b = EpochBatchSampler(10, 4, seed=3)
    b.set_epoch(2, start_step=1)                                   # resume after step 1
    assert [[i for _, i in x] for x in b] == batches[1:]
    a.set_epoch(3)
    assert [[i for _, i in x] for x in a] != batches               # a new permutation
    ranks = [EpochBatchSampler(10, 4, seed=3, rank=r, world=2) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    halves = [[[i for _, i in x] for x in s] for s in ranks]
    for step in range(2):
        assert len(halves[0][step]) == len(halves[1][step]) == 2
        assert sorted(halves[0][step] + halves[1][step]) == sorted(batches[step])
    with pytest.raises(ValueError, match="does not divide"):
        EpochBatchSampler(10, 3, seed=0, world=2)


def test_augmentation_draws_depend_on_seed_epoch_index_only(data):
    ds = SeededItems(ClipDataset(data, modalities=("rgb",), clip_len=CLIP_LEN, crop=CROP), 7)
    first = ds[(0, 1)]
    torch.manual_seed(123)                                         # the global RNG is irrelevant
    again = ds[(0, 1)]
    assert torch.equal(first["rgb"], again["rgb"]) and first["start"] == again["start"]
    state = torch.get_rng_state()
    ds[(0, 2)]
    assert torch.equal(state, torch.get_rng_state())               # and left untouched
    other = [ds[(e, 1)] for e in range(1, 6)]
    assert any(not torch.equal(first["rgb"], o["rgb"]) for o in other)


def test_train_teacher_writes_config_log_checkpoint_and_model(data, tmp_path):
    d = copy_data(data, tmp_path / "data")
    cfg = tiny_cfg()
    result = train_run(d, cfg, progress=False, log=lambda s: None)
    paths = RunPaths(d / "runs" / "teacher_split1")
    assert json.loads(paths.config.read_text())["lr"] == 0.05
    assert [h["epoch"] for h in read_log(paths.log)] == [1, 2] == [h["epoch"]
                                                                   for h in result.history]
    h = result.history[0]
    assert h["train_clips"] == 9 and h["val_clips"] == 3 and 0 <= h["val_acc"] <= 1
    ckpt = torch.load(paths.checkpoint, weights_only=False)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 0)
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng"}
    model, back = load_trained(paths.dir)
    assert back == cfg and not any(p.requires_grad for p in model.parameters())
    assert model(torch.zeros(1, 2, CLIP_LEN, CROP, CROP)).shape == (1, 3)
    # finished: a rerun trains nothing; another config in the same folder is refused
    logs = []
    train_run(d, cfg, progress=False, log=logs.append)
    assert "already trained" in logs[0]
    with pytest.raises(RunConfigMismatch, match=r"lr: recorded 0.05, now 0.1"):
        train_run(d, tiny_cfg(lr=0.1), progress=False)


@pytest.mark.parametrize("kind", ["rgb", "spatial", "temporal"])
def test_other_kinds_train_on_their_modality(data, tmp_path, kind):
    d = copy_data(data, tmp_path / "data")
    # channels_last "on": the 3D ResNeXt takes channels_last_3d, the 2D MAT-EffNet ignores it
    result = train_run(d, tiny_cfg(kind, epochs=1, batch_size=9 if kind == "rgb" else 3,
                                   channels_last="on"), progress=False, log=lambda s: None)
    assert result.history[0]["train_clips"] == 9
    model, cfg = load_trained(result.run_dir)
    x = (torch.zeros(2, 3, CLIP_LEN, CROP, CROP) if kind == "rgb" else
         torch.zeros(2, 2, 3 if kind == "spatial" else 20, CROP, CROP))
    assert model(x).shape == (2, 3)


def test_compiled_training_learns_the_same_weights_and_saves_the_bare_model(data, tmp_path):
    d = copy_data(data, tmp_path / "data")
    quiet = dict(progress=False, log=lambda s: None)
    # one step: on 24 px clips, batch 3, BatchNorm is so ill-conditioned that float rounding
    # (fused kernels sum in another order) grows 1e-4 -> 1 in the gradients within three steps
    one = dict(epochs=1, steps_per_epoch=1)
    eager = train_run(d, tiny_cfg(name="eager", **one), **quiet)
    compiled = train_run(d, tiny_cfg(name="compiled", compile=True, **one), **quiet)
    assert json.loads((compiled.run_dir / "config.json").read_text())["compile"] is True
    a = torch.load(eager.run_dir / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(compiled.run_dir / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()                                    # no "_orig_mod." prefixes
    seed_all(0)
    start = build_model(tiny_cfg(), 3).state_dict()
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], start[k])]
    assert moved                                                   # both really trained
    for k in a:                                                    # the same maths, fused
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)
    load_trained(compiled.run_dir)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from pipeline.config import load_train_config
    from pipeline.train import Interrupted, train_run
    data, name, action = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = load_train_config("teacher", options=dict(
        name=name, arch="tiny", epochs=2, batch_size=3, workers=0, clip_len={clip_len},
        crop={crop}, lr=0.05, deterministic=True, device="cpu", checkpoint_every=2))
    def on_step(epoch, done):
        if action != "none" and (epoch, done) == tuple(int(x) for x in action[1:].split(",")):
            os.kill(os.getpid(), signal.SIGKILL if action[0] == "k" else signal.SIGTERM)
    try:
        train_run(data, cfg, progress=False, on_step=on_step)
    except Interrupted as e:
        print(e)
        sys.exit(143)
""").format(clip_len=CLIP_LEN, crop=CROP)


def run_child(data: Path, name: str, action: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", CHILD, str(data), name, action], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_sigterm_then_kill9_mid_epoch_then_resume_equals_uninterrupted(data, tmp_path):
    """2 epochs of 3 steps, mid-epoch checkpoints every 2 steps; the same final weights."""
    d = copy_data(data, tmp_path / "data")
    ref = run_child(d, "straight", "none")
    assert ref.returncode == 0, ref.stderr

    # SIGTERM after step 1 of epoch 1: the step in flight (2) finishes, is saved, exit 143
    p = run_child(d, "broken", "t0,1")
    assert p.returncode == 143, p.stderr
    assert "stopped by SIGTERM at epoch 1, step 2" in p.stdout
    paths = RunPaths(d / "runs" / "broken")
    ckpt = torch.load(paths.checkpoint, weights_only=False)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2) and not paths.model.exists()

    # kill -9 after step 3 of epoch 2: its last checkpoint is step 2 (mid-epoch), step 3 is lost
    p = run_child(d, "broken", "k1,3")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "resuming at epoch 1, step 2" in p.stdout
    ckpt = torch.load(paths.checkpoint, weights_only=False)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2) and not paths.model.exists()

    p = run_child(d, "broken", "none")
    assert p.returncode == 0, p.stderr
    assert "resuming at epoch 2, step 2" in p.stdout
    a = torch.load(d / "runs" / "straight" / "model.pt", weights_only=False)
    b = torch.load(paths.model, weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # the logged epochs are those of the uninterrupted run, each once
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in b["history"]]
    assert [h["epoch"] for h in read_log(paths.log)] == [1, 2]


def test_cli_commands_chain_with_config_file_and_options(data, tmp_path):
    from click.testing import CliRunner
    from pipeline.cli import cli
    d = copy_data(data, tmp_path / "data")
    toml = tmp_path / "tiny.toml"
    toml.write_text(f'arch = "tiny"\nclip_len = {CLIP_LEN}\ncrop = {CROP}\nepochs = 3\n'
                    f'workers = 0\ndevice = "cpu"\n')
    run = CliRunner().invoke
    bad = run(cli, ["train-teacher", "--data", str(d), "--epochs", "1", "--crop", "99"])
    assert bad.exit_code == 2 and "No such option '--crop'" in bad.output
    big = run(cli, ["train-teacher", "--data", str(d), "--arch", "tiny", "--workers", "0"])
    assert big.exit_code == 1 and "crop 112 is larger than the frames" in big.output
    assert not (d / "runs" / "teacher_split1").exists()     # nothing half-made to refuse later
    r = run(cli, ["train-teacher", "--data", str(d), "--config", str(toml), "--epochs", "1",
                  "--batch-size", "3", "--lr", "0.05"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((d / "runs" / "teacher_split1" / "config.json").read_text())
    assert (cfg["epochs"], cfg["clip_len"], cfg["lr"], cfg["arch"]) == (1, CLIP_LEN, 0.05, "tiny")
    r = run(cli, ["teacher-features", "--data", str(d), "--stride", "2", "--workers", "0"])
    assert r.exit_code == 0 and "9/9 done" in r.output, r.output
    r = run(cli, ["distill", "--data", str(d), "--config", str(toml), "--epochs", "1",
                  "--batch-size", "3", "--stride", "3"])
    assert r.exit_code == 1 and "view grid or clip geometry changed" in r.output
    r = run(cli, ["distill", "--data", str(d), "--config", str(toml), "--epochs", "1",
                  "--batch-size", "3"])                     # the cache's own grid (stride 2)
    assert r.exit_code == 0, r.output
    r = run(cli, ["evaluate", "--data", str(d), "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "| IMRS + flow teacher | distill_split1+teacher_split1 |" in r.output


def test_a_run_folder_is_locked_and_cleared_of_a_killed_write(data, tmp_path):
    from preprocess.ledger import StageLock, StageLocked
    d = copy_data(data, tmp_path / "data")
    run = d / "runs" / "teacher_split1"
    run.mkdir(parents=True)
    debris = run / ".tmp-checkpoint.pt.4242.deadbeef"
    debris.write_bytes(b"half a checkpoint")
    with StageLock(run / "run.lock", "someone else"):
        with pytest.raises(StageLocked, match="train-teacher --name teacher_split1"):
            train_run(d, tiny_cfg(epochs=1), progress=False, log=lambda s: None)
    train_run(d, tiny_cfg(epochs=1), progress=False, log=lambda s: None)
    assert not debris.exists() and (run / "model.pt").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
