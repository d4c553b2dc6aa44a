"""TV-L1's parameters with OpenCV's `DualTVL1OpticalFlow_create()` defaults (IMRS section 4.2.1).

Torch-free, so that the OpenCV backends and the stage's recorded parameters need no torch import.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TVL1Params:
    """OpenCV's ``DualTVL1OpticalFlow`` parameters, with its defaults.

    ``remap_coord_bits`` is not an OpenCV parameter and only the torch implementation reads it:
    ``None`` warps at exact float coordinates (OpenCV 5.x), ``5`` on OpenCV 4.x's 1/32-pixel
    remap tables.
    """

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    gamma: float = 0.0
    median_filtering: int = 5
    remap_coord_bits: int | None = None

    def opencv(self) -> dict:
        """The parameters OpenCV itself takes (without remap_coord_bits)."""
        return {k: v for k, v in self.__dict__.items() if k != "remap_coord_bits"}
