"""Batched TV-L1 optical flow in PyTorch, reproducing OpenCV's CPU ``DualTVL1OpticalFlow``.

The algorithm is the duality-based TV-L1 of Zach, Pock and Bischof ("A Duality Based Approach for
Realtime TV-L1 Optical Flow", DAGM 2007) in the form analysed by Sanchez, Meinhardt-Llopis and
Facciolo ("TV-L1 Optical Flow Estimation", IPOL 2013), as OpenCV implements it in
``opencv_contrib/modules/optflow/src/tvl1flow.cpp``. This module follows that file's numerics so
that flows agree with ``cv2.optflow.DualTVL1OpticalFlow_create()`` to within float rounding:

* intensities stay in 0..255; the pyramid is cascaded (each level resized from the one above with
  ``cv::resize(..., fx=fy=scale_step, INTER_LINEAR)``, so 256 -> 205 -> 164 -> 131 -> 105, sampled
  at exactly ``1/scale_step``); levels under 16 px are dropped;
* resizing reproduces what the x86 wheels run (Intel IPP through OpenCV's HAL): ``s0 + f*(s1-s0)``
  with one rounding (an FMA), horizontal pass first, ``f`` taken from the source position computed
  in double, the last source column/row reached with ``f = 1`` from its neighbour;
* centred image gradients with half one-sided differences at the borders;
* bicubic warping with Keys' kernel (A = -0.75), zero outside the image (``BORDER_CONSTANT``).
  OpenCV 4.x quantises remap coordinates to 1/32 px (``INTER_BITS = 5`` tables); OpenCV 5.x samples
  at the exact float position. ``TVL1Params.remap_coord_bits`` picks either (default: 5.x);
* a 5x5 median (border replicated) on the flow at the start of every outer iteration;
* the thresholding step with its ``FLT_EPSILON`` guard, backward divergence and forward gradient
  with OpenCV's border rules, dual variables reset at each scale;
* per-pair stopping: within a warp a pair stops once its summed squared update is
  ``<= epsilon**2 * H*W``; it then stays frozen while the rest of its batch goes on;
* upsampling to the next level's explicit size, then multiplying by ``1/scale_step``.

Every array update is a separate PyTorch operation here: this is the reference path (CPU and CUDA).
``preprocess.tvl1_triton`` fuses the inner iterations into Triton kernels for CUDA and is checked
against this module.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .tvl1_params import TVL1Params  # noqa: F401  (re-exported: part of this module's API)

FLT_EPSILON = float(np.finfo(np.float32).eps)
MIN_LEVEL_SIZE = 16  # OpenCV drops pyramid levels with a side under 16 px


def _f32(x: float) -> float:
    """Round a double to the nearest float32, as OpenCV's ``static_cast<float>`` does."""
    return float(np.float32(x))


def pyramid_sizes(height: int, width: int, params: TVL1Params = TVL1Params()) -> list[tuple[int, int]]:
    """(H, W) of each pyramid level, finest first, as ``cv::resize`` with ``fx=fy=scale_step``
    rounds them (``saturate_cast<int>``, i.e. round half to even), dropping levels under 16 px."""
    sizes = [(height, width)]
    for _ in range(1, params.nscales):
        h, w = sizes[-1]
        nh, nw = int(round(h * params.scale_step)), int(round(w * params.scale_step))
        if nh < MIN_LEVEL_SIZE or nw < MIN_LEVEL_SIZE:
            break
        sizes.append((nh, nw))
    return sizes


# ----------------------------------------------------------------------------------------------
# cv::resize INTER_LINEAR (IPP flavour)


