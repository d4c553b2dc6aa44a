"""The shared stage machinery: atomic publish, ledger, parameter record, lock, runner."""
import json
import os
import subprocess
import sys

import pytest

from preprocess.atomic import (TMP_PREFIX, clean_stale_temps, publishing_dir, remove_published,
                               write_json_atomic)
from preprocess.layout import DataLayout, flow_names, frame_name
from preprocess.ledger import (DONE, FAILED, Ledger, ParamsMismatch, Record, StageLock,
                               StageLocked, check_params)
from preprocess.runner import DataNotWritable, run_stage, stage_status


def test_names_are_one_based_five_digits():
    assert frame_name(1) == "img_00001.jpg"
    assert flow_names(12) == ("flow_x_00012.jpg", "flow_y_00012.jpg")


def test_publishing_dir_is_all_or_nothing(tmp_path):
    final = tmp_path / "cls" / "vid"
    with pytest.raises(RuntimeError):
        with publishing_dir(final) as tmp:
            (tmp / "a.jpg").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not final.exists()
    assert not [p for p in (tmp_path / "cls").iterdir()]
    with publishing_dir(final) as tmp:
        (tmp / "a.jpg").write_bytes(b"x")
    assert (final / "a.jpg").read_bytes() == b"x"
    with pytest.raises(FileExistsError):
        with publishing_dir(final) as tmp:
            (tmp / "b.jpg").write_bytes(b"y")
    assert sorted(p.name for p in final.iterdir()) == ["a.jpg"]
    assert [p.name for p in (tmp_path / "cls").iterdir()] == ["vid"]


def test_clean_stale_temps_and_remove_published(tmp_path):
    (tmp_path / "c" / f"{TMP_PREFIX}v.1.ab").mkdir(parents=True)
    (tmp_path / "c" / f"{TMP_PREFIX}f.jpg").write_bytes(b"")
    (tmp_path / "c" / "kept").mkdir()
    assert clean_stale_temps(tmp_path) == 2
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["kept"]
    remove_published(tmp_path / "c")
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


def test_ledger_last_record_wins_and_torn_tail_is_ignored(tmp_path):
    led = Ledger(tmp_path / "l.jsonl")
    led.append([Record("a", FAILED, "bad"), Record("b", DONE, info={"frames": 3})])
    led.append([Record("a", DONE)])
    with open(led.path, "a") as f:
        f.write('{"item": "c", "status": "do')  # a kill mid-write
    recs = led.load()
    assert set(recs) == {"a", "b"} and recs["a"].status == DONE
    assert recs["b"].info == {"frames": 3}
    led.append([Record("c", DONE)])  # the torn tail is dropped before appending
    assert led.load()["c"].status == DONE
    assert all(json.loads(line) for line in led.path.read_text().splitlines())
    led.reset()
    assert led.load() == {}


def test_params_recorded_then_refused_then_forced(tmp_path):
    p = tmp_path / "meta" / "frames.params.json"
    assert check_params(p, "frames", {"size": 256}, force=False) is False
    assert check_params(p, "frames", {"size": 256}, force=False) is False
    with pytest.raises(ParamsMismatch, match="size: recorded 256, now 128"):
        check_params(p, "frames", {"size": 128}, force=False)
    assert json.loads(p.read_text()) == {"size": 256}
    assert check_params(p, "frames", {"size": 128}, force=True) is True
    assert json.loads(p.read_text()) == {"size": 128}


def test_stage_lock_excludes_another_process(tmp_path):
    lock = tmp_path / "frames.lock"
    code = ("import sys; from preprocess.ledger import StageLock, StageLocked\n"
            "try:\n    StageLock(sys.argv[1], 'frames').__enter__()\n"
            "except StageLocked as e:\n    print(e); sys.exit(3)\n")
    with StageLock(lock, "frames"):
        r = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True, text=True)
        assert r.returncode == 3 and "another `pipeline frames` is running" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True, text=True)
    assert r.returncode == 0


def _work(out_dir, item):
    """A tiny stage: publish one folder per item; items named bad* fail."""
    if item.startswith("bad"):
        raise ValueError(f"{item} is unreadable")
    with publishing_dir(out_dir / item) as tmp:
        (tmp / "x.txt").write_text(item)
    return {"n": len(item)}


