"""How flow is stored: clip to +-20 px, map linearly onto 0..255, round (seed 000, section 4.2.1).

    q = round((clip(v, -20, 20) + 20) * 255 / 40)   as uint8
    v = q * 40 / 255 - 20                           the one inverse, used everywhere

The paper truncates TV-L1 flow to [-20, 20] and maps it onto (0, 255). We pin the rounding:
round half to even (numpy's `rint`, torch's `round`, OpenCV's `cvRound`), so zero flow is
127.5 -> 128, +20 -> 255 and -20 -> 0. This is the denseflow convention; MARS and mmaction2's old
`build_rawframes` script truncate instead (zero flow is 127 there), so flow JPEGs made by those
tools decode 0.16 px off under this inverse. A quantization step is 40/255 = 0.157 px.

Both functions accept numpy arrays (or scalars) and torch tensors, so the GPU flow stage can
quantize on the device and the datasets can dequantize batches without a round trip to numpy.
"""
from __future__ import annotations

import numpy as np

BOUND = 20.0
"""Flow is clipped to [-BOUND, BOUND] pixels per frame before quantization."""
SCALE = 255.0 / (2 * BOUND)
"""Quantization levels per pixel of flow."""
ZERO = 128
"""The code of zero flow."""


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def quantize(v):
    """Flow in pixels -> uint8 codes (numpy in, numpy out; torch tensor in, tensor out)."""
    if _is_torch(v):
        import torch
        q = (v.float().clamp(-BOUND, BOUND) + BOUND) * SCALE
        return torch.round(q).to(torch.uint8)
    v = np.asarray(v, dtype=np.float32)
    return np.rint((np.clip(v, -BOUND, BOUND) + BOUND) * np.float32(SCALE)).astype(np.uint8)


def dequantize(q):
    """uint8 codes -> flow in pixels as float32 (numpy in, numpy out; tensor in, tensor out)."""
    if _is_torch(q):
        return q.float() * (1.0 / SCALE) - BOUND
    return np.asarray(q, dtype=np.float32) * np.float32(1.0 / SCALE) - np.float32(BOUND)


def describe() -> dict:
    """The quantization as recorded with the flow stage's parameters."""
    return {"bound": BOUND, "rule": "round_half_even((clip(v,-20,20)+20)*255/40)", "zero": ZERO}
