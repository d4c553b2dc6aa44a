"""Decoding a video to the end of its stream, with a clear reason when that cannot be done.

IMRS section 4.2.1 extracts "all frames of the video" with OpenCV; this module is that decoder
(OpenCV's FFmpeg backend), plus the checks that make a partial or unreadable file fail loudly
instead of yielding a short, silently incomplete video. Policies, decided once here:

* **Count by decoding.** Frames are read until FFmpeg reports the end of the stream;
  CAP_PROP_FRAME_COUNT is only a cross-check (it is a guess from duration x fps for Matroska,
  MPEG-PS and VFR files, and garbage for some, see data/MANIFEST.md).
* **Rotation.** OpenCV applies the display-matrix rotation by default, so frames look the way
  players show them (a phone video held upside down comes out upright). We keep that, and record
  the rotation in degrees (`VideoInfo.rotation`) so it is visible in the ledger.
* **Non-square pixels.** Frames are the coded pixels; the sample aspect ratio (`VideoInfo.sar`)
  is reported so that a caller that preserves aspect (the frames stage's short-side mode) can
  use the display aspect ratio.
* **Streams and pixel formats.** The first video stream (FFmpeg's default) is read; 10-bit,
  4:4:4 and full-range video is converted to 8-bit BGR by OpenCV.
* **Truncated or damaged files.** Decoding that stops before the frame count the container
  announces fails the video when either FFmpeg reported a problem while reading it (a short
  read, "partial file", "File ended prematurely", a decode error) or the container is AVI,
  whose header states the exact count. A shortfall with neither is accepted: it is the
  estimated count of a VFR or Matroska file, or an MP4 edit list trimming its first frames,
  all of which decode cleanly. Not detected: damage FFmpeg conceals without losing frames, and
  a cut in a stream with neither a count nor an error message (raw MPEG-PS, e.g. a truncated
  copy of data/videos/pygame_blue.mpg yields its first 17 of 24 frames as the whole video).
* **One decoder thread.** Parallelism comes from running one video per worker process.

FFmpeg writes its messages to file descriptor 2; while a video is opened or read they are
captured (one reader at a time per process, under a lock) and used as evidence and in the
failure reason, instead of scrolling past on the terminal. OPENCV_FFMPEG_LOGLEVEL and
OPENCV_FFMPEG_DEBUG are removed from this process's environment at import, because they would
route those messages through OpenCV's buffered stdout logger or silence them.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

for _var in ("OPENCV_FFMPEG_LOGLEVEL", "OPENCV_FFMPEG_DEBUG"):
    os.environ.pop(_var, None)

import cv2  # noqa: E402  (after the environment is set for OpenCV's FFmpeg backend)
import numpy as np  # noqa: E402

# A frame count above this is not a count (MPEG-PS files report -3074457345618259 and the like).
_MAX_PLAUSIBLE_FRAMES = 10**8
_FFMPEG_LINE = re.compile(r"^\[([^\]@]+?) @ 0x[0-9a-fA-F]+\]\s*(.*)$")
_CAPTURE_LOCK = threading.Lock()


class VideoError(ValueError):
    """A video that cannot be turned into frames; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    width: int                    # of the decoded frames, after rotation
    height: int
    fps: float
    container_frames: int | None  # what the container announces; None when implausible
    rotation: int                 # display rotation applied, degrees (0, 90, 180, 270)
    sar: tuple[int, int]          # sample (pixel) aspect ratio; (1, 1) when unknown
    codec: str                    # FourCC as reported by OpenCV, e.g. "h264", "FMP4"
    container: str                # "avi", "mp4", "matroska", ... sniffed from the first bytes


