"""Fused Triton kernels for the batched TV-L1 of ``preprocess.tvl1_torch`` (CUDA only).

Same algorithm and the same float32 arithmetic as the PyTorch reference, which follows OpenCV's
``opencv_contrib/modules/optflow/src/tvl1flow.cpp`` (Zach, Pock and Bischof, DAGM 2007; Sanchez,
Meinhardt-Llopis and Facciolo, IPOL 2013): FMA contraction is switched off, divisions and square
roots are IEEE, OpenCV's double-precision ``hypot`` is reproduced exactly in float32, so on an H200
the flow is bit-identical to ``cv2.optflow`` (benchmarks/TVL1_NOTES.md has the figures).

Why it is fast:

* one launch is one whole inner iteration (thresholding, divergence, primal update, its squared
  change, forward gradient, dual update) for every running pair of the batch. A work item is a band
  of full-width rows that one program sweeps top to bottom, a thread per column: the primal update
  of the row below, which the forward gradient needs, is the next row's own, so each pixel's inputs
  are read once and its primal update is computed once; the right neighbour's comes from the other
  threads through ``tl.gather``;
* on real frames OpenCV's stopping rule (summed squared update <= epsilon^2 * H*W) ends most warps
  after a few dozen of the 300 allowed iterations. Each launch therefore compacts the batch: every
  program reads the per-pair flags and errors the previous launch left and walks only the bands of
  pairs still running, so a converged pair costs nothing while the rest of its batch goes on;
* per-pair state lives in small slot arrays (running flag, error, buffer parities) indexed by
  launch, so launches need no host round trip, and one outer iteration (median + 30 inner
  iterations) is a CUDA graph replayed until every pair has stopped;
* the 5x5 median and the warp (bicubic remap of I1 and its gradient, data-term constants) are
  their own fused kernels.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from preprocess import tvl1_torch as ref

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """True when Triton kernels can run here (Triton importable and a CUDA device present)."""
    return torch.cuda.is_available() or _INTERPRET


FLT_EPSILON = tl.constexpr(1.1920928955078125e-07)
INF = tl.constexpr(float("inf"))


# ----------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _schedule(ACT, CU, CP, ERR, sp, sc, sn, B, eps,
              INC_P: tl.constexpr, PASS_ERR: tl.constexpr, BLOCK_B: tl.constexpr):
    """Which pairs run in this launch: active before and last error still above eps.

    Every program computes the same answer from slot ``sp`` (written by the previous launch);
    program 0 alone publishes it into slot ``sc`` for the next launch, advances the buffer
    parities of the pairs that run and clears the error slot ``sn`` the next launch accumulates
    into. Returns the inclusive prefix count of running pairs, each running pair's buffer
    parities packed as a tag (bit 16: u, bit 17: p; zero for pairs that do not run) and the number
    of running pairs."""
    offs = tl.arange(0, BLOCK_B)
    m = offs < B
    act = tl.load(ACT + sp * B + offs, mask=m, other=0)
    err = tl.load(ERR + sp * B + offs, mask=m, other=0.0)
    cu = tl.load(CU + sp * B + offs, mask=m, other=0)
    cp = tl.load(CP + sp * B + offs, mask=m, other=0)
    run = ((act != 0) & (err > eps)).to(tl.int32)
    if tl.program_id(0) == 0:
        tl.store(ACT + sc * B + offs, run, mask=m)
        tl.store(CU + sc * B + offs, cu + run, mask=m)
        if INC_P:
            tl.store(CP + sc * B + offs, cp + run, mask=m)
        else:
            tl.store(CP + sc * B + offs, cp, mask=m)
        if PASS_ERR:
            tl.store(ERR + sc * B + offs, err, mask=m)
        tl.store(ERR + sn * B + offs, tl.zeros([BLOCK_B], dtype=tl.float64), mask=m)
    prefix = tl.cumsum(run, axis=0)
    tag = tl.where(run != 0, ((cu & 1) << 16) | ((cp & 1) << 17), 0)
    return prefix, tag, tl.sum(run, axis=0)


@triton.jit
def _divergence(v1, v1l, v2, v2u, xz, yz):
    """Backward divergence with tvl1flow.cpp's first-row / first-column formulas."""
    a = v1 - v1l
    general = a + (v2 - v2u)
    row0 = a + v2
    col0 = (v1 + v2) - v2u
    corner = v1 + v2
    return tl.where(yz, tl.where(xz, corner, row0), tl.where(xz, col0, general))


@triton.jit
def _primal(ix, iy, rc, u1, u2, div1, div2, l_t, theta):
    """Thresholding step v = u + d, then u' = v + theta * div(p)."""
    grad = ix * ix + iy * iy
    rho = rc + (ix * u1 + iy * u2)
    ltg = l_t * grad
    lo = rho < -ltg
    hi = rho > ltg
    big = grad > FLT_EPSILON
    fi = tl.where(big, tl.math.div_rn(-rho, tl.where(big, grad, 1.0)), 0.0)
    coef = tl.where(lo, l_t, tl.where(hi, -l_t, fi))
    v1 = u1 + coef * ix
    v2 = u2 + coef * iy
    return v1 + theta * div1, v2 + theta * div2


