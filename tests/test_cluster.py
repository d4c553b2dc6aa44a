"""The stages on a dask.distributed cluster (`--scheduler ADDRESS`, issue 7 part 1).

A LocalCluster of 2 worker processes stands in for a real cluster: the videos become tasks on
its workers, which publish into the shared DATA with the same atomic protocol, while the
driver (the `pipeline` process) alone writes the ledger. The outputs must equal a local run's
byte for byte, bad videos must fail with their reason just as locally, and a driver killed
mid-run must be resumable on the cluster.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from faultlib import (ledger_records, ledger_summary, run_and_kill, run_pipeline, tiny_dataset,
                      tmp_entries, tree_diff, truncated_copy)
from preprocess.flow import compute_flow
from preprocess.frames import extract_frames
from preprocess.layout import DataLayout
from preprocess.shards import build_shards, parse_size

SIZE, SHARD_SIZE = 32, "40KB"
KEYS = {"frames": ("frames",), "flow": ("frames", "flows"),
        "shards": ("shard", "row", "frames", "flows")}


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import Client, LocalCluster   # the `cluster` extra (make test has it)
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                      dashboard_address=None) as c, Client(c) as client:
        yield c, client


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Six tiny videos plus a truncated and a zero-byte one, and a local run of all stages."""
    root = tmp_path_factory.mktemp("cluster")
    videos = root / "videos"
    ids = tiny_dataset(videos, per_class=3, frames=(6, 8, 5))
    truncated_copy(videos / "Left" / "v_Left_g01.avi", videos / "Left" / "v_cut.avi", 0.6)
    (videos / "Up" / "v_empty.avi").write_bytes(b"")
    data = root / "local"
    extract_frames(videos, data, size=SIZE, progress=False)
    compute_flow(data, backend="opencv", progress=False)
    build_shards(data, shard_bytes=parse_size(SHARD_SIZE), progress=False)
    return videos, data, ids


def stage_args(stage: str, videos: Path, data: Path, scheduler: str) -> list[str]:
    common = ["--data", str(data), "--scheduler", scheduler]
    if stage == "frames":
        return ["frames", "--videos", str(videos), "--size", str(SIZE), *common]
    if stage == "flow":
        return ["flow", "--backend", "opencv", *common]
    return ["shards", "--shard-size", SHARD_SIZE, *common]


def assert_same(local: Path, data: Path, stage: str) -> None:
    a, b = DataLayout(local), DataLayout(data)
    assert tree_diff(a.stage_output_dir(stage), b.stage_output_dir(stage)) == []
    assert a.params_path(stage).read_bytes() == b.params_path(stage).read_bytes()
    assert ledger_summary(local, stage, KEYS[stage]) == ledger_summary(data, stage, KEYS[stage])
    assert tmp_entries(data) == []


def test_every_stage_on_the_cluster_equals_a_local_run(cluster, local, tmp_path):
    c, _ = cluster
    videos, ref, ids = local
    data = tmp_path / "DATA"
    for stage in ("frames", "flow", "shards"):
        r = run_pipeline(*stage_args(stage, videos, data, c.scheduler_address))
        assert r.returncode == 1, r.stdout + r.stderr    # the two bad videos, as locally
        assert f"{stage}: {len(ids)}/{len(ids) + 2} done" in r.stdout, r.stdout
        assert "FAILED Left/v_cut: " in r.stdout and "FAILED Up/v_empty: " in r.stdout
        assert_same(ref, data, stage)
    reasons = {k: v[0] for k, v in ledger_summary(data, "frames").items() if v[0] != "done"}
    assert set(reasons) == {"Left/v_cut", "Up/v_empty"}


def test_a_driver_killed_mid_run_resumes_on_the_cluster(cluster, local, tmp_path):
    """kill -9 of the driver: tasks already running on the workers may still publish their
    video (the cluster outlives the driver); once they are idle, a rerun adopts those videos
    and redoes the rest, and the result equals a local run."""
    c, client = cluster
    videos, ref, _ = local
    data = tmp_path / "DATA"
    shutil.copytree(ref, data, ignore=shutil.ignore_patterns("flow*", "shards*"))  # frames only
    args = stage_args("flow", videos, data, c.scheduler_address)
    killed = run_and_kill(args, lambda: ledger_records(data, "flow") >= 4, moment="half")
    assert killed.moment == "half", killed.output
    wait_idle(client)
    assert run_pipeline(*args).returncode == 1
    assert_same(ref, data, "flow")


def wait_idle(client, timeout: float = 30) -> None:
    """Until no worker executes a task (a task whose driver died runs to its end)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        busy = client.run(lambda dask_worker: dask_worker.state.executing_count)
        if not any(busy.values()) and not any(client.processing().values()):
            return
        time.sleep(0.05)
    raise TimeoutError("the cluster's workers are still busy")