class VideoReader:
    """Iterate over every frame of a video as uint8 BGR (H, W, 3) arrays.

    Use as a context manager; iterating raises VideoError (naming the file) when the video
    cannot be opened, has no decodable frame, or ends before the container says it should
    (see the module docstring). `info` is set once opened; `frames` counts what was decoded.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.info: VideoInfo | None = None
        self.frames = 0
        self._log = _FFmpegLog()
        self._cap = None
        self._announced = -1

    @property
    def messages(self) -> list[str]:
        """FFmpeg's messages while opening and reading, "<component>: <text>", deduplicated."""
        return self._log.messages

    def __enter__(self) -> "VideoReader":
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._log.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._cap is None:
            raise RuntimeError("VideoReader is used as `with VideoReader(path) as video:`")
        while True:
            with self._log.capture():
                ok, frame = self._cap.read()
            if not ok:
                break
            self.frames += 1
            yield frame
        self._check_complete()

    def _open(self) -> None:
        path = self.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise VideoError(f"{path}: file not found") from None
        if not path.is_file():
            raise VideoError(f"{path}: not a regular file")
        if size == 0:
            raise VideoError(f"{path}: empty file (0 bytes)")
        container = sniff_container(path)
        with self._log.capture():
            cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
            opened = cap.isOpened()
        if not opened:
            cap.release()
            raise VideoError(f"{path}: cannot be opened as a video "
                             f"({self._evidence() or _describe_non_video(path, container)})")
        self._cap = cap
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self._announced = int(count) if abs(count) < _MAX_PLAUSIBLE_FRAMES else -1
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
        sar_num, sar_den = int(cap.get(cv2.CAP_PROP_SAR_NUM)), int(cap.get(cv2.CAP_PROP_SAR_DEN))
        self.info = VideoInfo(
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            fps=float(cap.get(cv2.CAP_PROP_FPS)),
            container_frames=int(count) if 0 < count < _MAX_PLAUSIBLE_FRAMES else None,
            rotation=int(cap.get(cv2.CAP_PROP_ORIENTATION_META)) % 360,
            sar=(sar_num, sar_den) if sar_num > 0 and sar_den > 0 else (1, 1),
            codec=_fourcc_text(fourcc),
            container=container,
        )

    def _check_complete(self) -> None:
        info, n = self.info, self.frames
        if n == 0 and self._announced == 0 and not self.messages:
            raise VideoError(f"{self.path}: the video stream has no frames (zero-frame video)")
        if n == 0:
            raise VideoError(f"{self.path}: opened, but no frame could be decoded (codec "
                             f"{info.codec!r}{'; ' + self._evidence() if self.messages else ''}"
                             f"): an unsupported codec, or no picture data")
        expected = info.container_frames
        if expected is None or n >= expected:
            return
        if self.messages:
            evidence = f"FFmpeg: {self._evidence()}"
        elif info.container == "avi":
            evidence = "the AVI header states the exact frame count"
        else:
            return  # an estimated count or an edit list: the stream ended cleanly
        raise VideoError(f"{self.path}: truncated or damaged: decoding stopped after {n} of the "
                         f"{expected} frames the container announces ({evidence})")

    def _evidence(self, limit: int = 2) -> str:
        return "; ".join(self.messages[:limit])


def sniff_container(path: Path) -> str:
    """The container family from the file's first bytes ("unknown" if not recognised)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "mpeg"
    if head[:3] == b"FLV":
        return "flv"
    return "unknown"


def _describe_non_video(path: Path, container: str) -> str:
    if container != "unknown":
        return f"a damaged or unsupported {container} file"
    with open(path, "rb") as f:
        head = f.read(512)
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:200]:
        return "it is an HTML page, not a video"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "it is a text file, not a video"
    return "not a video container FFmpeg recognises"


def _fourcc_text(fourcc: int) -> str:
    chars = bytes((fourcc >> (8 * i)) & 0xFF for i in range(4))
    return chars.decode("ascii", "replace") if all(32 <= c < 127 for c in chars) else str(fourcc)


class _FFmpegLog:
    """Collects what FFmpeg writes to fd 2 while a `capture()` block runs.

    fd 2 is process-wide, hence the lock: threads decoding in one process take turns per read.
    One temporary file serves the whole video; it is parsed only when it has grown.
    """

    def __init__(self):
        self._file = tempfile.TemporaryFile()
        self._parsed = 0
        self.messages: list[str] = []

    @contextmanager
    def capture(self) -> Iterator[None]:
        with _CAPTURE_LOCK:
            try:
                saved = os.dup(2)
            except OSError:  # no stderr at all (a daemon): leave none behind afterwards
                saved = None
            os.dup2(self._file.fileno(), 2)
            try:
                yield
            finally:
                if saved is None:
                    os.close(2)
                else:
                    os.dup2(saved, 2)
                    os.close(saved)
        size = os.fstat(self._file.fileno()).st_size
        if size > self._parsed:
            self._file.seek(self._parsed)
            self._collect(self._file.read(size - self._parsed))
            self._parsed = size

    def _collect(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            m = _FFMPEG_LINE.match(line.strip())
            if m and m.group(2):
                msg = f"{m.group(1)}: {m.group(2).strip()}"
                if msg not in self.messages and len(self.messages) < 20:
                    self.messages.append(msg)

    def close(self) -> None:
        self._file.close()