@triton.jit
def _hypot(x, y):
    """(float)hypot(x, y) as tvl1flow.cpp computes it (in double, then rounded), in float32 only.

    sqrt of the rounded x^2 + y^2 is at most one ulp off the correctly rounded result; the exact
    residual S - r^2 (S = x^2 + y^2 kept as an unevaluated sum through FMA error terms) says which
    neighbour is right. Cheaper than double precision: no float<->double conversions, no DFMA."""
    hx = x * x
    lx = tl.fma(x, x, -hx)
    hy = y * y
    ly = tl.fma(y, y, -hy)
    s = hx + hy
    bb = s - hx
    lo = ((hx - (s - bb)) + (hy - bb)) + (lx + ly)
    r = tl.sqrt_rn(s)
    hr = r * r
    res = (s - hr) + (lo - tl.fma(r, r, -hr))
    bits = r.to(tl.int32, bitcast=True)
    ulp = (bits & 0x7F800000).to(tl.float32, bitcast=True) * 1.1920928955078125e-07
    ulp_dn = tl.where((bits & 0x007FFFFF) == 0, ulp * 0.5, ulp)
    return tl.where(res > r * ulp, r + ulp, tl.where(res < -(r * ulp_dn), r - ulp_dn, r))


@triton.jit
def _pair_of_item(prefix, tag, k):
    """(index, u parity, p parity) of the k-th running pair (0-based), from one reduction over the
    per-pair prefix counts and tags that every program holds in registers."""
    packed = tl.sum((prefix <= k).to(tl.int32) + tl.where(prefix == k + 1, tag, 0), axis=0)
    return packed & 0xFFFF, (packed >> 16) & 1, (packed >> 17) & 1


# ----------------------------------------------------------------------------------------------
# One inner iteration


@triton.jit
def _rows_iterate(U, P, C, B, H, W, n, bb, qu, qp, band, l_t, theta, taut,
                  TW: tl.constexpr, R: tl.constexpr, LOAD_LEFT: tl.constexpr = False,
                  PACK_RIGHT: tl.constexpr = False):
    """One inner iteration on a band of R full-width rows of one pair; returns its squared change.

    A thread owns one column and walks down the band: the primal update of the row below, needed
    for the forward gradient, becomes the next step's own row, so every pixel's primal update is
    computed once and its inputs are loaded once; the left and right neighbours it needs come from
    the row held by the other threads (``tl.gather``) instead of memory or recomputation."""
    xs = tl.arange(0, TW)
    inx = xs < W
    xz = xs == 0
    last_x = xs + 1 >= W
    never = xs < 0
    left = tl.maximum(xs - 1, 0)
    right = tl.minimum(xs + 1, TW - 1)
    u1p = U + ((qu * 2) * B + bb) * n
    u2p = U + ((qu * 2 + 1) * B + bb) * n
    ixp = C + bb * n
    iyp = C + (B + bb) * n
    rcp = C + (2 * B + bb) * n
    p11p = P + ((qp * 4) * B + bb) * n
    p12p = P + ((qp * 4 + 1) * B + bb) * n
    p21p = P + ((qp * 4 + 2) * B + bb) * n
    p22p = P + ((qp * 4 + 3) * B + bb) * n
    ru = 1 - qu
    rp = 1 - qp
    v1p = U + ((ru * 2) * B + bb) * n
    v2p = U + ((ru * 2 + 1) * B + bb) * n
    q11p = P + ((rp * 4) * B + bb) * n
    q12p = P + ((rp * 4 + 1) * B + bb) * n
    q21p = P + ((rp * 4 + 2) * B + bb) * n
    q22p = P + ((rp * 4 + 3) * B + bb) * n

    # the band's first row: its own primal update
    y = band * R
    o = y * W + xs
    mu = inx & (y >= 1)
    u1 = tl.load(u1p + o, mask=inx, other=0.0)
    u2 = tl.load(u2p + o, mask=inx, other=0.0)
    p11 = tl.load(p11p + o, mask=inx, other=0.0)
    p12 = tl.load(p12p + o, mask=inx, other=0.0)
    p21 = tl.load(p21p + o, mask=inx, other=0.0)
    p22 = tl.load(p22p + o, mask=inx, other=0.0)
    yz = never | (y == 0)
    d1 = _divergence(p11, tl.gather(p11, left, 0), p12, tl.load(p12p + o - W, mask=mu, other=0.0), xz, yz)
    d2 = _divergence(p21, tl.gather(p21, left, 0), p22, tl.load(p22p + o - W, mask=mu, other=0.0), xz, yz)
    n1, n2 = _primal(tl.load(ixp + o, mask=inx, other=0.0), tl.load(iyp + o, mask=inx, other=0.0),
                     tl.load(rcp + o, mask=inx, other=0.0), u1, u2, d1, d2, l_t, theta)
    acc = tl.zeros([TW], dtype=tl.float32)
    for r in range(R):
        row_ok = inx & (y < H)
        od = o + W
        md = inx & (y + 1 < H)
        # the row below: inputs and primal update
        u1d = tl.load(u1p + od, mask=md, other=0.0)
        u2d = tl.load(u2p + od, mask=md, other=0.0)
        p11d = tl.load(p11p + od, mask=md, other=0.0)
        p12d = tl.load(p12p + od, mask=md, other=0.0)
        p21d = tl.load(p21p + od, mask=md, other=0.0)
        p22d = tl.load(p22p + od, mask=md, other=0.0)
        if LOAD_LEFT:  # from memory (the row is in L1 already) instead of through shared memory
            mdl = md & (xs >= 1)
            p11dl = tl.load(p11p + od - 1, mask=mdl, other=0.0)
            p21dl = tl.load(p21p + od - 1, mask=mdl, other=0.0)
        else:
            p11dl = tl.gather(p11d, left, 0)
            p21dl = tl.gather(p21d, left, 0)
        d1 = _divergence(p11d, p11dl, p12d, p12, xz, never)
        d2 = _divergence(p21d, p21dl, p22d, p22, xz, never)
        n1d, n2d = _primal(tl.load(ixp + od, mask=md, other=0.0), tl.load(iyp + od, mask=md, other=0.0),
                           tl.load(rcp + od, mask=md, other=0.0), u1d, u2d, d1, d2, l_t, theta)
        # dual update of this row with the forward gradient of the new u
        last_y = never | (y + 1 >= H)
        if PACK_RIGHT:  # both components through shared memory in one exchange
            n1r, n2r = tl.split(tl.gather(tl.join(n1, n2), tl.broadcast_to(right[:, None], (TW, 2)), 0))
        else:
            n1r = tl.gather(n1, right, 0)
            n2r = tl.gather(n2, right, 0)
        u1x = tl.where(last_x, 0.0, n1r - n1)
        u2x = tl.where(last_x, 0.0, n2r - n2)
        u1y = tl.where(last_y, 0.0, n1d - n1)
        u2y = tl.where(last_y, 0.0, n2d - n2)
        ng1 = 1.0 + taut * _hypot(u1x, u1y)
        ng2 = 1.0 + taut * _hypot(u2x, u2y)
        tl.store(v1p + o, n1, mask=row_ok)
        tl.store(v2p + o, n2, mask=row_ok)
        tl.store(q11p + o, tl.math.div_rn(p11 + taut * u1x, ng1), mask=row_ok)
        tl.store(q12p + o, tl.math.div_rn(p12 + taut * u1y, ng1), mask=row_ok)
        tl.store(q21p + o, tl.math.div_rn(p21 + taut * u2x, ng2), mask=row_ok)
        tl.store(q22p + o, tl.math.div_rn(p22 + taut * u2y, ng2), mask=row_ok)
        e1 = n1 - u1
        e2 = n2 - u2
        acc += tl.where(row_ok, e1 * e1 + e2 * e2, 0.0)
        # step down
        y += 1
        o = od
        u1, u2, p11, p12, p21, p22, n1, n2 = u1d, u2d, p11d, p12d, p21d, p22d, n1d, n2d
    # summed in float32 over the band, in double across bands (OpenCV: float, row by row)
    return tl.sum(acc, axis=0).to(tl.float64)


