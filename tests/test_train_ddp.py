"""DistributedDataParallel on CPU: `torchrun --nproc_per_node 2` with gloo over real shards."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.train import EpochBatchSampler, RunPaths
from tests.test_train_data import CLIP_LEN, CROP, copy_data, tiny_data

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from torch.utils.data import Dataset
    from pipeline.config import load_train_config
    from pipeline.train import build_task, fit

    class Recording(Dataset):
        def __init__(self, base):
            self.base, self.seen = base, []
        def __len__(self):
            return len(self.base)
        def __getitem__(self, i):
            self.seen.append(i)
            return self.base[i]

    data, out = sys.argv[1], sys.argv[2]
    cfg = load_train_config("teacher", options=dict(
        arch="tiny", epochs=2, batch_size=4, workers=0, clip_len={clip_len}, crop={crop},
        lr=0.05, device="cpu", name="ddp"))
    task = build_task(data, cfg)
    task.train_set = Recording(task.train_set)
    fit(task, cfg, os.path.join(data, "runs", "ddp"), progress=False)
    torch.save({{"seen": task.train_set.seen, "state": task.model.backbone.state_dict(),
                "world": torch.distributed.get_world_size()}},
               os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
""").format(clip_len=CLIP_LEN, crop=CROP)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def test_two_gloo_ranks_split_the_data_and_end_with_identical_weights(data, tmp_path):
    d = copy_data(data, tmp_path / "data")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(script), str(d), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for k in r0["state"]:                     # parameters by all-reduce, BN buffers broadcast
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # 9 training videos, global batch 4: 2 steps of 2 clips per rank per epoch, disjoint halves
    sampler = EpochBatchSampler(9, 4, seed=0)
    # each rank first loads item 0 once (fit checks a sample before creating the run)
    assert r0["seen"][0] == r1["seen"][0] == 0
    r0["seen"], r1["seen"] = r0["seen"][1:], r1["seen"][1:]
    assert len(r0["seen"]) == len(r1["seen"]) == 2 * 2 * 2
    for epoch in range(2):
        a, b = r0["seen"][4 * epoch:4 * epoch + 4], r1["seen"][4 * epoch:4 * epoch + 4]
        assert not set(a) & set(b)
        expected = sampler.global_batch(epoch, 0) + sampler.global_batch(epoch, 1)
        assert sorted(a + b) == sorted(expected)
    # rank 0 alone wrote the run; its model is what every rank holds
    saved = torch.load(RunPaths(d / "runs" / "ddp").model, weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], r0["state"][k]) for k in saved)
