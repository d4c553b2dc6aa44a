"""The dataset index against the real official UCF101/HMDB51 split files (data/MANIFEST.md)
over trees of empty placeholder videos, plus the failure paths: escapes, malformed lines,
missing videos, hostile names, CRLF, and the deterministic folders split."""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from preprocess.atomic import TMP_PREFIX
from preprocess.dataset_index import DatasetIndex, MissingVideo, VideoEntry, build_index
from shared_data import SHARED_DATA

SPLITS = SHARED_DATA / "splits"
HMDB = SPLITS / "hmdb51_splits"


def _official_ucf101_names() -> list[str]:
    """Every listed path of split 1 (train + test = all 13320 videos), read independently."""
    names = []
    for f in ("ucf101_trainlist01.txt", "ucf101_testlist01.txt"):
        for line in (SPLITS / f).read_text().splitlines():
            if line.strip():
                names.append(line.split()[0])
    return names


def _touch_all(root: Path, rel_paths) -> None:
    """Empty placeholder files (the index never opens them)."""
    made = set()
    for rel in rel_paths:
        p = os.path.join(root, rel)
        parent = os.path.dirname(p)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))


@pytest.fixture(scope="module")
def ucf_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("UCF-101")
    _touch_all(root, _official_ucf101_names())
    return root


@pytest.fixture(scope="module")
def hmdb_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hmdb51")
    for f in HMDB.glob("*_test_split1.txt"):
        cls = f.name[: -len("_test_split1.txt")]
        _touch_all(root, (f"{cls}/{line.split()[0]}" for line in f.read_text().splitlines()
                          if line.strip()))
    return root


def _counts(index: DatasetIndex, split: int) -> Counter:
    return Counter(v.splits[split - 1] for v in index.videos)