@triton.jit(do_not_specialize=["sp", "sc", "sn", "B", "H", "W", "nbands"])
def _rows_kernel(U, P, C, ACT, CU, CP, ERR, sp, sc, sn, B, H, W, nbands,
                 eps, l_t, theta, taut,
                 BLOCK_B: tl.constexpr, TW: tl.constexpr, R: tl.constexpr, LOAD_LEFT: tl.constexpr,
                 PACK_RIGHT: tl.constexpr):
    """u, p (buffer parity q) -> u, p (parity 1-q) for every running pair, one band of R full-width
    rows per work item (``_rows_iterate``); squared change of u summed per pair into ERR[sc].
    Layout: U (2, 2, B, H, W), P (2, 4, B, H, W), C (3, B, H, W) = (I1wx, I1wy, rho_c)."""
    prefix, tag, n_run = _schedule(ACT, CU, CP, ERR, sp, sc, sn, B, eps, True, False, BLOCK_B)
    n = H * W
    for item in tl.range(tl.program_id(0), n_run * nbands, tl.num_programs(0)):
        k = item // nbands
        band = item - k * nbands
        b, qu, qp = _pair_of_item(prefix, tag, k)
        err = _rows_iterate(U, P, C, B, H, W, n, b.to(tl.int64), qu, qp, band, l_t, theta, taut, TW, R,
                            LOAD_LEFT, PACK_RIGHT)
        tl.atomic_add(ERR + sc * B + b, err)


# ----------------------------------------------------------------------------------------------
# 5x5 median of the flow at the start of an outer iteration


