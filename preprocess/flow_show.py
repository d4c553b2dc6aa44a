"""`pipeline show`: a PNG of a few frames beside their stored flow, to see at a glance it is sane.

Each row is flow k: the RGB frame k, the flow in the Middlebury colour coding (Baker, Scharstein,
Lewis, Roth, Black & Szeliski, "A Database and Evaluation Methodology for Optical Flow", IJCV
2011: hue = direction on a 55-entry colour wheel, saturation = speed), and the flow_x / flow_y
JPEGs as stored (grey 128 = no motion). The flow is decoded from those JPEGs with the one
inverse (`flow_quant.dequantize`), so the picture shows what training will read. A colour wheel
in the header says which colour is which direction; the colours saturate at the speed printed
there (the 99th percentile of the shown flows' speeds, at least 1 px).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .atomic import write_bytes_atomic
from .flow_quant import dequantize
from .layout import DataLayout, flow_names, frame_name

# Baker et al.'s wheel: colour segments between red, yellow, green, cyan, blue, magenta, with
# these many steps each (chosen in the paper to be perceptually even).
WHEEL_SEGMENTS = (15, 6, 4, 11, 13, 6)
MIN_TILE = 200  # px: smaller frames are enlarged so that the labels fit


def color_wheel() -> np.ndarray:
    """The (55, 3) RGB wheel, float 0..255, from red through yellow, green, cyan, blue, magenta."""
    # Each segment ramps one channel up or down while the others hold; (channel, direction).
    ramps = ((1, +1), (0, -1), (2, +1), (1, -1), (0, +1), (2, -1))
    rgb = np.array([255.0, 0.0, 0.0])
    rows = []
    for n, (channel, direction) in zip(WHEEL_SEGMENTS, ramps):
        for i in range(n):
            step = np.floor(255.0 * i / n)
            c = rgb.copy()
            c[channel] = step if direction > 0 else 255.0 - step
            rows.append(c)
        rgb[channel] = 255.0 if direction > 0 else 0.0
    return np.array(rows)


def flow_to_color(flow: np.ndarray, max_speed: float) -> np.ndarray:
    """(H, W, 2) flow in pixels -> (H, W, 3) uint8 RGB; speeds >= max_speed are full colour."""
    wheel = color_wheel()
    n = len(wheel)
    u, v = flow[..., 0] / max_speed, flow[..., 1] / max_speed
    speed = np.sqrt(u * u + v * v)
    angle = np.arctan2(-v, -u) / np.pi           # -1..1, direction of motion
    fk = (angle + 1) / 2 * (n - 1)
    k0 = np.floor(fk).astype(int)
    k1 = (k0 + 1) % n
    f = (fk - k0)[..., None]
    col = ((1 - f) * wheel[k0] + f * wheel[k1]) / 255.0
    inside = (speed <= 1)[..., None]
    col = np.where(inside, 1 - speed[..., None] * (1 - col), col * 0.75)
    return np.floor(255 * col).astype(np.uint8)


def _wheel_legend(size: int) -> np.ndarray:
    """A disc: each pixel coloured as a flow pointing from the centre to it."""
    r = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    flow = np.stack([x - r, y - r], axis=-1)
    img = flow_to_color(flow, r)
    img[np.hypot(x - r, y - r) > r] = 255
    return img


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((18, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, tile])


def _read(path: Path, flags: int) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    if img is None:
        raise FileNotFoundError(f"{path} is missing or not a decodable image")
    return img


def render(data: Path, video_id: str, *, rows: int = 4) -> np.ndarray:
    """The picture of `video_id` as a BGR uint8 array (see the module docstring)."""
    layout = DataLayout(data)
    flow_dir, frames_dir = layout.flow_video_dir(video_id), layout.frames_video_dir(video_id)
    if not flow_dir.is_dir():
        raise FileNotFoundError(f"no flow for {video_id!r} in {layout.root} ({flow_dir} does not "
                                f"exist): run `pipeline flow --data {layout.root}` first")
    n_flows = sum(1 for p in flow_dir.iterdir() if p.name.startswith("flow_x_"))
    if n_flows == 0:
        raise ValueError(f"{video_id!r} has a single frame, hence no flow to show")
    ks = sorted(set(np.linspace(1, n_flows, min(rows, n_flows)).round().astype(int).tolist()))

    shown = []
    for k in ks:
        fx, fy = (flow_dir / name for name in flow_names(k))
        qx, qy = _read(fx, cv2.IMREAD_GRAYSCALE), _read(fy, cv2.IMREAD_GRAYSCALE)
        shown.append((k, _read(frames_dir / frame_name(k), cv2.IMREAD_COLOR), qx, qy,
                      np.stack([dequantize(qx), dequantize(qy)], axis=-1)))
    speeds = np.concatenate([np.hypot(f[..., 0], f[..., 1]).ravel() for *_, f in shown])
    max_speed = max(float(np.percentile(speeds, 99)), 1.0)

    body = []
    for k, rgb, qx, qy, flow in shown:
        h, w = qx.shape
        zoom = max(1, -(-MIN_TILE // w))  # small frames are enlarged, pixels kept square

        def tile(img: np.ndarray) -> np.ndarray:
            if img.shape[:2] != (h, w):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
            return cv2.resize(img, (w * zoom, h * zoom), interpolation=cv2.INTER_NEAREST)

        color = cv2.cvtColor(flow_to_color(flow, max_speed), cv2.COLOR_RGB2BGR)
        mean = flow.reshape(-1, 2).mean(axis=0)
        tiles = [_label(tile(rgb), f"frame {k}"),
                 _label(tile(color), f"flow {k}, mean ({mean[0]:+.2f}, {mean[1]:+.2f}) px"),
                 _label(tile(cv2.cvtColor(qx, cv2.COLOR_GRAY2BGR)), f"flow_x_{k:05d}.jpg"),
                 _label(tile(cv2.cvtColor(qy, cv2.COLOR_GRAY2BGR)), f"flow_y_{k:05d}.jpg")]
        gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
        body.append(np.hstack([t for tile in tiles for t in (tile, gap)][:-1]))
    width = max(max(b.shape[1] for b in body), 640)
    body = [np.pad(b, ((0, 4), (0, width - b.shape[1]), (0, 0)), constant_values=255)
            for b in body]

    legend = cv2.cvtColor(_wheel_legend(64), cv2.COLOR_RGB2BGR)
    header = np.full((72, width, 3), 255, np.uint8)
    header[4:68, width - 68:width - 4] = legend
    lines = [f"{video_id}: {n_flows} flows (flow k: frame k -> k+1)",
             f"colour = direction (wheel, right), saturated at {max_speed:.2f} px/frame",
             "flow_x / flow_y JPEGs: grey 128 = still, clipped at +-20 px"]
    for i, text in enumerate(lines):
        cv2.putText(header, text, (6, 20 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return np.vstack([header] + body)


def show(data: Path, video_id: str, *, out: Path | None = None, rows: int = 4) -> Path:
    """Write the picture of `video_id` as a PNG (default DATA/show/<class>__<video>.png)."""
    img = render(data, video_id, rows=rows)
    out = Path(out) if out is not None else DataLayout(data).show_path(video_id)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"PNG encoding of the picture for {video_id!r} failed")
    write_bytes_atomic(out, buf.tobytes())
    return out
