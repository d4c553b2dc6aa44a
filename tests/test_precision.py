"""What each --amp value means: bf16 autocast, TF32 or strict fp32 (the switches need no GPU)."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import load_train_config
from pipeline.precision import apply_precision, autocast, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def tf32_switches():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("amp, bf16, tf32", [("auto", True, True), ("bf16", True, True),
                                             ("tf32", False, True), ("off", False, False)])
def test_cuda_modes_set_autocast_and_tf32(tf32_switches, amp, bf16, tf32):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
    assert apply_precision(amp, CUDA) is bf16
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert resolve_precision(amp, CUDA) == ("bf16" if bf16 else "tf32" if tf32 else "fp32")


def test_cpu_runs_fp32_unless_bf16_is_asked_and_leaves_the_cuda_switches(tf32_switches):
    before = torch.backends.cudnn.allow_tf32
    assert [resolve_precision(a, CPU) for a in ("auto", "bf16", "tf32", "off")] == [
        "fp32", "bf16", "fp32", "fp32"]
    assert apply_precision("off", CPU) is False and torch.backends.cudnn.allow_tf32 is before
    x = torch.ones(2, 2)
    with autocast(CPU, True):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(CPU, False):
        assert (x @ x).dtype == torch.float32


def test_unknown_precision_is_refused_by_config_and_resolver():
    with pytest.raises(ValueError, match="amp must be one of auto, bf16, tf32, off"):
        load_train_config("teacher", options={"amp": "fp16"})
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_precision("fp16", CPU)