@triton.jit
def _median25(v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15, v16, v17, v18, v19, v20, v21, v22, v23, v24):
    """Median of 25 values: Batcher's odd-even merge sort on 32 wires (7 of them +inf), pruned to
    the comparators that reach the middle output (113 instead of 191)."""
    v0, v1 = tl.minimum(v0, v1), tl.maximum(v0, v1)
    v2, v3 = tl.minimum(v2, v3), tl.maximum(v2, v3)
    v4, v5 = tl.minimum(v4, v5), tl.maximum(v4, v5)
    v6, v7 = tl.minimum(v6, v7), tl.maximum(v6, v7)
    v8, v9 = tl.minimum(v8, v9), tl.maximum(v8, v9)
    v10, v11 = tl.minimum(v10, v11), tl.maximum(v10, v11)
    v12, v13 = tl.minimum(v12, v13), tl.maximum(v12, v13)
    v14, v15 = tl.minimum(v14, v15), tl.maximum(v14, v15)
    v16, v17 = tl.minimum(v16, v17), tl.maximum(v16, v17)
    v18, v19 = tl.minimum(v18, v19), tl.maximum(v18, v19)
    v20, v21 = tl.minimum(v20, v21), tl.maximum(v20, v21)
    v22, v23 = tl.minimum(v22, v23), tl.maximum(v22, v23)
    v0, v2 = tl.minimum(v0, v2), tl.maximum(v0, v2)
    v1, v3 = tl.minimum(v1, v3), tl.maximum(v1, v3)
    v4, v6 = tl.minimum(v4, v6), tl.maximum(v4, v6)
    v5, v7 = tl.minimum(v5, v7), tl.maximum(v5, v7)
    v8, v10 = tl.minimum(v8, v10), tl.maximum(v8, v10)
    v9, v11 = tl.minimum(v9, v11), tl.maximum(v9, v11)
    v12, v14 = tl.minimum(v12, v14), tl.maximum(v12, v14)
    v13, v15 = tl.minimum(v13, v15), tl.maximum(v13, v15)
    v16, v18 = tl.minimum(v16, v18), tl.maximum(v16, v18)
    v17, v19 = tl.minimum(v17, v19), tl.maximum(v17, v19)
    v20, v22 = tl.minimum(v20, v22), tl.maximum(v20, v22)
    v21, v23 = tl.minimum(v21, v23), tl.maximum(v21, v23)
    v1, v2 = tl.minimum(v1, v2), tl.maximum(v1, v2)
    v5, v6 = tl.minimum(v5, v6), tl.maximum(v5, v6)
    v9, v10 = tl.minimum(v9, v10), tl.maximum(v9, v10)
    v13, v14 = tl.minimum(v13, v14), tl.maximum(v13, v14)
    v17, v18 = tl.minimum(v17, v18), tl.maximum(v17, v18)
    v21, v22 = tl.minimum(v21, v22), tl.maximum(v21, v22)
    v0, v4 = tl.minimum(v0, v4), tl.maximum(v0, v4)
    v1, v5 = tl.minimum(v1, v5), tl.maximum(v1, v5)
    v2, v6 = tl.minimum(v2, v6), tl.maximum(v2, v6)
    v3, v7 = tl.minimum(v3, v7), tl.maximum(v3, v7)
    v8, v12 = tl.minimum(v8, v12), tl.maximum(v8, v12)
    v9, v13 = tl.minimum(v9, v13), tl.maximum(v9, v13)
    v10, v14 = tl.minimum(v10, v14), tl.maximum(v10, v14)
    v11, v15 = tl.minimum(v11, v15), tl.maximum(v11, v15)
    v16, v20 = tl.minimum(v16, v20), tl.maximum(v16, v20)
    v17, v21 = tl.minimum(v17, v21), tl.maximum(v17, v21)
    v18, v22 = tl.minimum(v18, v22), tl.maximum(v18, v22)
    v19, v23 = tl.minimum(v19, v23), tl.maximum(v19, v23)
    v2, v4 = tl.minimum(v2, v4), tl.maximum(v2, v4)
    v3, v5 = tl.minimum(v3, v5), tl.maximum(v3, v5)
    v10, v12 = tl.minimum(v10, v12), tl.maximum(v10, v12)
    v11, v13 = tl.minimum(v11, v13), tl.maximum(v11, v13)
    v18, v20 = tl.minimum(v18, v20), tl.maximum(v18, v20)
    v19, v21 = tl.minimum(v19, v21), tl.maximum(v19, v21)
    v1, v2 = tl.minimum(v1, v2), tl.maximum(v1, v2)
    v3, v4 = tl.minimum(v3, v4), tl.maximum(v3, v4)
    v5, v6 = tl.minimum(v5, v6), tl.maximum(v5, v6)
    v9, v10 = tl.minimum(v9, v10), tl.maximum(v9, v10)
    v11, v12 = tl.minimum(v11, v12), tl.maximum(v11, v12)
    v13, v14 = tl.minimum(v13, v14), tl.maximum(v13, v14)
    v17, v18 = tl.minimum(v17, v18), tl.maximum(v17, v18)
    v19, v20 = tl.minimum(v19, v20), tl.maximum(v19, v20)
    v21, v22 = tl.minimum(v21, v22), tl.maximum(v21, v22)
    v0, v8 = tl.minimum(v0, v8), tl.maximum(v0, v8)
    v1, v9 = tl.minimum(v1, v9), tl.maximum(v1, v9)
    v2, v10 = tl.minimum(v2, v10), tl.maximum(v2, v10)
    v3, v11 = tl.minimum(v3, v11), tl.maximum(v3, v11)
    v4, v12 = tl.minimum(v4, v12), tl.maximum(v4, v12)
    v5, v13 = tl.minimum(v5, v13), tl.maximum(v5, v13)
    v6, v14 = tl.minimum(v6, v14), tl.maximum(v6, v14)
    v7 = tl.minimum(v7, v15)
    v16, v24 = tl.minimum(v16, v24), tl.maximum(v16, v24)
    v4, v8 = tl.minimum(v4, v8), tl.maximum(v4, v8)
    v5, v9 = tl.minimum(v5, v9), tl.maximum(v5, v9)
    v6, v10 = tl.minimum(v6, v10), tl.maximum(v6, v10)
    v7, v11 = tl.minimum(v7, v11), tl.maximum(v7, v11)
    v20, v24 = tl.minimum(v20, v24), tl.maximum(v20, v24)
    v2, v4 = tl.minimum(v2, v4), tl.maximum(v2, v4)
    v3, v5 = tl.minimum(v3, v5), tl.maximum(v3, v5)
    v6, v8 = tl.minimum(v6, v8), tl.maximum(v6, v8)
    v7, v9 = tl.minimum(v7, v9), tl.maximum(v7, v9)
    v10, v12 = tl.minimum(v10, v12), tl.maximum(v10, v12)
    v11, v13 = tl.minimum(v11, v13), tl.maximum(v11, v13)
    v18, v20 = tl.minimum(v18, v20), tl.maximum(v18, v20)
    v19, v21 = tl.minimum(v19, v21), tl.maximum(v19, v21)
    v22, v24 = tl.minimum(v22, v24), tl.maximum(v22, v24)
    v1, v2 = tl.minimum(v1, v2), tl.maximum(v1, v2)
    v3, v4 = tl.minimum(v3, v4), tl.maximum(v3, v4)
    v5, v6 = tl.minimum(v5, v6), tl.maximum(v5, v6)
    v7, v8 = tl.minimum(v7, v8), tl.maximum(v7, v8)
    v9, v10 = tl.minimum(v9, v10), tl.maximum(v9, v10)
    v11, v12 = tl.minimum(v11, v12), tl.maximum(v11, v12)
    v13 = tl.minimum(v13, v14)
    v17, v18 = tl.minimum(v17, v18), tl.maximum(v17, v18)
    v19, v20 = tl.minimum(v19, v20), tl.maximum(v19, v20)
    v21, v22 = tl.minimum(v21, v22), tl.maximum(v21, v22)
    v23, v24 = tl.minimum(v23, v24), tl.maximum(v23, v24)
    v16 = tl.maximum(v0, v16)
    v17 = tl.maximum(v1, v17)
    v18 = tl.maximum(v2, v18)
    v19 = tl.maximum(v3, v19)
    v20 = tl.maximum(v4, v20)
    v21 = tl.maximum(v5, v21)
    v6 = tl.minimum(v6, v22)
    v7 = tl.minimum(v7, v23)
    v8 = tl.minimum(v8, v24)
    v16 = tl.maximum(v8, v16)
    v17 = tl.maximum(v9, v17)
    v10 = tl.minimum(v10, v18)
    v11 = tl.minimum(v11, v19)
    v12 = tl.minimum(v12, v20)
    v13 = tl.minimum(v13, v21)
    v10 = tl.maximum(v6, v10)
    v11 = tl.maximum(v7, v11)
    v12 = tl.minimum(v12, v16)
    v13 = tl.minimum(v13, v17)
    v12 = tl.maximum(v10, v12)
    v11 = tl.minimum(v11, v13)
    v12 = tl.maximum(v11, v12)
    return v12


