"""Numeric precision of training, feature caching and evaluation: one setting, named honestly.

On CUDA the three modes differ in what the tensor cores compute:

- ``bf16``: autocast to bfloat16 (convolutions and matmuls on bf16 tensor cores); weights,
  optimizer state and losses stay fp32. No loss scaling is needed. The default on CUDA.
- ``tf32``: fp32 tensors, but cuDNN and cuBLAS may multiply in TF32 (a 10-bit mantissa, as
  fp16's). PyTorch enables this for convolutions by default, so "plain" PyTorch fp32 is this.
- ``off``: IEEE fp32 throughout; TF32 is disabled. The reference numerics, and what "fp32"
  means in this project's benchmarks and records.

``auto`` is bf16 on CUDA and fp32 elsewhere: bf16 autocast of 3D convolutions is slower than
fp32 on CPUs without AMX, so on a CPU only an explicit ``bf16`` autocasts, and TF32 does not
exist there.
The TF32 switches are process-wide, so they are set where a command starts its device work.
"""
from __future__ import annotations

import contextlib

import torch

from .config import PRECISIONS


def resolve_precision(amp: str, device: torch.device) -> str:
    """What `amp` means on `device`: "bf16", "tf32" or "fp32"."""
    if amp not in PRECISIONS:
        raise ValueError(f"amp must be one of {', '.join(PRECISIONS)}, got {amp!r}")
    if device.type != "cuda":
        return "bf16" if amp == "bf16" else "fp32"
    return {"auto": "bf16", "bf16": "bf16", "tf32": "tf32", "off": "fp32"}[amp]


def apply_precision(amp: str, device: torch.device) -> bool:
    """Set the TF32 switches for `amp` on `device`; True when bf16 autocast is to be used.

    bf16 leaves TF32 on for the few fp32 operations autocast keeps (PyTorch's default); fp32
    turns it off so that fp32 is fp32.
    """
    mode = resolve_precision(amp, device)
    if device.type == "cuda":
        tf32 = mode != "fp32"
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return mode == "bf16"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when asked, else nothing."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
