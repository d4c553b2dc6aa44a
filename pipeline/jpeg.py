"""JPEG decoding for the loaders: nvjpeg on a CUDA device when torchvision has it, OpenCV otherwise.

Why two paths: at 16 frames and 32 flow images per clip, decoding is most of a loader's work.
On a GPU machine `torchvision.io.decode_jpeg(list, device="cuda")` decodes a whole batch at once
(nvjpeg; hardware-accelerated for baseline JPEGs on A100/H100-class GPUs), so CPU workers only
read bytes. Elsewhere `cv2.imdecode` (libjpeg-turbo) decodes in the DataLoader workers.

Both return uint8 images as (N, H, W, C) with RGB channel order for colour and C = 1 for grey;
they agree within JPEG-decoder tolerance. Measured on an H200 (torchvision 0.26, hardware
nvjpeg) against OpenCV 5.0's libjpeg-turbo: grey JPEGs (flow) decode bit-identically; colour
JPEGs (4:2:0) differ where chroma changes sharply, the two decoders upsampling chroma
differently: a mean of 3.3 levels and at most 40 on chroma-rich synthetic textures (checked by
the `gpu` test; torchvision's own test allows a mean of 2 on photographs). torchvision is imported only when the CUDA path is used,
so this module imports without it.
"""
from __future__ import annotations

import functools
from typing import Sequence

import cv2
import numpy as np
import torch

RGB = "rgb"
GRAY = "gray"
# OpenCV >= 4.10 decodes straight to RGB; older builds (e.g. a GPU machine's) decode BGR.
_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)


def _as_array(buf) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        return buf
    if isinstance(buf, torch.Tensor):
        return buf.numpy()
    return np.frombuffer(buf, np.uint8)


def decode_cpu(buffers: Sequence, mode: str = RGB) -> np.ndarray:
    """Decode JPEG byte strings with OpenCV -> uint8 (N, H, W, 3) RGB or (N, H, W, 1) grey.

    Raises ValueError naming the position of a buffer that does not decode, or when sizes differ.
    """
    flag = _RGB_FLAG if mode == RGB else cv2.IMREAD_GRAYSCALE
    out = None
    for i, buf in enumerate(buffers):
        img = cv2.imdecode(_as_array(buf), flag)
        if img is not None and mode == RGB and _RGB_FLAG == cv2.IMREAD_COLOR:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img is None:
            raise ValueError(f"JPEG {i} of {len(buffers)} does not decode")
        if out is None:
            out = np.empty((len(buffers),) + img.shape[:2] + (3 if mode == RGB else 1,), np.uint8)
        if img.shape[:2] != out.shape[1:3]:
            raise ValueError(f"JPEG {i} is {img.shape[:2]}, the first was {out.shape[1:3]}")
        out[i] = img if mode == RGB else img[..., None]
    if out is None:
        raise ValueError("no JPEG to decode")
    return out


@functools.lru_cache(maxsize=None)
def gpu_decode_available() -> bool:
    """True when CUDA is up and torchvision's nvjpeg decode is importable."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # torchvision missing or built without image support
        return False
    return True


def decode_gpu(buffers: Sequence, mode: str = RGB, device: str | torch.device = "cuda"
               ) -> torch.Tensor:
    """Decode a batch with nvjpeg -> uint8 tensor (N, H, W, C) on `device` (C = 3 RGB, 1 grey).

    `buffers` are bytes, numpy uint8 arrays or CPU uint8 tensors; one batched call for all.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [b if isinstance(b, torch.Tensor) else torch.from_numpy(_writable(b))
               for b in buffers]
    read_mode = ImageReadMode.RGB if mode == RGB else ImageReadMode.GRAY
    images = decode_jpeg(tensors, mode=read_mode, device=device)  # list of (C, H, W)
    return torch.stack(images).permute(0, 2, 3, 1)


def _writable(buf) -> np.ndarray:
    a = _as_array(buf)
    return a if a.flags.writeable else a.copy()


def decode(buffers: Sequence, mode: str = RGB, device: str | torch.device | None = None
           ) -> torch.Tensor:
    """Decode on `device` (None or "cpu": OpenCV; a CUDA device: nvjpeg) -> (N, H, W, C) uint8."""
    if device is None or torch.device(device).type == "cpu":
        return torch.from_numpy(decode_cpu(buffers, mode))
    if not gpu_decode_available():
        raise RuntimeError("GPU JPEG decode needs CUDA and torchvision (torchvision.io."
                           "decode_jpeg); use device=None to decode on the CPU")
    return decode_gpu(buffers, mode, device)