def write_ucf_lists(folder: Path, classes, train: dict, test: dict, eol="\r\n") -> None:
    """Official-format UCF101 split files: train lines carry the label, test lines do not."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classInd.txt").write_bytes(
        "".join(f"{i} {c}{eol}" for i, c in enumerate(classes, 1)).encode())
    for k in (1, 2, 3):
        (folder / f"trainlist0{k}.txt").write_bytes("".join(
            f"{p} {classes.index(p.split('/')[0]) + 1}{eol}" if "/" in p and
            p.split("/")[0] in classes else f"{p} 1{eol}"
            for p in train.get(k, [])).encode())
        (folder / f"testlist0{k}.txt").write_bytes(
            "".join(f"{p}{eol}" for p in test.get(k, [])).encode())


# --- UCF101, real lists ---------------------------------------------------------------------

def test_ucf101_official_lists_give_official_counts(ucf_tree):
    index = build_index(ucf_tree, "ucf101", SPLITS)  # the ucf101_ prefixed names
    assert index.dataset == "ucf101" and len(index.classes) == 101
    assert index.classes[0] == "ApplyEyeMakeup" and index.classes[36] == "HandstandPushups"
    assert index.classes == tuple(
        (SPLITS / "mmaction2_ucf101_label_map.txt").read_text().split())
    assert len(index.videos) == 13320 and index.missing == ()
    assert _counts(index, 1) == {1: 9537, 2: 3783}
    assert _counts(index, 2) == {1: 9586, 2: 3734}
    assert _counts(index, 3) == {1: 9624, 2: 3696}
    ids = [v.video_id for v in index.videos]
    assert ids == sorted(ids)
    for v in index.videos:
        assert index.classes[v.label] == v.class_name
        assert v.video_id == f"{v.class_name}/{Path(v.path).stem}"
        assert (ucf_tree / v.path).is_file()
    v = index.by_id()["HandstandPushups/v_HandStandPushups_g08_c01"]
    assert v.label == 36 and v.splits == (1, 2, 1)
    assert index.videos_root == str(ucf_tree.absolute())


def test_ucf101_renamed_handstand_files_resolve_case_insensitively(tmp_path):
    # Redistributions rename v_HandStandPushups_* to v_HandstandPushups_* (MANIFEST.md).
    names = [n.replace("v_HandStandPushups", "v_HandstandPushups")
             for n in _official_ucf101_names() if n.startswith("HandstandPushups/")]
    _touch_all(tmp_path, names)
    index = build_index(tmp_path, "ucf101", SPLITS)
    assert len(index.videos) == len(names) == 128
    assert len(index.missing) == 13320 - 128   # every other class is absent from this tree
    assert all(v.class_name == "HandstandPushups" and v.label == 36 for v in index.videos)
    # The id follows the real file, since it names the frames/flow folders of that file.
    assert all(Path(v.path).name.startswith("v_HandstandPushups_") for v in index.videos)
    assert index.by_id()["HandstandPushups/v_HandstandPushups_g08_c01"].splits == (1, 2, 1)


def test_ucf101_missing_videos_are_reported_with_file_and_line(tmp_path):
    yoyo = sorted(n for n in _official_ucf101_names() if n.startswith("YoYo/"))
    _touch_all(tmp_path, yoyo[1:])
    index = build_index(tmp_path, "ucf101", SPLITS)
    assert [v.path for v in index.videos] == yoyo[1:]
    assert len(index.missing) == 13320 - len(yoyo) + 1
    ids = [m.video_id for m in index.missing]
    assert ids == sorted(ids) and "YoYo/v_YoYo_g01_c01" in ids and "YoYo/v_YoYo_g01_c02" not in ids
    missing = {m.video_id: m for m in index.missing}["YoYo/v_YoYo_g01_c01"]
    assert missing.path == "YoYo/v_YoYo_g01_c01.avi"
    # g01 is a test video of split 1, train in split 2: the first listing named is testlist01.
    line_no = (SPLITS / "ucf101_testlist01.txt").read_text().splitlines().index(
        "YoYo/v_YoYo_g01_c01.avi") + 1
    assert missing.reason == (f"listed in ucf101_testlist01.txt line {line_no} "
                              f"but not found under {tmp_path}")


def test_ucf101_small_lists_crlf_default_folder_unlisted_and_round_trip(tmp_path):
    videos = tmp_path / "videos"
    classes = ["Jump", "Run"]
    _touch_all(videos, ["Jump/v_Jump_g01_c01.avi", "Jump/v_Jump_g02_c01.avi",
                        "Run/v_Run_g01_c01.avi", "Run/v_Run_g02_c01.mp4",   # transcoded
                        "Run/v_Run_g09_c01.avi",                             # in no list
                        "Run/notes.txt", "Run/.tmp-v_Run_g03.avi", "Other/x.avi"])
    train = {k: ["Jump/v_Jump_g01_c01.avi", "Run/v_Run_g01_c01.avi "] for k in (1, 2, 3)}
    test = {k: ["Jump/v_Jump_g02_c01.avi  ", "Run/v_Run_g02_c01.avi"] for k in (1, 2, 3)}
    train[3], test[3] = test[3], train[3]
    write_ucf_lists(videos / "splits", classes, train, test)  # unprefixed, CRLF
    index = build_index(videos, "ucf101")  # finds videos/splits by itself
    assert index.classes == ("Jump", "Run") and index.missing == ()
    by_id = index.by_id()
    assert set(by_id) == {"Jump/v_Jump_g01_c01", "Jump/v_Jump_g02_c01", "Run/v_Run_g01_c01",
                          "Run/v_Run_g02_c01", "Run/v_Run_g09_c01"}
    assert by_id["Jump/v_Jump_g01_c01"] == VideoEntry(
        "Jump/v_Jump_g01_c01", "Jump", 0, "Jump/v_Jump_g01_c01.avi", (1, 1, 2))
    assert by_id["Run/v_Run_g02_c01"].path == "Run/v_Run_g02_c01.mp4"
    assert by_id["Run/v_Run_g02_c01"].splits == (2, 2, 1)
    # On disk but in no list: indexed with the label of its folder, never trained or tested on.
    assert by_id["Run/v_Run_g09_c01"] == VideoEntry(
        "Run/v_Run_g09_c01", "Run", 1, "Run/v_Run_g09_c01.avi", (0, 0, 0))

    path = tmp_path / "meta" / "index.json"
    index.save(path)
    assert DatasetIndex.load(path) == index
    assert DatasetIndex.from_json(json.loads(json.dumps(index.to_json()))) == index
    assert [p.name for p in path.parent.iterdir()] == ["index.json"]  # no temp debris
    assert not any(p.name.startswith(TMP_PREFIX) for p in path.parent.iterdir())


def test_ucf101_lf_endings_also_parse(tmp_path):
    _touch_all(tmp_path, ["A/a1.avi", "A/a2.avi"])
    write_ucf_lists(tmp_path, ["A"], {k: ["A/a1.avi"] for k in (1, 2, 3)},
                    {k: ["A/a2.avi"] for k in (1, 2, 3)}, eol="\n")
    index = build_index(tmp_path, "ucf101")
    assert [v.splits for v in index.videos] == [(1, 1, 1), (2, 2, 2)]


@pytest.mark.parametrize("entry, complaint", [
    ("A/../../outside.avi", "leads outside"),
    ("../outside.avi", "leads outside"),
    ("A\\..\\..\\outside.avi", "leads outside"),
    ("/etc/passwd.avi", "absolute path"),
    ("C:/videos/A/a.avi", "absolute path"),
])
def test_escaping_entries_are_refused_naming_file_and_line(tmp_path, entry, complaint):
    _touch_all(tmp_path / "videos", ["A/a.avi"])
    (tmp_path / "outside.avi").touch()
    write_ucf_lists(tmp_path / "splits", ["A"], {k: ["A/a.avi", entry] for k in (1, 2, 3)}, {})
    with pytest.raises(ValueError, match=rf"trainlist01.txt line 2: .*{complaint}"):
        build_index(tmp_path / "videos", "ucf101", tmp_path / "splits")


def test_symlinks_leading_outside_are_refused(tmp_path):
    outside = tmp_path / "outside"
    _touch_all(outside, ["secret.avi", "B/b.avi"])
    videos = tmp_path / "videos"
    _touch_all(videos, ["A/a.avi", "A/target.avi"])
    (videos / "A" / "inside.avi").symlink_to(videos / "A" / "target.avi")  # stays inside: fine
    write_ucf_lists(tmp_path / "s1", ["A", "B"], {k: ["A/a.avi", "A/inside.avi"]
                                                  for k in (1, 2, 3)}, {})
    assert [v.video_id for v in build_index(videos, "ucf101", tmp_path / "s1").videos] == [
        "A/a", "A/inside", "A/target"]
    # Unlisted files in class folders are indexed, so a link out of them is refused too.
    (videos / "A" / "link.avi").symlink_to(outside / "secret.avi")
    with pytest.raises(ValueError, match="A/link.avi resolves outside the videos folder"):
        build_index(videos, "ucf101", tmp_path / "s1")
    # Listed through a file link, and through a class-folder link.
    write_ucf_lists(tmp_path / "s2", ["A"], {k: ["A/a.avi"] for k in (1, 2, 3)},
                    {k: ["A/link.avi"] for k in (1, 2, 3)})
    with pytest.raises(ValueError, match=r"testlist01.txt line 1: 'A/link.avi' resolves outside"):
        build_index(videos, "ucf101", tmp_path / "s2")
    (videos / "A" / "link.avi").unlink()
    (videos / "B").symlink_to(outside / "B")
    write_ucf_lists(tmp_path / "s3", ["A", "B"], {k: ["A/a.avi", "B/b.avi"] for k in (1, 2, 3)},
                    {})
    with pytest.raises(ValueError, match=r"trainlist01.txt line 2: 'B/b.avi' resolves outside"):
        build_index(videos, "ucf101", tmp_path / "s3")
    # Even when the listed file does not exist behind the link.
    write_ucf_lists(tmp_path / "s4", ["A", "B"], {k: ["A/a.avi", "B/gone.avi"]
                                                  for k in (1, 2, 3)}, {})
    with pytest.raises(ValueError, match=r"trainlist01.txt line 2: 'B/gone.avi' resolves outside"):
        build_index(videos, "ucf101", tmp_path / "s4")


@pytest.mark.parametrize("files, match", [
    ({"classInd.txt": "1 A\r\nA\r\n"}, r"classInd.txt line 2: expected '<index> <ClassName>'"),
    ({"classInd.txt": "1 A\r\n3 B\r\n"}, r"indices must be 1..2"),
    ({"trainlist01.txt": "A/a.avi 2\r\n"}, r"trainlist01.txt line 1: label 2 disagrees"),
    ({"trainlist02.txt": "\r\nZ/a.avi 1\r\n"}, r"trainlist02.txt line 2: class folder 'Z'"),
    ({"testlist01.txt": "a.avi\r\n"}, r"testlist01.txt line 1: expected '<Class>/<video file>'"),
    ({"testlist03.txt": "A/a.avi\r\n"}, r"testlist03.txt line 1: 'A/a.avi' is listed again "
                                        r"for split 3 \(first in trainlist03.txt line 1\)"),
])
def test_malformed_ucf101_files_name_file_and_line(tmp_path, files, match):
    _touch_all(tmp_path, ["A/a.avi"])
    write_ucf_lists(tmp_path, ["A"], {k: ["A/a.avi"] for k in (1, 2, 3)}, {})
    for name, text in files.items():
        (tmp_path / name).write_bytes(text.encode())
    with pytest.raises(ValueError, match=match):
        build_index(tmp_path, "ucf101")


def test_missing_split_files_and_unknown_dataset(tmp_path):
    _touch_all(tmp_path, ["A/a.avi"])
    with pytest.raises(FileNotFoundError, match="no ucf101 split files"):
        build_index(tmp_path, "ucf101")
    write_ucf_lists(tmp_path, ["A"], {1: ["A/a.avi"]}, {})
    (tmp_path / "testlist03.txt").unlink()
    with pytest.raises(FileNotFoundError, match="testlist03.txt"):
        build_index(tmp_path, "ucf101")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_index(tmp_path, "kinetics")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_index(tmp_path / "nope", "folders")


# --- HMDB51 ---------------------------------------------------------------------------------

def test_hmdb51_official_lists_give_official_counts(hmdb_tree):
    index = build_index(hmdb_tree, "hmdb51", HMDB)
    assert len(index.classes) == 51 and list(index.classes) == sorted(index.classes)
    assert index.classes[0] == "brush_hair" and "fall_floor" in index.classes
    # Sorted names give mmaction2's label map (TSN's class_list.txt puts kick_ball before
    # kick and sword_exercise before sword: it sorts the split file names instead).
    assert index.classes == tuple(
        (SPLITS / "mmaction2_hmdb51_label_map.txt").read_text().split())
    assert len(index.videos) == 6766 and index.missing == ()
    for k in (1, 2, 3):
        assert _counts(index, k) == {1: 3570, 2: 1530, 0: 1666}
    # Glob-hostile names resolve to exactly themselves.
    hostile = "Brushing_Her_Hair__[_NEW_AUDIO_]_UPDATED!!!!_brush_hair_h_cm_np1_fr_goo_0"
    v = index.by_id()[f"brush_hair/{hostile}"]
    assert v.path == f"brush_hair/{hostile}.avi" and v.label == 0 and v.splits[0] == 2
    names = "".join(v.path for v in index.videos)
    assert all(ch in names for ch in "[]!()#&;~")
    # The parent folder of hmdb51_splits is accepted too.
    assert build_index(hmdb_tree, "hmdb51", SPLITS) == index


def test_hmdb51_hostile_names_never_glob(tmp_path):
    videos, splits = tmp_path / "videos", tmp_path / "splits"
    # "a[1].avi" as a glob matches "a1.avi"; only the real "a[1].avi" may satisfy it.
    _touch_all(videos, ["ride_horse/a1.avi", "ride_horse/b#&;~(x)!.avi"])
    splits.mkdir()
    for k in (1, 2, 3):
        (splits / f"ride_horse_test_split{k}.txt").write_text(
            "a[1].avi 1 \nb#&;~(x)!.avi 2 \n*.avi 0 \n")
    index = build_index(videos, "hmdb51", splits)
    assert [v.video_id for v in index.videos] == ["ride_horse/a1", "ride_horse/b#&;~(x)!"]
    assert index.by_id()["ride_horse/a1"].splits == (0, 0, 0)   # unlisted
    assert index.by_id()["ride_horse/b#&;~(x)!"].splits == (2, 2, 2)
    assert [m.video_id for m in index.missing] == ["ride_horse/*", "ride_horse/a[1]"]
    assert index.missing[1].reason == (
        f"listed in ride_horse_test_split1.txt line 1 but not found under {videos}")


@pytest.mark.parametrize("line, match", [
    ("../../outside.avi 1 ", "leads outside"),
    ("/tmp/x.avi 1 ", "absolute path"),
    ("sub/x.avi 1 ", "bare video file name"),
    ("x.avi 3 ", r"expected '<video file> <0\|1\|2>'"),
    ("x.avi", r"expected '<video file> <0\|1\|2>'"),
])
def test_hmdb51_bad_lines(tmp_path, line, match):
    for k in (1, 2, 3):
        (tmp_path / f"kick_ball_test_split{k}.txt").write_text(f"ok.avi 1 \n{line}\n")
    with pytest.raises(ValueError, match=rf"kick_ball_test_split1.txt line 2: .*{match}"):
        build_index(tmp_path, "hmdb51")


def test_hmdb51_incomplete_class_is_an_error(tmp_path):
    (tmp_path / "wave_test_split1.txt").write_text("x.avi 1 \n")
    with pytest.raises(ValueError, match=r"class 'wave' needs wave_test_split1..3.txt"):
        build_index(tmp_path, "hmdb51")


# --- folders --------------------------------------------------------------------------------

def test_folders_layout_is_sorted_stratified_and_deterministic(tmp_path):
    a = tmp_path / "a"
    rel = [f"walk/clip_{i:02d}.avi" for i in range(20)] + \
          [f"Zoom/z{i}.MP4" for i in range(10)] + \
          ["jump [x]/j1.webm", "jump [x]/j2.mkv", "solo/only.mov",
           "walk/readme.txt", "walk/.hidden.avi", "walk/noext", "empty/notes.md",
           ".git/x.avi", "splits/trainlist01.txt"]
    _touch_all(a, rel)
    index = build_index(a)
    assert index.dataset == "folders" and index.missing == ()
    assert index.classes == ("Zoom", "jump [x]", "solo", "walk")  # code-point order
    assert len(index.videos) == 33
    by_class = {c: [v for v in index.videos if v.class_name == c] for c in index.classes}
    assert [len(by_class["walk"]), len(by_class["Zoom"])] == [20, 10]
    for k in range(3):
        assert Counter(v.splits[k] for v in by_class["walk"]) == {1: 14, 2: 6}
        assert Counter(v.splits[k] for v in by_class["Zoom"]) == {1: 7, 2: 3}
        assert sorted(v.splits[k] for v in by_class["jump [x]"]) == [1, 2]
        assert by_class["solo"][0].splits[k] == 1
    walk = [v.splits for v in by_class["walk"]]
    assert len({tuple(s[k] for s in walk) for k in range(3)}) == 3   # three different splits
    # Same ids -> same splits, wherever the folder lives and however often it is built.
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    again = build_index(b)
    assert again.videos == index.videos and build_index(a) == index
    # Pinned: the rule is sha256 of "split<k>/<video_id>", stable across machines and versions.
    assert index.by_id()["walk/clip_00"].splits == _expected_walk_clip_00()


def _expected_walk_clip_00() -> tuple[int, int, int]:
    import hashlib
    ids = [f"walk/clip_{i:02d}" for i in range(20)]
    out = []
    for k in (1, 2, 3):
        order = sorted(ids, key=lambda v: hashlib.sha256(f"split{k}/{v}".encode()).digest())
        out.append(1 if order.index("walk/clip_00") < 14 else 2)
    return tuple(out)


def test_folders_refuses_splits_collisions_and_escapes(tmp_path):
    _touch_all(tmp_path / "v", ["A/x.avi", "A/x.mp4"])
    with pytest.raises(ValueError, match="share a file stem"):
        build_index(tmp_path / "v")
    with pytest.raises(ValueError, match="no split files"):
        build_index(tmp_path / "v", "folders", tmp_path)
    (tmp_path / "v" / "A" / "x.mp4").unlink()
    (tmp_path / "secret.avi").touch()
    os.symlink(tmp_path / "secret.avi", tmp_path / "v" / "A" / "y.avi")
    with pytest.raises(ValueError, match="resolves outside the videos folder"):
        build_index(tmp_path / "v")
    with pytest.raises(FileNotFoundError, match="no <class>/<video>"):
        build_index(tmp_path / "v" / "A")