@triton.jit
def _ld_clamped(base, ys, xs, dy: tl.constexpr, dx: tl.constexpr, H, W, m):
    yy = tl.minimum(tl.maximum(ys + dy, 0), H - 1)
    xx = tl.minimum(tl.maximum(xs + dx, 0), W - 1)
    return tl.load(base + yy * W + xx, mask=m, other=0.0)


@triton.jit
def _median5x5(base, ys, xs, H, W, m):
    """cv::medianBlur(ksize=5) of a float image at (ys, xs): border replicated."""
    return _median25(
        _ld_clamped(base, ys, xs, -2, -2, H, W, m), _ld_clamped(base, ys, xs, -2, -1, H, W, m),
        _ld_clamped(base, ys, xs, -2, 0, H, W, m), _ld_clamped(base, ys, xs, -2, 1, H, W, m),
        _ld_clamped(base, ys, xs, -2, 2, H, W, m), _ld_clamped(base, ys, xs, -1, -2, H, W, m),
        _ld_clamped(base, ys, xs, -1, -1, H, W, m), _ld_clamped(base, ys, xs, -1, 0, H, W, m),
        _ld_clamped(base, ys, xs, -1, 1, H, W, m), _ld_clamped(base, ys, xs, -1, 2, H, W, m),
        _ld_clamped(base, ys, xs, 0, -2, H, W, m), _ld_clamped(base, ys, xs, 0, -1, H, W, m),
        _ld_clamped(base, ys, xs, 0, 0, H, W, m), _ld_clamped(base, ys, xs, 0, 1, H, W, m),
        _ld_clamped(base, ys, xs, 0, 2, H, W, m), _ld_clamped(base, ys, xs, 1, -2, H, W, m),
        _ld_clamped(base, ys, xs, 1, -1, H, W, m), _ld_clamped(base, ys, xs, 1, 0, H, W, m),
        _ld_clamped(base, ys, xs, 1, 1, H, W, m), _ld_clamped(base, ys, xs, 1, 2, H, W, m),
        _ld_clamped(base, ys, xs, 2, -2, H, W, m), _ld_clamped(base, ys, xs, 2, -1, H, W, m),
        _ld_clamped(base, ys, xs, 2, 0, H, W, m), _ld_clamped(base, ys, xs, 2, 1, H, W, m),
        _ld_clamped(base, ys, xs, 2, 2, H, W, m))


