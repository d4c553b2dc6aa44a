"""Fault injection across the stages: kill -9 at several moments, a full disk, a read-only DATA,
two runs at once, and bad input (issue 7; the contract is DESIGN.md "Stages").

Every stage runs as a real `python -m pipeline.cli` process on tiny real videos (48x32 MJPG,
frames at --size 32). After each fault, a rerun must leave exactly what an uninterrupted run
leaves: the same bytes under the stage's output folder, the same recorded parameters and index,
a ledger that agrees record for record, and no `.tmp-` debris anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest

from faultlib import (REPO, avi_claiming_frames, copy_tree, index_ids, ledger_records,
                      ledger_summary, load_ledger, moving_texture, pipeline_cmd, run_and_kill,
                      run_pipeline, tiny_dataset, tmp_entries, tree_diff, tree_digest,
                      truncated_copy, wait_group_gone, write_avi)
from shared_data import SHARED_DATA
from preprocess.layout import DataLayout, flow_names, frame_name

SIZE = "32"
FRAMES_PER_VIDEO = (6, 8, 5)
SHARD_SIZE = "40KB"   # a few videos per shard: several shards, some holding more than one video
# Ledger fields that must agree between a resumed run and an uninterrupted one.
LEDGER_KEYS = {"frames": ("frames",), "flow": ("frames", "flows"),
               "shards": ("shard", "row", "frames", "flows")}
REAL = SHARED_DATA / "videos"


def stage_args(stage: str, videos: Path, data: Path, *extra: str) -> list[str]:
    if stage == "frames":
        return ["frames", "--videos", str(videos), "--data", str(data), "--size", SIZE, *extra]
    if stage == "flow":
        return ["flow", "--data", str(data), "--backend", "opencv", *extra]
    return ["shards", "--data", str(data), "--shard-size", SHARD_SIZE, *extra]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@dataclass(frozen=True)
class Reference:
    """Uninterrupted runs of frames, flow and shards, and DATA as it was before each stage."""
    videos: Path
    ids: list[str]
    before: dict[str, Path]   # stage -> DATA as its upstream stages left it
    after: Path               # DATA after all three stages


STAGES = ("frames", "flow", "shards")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    videos = root / "videos"
    ids = tiny_dataset(videos, per_class=3, frames=FRAMES_PER_VIDEO)
    data = root / "DATA"
    before = {}
    for stage in STAGES:
        before[stage] = copy_tree(data, root / f"before_{stage}") if data.exists() else None
        ok(run_pipeline(*stage_args(stage, videos, data)))
    assert all(r[0] == "done" for r in ledger_summary(data, "shards").values())
    return Reference(videos, ids, before, data)


def fresh_data(ref: Reference, stage: str, dst: Path) -> Path:
    """DATA as an uninterrupted run left it before `stage` (empty for frames)."""
    src = ref.before[stage]
    return copy_tree(src, dst) if src is not None else dst


def assert_same_as_reference(ref: Reference, data: Path, stage: str) -> None:
    """The stage's outputs, parameters and ledger equal the uninterrupted run's; no debris."""
    layout, ref_layout = DataLayout(data), DataLayout(ref.after)
    out = layout.stage_output_dir(stage)
    assert tree_diff(ref_layout.stage_output_dir(stage), out) == []
    assert layout.params_path(stage).read_bytes() == ref_layout.params_path(stage).read_bytes()
    assert layout.index_path.read_bytes() == ref_layout.index_path.read_bytes()
    assert tmp_entries(data) == []
    assert (ledger_summary(data, stage, LEDGER_KEYS[stage])
            == ledger_summary(ref.after, stage, LEDGER_KEYS[stage]))
    assert_ledger_consistent(data, stage)


def assert_ledger_consistent(data: Path, stage: str) -> None:
    """Every indexed video is done or failed with a reason; a done one is published whole."""
    layout = DataLayout(data)
    records = load_ledger(data, stage)
    missing = [v for v in index_ids(data) if v not in records]
    assert missing == [], f"{stage}: no ledger record for {missing}"
    for vid, rec in records.items():
        if rec["status"] != "done":
            assert rec["status"] == "failed" and rec["reason"], (vid, rec)
            continue
        info = rec["info"]
        if stage == "frames":
            folder = layout.frames_video_dir(vid)
            assert sorted(os.listdir(folder)) == [frame_name(k)
                                                  for k in range(1, info["frames"] + 1)], vid
        elif stage == "flow":
            folder = layout.flow_video_dir(vid)
            assert sorted(os.listdir(folder)) == sorted(
                n for k in range(1, info["flows"] + 1) for n in flow_names(k)), vid
        else:
            with h5py.File(layout.shards_dir / info["shard"], "r") as f:
                assert f["video_id"][info["row"]].decode() == vid
                assert int(f["n_frames"][info["row"]]) == info["frames"]


# --- kill -9 at several moments, rerun, compare ------------------------------------------------

def _moment(stage: str, data: Path, moment: str):
    out = DataLayout(data).stage_output_dir(stage)
    if moment == "first-temp":       # inside the first video (or shard): its temporary is open
        return lambda: bool(tmp_entries(out))
    if moment == "first-record":     # right after the first ledger record
        return lambda: ledger_records(data, stage) >= 1
    return lambda: ledger_records(data, stage) >= 3   # "half": 3 of the 6 videos recorded


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("moment", ["first-temp", "first-record", "half"])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(reference, tmp_path, stage, moment):
    data = fresh_data(reference, stage, tmp_path / "DATA")
    args = stage_args(stage, reference.videos, data)
    killed = run_and_kill(args, _moment(stage, data, moment), moment=moment)
    assert killed.moment == moment, f"the stage ended before the kill:\n{killed.output}"
    assert ledger_records(data, stage) < len(reference.ids), "the kill came after the last video"
    ok(run_pipeline(*args))
    assert_same_as_reference(reference, data, stage)


@pytest.mark.parametrize("stage", ["flow"])
def test_workers_die_with_a_killed_stage(reference, tmp_path, stage):
    """kill -9 of the stage's process alone (not its group): no worker outlives it to publish
    a video behind the rerun's back; the rerun then completes as if uninterrupted."""
    data = fresh_data(reference, stage, tmp_path / "DATA")
    args = stage_args(stage, reference.videos, data, "--jobs", "2")
    proc = subprocess.Popen(pipeline_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while ledger_records(data, stage) < 1 and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert proc.poll() is None, "the stage ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_death = tree_digest(data)
        wait_group_gone(proc.pid, timeout=5)
        assert tree_digest(data) == at_death, "a worker published after the stage was killed"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # orphaned workers, if any, are ours to end
        except ProcessLookupError:
            pass
    ok(run_pipeline(*stage_args(stage, reference.videos, data)))
    assert_same_as_reference(reference, data, stage)


# --- kill -9 during teacher-features and a short training run -----------------------------------

TINY_TRAIN = """
arch = "tiny"
epochs = 2
steps_per_epoch = 4
batch_size = 2
workers = 0
clip_len = 4
crop = 24
lr = 0.05
deterministic = true
device = "cpu"
checkpoint_every = 1
"""
TEACHER = "teacher_split1"
FEATURE_ARGS = ("--teacher", TEACHER, "--stride", "2", "--workers", "0", "--device", "cpu")
# Bit-identical resumption holds for one thread count (a sum's order changes with threads).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(reference, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: a tiny flow teacher on the reference DATA, then its feature cache."""
    root = tmp_path_factory.mktemp("trained")
    config = root / "tiny.toml"
    config.write_text(TINY_TRAIN)
    data = copy_tree(reference.after, root / "DATA")
    ok(run_pipeline("train-teacher", "--data", data, "--config", config, "--name", TEACHER,
                    env=ONE_THREAD))
    before_features = copy_tree(data, root / "before_features")
    ok(run_pipeline("teacher-features", "--data", data, *FEATURE_ARGS, env=ONE_THREAD))
    return {"config": config, "after": data, "before_features": before_features}


def test_training_killed_twice_resumes_to_the_same_weights(reference, trained, tmp_path):
    """kill -9 mid-epoch 1 (after its first checkpoint), then again after epoch 1 is logged:
    the third run ends with the uninterrupted run's weights, bit for bit, and its log."""
    import torch
    data = copy_tree(reference.after, tmp_path / "DATA")
    run = DataLayout(data).run_dir(TEACHER)
    args = ["train-teacher", "--data", str(data), "--config", str(trained["config"]),
            "--name", TEACHER]
    for moment, when in (("first checkpoint", lambda: (run / "checkpoint.pt").exists()),
                         ("epoch 1 logged", lambda: _lines(run / "log.jsonl") >= 1)):
        killed = run_and_kill(args, when, moment=moment, env=ONE_THREAD)
        assert killed.moment == moment, f"training ended before the kill:\n{killed.output}"
        assert not (run / "model.pt").exists()
    ok(run_pipeline(*args, env=ONE_THREAD))
    ref = DataLayout(trained["before_features"]).run_dir(TEACHER)
    a = torch.load(ref / "model.pt", weights_only=False)
    b = torch.load(run / "model.pt", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert _no_seconds(a["history"]) == _no_seconds(b["history"])
    assert _no_seconds(_log(ref)) == _no_seconds(_log(run)) and len(_log(run)) == 2
    assert (ref / "config.json").read_bytes() == (run / "config.json").read_bytes()
    # Debris of a kill mid-write in the run folder is test_a_rerun_removes_a_killed_write's.
    assert [e for e in tmp_entries(data) if not e.startswith(f"runs/{TEACHER}/")] == []


def test_a_rerun_removes_a_killed_write(reference, trained, tmp_path):
    """What a kill -9 inside write_text_atomic(config.json) leaves, the run must clear."""
    data = copy_tree(reference.after, tmp_path / "DATA")
    run = DataLayout(data).run_dir(TEACHER)
    run.mkdir(parents=True)
    (run / ".tmp-config.json.4242.deadbeef").write_text('{"arch": "ti')
    ok(run_pipeline("train-teacher", "--data", data, "--config", trained["config"], "--name",
                    TEACHER, "--epochs", "1", env=ONE_THREAD))
    assert (run / "model.pt").exists()
    assert tmp_entries(data) == []


def test_teacher_features_killed_twice_resume_to_the_same_cache(trained, tmp_path):
    """kill -9 after the first video's part, then after the third: the rerun computes only the
    rest and the merged cache holds what an uninterrupted run's holds; no part is left."""
    data = copy_tree(trained["before_features"], tmp_path / "DATA")
    features = DataLayout(data).features_dir
    args = ["teacher-features", "--data", str(data), *FEATURE_ARGS]
    for moment, n in (("first part", 1), ("third part", 3)):
        killed = run_and_kill(args, lambda: len(_parts(features)) >= n, moment=moment,
                              env=ONE_THREAD)
        assert killed.moment == moment, f"the stage ended before the kill:\n{killed.output}"
    r = ok(run_pipeline(*args, env=ONE_THREAD))
    assert "teacher-features: 4/4 done (1 now, 3 already)" in r.stdout, r.stdout
    ref = sorted(DataLayout(trained["after"]).features_dir.iterdir())
    got = sorted(features.iterdir())
    assert [p.name for p in got] == [p.name for p in ref]      # one cache, no .parts left
    assert _h5_content(got[0]) == _h5_content(ref[0])
    assert tmp_entries(data) == []


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _no_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _parts(features: Path) -> list[Path]:
    return [p for p in features.rglob("*.h5") if ".parts" in str(p.relative_to(features))
            and not p.name.startswith(".tmp-")]


def _h5_content(path: Path) -> dict:
    """Every dataset's bytes and every attribute of an HDF5 file (HDF5 timestamps aside)."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: str(v) for k, v in f.attrs.items()}
        for name, obj in f.items():
            value = obj[()]
            out[name] = (value.tolist() if value.dtype.kind == "O"
                         else (str(value.dtype), value.shape, value.tobytes()))
    return out


# --- a full disk and a read-only DATA ----------------------------------------------------------

def in_private_mounts(setup: str, command: list[str], copy_out: tuple[Path, Path] | None = None
                      ) -> subprocess.CompletedProcess:
    """Run `command` after shell `setup` inside `unshare -rm` (a private mount namespace).

    The mounts vanish with the namespace; `copy_out` (src, dst) saves src's final state first.
    """
    cmd = " ".join(_quote(c) for c in command)
    script = f"set -e; {setup}; set +e; {cmd}; rc=$?"
    if copy_out:
        script += f"; cp -a {_quote(copy_out[0])}/. {_quote(copy_out[1])}/"
    script += "; exit $rc"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _quote(s) -> str:
    import shlex
    return shlex.quote(str(s))


def disk_kib(root: Path) -> int:
    """KiB that the files under `root` take on a tmpfs (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in Path(root).rglob("*") if p.is_file())


@pytest.mark.parametrize("stage", STAGES)
def test_full_disk_stops_with_a_clear_error_and_a_rerun_completes(reference, tmp_path, stage):
    """DATA on a tmpfs with room for about half of the stage's output: the stage stops at ENOSPC
    with one clear line naming the disk's folder, publishes nothing partial and fails no video;
    once there is room, a rerun completes it as if uninterrupted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    data = mnt / "DATA"
    before = reference.before[stage]
    used = disk_kib(before) if before is not None else 0
    room = disk_kib(DataLayout(reference.after).stage_output_dir(stage)) // 2
    setup = f"mount -t tmpfs -o size={used + room + 16}k tmpfs {mnt}"
    if before is not None:
        setup += f" && cp -a {before} {data}"
    saved = tmp_path / "saved"
    saved.mkdir()
    r = in_private_mounts(setup, pipeline_cmd(*stage_args(stage, reference.videos, data)),
                          copy_out=(mnt, saved))
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Traceback" not in out, out
    assert "No space left on device" in out and str(data) in out, out
    full = saved / "DATA"   # what the full disk held when the stage stopped
    assert tmp_entries(full) == []
    records = load_ledger(full, stage)
    assert all(rec["status"] == "done" for rec in records.values()), records
    assert len(records) < len(reference.ids), "the disk never filled up"
    assert_published_match_reference(reference, full, stage)
    # With room again (here: the same folder on the roomy disk) a rerun finishes the stage.
    r2 = ok(run_pipeline(*stage_args(stage, reference.videos, full)))
    assert f"({len(reference.ids) - len(records)} now, {len(records)} already)" in r2.stdout
    assert_same_as_reference(reference, full, stage)


def assert_published_match_reference(ref: Reference, data: Path, stage: str) -> None:
    """Everything published under the stage's output folder is the reference's, byte for byte."""
    out = DataLayout(data).stage_output_dir(stage)
    ref_out = DataLayout(ref.after).stage_output_dir(stage)
    if not out.exists():
        return
    if stage == "shards":
        for shard in out.iterdir():
            assert shard.read_bytes() == (ref_out / shard.name).read_bytes(), shard.name
    else:
        for video in (v for c in out.iterdir() for v in c.iterdir()):
            rel = video.relative_to(out)
            assert tree_diff(ref_out / rel, video) == [], rel


@pytest.mark.parametrize("stage", STAGES)
def test_read_only_data_is_refused_at_start(reference, tmp_path, stage):
    data = fresh_data(reference, stage, tmp_path / "DATA")
    data.mkdir(exist_ok=True)
    before = tree_digest(data)
    r = in_private_mounts(f"mount --bind {data} {data} && mount -o remount,bind,ro {data}",
                          pipeline_cmd(*stage_args(stage, reference.videos, data)))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in out, out
    assert "not writable" in out and str(data) in out, out
    assert tree_digest(data) == before


# --- two runs at once ------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["frames", "flow"])
def test_a_second_run_on_the_same_data_stops_at_once(reference, tmp_path, stage):
    """While one run works (suspended mid-video, holding the stage lock), a second one stops at
    once with a clear message and non-zero status, touching nothing; the first then completes."""
    data = fresh_data(reference, stage, tmp_path / "DATA")
    args = stage_args(stage, reference.videos, data, "--jobs", "1")
    first = subprocess.Popen(pipeline_cmd(*args), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out_dir = DataLayout(data).stage_output_dir(stage)
    try:
        deadline = time.monotonic() + 60
        while not tmp_entries(out_dir):
            assert first.poll() is None and time.monotonic() < deadline, "first run never began"
            time.sleep(0.001)
        os.killpg(first.pid, signal.SIGSTOP)
        snapshot = copy_tree(data, tmp_path / "snapshot")
        t0 = time.monotonic()
        second = run_pipeline(*args, timeout=30)
        elapsed = time.monotonic() - t0
        assert tree_diff(snapshot, data) == []      # the second run changed nothing at all
        os.killpg(first.pid, signal.SIGCONT)
        first_out, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert second.returncode != 0
    assert f"another `pipeline {stage}` is running on {data}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert elapsed < 10
    assert first.returncode == 0, first_out
    assert_same_as_reference(reference, data, stage)


# --- bad input through every stage --------------------------------------------------------------

# Real files (data/MANIFEST.md), cheap to decode: None = must fail, else the frames it has.
REAL_FILES = {
    "moviepy_result.webm": None,                    # zero bytes
    "odd_html_page_named_Megamind.avi": None,       # an HTML page
    "moviepy_bitmap.mp4": 5,                        # 1x1 pixels, yuv444p
    "pygame_blue.mpg": 24,                          # MPEG-PS, no usable frame count, no PTS
    "torchcodec_h265_video.mp4": 10,                # HEVC
}


def bad_input_videos(root: Path) -> dict[str, int | None]:
    """The real files above and generated damage; video id -> expected frames (None: fails)."""
    expected = {}
    for name, n in REAL_FILES.items():
        cls = "real" if n is not None else "junk"
        (root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(REAL / name, root / cls / name)
        expected[f"{cls}/{Path(name).stem}"] = n
    made = root / "made"
    good = write_avi(made / "good.avi", moving_texture(6, seed=1))
    write_avi(made / "one_frame.avi", moving_texture(1, seed=2))
    expected.update({"made/good": 6, "made/one_frame": 1})
    truncated_copy(good, made / "cut_half.avi", 0.5)
    truncated_copy(good, made / "cut_late.avi", 0.8)
    (made / "zero.avi").write_bytes(b"")
    (made / "notes.mp4").write_text("this is a text file named like a video\n" * 20)
    (made / "noise.mkv").write_bytes(os.urandom(4096))
    avi_claiming_frames(good, made / "claims_more.avi", 40)
    avi_claiming_frames(good, made / "claims_fewer.avi", 2)
    expected.update({"made/cut_half": None, "made/cut_late": None, "made/zero": None,
                     "made/notes": None, "made/noise": None, "made/claims_more": None,
                     "made/claims_fewer": 6})   # decoded to the end: the header's 2 is a lie
    return expected


def test_bad_input_ends_done_or_failed_with_reason_in_every_stage(tmp_path):
    videos, data = tmp_path / "videos", tmp_path / "DATA"
    expected = bad_input_videos(videos)
    bad = sorted(v for v, n in expected.items() if n is None)
    outputs = {}
    for stage in STAGES:
        r = run_pipeline(*stage_args(stage, videos, data))
        outputs[stage] = r.stdout + r.stderr
        assert r.returncode == 1, outputs[stage]        # failures are visible in the status
        assert "Traceback" not in outputs[stage]
        records = load_ledger(data, stage)
        assert sorted(records) == sorted(expected), stage
        failed = sorted(v for v, rec in records.items() if rec["status"] == "failed")
        assert failed == bad, (stage, {v: records[v]["reason"] for v in failed})
        for vid in bad:
            reason = records[vid]["reason"]
            if stage == "frames":   # the reason names the file
                assert Path(vid).parent.name in reason and Path(vid).name in reason, reason
            else:                   # downstream: the upstream failure, with its reason
                assert reason.startswith("frames failed: "), reason
                assert load_ledger(data, "frames")[vid]["reason"] in reason
            assert f"FAILED {vid}: " in outputs[stage]
        assert_ledger_consistent(data, stage)
    frames = load_ledger(data, "frames")
    for vid, n in expected.items():
        if n is not None:
            assert frames[vid]["info"]["frames"] == n, vid
    assert load_ledger(data, "flow")["made/one_frame"]["info"]["flows"] == 0
    reasons = {v: frames[v]["reason"] for v in bad}
    assert "empty file (0 bytes)" in reasons["made/zero"]
    assert "empty file (0 bytes)" in reasons["junk/moviepy_result"]
    assert "HTML page" in reasons["junk/odd_html_page_named_Megamind"]
    assert "cannot be opened as a video" in reasons["made/notes"]
    assert "40 frames" in reasons["made/claims_more"]
    verify = run_pipeline("verify", "--data", str(data))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    status = ok(run_pipeline("status", "--data", str(data)))
    assert "made/claims_more" in status.stdout


# --- a task that outlives its driver (a cluster worker) ----------------------------------------

def test_cleanup_cannot_let_an_orphaned_task_publish_half_a_video(tmp_path, monkeypatch):
    """On a cluster a task outlives its killed driver; the rerun's cleanup of its temporary
    folder may coincide with the task renaming that folder to the final name. Whatever the
    interleaving, a final name must never hold part of a video."""
    from preprocess import atomic
    parent = tmp_path / "frames" / "Class"
    orphan_tmp = parent / f"{atomic.TMP_PREFIX}v_a.4242.deadbeef"
    orphan_tmp.mkdir(parents=True)
    for k in range(1, 6):
        (orphan_tmp / frame_name(k)).write_bytes(b"jpeg %d" % k)
    final = parent / "v_a"
    real_rmtree = shutil.rmtree

    def rmtree_racing_the_orphan(path, *args, **kwargs):
        # the cleanup has removed a first file when the orphaned task publishes its folder
        next(Path(path).iterdir()).unlink()
        try:
            os.rename(orphan_tmp, final)
        except FileNotFoundError:
            pass   # the cleanup already owns the folder: the task's publish fails, as it must
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree_racing_the_orphan)
    atomic.clean_stale_temps(tmp_path / "frames")
    assert not final.exists() or sorted(os.listdir(final)) == [frame_name(k) for k in range(1, 6)]
    assert tmp_entries(tmp_path) == []


def test_a_listed_but_missing_video_is_failed_in_every_stage_ledger(tmp_path):
    """UCF101 split files naming a video that is not on disk (a partial download)."""
    from preprocess.flow import compute_flow
    from preprocess.frames import extract_frames
    from preprocess.shards import build_shards
    videos, data = tmp_path / "videos", tmp_path / "DATA"
    for g in (1, 2):
        write_avi(videos / "Left" / f"v_Left_g0{g}_c01.avi", moving_texture(4, seed=g))
    (videos / "splits").mkdir()
    (videos / "splits" / "classInd.txt").write_text("1 Left\r\n")
    for k in (1, 2, 3):
        (videos / "splits" / f"trainlist0{k}.txt").write_text(
            "Left/v_Left_g01_c01.avi 1\r\nLeft/v_Left_g03_c01.avi 1\r\n")
        (videos / "splits" / f"testlist0{k}.txt").write_text("Left/v_Left_g02_c01.avi\r\n")
    extract_frames(videos, data, dataset="ucf101", size=32, progress=False)
    compute_flow(data, backend="opencv", progress=False)
    build_shards(data, progress=False)
    for stage in STAGES:
        rec = load_ledger(data, stage).get("Left/v_Left_g03_c01")
        assert rec is not None, f"{stage}: no ledger record for the missing video"
        assert rec["status"] == "failed" and "not found under" in rec["reason"], (stage, rec)
        assert_ledger_consistent(data, stage)
