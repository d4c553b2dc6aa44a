"""The dataset index: every video with its class, label and role in the three official splits.

Three layouts are understood:

* ``ucf101``: ``classInd.txt``, ``trainlist0{1,2,3}.txt``, ``testlist0{1,2,3}.txt`` (Soomro et
  al., UCF101, 2012; the files of ``ucfTrainTestlist``), also under a ``ucf101_`` prefix (the
  plain name wins when both exist). Videos on disk at ``<videos>/<Class>/<file>.avi``.
* ``hmdb51``: ``<class>_test_split{1,2,3}.txt`` with ids 1 train, 2 test, 0 unused (Kuehne et
  al., HMDB51, 2011; ``testTrainMulti_7030_splits``). Classes are the file-name prefixes, sorted.
  Videos at ``<videos>/<class>/<file>.avi``.
* ``folders``: ``<videos>/<class>/<video>.<ext>`` with no split files. Classes are the sorted
  subfolders holding at least one video. The three splits are made up deterministically and
  stratified per class: for split k the class's videos are ordered by
  ``sha256(f"split{k}/{video_id}")`` and the first ``round(0.7 n)`` are train, the rest test
  (at least one of each when a class has two videos or more). A stable hash, not Python's
  ``hash()``, so every machine and every run agrees; adding a video moves at most one other.

Quirks of the official files handled here (see data/MANIFEST.md): CRLF endings, test lists
without a label column, trailing spaces, the ``HandstandPushups`` class whose files are
``v_HandStandPushups_*`` (a listed name missing on disk is matched case-insensitively against
the real files, exact names first; then, for a set transcoded to another container, the one
video file with the same stem), names with ``[ ] ! ( ) # & ; ~`` (never globbed: folders are
listed and compared as strings). HMDB51 class order is sorted names, as in mmaction2's label
map (TSN's ``class_list.txt`` puts ``kick_ball`` before ``kick``).

Policy:

* A split entry never resolves outside the videos folder: ``..``, absolute paths and symlinks
  leading out are a ValueError naming the split file and line, as are malformed lines.
* A listed video missing on disk is kept in ``missing`` with the file and line that list it.
* A video on disk that no split lists (ucf101/hmdb51) is still indexed, with the label of its
  class folder and splits ``(0, 0, 0)``: it is never trained or tested on, yet its presence is
  visible rather than silently dropped. Folders that are not a known class are ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .atomic import write_json_atomic

VIDEO_EXTENSIONS = frozenset({"avi", "mp4", "mkv", "webm", "mov", "mpg", "mpeg", "m4v", "flv",
                              "wmv"})
DATASETS = ("ucf101", "hmdb51", "folders")
UNUSED, TRAIN, TEST = 0, 1, 2
N_SPLITS = 3
FOLDERS_TRAIN_FRACTION = 0.7
INDEX_FORMAT = 1


@dataclass(frozen=True)
class VideoEntry:
    video_id: str                  # "<class>/<video file stem>": its folder under frames/, flow/
    class_name: str
    label: int                     # 0-based position in `DatasetIndex.classes`
    path: str                      # posix path relative to the videos root
    splits: tuple[int, int, int]   # per official split 1..3: 0 unused, 1 train, 2 test


@dataclass(frozen=True)
class MissingVideo:
    video_id: str
    path: str                      # as listed, relative to the videos root
    reason: str


@dataclass(frozen=True)
class DatasetIndex:
    dataset: str                   # "ucf101" | "hmdb51" | "folders"
    videos_root: str               # absolute
    classes: tuple[str, ...]
    videos: tuple[VideoEntry, ...]      # sorted by video_id
    missing: tuple[MissingVideo, ...]   # sorted by video_id

    def to_json(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "dataset": self.dataset,
            "videos_root": self.videos_root,
            "classes": list(self.classes),
            "videos": [{"video_id": v.video_id, "class_name": v.class_name, "label": v.label,
                        "path": v.path, "splits": list(v.splits)} for v in self.videos],
            "missing": [{"video_id": m.video_id, "path": m.path, "reason": m.reason}
                        for m in self.missing],
        }

    @classmethod
    def from_json(cls, d: dict) -> "DatasetIndex":
        if d.get("format") != INDEX_FORMAT:
            raise ValueError(f"dataset index format {d.get('format')!r} is not {INDEX_FORMAT}")
        return cls(
            dataset=d["dataset"],
            videos_root=d["videos_root"],
            classes=tuple(d["classes"]),
            videos=tuple(VideoEntry(v["video_id"], v["class_name"], int(v["label"]), v["path"],
                                    tuple(int(s) for s in v["splits"])) for v in d["videos"]),
            missing=tuple(MissingVideo(m["video_id"], m["path"], m["reason"])
                          for m in d["missing"]),
        )

    def save(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> "DatasetIndex":
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def by_id(self) -> dict[str, VideoEntry]:
        return {v.video_id: v for v in self.videos}


def build_index(videos: Path, dataset: str = "folders", splits: Path | None = None) -> DatasetIndex:
    """Index the videos under `videos` for `dataset` ("ucf101", "hmdb51" or "folders").

    `splits` is the folder of split files (ucf101/hmdb51); by default the videos folder itself
    or a `splits/` folder inside it. Raises FileNotFoundError when the videos or split files
    are absent and ValueError (naming file and line) for malformed or escaping entries.
    """
    videos = Path(videos)
    if not videos.is_dir():
        raise FileNotFoundError(f"videos folder {videos} does not exist")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    tree = _Tree(videos)
    if dataset == "folders":
        if splits is not None:
            raise ValueError("the folders layout has no split files; its splits are made up "
                             "from a stable hash of each video id (drop --splits)")
        return _build_folders(tree)
    if dataset == "ucf101":
        classes, listings = _read_ucf101(_find_splits_dir(videos, splits, dataset))
    else:
        classes, listings = _read_hmdb51(_find_splits_dir(videos, splits, dataset))
    return _build_listed(tree, dataset, classes, listings)


# --- split files ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Listing:
    """One line of a split file: `class_name/name` has role `role` in split `split`."""
    class_name: str
    name: str        # file name as listed, no folder
    split: int       # 1..3
    role: int        # UNUSED, TRAIN or TEST
    source: str      # split file name
    line: int        # 1-based


def _ucf101_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"ucf101_{name}"):
        if candidate.is_file():
            return candidate
    return None


_UCF101_NAMES = ["classInd.txt"] + [f"{kind}list0{k}.txt" for k in (1, 2, 3)
                                    for kind in ("train", "test")]
_HMDB51_RE = re.compile(r"(.+)_test_split([1-9][0-9]*)\.txt")


def _has_split_files(folder: Path, dataset: str) -> bool:
    if not folder.is_dir():
        return False
    if dataset == "ucf101":
        return _ucf101_file(folder, "classInd.txt") is not None
    return any(_HMDB51_RE.fullmatch(p.name) for p in folder.iterdir())


def _find_splits_dir(videos: Path, splits: Path | None, dataset: str) -> Path:
    if splits is not None:
        candidates = [Path(splits)]
        if dataset == "hmdb51":
            candidates.append(Path(splits) / "hmdb51_splits")
    else:
        candidates = [videos, videos / "splits",
                      videos / ("ucfTrainTestlist" if dataset == "ucf101"
                                else "testTrainMulti_7030_splits")]
    for folder in candidates:
        if _has_split_files(folder, dataset):
            return folder
    wanted = ("classInd.txt (or ucf101_classInd.txt) with train/testlist0N.txt"
              if dataset == "ucf101" else "<class>_test_splitN.txt files")
    raise FileNotFoundError(f"no {dataset} split files ({wanted}) in "
                            f"{', '.join(str(c) for c in candidates)}; pass --splits")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every non-blank line; CRLF or LF."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _read_ucf101(folder: Path) -> tuple[list[str], list[_Listing]]:
    missing_files = [n for n in _UCF101_NAMES if _ucf101_file(folder, n) is None]
    if missing_files:
        raise FileNotFoundError(f"{folder}: missing UCF101 split files {', '.join(missing_files)} "
                                f"(plain or with a ucf101_ prefix); all three splits are needed")
    class_file = _ucf101_file(folder, "classInd.txt")
    by_index: dict[int, str] = {}
    for n, line in _read_lines(class_file):
        m = re.fullmatch(r"(\d+)\s+(\S.*)", line)
        if not m:
            raise ValueError(f"{class_file} line {n}: expected '<index> <ClassName>', "
                             f"got {line!r}")
        idx, name = int(m.group(1)), m.group(2)
        if idx in by_index:
            raise ValueError(f"{class_file} line {n}: index {idx} given twice")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{class_file} line {n}: class name {name!r} is not a folder name")
        by_index[idx] = name
    if sorted(by_index) != list(range(1, len(by_index) + 1)):
        raise ValueError(f"{class_file}: class indices must be 1..{len(by_index)} without gaps")
    classes = [by_index[i] for i in range(1, len(by_index) + 1)]
    if len(set(classes)) != len(classes):
        raise ValueError(f"{class_file}: a class name appears twice")
    lookup = _CaseLookup(classes)
    number = {c: i for i, c in enumerate(classes, 1)}

    listings = []
    for split in (1, 2, 3):
        for kind, role in (("train", TRAIN), ("test", TEST)):
            path = _ucf101_file(folder, f"{kind}list0{split}.txt")
            for n, line in _read_lines(path):
                where = f"{path.name} line {n}"
                # Train lines end in a 1-based label, test lines have none (official format).
                m = re.fullmatch(r"(.+?)\s+(\d+)", line)
                entry, label = (m.group(1), int(m.group(2))) if m else (line, None)
                parts = _safe_parts(entry, where)
                if len(parts) != 2:
                    raise ValueError(f"{where}: expected '<Class>/<video file>', got {entry!r}")
                class_name = lookup.get(parts[0])
                if class_name is None:
                    raise ValueError(f"{where}: class folder {parts[0]!r} is not in "
                                     f"{class_file.name}")
                if label is not None and label != number[class_name]:
                    raise ValueError(f"{where}: label {label} disagrees with {class_file.name}, "
                                     f"where {class_name} is {number[class_name]}")
                listings.append(_Listing(class_name, parts[1], split, role, path.name, n))
    return classes, listings


def _read_hmdb51(folder: Path) -> tuple[list[str], list[_Listing]]:
    files: dict[str, dict[int, Path]] = {}
    for p in folder.iterdir():
        m = _HMDB51_RE.fullmatch(p.name)
        if m and p.is_file():
            files.setdefault(m.group(1), {})[int(m.group(2))] = p
    classes = sorted(files)
    for c in classes:
        if sorted(files[c]) != [1, 2, 3]:
            raise ValueError(f"{folder}: class {c!r} needs {c}_test_split1..3.txt, found splits "
                             f"{sorted(files[c])}")
    listings = []
    for c in classes:
        for split in (1, 2, 3):
            path = files[c][split]
            for n, line in _read_lines(path):
                where = f"{path.name} line {n}"
                m = re.fullmatch(r"(.+?)\s+(\d+)", line)
                if not m or int(m.group(2)) not in (UNUSED, TRAIN, TEST):
                    raise ValueError(f"{where}: expected '<video file> <0|1|2>', got {line!r}")
                parts = _safe_parts(m.group(1), where)
                if len(parts) != 1:
                    raise ValueError(f"{where}: expected a bare video file name, got "
                                     f"{m.group(1)!r}")
                listings.append(_Listing(c, parts[0], split, int(m.group(2)), path.name, n))
    return classes, listings


def _safe_parts(entry: str, where: str) -> list[str]:
    """Split a listed relative path, refusing anything that could leave the videos folder."""
    # Lists made on Windows use backslashes; treating them as separators also catches "..\\x".
    posix = entry.replace("\\", "/")
    if posix.startswith("/") or re.match(r"[A-Za-z]:/", posix):
        raise ValueError(f"{where}: absolute path {entry!r} is not allowed; entries are "
                         f"relative to the videos folder")
    parts = [p for p in PurePosixPath(posix).parts if p != "."]
    if ".." in parts:
        raise ValueError(f"{where}: {entry!r} leads outside the videos folder ('..')")
    if not parts:
        raise ValueError(f"{where}: empty video path")
    return parts


# --- files on disk ----------------------------------------------------------------------------

class _CaseLookup:
    """Exact name first, then a unique case-insensitive match; None otherwise."""

    def __init__(self, names):
        self.names = set(names)
        self.folded: dict[str, list[str]] = {}
        for n in sorted(self.names):
            self.folded.setdefault(n.casefold(), []).append(n)

    def get(self, name: str) -> str | None:
        if name in self.names:
            return name
        hits = self.folded.get(name.casefold(), [])
        return hits[0] if len(hits) == 1 else None

    def ambiguous(self, name: str) -> list[str]:
        hits = self.folded.get(name.casefold(), [])
        return hits if name not in self.names and len(hits) > 1 else []


class _Tree:
    """Cached folder listings below the videos root; resolves names without globbing."""

    def __init__(self, root: Path):
        self.root = root.absolute()
        self.real_root = os.path.realpath(self.root)
        self._cache: dict[tuple[str, ...], dict[str, os.DirEntry]] = {}
        self._lookups: dict[tuple[str, ...], _CaseLookup] = {}

    def entries(self, parts: tuple[str, ...]) -> dict[str, os.DirEntry]:
        if parts not in self._cache:
            try:
                with os.scandir(self.root.joinpath(*parts)) as it:
                    self._cache[parts] = {e.name: e for e in it}
            except (FileNotFoundError, NotADirectoryError):
                self._cache[parts] = {}
        return self._cache[parts]

    def find(self, parts: tuple[str, ...], name: str, *, any_video_ext: bool = False
             ) -> tuple[os.DirEntry | None, list[str]]:
        """The entry `name` in folder `parts`, else its unique case-insensitive match, else
        (with `any_video_ext`) the unique video file with the same stem, e.g. a UCF101 list's
        ``.avi`` transcoded to ``.mp4``. Also returns the names when several would match."""
        listing = self.entries(parts)
        if name in listing:
            return listing[name], []
        if parts not in self._lookups:
            self._lookups[parts] = _CaseLookup(listing)
        lookup = self._lookups[parts]
        hit = lookup.get(name)
        if hit is not None or lookup.ambiguous(name) or not any_video_ext:
            return (listing[hit] if hit else None), lookup.ambiguous(name)
        stem = PurePosixPath(name).stem.casefold()
        same_stem = sorted(n for n in listing
                           if _is_video_name(n) and PurePosixPath(n).stem.casefold() == stem)
        if len(same_stem) == 1:
            return listing[same_stem[0]], []
        return None, same_stem

    def inside(self, rel: PurePosixPath) -> bool:
        real = os.path.realpath(self.root.joinpath(*rel.parts))
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def video_files(self, parts: tuple[str, ...]) -> list[os.DirEntry]:
        return sorted((e for e in self.entries(parts).values() if _is_video_name(e.name)
                       and e.is_file()), key=lambda e: e.name)

    def class_dirs(self) -> list[os.DirEntry]:
        return sorted((e for e in self.entries(()).values()
                       if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name)


def _is_video_name(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(dot and stem) and not name.startswith(".") and ext.lower() in VIDEO_EXTENSIONS


def _video_id(class_name: str, file_name: str) -> str:
    return f"{class_name}/{PurePosixPath(file_name).stem}"


def _build_listed(tree: _Tree, dataset: str, classes: list[str],
                  listings: list[_Listing]) -> DatasetIndex:
    label = {c: i for i, c in enumerate(classes)}
    class_dir = {c: tree.find((), c)[0] for c in classes}
    found: dict[str, dict] = {}        # real relative path -> class, splits, where listed
    missing: dict[str, MissingVideo] = {}
    for item in listings:
        where = f"{item.source} line {item.line}"
        listed = f"{item.class_name}/{item.name}"
        cdir = class_dir[item.class_name]
        entry, ambiguous = (tree.find((cdir.name,), item.name, any_video_ext=True)
                            if cdir is not None else (None, []))
        rel = PurePosixPath(cdir.name if cdir is not None else item.class_name,
                            entry.name if entry is not None else item.name)
        if not _stays_inside(tree, rel, cdir, entry):
            raise ValueError(f"{where}: {listed!r} resolves outside the videos folder "
                             f"{tree.root} (through a symlink)")
        if entry is None or not entry.is_file():
            vid = _video_id(item.class_name, item.name)
            if ambiguous:
                reason = (f"listed in {where} but several files under {tree.root} could be it: "
                          f"{', '.join(ambiguous)}")
            elif entry is None:
                reason = f"listed in {where} but not found under {tree.root}"
            else:
                reason = f"listed in {where} but {rel} is not a file (or a broken link)"
            missing.setdefault(vid, MissingVideo(vid, listed, reason))
            continue
        rec = found.setdefault(rel.as_posix(), {"class": item.class_name, "seen": {},
                                                "splits": [UNUSED] * N_SPLITS})
        if item.split in rec["seen"]:
            raise ValueError(f"{where}: {listed!r} is listed again for split {item.split} "
                             f"(first in {rec['seen'][item.split]})")
        rec["seen"][item.split] = where
        rec["splits"][item.split - 1] = item.role

    videos: dict[str, VideoEntry] = {}
    for key, rec in found.items():
        c = rec["class"]
        _add_unique(videos, VideoEntry(_video_id(c, key), c, label[c], key, tuple(rec["splits"])))
    # Videos on disk that no list names: indexed with splits (0, 0, 0), see module docstring.
    for c, cdir in class_dir.items():
        if cdir is None or not cdir.is_dir():
            continue
        for e in tree.video_files((cdir.name,)):
            key = f"{cdir.name}/{e.name}"
            if key not in found:
                _require_inside(tree, key, cdir, e)
                _add_unique(videos, VideoEntry(_video_id(c, e.name), c, label[c], key,
                                               (UNUSED,) * N_SPLITS))
    # A listed name that matched nothing because several files could be it: those files are
    # indexed above (unlisted) and the missing record explains why; the id must not be both.
    for vid in [v for v in missing if v in videos]:
        del missing[vid]
    return DatasetIndex(dataset, str(tree.root), tuple(classes),
                        tuple(videos[k] for k in sorted(videos)),
                        tuple(missing[k] for k in sorted(missing)))


def _stays_inside(tree: _Tree, rel: PurePosixPath, cdir: os.DirEntry | None,
                  entry: os.DirEntry | None) -> bool:
    # `rel` has no ".." and two plain components, so only a link among the parts that exist
    # can lead out; the rest need no resolving.
    if any(e is not None and e.is_symlink() for e in (cdir, entry)):
        return tree.inside(rel)
    return True


def _require_inside(tree: _Tree, key: str, cdir: os.DirEntry, entry: os.DirEntry) -> None:
    if not _stays_inside(tree, PurePosixPath(key), cdir, entry):
        raise ValueError(f"{tree.root / key} resolves outside the videos folder {tree.root} "
                         f"(through a symlink)")


def _add_unique(videos: dict[str, VideoEntry], v: VideoEntry) -> None:
    other = videos.get(v.video_id)
    if other is not None:
        raise ValueError(f"{other.path} and {v.path} would share the video id {v.video_id!r} "
                         f"(same class and file stem); rename one of them")
    videos[v.video_id] = v


def _build_folders(tree: _Tree) -> DatasetIndex:
    per_class: dict[str, list[str]] = {}
    for cdir in tree.class_dirs():
        keys = []
        for e in tree.video_files((cdir.name,)):
            key = f"{cdir.name}/{e.name}"
            _require_inside(tree, key, cdir, e)
            keys.append(key)
        if keys:
            per_class[cdir.name] = keys
    if not per_class:
        raise FileNotFoundError(f"{tree.root}: no <class>/<video>.<ext> files (extensions "
                                f"{', '.join(sorted(VIDEO_EXTENSIONS))})")
    classes = sorted(per_class)
    videos: dict[str, VideoEntry] = {}
    for label, c in enumerate(classes):
        ids = {_video_id(c, key): key for key in per_class[c]}
        if len(ids) != len(per_class[c]):
            raise ValueError(f"{tree.root / c}: two videos share a file stem (e.g. a.avi and "
                             f"a.mp4), so their ids would collide; rename one of them")
        roles = {vid: [UNUSED] * N_SPLITS for vid in ids}
        n_train = _n_train(len(ids))
        for k in range(1, N_SPLITS + 1):
            for rank, vid in enumerate(sorted(ids, key=lambda v: _split_hash(k, v))):
                roles[vid][k - 1] = TRAIN if rank < n_train else TEST
        for vid, key in ids.items():
            _add_unique(videos, VideoEntry(vid, c, label, key, tuple(roles[vid])))
    return DatasetIndex("folders", str(tree.root), tuple(classes),
                        tuple(videos[k] for k in sorted(videos)), ())


def _split_hash(split: int, video_id: str) -> bytes:
    return hashlib.sha256(f"split{split}/{video_id}".encode("utf-8")).digest()


def _n_train(n: int) -> int:
    """round(0.7 n), keeping at least one train and one test video once a class has two."""
    if n < 2:
        return n
    return min(n - 1, max(1, int(FOLDERS_TRAIN_FRACTION * n + 0.5)))