@triton.jit(do_not_specialize=["sp", "sc", "sn", "B", "H", "W", "ntx", "ntiles"])
def _median_kernel(U, ACT, CU, CP, ERR, sp, sc, sn, B, H, W, ntx, ntiles, eps,
                   BLOCK_B: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """u (parity q) -> median-filtered u (parity 1-q) for every running pair; errors pass through."""
    prefix, tag, n_run = _schedule(ACT, CU, CP, ERR, sp, sc, sn, B, eps, False, True, BLOCK_B)
    n = H * W
    ys0 = tl.arange(0, TH)[:, None]
    xs0 = tl.arange(0, TW)[None, :]
    for item in tl.range(tl.program_id(0), n_run * ntiles, tl.num_programs(0)):
        k = item // ntiles
        tile = item - k * ntiles
        b, qu, _ = _pair_of_item(prefix, tag, k)
        bb = b.to(tl.int64)
        ty = tile // ntx
        ys = ty * TH + ys0
        xs = (tile - ty * ntx) * TW + xs0
        inside = (ys < H) & (xs < W)
        off = ys * W + xs
        for c in tl.static_range(2):
            med = _median5x5(U + ((qu * 2 + c) * B + bb) * n, ys, xs, H, W, inside)
            tl.store(U + (((1 - qu) * 2 + c) * B + bb) * n + off, med, mask=inside)


# ----------------------------------------------------------------------------------------------
# Warping: bicubic remap of I1 and its gradient, constants of the linearised data term


@triton.jit
def _keys(t):
    """Keys' weights (A = -0.75) for taps -1..2 at offset t, evaluated as OpenCV 5's remap does."""
    s = 1.0 - t
    t2 = t * t
    w0 = -0.75 * (t * (s * s))
    w1 = tl.fma(tl.fma(tl.full(t.shape, 1.25, tl.float32), t, -2.25), t2, 1.0)
    w3 = -0.75 * (t2 * s)
    w2 = ((1.0 - w0) - w1) - w3
    return w0, w1, w2, w3


@triton.jit
def _tap_row(base, yy, xx, w0, w1, w2, w3, H, W, m):
    """One row of four taps (zero outside the image) summed as an FMA chain."""
    ok = m & (yy >= 0) & (yy < H)
    row = base + yy * W
    v0 = tl.load(row + xx, mask=ok & (xx >= 0) & (xx < W), other=0.0)
    v1 = tl.load(row + xx + 1, mask=ok & (xx + 1 >= 0) & (xx + 1 < W), other=0.0)
    v2 = tl.load(row + xx + 2, mask=ok & (xx + 2 >= 0) & (xx + 2 < W), other=0.0)
    v3 = tl.load(row + xx + 3, mask=ok & (xx + 3 >= 0) & (xx + 3 < W), other=0.0)
    acc = v0 * w0
    acc = tl.fma(v1, w1, acc)
    acc = tl.fma(v2, w2, acc)
    return tl.fma(v3, w3, acc)


@triton.jit
def _bicubic(base, iy, ix, wx0, wx1, wx2, wx3, wy0, wy1, wy2, wy3, H, W, m):
    """cv::remap(INTER_CUBIC, BORDER_CONSTANT 0) of one float image: rows first, then the column."""
    acc = _tap_row(base, iy, ix, wx0, wx1, wx2, wx3, H, W, m) * wy0
    acc = tl.fma(_tap_row(base, iy + 1, ix, wx0, wx1, wx2, wx3, H, W, m), wy1, acc)
    acc = tl.fma(_tap_row(base, iy + 2, ix, wx0, wx1, wx2, wx3, H, W, m), wy2, acc)
    return tl.fma(_tap_row(base, iy + 3, ix, wx0, wx1, wx2, wx3, H, W, m), wy3, acc)


@triton.jit(do_not_specialize=["s_init", "s_first", "B", "H", "W", "ntx", "ntiles"])
def _warp_kernel(U, P, C, I0, I1, I1X, I1Y, ACT, QU, QP, CU, CP, ERR, s_init, s_first,
                 B, H, W, ntx, ntiles, TH: tl.constexpr, TW: tl.constexpr):
    """Start of a warping: bring u and p to buffer 0 (from the parities QU, QP), warp I1 and its gradient by u, store
    (I1wx, I1wy, rho_c) and reset every pair to running with an infinite error."""
    n = H * W
    ys0 = tl.arange(0, TH)[:, None]
    xs0 = tl.arange(0, TW)[None, :]
    for item in tl.range(tl.program_id(0), B * ntiles, tl.num_programs(0)):
        b = item // ntiles
        tile = item - b * ntiles
        qu = tl.load(QU + b)
        qp = tl.load(QP + b)
        bb = b.to(tl.int64)
        ty = tile // ntx
        ys = ty * TH + ys0
        xs = (tile - ty * ntx) * TW + xs0
        inside = (ys < H) & (xs < W)
        off = ys * W + xs
        u1 = tl.load(U + ((qu * 2) * B + bb) * n + off, mask=inside, other=0.0)
        u2 = tl.load(U + ((qu * 2 + 1) * B + bb) * n + off, mask=inside, other=0.0)
        tl.store(U + bb * n + off, u1, mask=inside)
        tl.store(U + (B + bb) * n + off, u2, mask=inside)
        for c in tl.static_range(4):
            pc = tl.load(P + ((qp * 4 + c) * B + bb) * n + off, mask=inside, other=0.0)
            tl.store(P + (c * B + bb) * n + off, pc, mask=inside)

        mx = xs.to(tl.float32) + u1
        my = ys.to(tl.float32) + u2
        fx = tl.floor(mx)
        fy = tl.floor(my)
        wx0, wx1, wx2, wx3 = _keys(mx - fx)
        wy0, wy1, wy2, wy3 = _keys(my - fy)
        ix = fx.to(tl.int32) - 1
        iy = fy.to(tl.int32) - 1
        i1w = _bicubic(I1 + bb * n, iy, ix, wx0, wx1, wx2, wx3, wy0, wy1, wy2, wy3, H, W, inside)
        i1wx = _bicubic(I1X + bb * n, iy, ix, wx0, wx1, wx2, wx3, wy0, wy1, wy2, wy3, H, W, inside)
        i1wy = _bicubic(I1Y + bb * n, iy, ix, wx0, wx1, wx2, wx3, wy0, wy1, wy2, wy3, H, W, inside)
        i0 = tl.load(I0 + bb * n + off, mask=inside, other=0.0)
        tl.store(C + bb * n + off, i1wx, mask=inside)
        tl.store(C + (B + bb) * n + off, i1wy, mask=inside)
        tl.store(C + (2 * B + bb) * n + off, i1w - i1wx * u1 - i1wy * u2 - i0, mask=inside)
        if tile == 0:
            tl.store(ACT + s_init * B + b, 1)
            tl.store(CU + s_init * B + b, 0)
            tl.store(CP + s_init * B + b, 0)
            tl.store(ERR + s_init * B + b, INF)
            tl.store(ERR + s_first * B + b, 0.0)


# ----------------------------------------------------------------------------------------------
# Host side


@dataclass(frozen=True)
class KernelConfig:
    """Launch shapes: the iteration kernel's band height (``rows``) and its two neighbour
    exchanges (left duals loaded from memory rather than gathered; right flow values gathered as
    one packed pair or two), the median and warp kernels' TH x TW tile and warps, programs per SM
    of the persistent grid, software-pipelining stages, a register cap (64 lets four 256-thread
    programs share an SM), and whether outer iterations are CUDA graph replays."""

    rows: int = 8
    load_left: bool = True
    pack_right: bool = False
    th: int = 8
    tw: int = 32
    num_warps: int = 8
    programs_per_sm: int = 12
    num_stages: int = 3
    max_registers: int | None = 64
    cuda_graphs: bool = True


def _slot_cycle(length: int, nslots: int = 5) -> list[int]:
    """A cyclic sequence of slot ids in which any three cyclically consecutive entries differ, so a
    launch can read slot j-1, write slot j and clear slot j+1 while replaying the cycle forever."""
    if length < 3:
        raise ValueError("a slot cycle needs at least three launches")
    seq: list[int] = [0, 1, 2]

    def ok_cyclic(s: list[int]) -> bool:
        n = len(s)
        return all(len({s[i], s[(i + 1) % n], s[(i + 2) % n]}) == 3 for i in range(n))

    def extend(s: list[int]) -> list[int] | None:
        if len(s) == length:
            return s if ok_cyclic(s) else None
        for c in range(nslots):
            if c != s[-1] and c != s[-2]:
                r = extend(s + [c])
                if r is not None:
                    return r
        return None

    found = extend(seq)
    assert found is not None
    return found


class _Level:
    """Static device buffers of one pyramid level for a batch of B pairs."""

    def __init__(self, b: int, h: int, w: int, device, cfg: KernelConfig):
        f32 = dict(dtype=torch.float32, device=device)
        self.b, self.h, self.w = b, h, w
        self.U = torch.zeros(2, 2, b, h, w, **f32)
        self.P = torch.zeros(2, 4, b, h, w, **f32)
        self.C = torch.zeros(3, b, h, w, **f32)
        self.I0 = torch.zeros(b, h, w, **f32)
        self.I1 = torch.zeros(b, h, w, **f32)
        self.I1X = torch.zeros(b, h, w, **f32)
        self.I1Y = torch.zeros(b, h, w, **f32)
        self.ntx = triton.cdiv(w, cfg.tw)
        self.ntiles = self.ntx * triton.cdiv(h, cfg.th)
        self.tw_rows = max(32, triton.next_power_of_2(w))
        self.nbands = triton.cdiv(h, cfg.rows)
        self.graph = None


class TVL1Triton:
    """Batched TV-L1 for a fixed (B, H, W): buffers, compiled kernels and CUDA graphs are kept
    between calls, so repeated batches of one shape pay for set-up once."""

    NSLOTS = 5

    def __init__(self, b: int, h: int, w: int, params: ref.TVL1Params = ref.TVL1Params(),
                 device: torch.device | str = "cuda", cfg: KernelConfig = KernelConfig()):
        if params.gamma != 0 or params.remap_coord_bits is not None:
            raise ValueError("the Triton path implements gamma = 0 and exact remap coordinates")
        if params.median_filtering not in (0, 1, 5):
            raise ValueError("the Triton path implements a 5x5 median or none")
        self.params, self.cfg = params, cfg
        self.device = torch.device(device)
        self.b, self.h, self.w = b, h, w
        self.sizes = ref.pyramid_sizes(h, w, params)
        self.levels = [_Level(b, lh, lw, self.device, cfg) for lh, lw in self.sizes]
        self.median = params.median_filtering > 1
        self.seq = _slot_cycle(params.inner_iterations + (1 if self.median else 0))
        i32 = dict(dtype=torch.int32, device=self.device)
        self.ACT = torch.zeros(self.NSLOTS, b, **i32)
        self.CU = torch.zeros(self.NSLOTS, b, **i32)
        self.CP = torch.zeros(self.NSLOTS, b, **i32)
        self.ERR = torch.zeros(self.NSLOTS, b, dtype=torch.float64, device=self.device)
        self.QPREV = torch.zeros(2, b, **i32)
        self.block_b = max(256, triton.next_power_of_2(b))  # one compiled variant up to 256 pairs
        if self.device.type == "cuda":
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:
            sms = 1
        self.grid = (max(1, sms * cfg.programs_per_sm),)
        self.launch_opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.max_registers:
            self.launch_opts["maxnreg"] = cfg.max_registers
        if not _INTERPRET:
            self.launch_opts["enable_fp_fusion"] = False
        p = params
        self.l_t = ref._f32(p.lambda_ * p.theta)
        self.taut = ref._f32(p.tau / p.theta)
        self.theta = ref._f32(p.theta)
        self.iterations_run = 0  # outer iterations issued (graph replays or eager), for diagnostics

    # -- launches ------------------------------------------------------------------------------

    def _eps(self, lv: _Level) -> float:
        return ref._f32(self.params.epsilon * self.params.epsilon * lv.h * lv.w)

    def _launch_outer(self, lv: _Level) -> None:
        """Median (if any) and the inner iterations of one outer iteration, as kernel launches."""
        seq, n = self.seq, len(self.seq)
        eps = self._eps(lv)
        cfg = self.cfg
        for j in range(n):
            sp, sc, sn = seq[j - 1], seq[j], seq[(j + 1) % n]
            if self.median and j == 0:
                _median_kernel[self.grid](
                    lv.U, self.ACT, self.CU, self.CP, self.ERR, sp, sc, sn, self.b, lv.h, lv.w,
                    lv.ntx, lv.ntiles, eps, BLOCK_B=self.block_b, TH=cfg.th, TW=cfg.tw, **self.launch_opts)
            else:
                # one thread per column of the padded row: the row width sets the warps
                opts = dict(self.launch_opts, num_warps=max(1, min(16, lv.tw_rows // 32)))
                _rows_kernel[self.grid](
                    lv.U, lv.P, lv.C, self.ACT, self.CU, self.CP, self.ERR, sp, sc, sn, self.b, lv.h, lv.w,
                    lv.nbands, eps, self.l_t, self.theta, self.taut,
                    BLOCK_B=self.block_b, TW=lv.tw_rows, R=cfg.rows, LOAD_LEFT=cfg.load_left,
                    PACK_RIGHT=cfg.pack_right, **opts)

    def _launch_warp(self, lv: _Level) -> None:
        last = self.seq[-1]
        self.QPREV[0].copy_(self.CU[last] & 1)
        self.QPREV[1].copy_(self.CP[last] & 1)
        _warp_kernel[self.grid](
            lv.U, lv.P, lv.C, lv.I0, lv.I1, lv.I1X, lv.I1Y, self.ACT, self.QPREV[0], self.QPREV[1],
            self.CU, self.CP, self.ERR, last, self.seq[0], self.b, lv.h, lv.w, lv.ntx, lv.ntiles,
            TH=self.cfg.th, TW=self.cfg.tw, **self.launch_opts)

    def _any_running(self, lv: _Level) -> bool:
        last = self.seq[-1]
        return bool(((self.ACT[last] != 0) & (self.ERR[last] > self._eps(lv))).any())

    def _outer(self, lv: _Level) -> None:
        self.iterations_run += 1
        if not (self.cfg.cuda_graphs and self.device.type == "cuda"):
            self._launch_outer(lv)
            return
        if lv.graph is None:
            # compile and run once eagerly, then record the same launches
            self._launch_outer(lv)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._launch_outer(lv)
            lv.graph = graph
            return
        lv.graph.replay()

    # -- the solver ----------------------------------------------------------------------------

    def _solve_level(self, lv: _Level) -> torch.Tensor:
        for _ in range(self.params.warps):
            self._launch_warp(lv)
            for _ in range(self.params.outer_iterations):
                self._outer(lv)
                if not self._any_running(lv):
                    break
        q = (self.CU[self.seq[-1]] & 1).bool().view(self.b, 1, 1, 1)
        return torch.where(q, lv.U[1].transpose(0, 1), lv.U[0].transpose(0, 1))  # (B, 2, H, W)

    @torch.no_grad()
    def __call__(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """(B, H, W) intensities 0..255 -> (B, 2, H, W) float32 flow, B as constructed."""
        # Triton launches and graph capture use the calling thread's current device, which is
        # cuda:0 in any thread that never chose one (the flow stage's per-GPU device threads).
        with torch.cuda.device(self.device):
            return self._run(prev, nxt)

    def _run(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        if prev.shape != (self.b, self.h, self.w) or nxt.shape != prev.shape:
            raise ValueError(f"expected ({self.b}, {self.h}, {self.w}) inputs, got {tuple(prev.shape)}")
        p = self.params
        prev = prev.to(self.device, torch.float32)
        nxt = nxt.to(self.device, torch.float32)
        pyr0 = ref.build_pyramid(prev, self.sizes, p.scale_step)
        pyr1 = ref.build_pyramid(nxt, self.sizes, p.scale_step)
        for lv, a, c in zip(self.levels, pyr0, pyr1):
            lv.I0.copy_(a)
            lv.I1.copy_(c)
            gx, gy = ref.centered_gradient(c)
            lv.I1X.copy_(gx)
            lv.I1Y.copy_(gy)
        flow = None
        for s in range(len(self.levels) - 1, -1, -1):
            lv = self.levels[s]
            lv.P.zero_()
            self.CU.zero_()
            self.CP.zero_()
            self.ERR.zero_()
            if flow is None:
                lv.U.zero_()
            else:
                lv.U[0, 0].copy_(ref.upsample_flow(flow[:, 0], lv.h, lv.w, p.scale_step))
                lv.U[0, 1].copy_(ref.upsample_flow(flow[:, 1], lv.h, lv.w, p.scale_step))
            flow = self._solve_level(lv)
        return flow.contiguous()


_SOLVERS: "OrderedDict[tuple, TVL1Triton]" = OrderedDict()
MAX_CACHED_SOLVERS = 4  # each holds its batch's device buffers


def tvl1_flow_triton(prev: torch.Tensor, nxt: torch.Tensor, params: ref.TVL1Params = ref.TVL1Params(),
                     cfg: KernelConfig = KernelConfig()) -> torch.Tensor:
    """TV-L1 with the fused kernels; solvers are cached per (shape, params, device, config)."""
    if prev.dim() != 3 or prev.shape != nxt.shape:
        raise ValueError(f"prev and nxt must both be (B, H, W); got {tuple(prev.shape)} and {tuple(nxt.shape)}")
    b, h, w = prev.shape
    key = (b, h, w, params, str(prev.device), cfg)
    solver = _SOLVERS.get(key)
    if solver is None:
        while len(_SOLVERS) >= MAX_CACHED_SOLVERS:
            _SOLVERS.popitem(last=False)
        solver = _SOLVERS[key] = TVL1Triton(b, h, w, params, prev.device, cfg)
    _SOLVERS.move_to_end(key)
    return solver(prev, nxt)


def clear_cache() -> None:
    """Release the cached solvers' buffers and graphs."""
    _SOLVERS.clear()
