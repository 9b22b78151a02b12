"""Pixel conversions between uint8 images and the generators' and teacher views' [-1, 1] tensors.

The generators sample in [-1, 1] and the teacher view (:class:`TeacherView`) reads that range,
so every image crosses between the two here, and the rounding is the same everywhere.
"""
from __future__ import annotations

import numpy as np
import torch


def uint8_to_signed(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def signed_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded to nearest ((x + 1) * 127.5 + 0.5, clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
