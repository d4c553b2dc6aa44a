"""The pinned flow quantization and its one inverse (seed 000 section 4.2.1)."""
import numpy as np
import torch

from preprocess.flow_quant import BOUND, ZERO, dequantize, quantize

STEP = 40 / 255


def test_pinned_codes_at_zero_and_the_bounds():
    v = np.array([0.0, 20.0, -20.0, 20.0001, -20.0001, 35.0, -1e6, 1e6], np.float32)
    assert quantize(v).tolist() == [128, 255, 0, 255, 0, 255, 0, 255]
    assert ZERO == 128 and quantize(np.float32(0)) == 128
    assert quantize(v).dtype == np.uint8


def test_rounding_is_to_nearest_code():
    # Exactly between codes 127 and 128 lies v = 0 (127.5): half to even gives 128. Just off
    # the middle rounds to the nearer code.
    assert quantize(np.float32(-0.01)) == 127   # 127.44
    assert quantize(np.float32(0.01)) == 128    # 127.56
    assert quantize(np.float32(-0.1)) == 127    # 126.86
    assert quantize(np.float32(STEP * 0.49 - 20)) == 0
    assert quantize(np.float32(STEP * 0.51 - 20)) == 1
    assert quantize(np.float32(20 - STEP * 0.51)) == 254
    assert quantize(np.float32(20 - STEP * 0.49)) == 255


def test_inverse_of_every_code_is_exact_and_round_trips():
    q = np.arange(256, dtype=np.uint8)
    v = dequantize(q)
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, q.astype(np.float64) * 40 / 255 - 20, atol=1e-5)
    assert v[0] == -BOUND and abs(v[255] - BOUND) < 1e-5 and abs(v[128] - STEP / 2) < 1e-6
    assert (quantize(v) == q).all()


def test_round_trip_error_is_at_most_half_a_step_inside_the_bounds():
    v = np.random.default_rng(0).uniform(-20, 20, 100_000).astype(np.float32)
    err = np.abs(dequantize(quantize(v)) - v)
    assert err.max() <= STEP / 2 + 1e-5
    outside = np.array([-50, -20.5, 21, 99], np.float32)
    np.testing.assert_allclose(dequantize(quantize(outside)), np.clip(outside, -20, 20),
                               atol=1e-5)


def test_torch_tensors_give_the_same_codes_and_values():
    v = np.random.default_rng(1).uniform(-25, 25, (3, 2, 7, 5)).astype(np.float32)
    v[0, 0, 0, :3] = [0.0, 20.0, -20.0]
    qt = quantize(torch.from_numpy(v))
    assert isinstance(qt, torch.Tensor) and qt.dtype == torch.uint8
    assert (qt.numpy() == quantize(v)).all()
    back = dequantize(qt)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    np.testing.assert_allclose(back.numpy(), dequantize(quantize(v)), atol=1e-6)