def test_run_stage_records_failures_and_redoes_only_unfinished(tmp_path):
    import functools
    lay = DataLayout(tmp_path / "data")
    work = functools.partial(_work, lay.frames_dir)
    items = ["c/a", "c/b", "bad/x"]
    s = run_stage("frames", lay, items, work, {"v": 1}, jobs=2, progress=False,
                  known_failures={"c/missing": "listed but not on disk"})
    assert (s.done_now, s.already_done) == (2, 0)
    assert set(s.failed) == {"bad/x", "c/missing"} and "unreadable" in s.failed["bad/x"]
    assert "2/4 done" in s.line()
    st = stage_status(lay, "frames", items)
    assert st["done"] == 2 and st["pending"] == 0 and set(st["failed"]) == {"bad/x", "c/missing"}
    mtime = (lay.frames_dir / "c/a/x.txt").stat().st_mtime_ns
    lines = len(lay.ledger_path("frames").read_text().splitlines())
    run_stage("frames", lay, items, work, {"v": 1}, progress=False,
              known_failures={"c/missing": "listed but not on disk"})
    # a rerun appends only the retried item, not the unchanged known failure again
    assert len(lay.ledger_path("frames").read_text().splitlines()) == lines + 1
    s2 = run_stage("frames", lay, items + ["c/new"], work, {"v": 1}, jobs=1, progress=False)
    assert (s2.done_now, s2.already_done) == (1, 2) and set(s2.failed) == {"bad/x"}
    assert (lay.frames_dir / "c/a/x.txt").stat().st_mtime_ns == mtime  # never rewritten
    with pytest.raises(ParamsMismatch):
        run_stage("frames", lay, items, work, {"v": 2}, progress=False)
    s3 = run_stage("frames", lay, items, work, {"v": 2}, force=True, progress=False)
    assert s3.done_now == 2 and s3.already_done == 0


def test_read_only_data_is_refused_at_start(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a read-only bind is what a real user hits
        ro = tmp_path / "ro"
        ro.mkdir()
        script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
                  f"{sys.executable} -c 'import pathlib, preprocess.runner as r; "
                  f"r.ensure_writable(pathlib.Path(\"{ro}/data\"))'")
        r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
        assert r.returncode != 0 and "DataNotWritable" in r.stderr, r.stderr
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(DataNotWritable):
            run_stage("frames", DataLayout(ro / "data"), [], lambda i: {}, {}, progress=False)


def test_run_stage_on_a_dask_cluster_equals_local_run(tmp_path):
    """Items become tasks on a 2-process LocalCluster; outputs and ledger match a local run."""
    import functools

    import cloudpickle
    from dask.distributed import LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    items = [f"c/v{i}" for i in range(6)] + ["bad/z"]
    local = DataLayout(tmp_path / "local")
    run_stage("frames", local, items, functools.partial(_work, local.frames_dir), {}, jobs=2,
              progress=False)
    dist = DataLayout(tmp_path / "dist")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        s = run_stage("frames", dist, items, functools.partial(_work, dist.frames_dir), {},
                      progress=False, scheduler=cluster.scheduler_address)
    assert s.done_now == 6 and set(s.failed) == {"bad/z"}
    for item in items[:-1]:
        assert (dist.frames_dir / item / "x.txt").read_text() == \
            (local.frames_dir / item / "x.txt").read_text()
    assert Ledger(dist.ledger_path("frames")).load() == Ledger(local.ledger_path("frames")).load()


def _fill_disk(out_dir, item):
    if item == "c/full":
        raise OSError(28, "No space left on device", str(out_dir / item / "img_00001.jpg"))
    return _work(out_dir, item)


def test_full_disk_stops_the_stage_and_leaves_the_video_pending(tmp_path):
    import functools

    from preprocess.runner import StorageFull
    lay = DataLayout(tmp_path / "data")
    with pytest.raises(StorageFull, match="No space left on device while writing .*img_00001"):
        run_stage("frames", lay, ["c/full"], functools.partial(_fill_disk, lay.frames_dir), {},
                  progress=False)
    assert "c/full" not in Ledger(lay.ledger_path("frames")).load()
    assert stage_status(lay, "frames", ["c/full"])["pending"] == 1


def test_clean_stale_temps_stops_at_max_depth(tmp_path):
    (tmp_path / "c" / f"{TMP_PREFIX}v.1").mkdir(parents=True)
    (tmp_path / "c" / "v").mkdir()
    (tmp_path / "c" / "v" / f"{TMP_PREFIX}deep").write_bytes(b"")
    assert clean_stale_temps(tmp_path, max_depth=2) == 1
    assert (tmp_path / "c" / "v" / f"{TMP_PREFIX}deep").exists()
    assert not (tmp_path / "c" / f"{TMP_PREFIX}v.1").exists()
    assert clean_stale_temps(tmp_path) == 1
