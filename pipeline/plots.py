"""PNG figures drawn with OpenCV and numpy alone (matplotlib is not a dependency).

Two figures serve the evaluation report (seed 004 Figs. 7-8 plot accuracy and loss per epoch;
confusion matrices are how both papers discuss confused actions): a confusion matrix heat map
and line charts of training curves. Both are encoded in memory and published atomically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from preprocess.atomic import write_bytes_atomic

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (120, 120, 120), (225, 225, 225)
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Distinguishable line colours (BGR), the Tableau 10 palette.
PALETTE = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
           (75, 86, 140), (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23)]


def write_png(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    write_bytes_atomic(Path(path), buf.tobytes())


def _text(img, s: str, org, scale=0.4, color=BLACK, thickness=1) -> None:
    cv2.putText(img, s, (int(org[0]), int(org[1])), FONT, scale, color, thickness, cv2.LINE_AA)


def _text_size(s: str, scale=0.4, thickness=1) -> tuple[int, int]:
    (w, h), _ = cv2.getTextSize(s, FONT, scale, thickness)
    return w, h


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[:n - 1] + "."


def confusion_matrix_image(matrix: np.ndarray, classes: Sequence[str], title: str = "",
                           cell: int | None = None) -> np.ndarray:
    """Rows = true class, columns = predicted; colour = row-normalised rate, text = count."""
    matrix = np.asarray(matrix, dtype=np.int64)
    k = matrix.shape[0]
    if matrix.shape != (k, k) or len(classes) != k:
        raise ValueError(f"confusion matrix {matrix.shape} does not match {len(classes)} classes")
    cell = cell or max(6, min(40, 800 // max(k, 1)))
    names = [_short(c) for c in classes]
    label_w = max([_text_size(n)[0] for n in names] + [10]) + 10 if cell >= 10 else 10
    top, left = 40 + label_w, 30 + label_w
    size = k * cell
    img = np.full((top + size + 50, left + size + 70, 3), 255, np.uint8)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    heat = cv2.applyColorMap((255 - rates * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    img[top:top + size, left:left + size] = cv2.resize(heat, (size, size),
                                                       interpolation=cv2.INTER_NEAREST)
    if cell >= 18:
        for i in range(k):
            for j in range(k):
                s = str(matrix[i, j])
                w, h = _text_size(s, 0.35)
                colour = WHITE if rates[i, j] > 0.5 else BLACK
                _text(img, s, (left + j * cell + (cell - w) / 2, top + i * cell + (cell + h) / 2),
                      0.35, colour)
    if cell >= 10:
        for i, n in enumerate(names):  # row labels at the left, column labels rotated on top
            w, h = _text_size(n)
            _text(img, n, (left - w - 5, top + i * cell + (cell + h) / 2))
        strip = np.full((cell * k, label_w, 3), 255, np.uint8)
        for j, n in enumerate(names):  # left-aligned, then turned to read upwards from the matrix
            _text(strip, n, (5, j * cell + (cell + _text_size(n)[1]) / 2))
        img[top - label_w:top, left:left + size] = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    cv2.rectangle(img, (left, top), (left + size - 1, top + size - 1), GREY, 1)
    _text(img, "predicted", (left + size / 2 - 30, top + size + 20))
    _text(img, "true", (left - _text_size("true")[0] - 5, top - 5))
    if title:
        _text(img, title, (10, 20), 0.5)
    # colour bar: rate 0..1
    bar = cv2.applyColorMap(np.linspace(255, 0, size).astype(np.uint8)[:, None],
                            cv2.COLORMAP_INFERNO)
    x0 = left + size + 15
    img[top:top + size, x0:x0 + 12] = cv2.resize(bar[::-1], (12, size))
    _text(img, "1.0", (x0 + 15, top + 10), 0.35)
    _text(img, "0.0", (x0 + 15, top + size), 0.35)
    return img


@dataclass
class Panel:
    """One chart: a title, a y-axis label and named series of (x, y) points."""
    title: str
    ylabel: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    # optional per-series (palette index, dashed); default: the series' position, solid
    styles: dict[str, tuple[int, bool]] = field(default_factory=dict)


def _dashed(img, pts: Sequence[tuple[int, int]], colour, dash: int = 6) -> None:
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) // dash))
        for k in range(0, n, 2):
            a, b = k / n, min(1.0, (k + 1) / n)
            cv2.line(img, (int(x0 + a * (x1 - x0)), int(y0 + a * (y1 - y0))),
                     (int(x0 + b * (x1 - x0)), int(y0 + b * (y1 - y0))), colour, 2, cv2.LINE_AA)


def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    raw = max((hi - lo) / n, 1.0) if integer else (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def line_chart_image(panel: Panel, width: int = 480, height: int = 320) -> np.ndarray:
    """One chart of `width` x `height` plot area plus a legend column on its right."""
    legend_w = max([_text_size(n, 0.35)[0] for n in panel.series] + [0]) + 35
    width += legend_w  # the legend sits right of the plot, never over the lines
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 60, 15 + legend_w, 45, 45
    pts = [(x, y) for xs, ys in panel.series.values() for x, y in zip(xs, ys)
           if y is not None and math.isfinite(y)]
    _text(img, panel.title, ((width - _text_size(panel.title, 0.5)[0]) / 2, 20), 0.5)
    if not pts:
        _text(img, "no data", (width / 2 - 30, height / 2))
        return img
    xs_all, ys_all = [p[0] for p in pts], [p[1] for p in pts]
    integer_x = all(float(x).is_integer() for x in xs_all)
    xt = _nice_ticks(min(xs_all), max(xs_all), integer=integer_x)
    yt = _nice_ticks(min(ys_all), max(ys_all))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = width - left - right, height - top - bottom

    def px(x, y):
        return (int(round(left + (x - x0) / (x1 - x0) * pw)),
                int(round(top + ph - (y - y0) / (y1 - y0) * ph)))

    for y in yt:
        p = px(x0, y)
        cv2.line(img, (left, p[1]), (left + pw, p[1]), LIGHT, 1)
        s = f"{y:.3g}"
        _text(img, s, (left - _text_size(s, 0.35)[0] - 5, p[1] + 4), 0.35)
    for x in xt:
        p = px(x, y0)
        cv2.line(img, (p[0], top + ph), (p[0], top + ph + 4), GREY, 1)
        s = f"{x:g}"
        _text(img, s, (p[0] - _text_size(s, 0.35)[0] / 2, top + ph + 16), 0.35)
    cv2.rectangle(img, (left, top), (left + pw, top + ph), GREY, 1)
    _text(img, "epoch", (left + pw / 2 - 20, height - 8))
    _text(img, panel.ylabel, (5, top - 8), 0.35)
    lx = left + pw + 15
    for i, (name, (xs, ys)) in enumerate(panel.series.items()):
        index, dashed = panel.styles.get(name, (i, False))
        colour = PALETTE[index % len(PALETTE)]
        line = [px(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(line) > 1 and dashed:
            _dashed(img, line, colour)
        elif len(line) > 1:
            cv2.polylines(img, [np.array(line, np.int32)], False, colour, 2, cv2.LINE_AA)
        for p in line:
            cv2.circle(img, p, 3, colour, -1, cv2.LINE_AA)
        ly = top + 12 + 14 * i  # legend, top right
        if dashed:
            _dashed(img, [(lx, ly - 4), (lx + 18, ly - 4)], colour, 4)
        else:
            cv2.line(img, (lx, ly - 4), (lx + 18, ly - 4), colour, 2)
        _text(img, name, (lx + 22, ly), 0.35)
    return img


def charts_image(panels: Sequence[Panel], width: int = 480, height: int = 320) -> np.ndarray:
    """Panels side by side in one image."""
    return np.concatenate([line_chart_image(p, width, height) for p in panels], axis=1)
