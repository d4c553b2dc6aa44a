"""The TV-L1 implementations the flow stage can use, and which one `auto` picks.

TV-L1 is Zach, Pock & Bischof (DAGM 2007), as OpenCV implements it (Sanchez, Meinhardt-Llopis &
Facciolo, IPOL 2013); seed 000 section 4.2.1 uses OpenCV's default parameters, pinned in
`preprocess.tvl1_params.TVL1Params`.

- `opencv`: `cv2.optflow.DualTVL1OpticalFlow` on the CPU: the reference. One instance per
  worker process (instances are not thread-safe), cached in a module-level variable; its
  scale count is reset before every pair, because `calc` lowers it for images too small for
  5 scales and keeps it lowered (OpenCV 5.0), which would make results depend on history.
- `opencv-cuda`: `cv2.cuda.OpticalFlowDual_TVL1`, when OpenCV was built with CUDA. It is NOT the
  same algorithm: no median filtering of the flow between warps, another bicubic kernel and
  border rule in the warps, and one `iterations` count (300 = 30 inner x 10 outer) for the
  whole fixed-point loop; expect flows that differ from `opencv` by a few hundredths of a pixel.
- `torch`: the batched PyTorch TV-L1 of `preprocess.tvl1_torch`, on CUDA or on the CPU; the
  stage runs it through a per-device pipeline (`preprocess.flow_pipeline`).

`auto` picks the fastest available: torch on a CUDA machine, else opencv-cuda, else opencv.
The resolved name and its parameters are recorded with the outputs (`backend_params`).
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .tvl1_params import TVL1Params

BACKENDS = ("auto", "opencv", "opencv-cuda", "torch")


class BackendUnavailable(ValueError):
    """The requested flow backend cannot run on this machine (said before any work)."""


def opencv_cuda_available() -> bool:
    import cv2
    try:
        return hasattr(cv2, "cuda") and cv2.cuda.getCudaEnabledDeviceCount() > 0 \
            and hasattr(cv2.cuda, "OpticalFlowDual_TVL1_create")
    except cv2.error:
        return False


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _importable(module: str) -> bool:
    import importlib
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def resolve_backend(name: str) -> str:
    """The concrete backend for `name` ("auto" resolved), or BackendUnavailable saying why."""
    if name not in BACKENDS:
        raise ValueError(f"unknown flow backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        if torch_cuda_available() and _importable("preprocess.tvl1_torch"):
            return "torch"
        return resolve_backend("opencv-cuda" if opencv_cuda_available() else "opencv")
    if name == "opencv":
        import cv2
        if not hasattr(cv2, "optflow"):
            raise BackendUnavailable(
                "flow backend 'opencv' needs cv2.optflow, which only opencv-contrib-python has "
                "(this OpenCV is a build without the contrib modules)")
    elif name == "opencv-cuda" and not opencv_cuda_available():
        raise BackendUnavailable(
            "flow backend 'opencv-cuda' needs an OpenCV built with CUDA and a CUDA device "
            "(cv2.cuda.getCudaEnabledDeviceCount() is 0 here); use --backend opencv or torch")
    elif name == "torch":
        try:
            import preprocess.tvl1_torch  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(f"flow backend 'torch' cannot be imported: {e}") from None
    return name


def backend_params(name: str) -> dict:
    """What shapes a backend's flow, as recorded in DATA/meta/flow.params.json."""
    if name == "opencv":
        return {"backend": name, "algorithm": TVL1Params().opencv()}
    if name == "opencv-cuda":
        c = TVL1Params()
        return {"backend": name, "algorithm": {
            "tau": c.tau, "lambda_": c.lambda_, "theta": c.theta, "nscales": c.nscales,
            "warps": c.warps, "epsilon": c.epsilon,
            "iterations": c.inner_iterations * c.outer_iterations, "scale_step": c.scale_step,
            "gamma": c.gamma}}
    if name == "torch":
        return {"backend": name, "algorithm": asdict(TVL1Params())}
    raise ValueError(f"backend_params needs a resolved backend, not {name!r}")


_INSTANCE: dict[str, object] = {}  # one TV-L1 object per process and backend (not thread-safe)


def _opencv_instance():
    import cv2
    if "opencv" not in _INSTANCE:
        c = TVL1Params()
        alg = cv2.optflow.DualTVL1OpticalFlow_create()
        alg.setTau(c.tau)
        alg.setLambda(c.lambda_)
        alg.setTheta(c.theta)
        alg.setScalesNumber(c.nscales)
        alg.setWarpingsNumber(c.warps)
        alg.setEpsilon(c.epsilon)
        alg.setInnerIterations(c.inner_iterations)
        alg.setOuterIterations(c.outer_iterations)
        alg.setScaleStep(c.scale_step)
        alg.setGamma(c.gamma)
        alg.setMedianFiltering(c.median_filtering)
        alg.setUseInitialFlow(False)
        _INSTANCE["opencv"] = alg
    return _INSTANCE["opencv"]


def _opencv_cuda_instance():
    import cv2
    if "opencv-cuda" not in _INSTANCE:
        c = TVL1Params()
        _INSTANCE["opencv-cuda"] = cv2.cuda.OpticalFlowDual_TVL1_create(
            c.tau, c.lambda_, c.theta, c.nscales, c.warps, c.epsilon,
            c.inner_iterations * c.outer_iterations, c.scale_step, c.gamma, False)
    return _INSTANCE["opencv-cuda"]


def pair_flow(backend: str, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Flow from `prev` to `nxt` (uint8 grayscale, H x W) as float32 (H, W, 2) = (x, y) pixels.

    For the pairwise backends (opencv, opencv-cuda); the torch backend works in batches.
    """
    if backend == "opencv":
        alg = _opencv_instance()
        # calc() lowers the object's scale count for a small image and never restores it, so a
        # cached instance would compute later, larger videos with fewer scales: reset it.
        alg.setScalesNumber(TVL1Params().nscales)
        return alg.calc(prev, nxt, None)
    if backend == "opencv-cuda":
        import cv2
        g0, g1 = cv2.cuda_GpuMat(), cv2.cuda_GpuMat()
        g0.upload(prev)
        g1.upload(nxt)
        return _opencv_cuda_instance().calc(g0, g1, None).download()
    raise ValueError(f"pair_flow: {backend!r} is not a pairwise backend")