def _linear_taps(n_src: int, n_dst: int, scale: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of one axis: position ``(d+0.5)*scale - 0.5`` in double."""
    pos = (np.arange(n_dst, dtype=np.float64) + 0.5) * scale - 0.5
    s = np.floor(pos)
    f = pos - s
    s = s.astype(np.int64)
    low = s < 0
    s[low], f[low] = 0, 0.0
    high = s >= n_src - 1
    if n_dst < n_src:
        # Shrinking, IPP reaches the last sample from its neighbour with f = 1 (whose rounding
        # differs from clamping both taps); enlarging, it clamps.
        s[high], f[high] = max(n_src - 2, 0), 1.0
    else:
        s[high], f[high] = n_src - 1, 0.0
    s1 = np.minimum(s + 1, n_src - 1)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)
    return as_t(s, torch.long), as_t(s1, torch.long), as_t(f.astype(np.float32), torch.float64)


def _fma_lerp(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``a + f*(b - a)`` rounded once to float32, like a fused multiply-add."""
    d = (b - a).double()
    return (a.double() + f * d).float()


def resize_linear(img: torch.Tensor, out_h: int, out_w: int, scale_y: float, scale_x: float) -> torch.Tensor:
    """``cv::resize(INTER_LINEAR)`` of float32 images (B, H, W), source step ``scale_*`` per output
    pixel (``1/fx`` for a resize by factor, ``src/dst`` for one by explicit size)."""
    _, h, w = img.shape
    x0, x1, fx = _linear_taps(w, out_w, scale_x, img.device)
    y0, y1, fy = _linear_taps(h, out_h, scale_y, img.device)
    rows = _fma_lerp(img[:, :, x0], img[:, :, x1], fx)
    return _fma_lerp(rows[:, y0, :], rows[:, y1, :], fy[:, None])


# ----------------------------------------------------------------------------------------------
# Elementary operators of tvl1flow.cpp, all on (B, H, W) float32


def centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred differences; half one-sided differences on the first/last row and column."""
    dx = torch.empty_like(img)
    dy = torch.empty_like(img)
    dx[:, :, 1:-1] = 0.5 * (img[:, :, 2:] - img[:, :, :-2])
    dx[:, :, 0] = 0.5 * (img[:, :, 1] - img[:, :, 0])
    dx[:, :, -1] = 0.5 * (img[:, :, -1] - img[:, :, -2])
    dy[:, 1:-1, :] = 0.5 * (img[:, 2:, :] - img[:, :-2, :])
    dy[:, 0, :] = 0.5 * (img[:, 1, :] - img[:, 0, :])
    dy[:, -1, :] = 0.5 * (img[:, -1, :] - img[:, -2, :])
    return dx, dy


def forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences, zero on the last column (x) and last row (y)."""
    dx = torch.zeros_like(u)
    dy = torch.zeros_like(u)
    dx[:, :, :-1] = u[:, :, 1:] - u[:, :, :-1]
    dy[:, :-1, :] = u[:, 1:, :] - u[:, :-1, :]
    return dx, dy


def divergence(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Backward divergence with tvl1flow.cpp's first-row/column formulas (and their rounding)."""
    div = torch.empty_like(v1)
    div[:, 1:, 1:] = (v1[:, 1:, 1:] - v1[:, 1:, :-1]) + (v2[:, 1:, 1:] - v2[:, :-1, 1:])
    div[:, 0, 1:] = (v1[:, 0, 1:] - v1[:, 0, :-1]) + v2[:, 0, 1:]
    div[:, 1:, 0] = (v1[:, 1:, 0] + v2[:, 1:, 0]) - v2[:, :-1, 0]
    div[:, 0, 0] = v1[:, 0, 0] + v2[:, 0, 0]
    return div


def hypot_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|(x, y)| computed in double and rounded to float, as tvl1flow.cpp's ``(float)hypot(x, y)``."""
    return torch.hypot(x.double(), y.double()).float()


def median_blur(u: torch.Tensor, ksize: int) -> torch.Tensor:
    """``cv::medianBlur`` of float images: k x k median, border replicated."""
    r = ksize // 2
    padded = F.pad(u[:, None], (r, r, r, r), mode="replicate")[:, 0]
    patches = padded.unfold(1, ksize, 1).unfold(2, ksize, 1)
    return patches.reshape(*u.shape, ksize * ksize).median(dim=-1).values


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a*b + c`` rounded once to float32 (a fused multiply-add, emulated in double)."""
    return (a.double() * b.double() + c.double()).float()


def keys_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """Keys' cubic convolution weights (A = -0.75) of the taps at -1, 0, 1, 2 for offset t in [0, 1).

    Evaluated as OpenCV 5's float remap does (factored outer taps, an FMA for the centre one, the
    last inner tap as one minus the others), so that the weights agree bit for bit."""
    a = -0.75
    s = 1.0 - t
    t2 = t * t
    w0 = a * (t * (s * s))
    w1 = _fma(_fma(torch.full_like(t, a + 2.0), t, torch.full_like(t, -(a + 3.0))), t2, torch.ones_like(t))
    w3 = a * (t2 * s)
    w2 = ((1.0 - w0) - w1) - w3
    return [w0, w1, w2, w3]


def remap_cubic(imgs: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, coord_bits: int | None = None) -> torch.Tensor:
    """``cv::remap(INTER_CUBIC, BORDER_CONSTANT 0)`` of images (B, C, H, W) at ``(x+u1, y+u2)``.

    Taps outside the image contribute zero. Each row of four taps is summed with an FMA chain,
    then the four rows likewise (OpenCV 5's order). ``coord_bits=5`` rounds positions to 1/32 px
    first (round half to even, as ``cvRound``), like OpenCV 4.x's fixed-point remap tables."""
    b, c, h, w = imgs.shape
    dev = imgs.device
    xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    mx = xs + u1
    my = ys + u2
    if coord_bits is None:
        fx, fy = torch.floor(mx), torch.floor(my)
        tx, ty = mx - fx, my - fy
        ix, iy = fx.long(), fy.long()
    else:
        n = 1 << coord_bits
        qx = torch.round(mx * float(n)).long()
        qy = torch.round(my * float(n)).long()
        ix, iy = qx >> coord_bits, qy >> coord_bits
        tx = (qx & (n - 1)).float() * (1.0 / n)
        ty = (qy & (n - 1)).float() * (1.0 / n)
    wx = [wj[:, None] for wj in keys_weights(tx)]
    wy = [wi[:, None] for wi in keys_weights(ty)]
    flat = imgs.reshape(b, c, h * w)
    out = None
    for i in range(4):
        yy = iy + (i - 1)
        row = None
        for j in range(4):
            xx = ix + (j - 1)
            valid = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
            v = flat.gather(2, idx).view(b, c, h, w) * valid[:, None].to(imgs.dtype)
            row = v * wx[j] if row is None else _fma(v, wx[j], row)
        out = row * wy[i] if out is None else _fma(row, wy[i], out)
    return out


# ----------------------------------------------------------------------------------------------
# The solver


def _where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


def _solve_scale(i0, i1, u1, u2, u3, params: TVL1Params):
    """One pyramid level: ``warps`` warpings, each of up to ``outer x inner`` iterations."""
    b, h, w = i0.shape
    use_gamma = params.gamma != 0
    scaled_eps = _f32(params.epsilon * params.epsilon * h * w)
    l_t = _f32(params.lambda_ * params.theta)
    taut = _f32(params.tau / params.theta)
    theta = _f32(params.theta)
    gamma = _f32(params.gamma)
    i1x, i1y = centered_gradient(i1)
    stack = torch.stack([i1, i1x, i1y], dim=1)
    p11, p12, p21, p22 = (torch.zeros_like(i0) for _ in range(4))
    p31 = p32 = torch.zeros_like(i0) if use_gamma else None
    for _ in range(params.warps):
        warped = remap_cubic(stack, u1, u2, params.remap_coord_bits)
        i1w, i1wx, i1wy = warped[:, 0], warped[:, 1], warped[:, 2]
        grad = i1wx * i1wx + i1wy * i1wy
        rho_c = i1w - i1wx * u1 - i1wy * u2 - i0
        active = torch.ones(b, dtype=torch.bool, device=i0.device)
        for _ in range(params.outer_iterations):
            if not bool(active.any()):
                break
            if params.median_filtering > 1:
                u1 = _where(active, median_blur(u1, params.median_filtering), u1)
                u2 = _where(active, median_blur(u2, params.median_filtering), u2)
            for _ in range(params.inner_iterations):
                if not bool(active.any()):
                    break
                # thresholding step: v = u + d, the minimiser of the linearised data term
                rho = rho_c + (i1wx * u1 + i1wy * u2)
                if use_gamma:
                    rho = rho + gamma * u3
                lt_grad = l_t * grad
                lo = rho < -lt_grad
                hi = rho > lt_grad
                mid = ~(lo | hi) & (grad > FLT_EPSILON)
                fi = torch.where(mid, -rho / torch.where(mid, grad, torch.ones_like(grad)), torch.zeros_like(grad))
                coef = torch.where(lo, torch.full_like(grad, l_t), torch.where(hi, torch.full_like(grad, -l_t), fi))
                v1 = u1 + coef * i1wx
                v2 = u2 + coef * i1wy
                # u = v + theta * div(p)
                nu1 = v1 + theta * divergence(p11, p12)
                nu2 = v2 + theta * divergence(p21, p22)
                d1, d2 = nu1 - u1, nu2 - u2
                err = d1 * d1 + d2 * d2
                if use_gamma:
                    v3 = u3 + coef * gamma
                    nu3 = v3 + theta * divergence(p31, p32)
                    d3 = nu3 - u3
                    err = err + d3 * d3
                error = err.double().sum(dim=(1, 2))
                # dual step: p = (p + taut * grad u) / (1 + taut * |grad u|)
                u1x, u1y = forward_gradient(nu1)
                u2x, u2y = forward_gradient(nu2)
                ng1 = 1.0 + taut * hypot_f32(u1x, u1y)
                ng2 = 1.0 + taut * hypot_f32(u2x, u2y)
                p11 = _where(active, (p11 + taut * u1x) / ng1, p11)
                p12 = _where(active, (p12 + taut * u1y) / ng1, p12)
                p21 = _where(active, (p21 + taut * u2x) / ng2, p21)
                p22 = _where(active, (p22 + taut * u2y) / ng2, p22)
                u1 = _where(active, nu1, u1)
                u2 = _where(active, nu2, u2)
                if use_gamma:
                    u3x, u3y = forward_gradient(nu3)
                    ng3 = 1.0 + taut * hypot_f32(u3x, u3y)
                    p31 = _where(active, (p31 + taut * u3x) / ng3, p31)
                    p32 = _where(active, (p32 + taut * u3y) / ng3, p32)
                    u3 = _where(active, nu3, u3)
                active = active & (error > scaled_eps)
    return u1, u2, u3


def build_pyramid(img: torch.Tensor, sizes: Sequence[tuple[int, int]], scale_step: float) -> list[torch.Tensor]:
    """Cascaded INTER_LINEAR pyramid of (B, H, W) float32 images, finest first."""
    levels = [img]
    inv = 1.0 / scale_step
    for h, w in sizes[1:]:
        levels.append(resize_linear(levels[-1], h, w, inv, inv))
    return levels


def upsample_flow(u: torch.Tensor, h: int, w: int, scale_step: float) -> torch.Tensor:
    """Resize a flow component to an explicit size, then scale it by ``1/scale_step``."""
    _, sh, sw = u.shape
    up = resize_linear(u, h, w, 1.0 / (h / sh), 1.0 / (w / sw))
    return up * _f32(1.0 / scale_step)


def tvl1_flow_torch(prev: torch.Tensor, nxt: torch.Tensor, params: TVL1Params = TVL1Params()) -> torch.Tensor:
    """The pure-PyTorch solver: (B, H, W) float32 intensities 0..255 -> (B, 2, H, W) flow."""
    if prev.shape != nxt.shape or prev.dim() != 3:
        raise ValueError(f"prev and nxt must both be (B, H, W); got {tuple(prev.shape)} and {tuple(nxt.shape)}")
    prev = prev.to(torch.float32)
    nxt = nxt.to(torch.float32)
    b, h, w = prev.shape
    if h < 3 or w < 3:
        raise ValueError(f"images must be at least 3x3, got {h}x{w}")
    sizes = pyramid_sizes(h, w, params)
    p0 = build_pyramid(prev, sizes, params.scale_step)
    p1 = build_pyramid(nxt, sizes, params.scale_step)
    ch, cw = sizes[-1]
    u1 = prev.new_zeros(b, ch, cw)
    u2 = prev.new_zeros(b, ch, cw)
    u3 = prev.new_zeros(b, ch, cw) if params.gamma != 0 else None
    for s in range(len(sizes) - 1, -1, -1):
        u1, u2, u3 = _solve_scale(p0[s], p1[s], u1, u2, u3, params)
        if s == 0:
            break
        nh, nw = sizes[s - 1]
        u1 = upsample_flow(u1, nh, nw, params.scale_step)
        u2 = upsample_flow(u2, nh, nw, params.scale_step)
        if u3 is not None:  # u3 is an intensity offset, not a displacement: no 1/scale_step
            u3 = resize_linear(u3, nh, nw, 1.0 / (nh / u3.shape[1]), 1.0 / (nw / u3.shape[2]))
    return torch.stack([u1, u2], dim=1)


# ----------------------------------------------------------------------------------------------
# Public API


def _triton_usable(device: torch.device, params: TVL1Params) -> bool:
    """Whether the fused kernels cover this device and these parameters (they implement gamma = 0,
    OpenCV 5's exact remap coordinates and a 5x5 median or none)."""
    if device.type != "cuda" or params.gamma != 0 or params.remap_coord_bits is not None:
        return False
    median = params.median_filtering > 1
    if params.median_filtering not in (0, 1, 5) or params.inner_iterations + int(median) < 3:
        return False
    try:
        from preprocess import tvl1_triton
    except ImportError:
        return False
    return tvl1_triton.available()


def tvl1_flow(prev: torch.Tensor, nxt: torch.Tensor, params: TVL1Params = TVL1Params(), *,
              backend: str = "auto") -> torch.Tensor:
    """TV-L1 flow from ``prev`` to ``nxt``, as ``cv2.optflow.DualTVL1OpticalFlow.calc(prev, nxt)``.

    prev, nxt: (B, H, W) gray intensities 0..255 on any device (converted to float32).
    Returns (B, 2, H, W) float32 on the same device, channel 0 = x, 1 = y.
    ``backend``: "auto" (fused Triton kernels on CUDA when available, else PyTorch), "torch",
    or "triton".
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and _triton_usable(prev.device, params))
    if use_triton:
        from preprocess import tvl1_triton

        return tvl1_triton.tvl1_flow_triton(prev, nxt, params)
    return tvl1_flow_torch(prev, nxt, params)


def tvl1_flow_numpy(prev_u8: np.ndarray, next_u8: np.ndarray, params: TVL1Params = TVL1Params(),
                    device: str | torch.device | None = None) -> np.ndarray:
    """One pair of (H, W) gray images -> (H, W, 2) float32 flow, cv2's layout."""
    dev = torch.device(device) if device is not None else _default_device()
    a = torch.as_tensor(np.asarray(prev_u8), dtype=torch.float32, device=dev)[None]
    b = torch.as_tensor(np.asarray(next_u8), dtype=torch.float32, device=dev)[None]
    return tvl1_flow(a, b, params)[0].permute(1, 2, 0).contiguous().cpu().numpy()


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# Float32 planes of the finest level's size that one pair holds while its flow is computed: the
# PyTorch path's images, gradients, warped images, flow, duals and per-iteration temporaries; the
# Triton path's double-buffered flow and duals on every level plus the pyramid's temporaries.
TORCH_PLANES_PER_PAIR = 48
TRITON_PLANES_PER_PAIR = 64
# Largest batch the Triton path is given at once: on an H200 throughput still grows a little up to
# ~1024 pairs (benchmarks/TVL1_NOTES.md); each batch size keeps its own buffers and CUDA graphs.
TRITON_MAX_BATCH = 1024


def pair_bytes(height: int, width: int, planes: int = TORCH_PLANES_PER_PAIR) -> int:
    """Estimated device memory one pair needs while its flow is computed."""
    return planes * height * width * 4


def batch_size_for(height: int, width: int, *, memory_budget_bytes: int | None = None,
                   max_batch: int | None = None, device: torch.device | None = None,
                   planes: int = TORCH_PLANES_PER_PAIR) -> int:
    """Pairs per batch that keep the working set under ``memory_budget_bytes`` (default: half the
    free memory of a CUDA device, 1 GiB on the CPU), capped by ``max_batch``."""
    if memory_budget_bytes is None:
        if device is not None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget_bytes = free // 2
        else:
            memory_budget_bytes = 1 << 30
    n = max(1, int(memory_budget_bytes // pair_bytes(height, width, planes)))
    if max_batch is not None:
        n = min(n, max(1, int(max_batch)))
    return n


def _as_stack(frames) -> torch.Tensor | Sequence:
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        return frames
    return list(frames)


def flow_in_chunks(prevs, nxts, params: TVL1Params = TVL1Params(), *, max_batch: int | None = None,
                   memory_budget_bytes: int | None = None, device: str | torch.device | None = None,
                   backend: str = "auto") -> Iterator[torch.Tensor]:
    """Flow for any number of pairs, computed in batches that fit a memory budget.

    prevs, nxts: (N, H, W) tensors/arrays, or sequences of (H, W) arrays, gray 0..255.
    Yields (b, 2, H, W) float32 tensors on ``device`` (default CUDA if present), in input order;
    their concatenation is the flow of all N pairs. On the Triton path a short last batch is padded
    with blank pairs (they stop after one iteration), so every batch reuses the same buffers and
    CUDA graphs.
    """
    dev = torch.device(device) if device is not None else _default_device()
    prevs, nxts = _as_stack(prevs), _as_stack(nxts)
    n = len(prevs)
    if len(nxts) != n:
        raise ValueError(f"{n} previous frames but {len(nxts)} next frames")
    if n == 0:
        return
    h, w = np.asarray(prevs[0]).shape[-2:] if not isinstance(prevs, torch.Tensor) else prevs.shape[-2:]
    fused = backend == "triton" or (backend == "auto" and _triton_usable(dev, params))
    if fused:
        cap = TRITON_MAX_BATCH if max_batch is None else max_batch
        bs = min(n, batch_size_for(int(h), int(w), memory_budget_bytes=memory_budget_bytes, max_batch=cap,
                                   device=dev, planes=TRITON_PLANES_PER_PAIR))
    else:
        bs = batch_size_for(int(h), int(w), memory_budget_bytes=memory_budget_bytes, max_batch=max_batch,
                            device=dev)

    def stack(seq, lo, hi) -> torch.Tensor:
        if isinstance(seq, torch.Tensor):
            return seq[lo:hi].to(dev, torch.float32)
        return torch.as_tensor(np.stack([np.asarray(x) for x in seq[lo:hi]]), dtype=torch.float32, device=dev)

    for lo in range(0, n, bs):
        hi = min(n, lo + bs)
        a, b = stack(prevs, lo, hi), stack(nxts, lo, hi)
        if fused and hi - lo < bs:
            pad = a.new_zeros(bs - (hi - lo), *a.shape[1:])
            a, b = torch.cat([a, pad]), torch.cat([b, pad])
        yield tvl1_flow(a, b, params, backend=backend)[: hi - lo]
