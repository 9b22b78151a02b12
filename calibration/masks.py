"""Conditioning masks for the mask-conditioned generator, and what the teacher makes of them.

New layouts come from the training masks: each pool image takes one (a seeded choice among the
masks with someone in them), moved by a random affine transform (zoom, shift, rotation, flip)
and, with probability ``combine``, joined by a second transformed mask. Everything for pool
image ``i`` comes from its own seed, so a (seed, index) pair regenerates the same mask.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from edgeseg.calibration.config import MaskSourceConfig
from edgeseg.runtime.errors import InputError


def _affine(mask: torch.Tensor, rng: np.random.Generator, cfg: MaskSourceConfig) -> torch.Tensor:
    """One random affine transform of a (1, h, w) {0, 1} mask (nearest: it stays binary)."""
    scale = rng.uniform(*cfg.scale)
    angle = math.radians(rng.uniform(-cfg.rotate, cfg.rotate))
    tx, ty = rng.uniform(-cfg.shift, cfg.shift, size=2) * 2  # normalised coordinates span 2
    flip = -1.0 if cfg.hflip and rng.random() < 0.5 else 1.0
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    # output -> input sampling grid: the inverse of zoom/rotate, then the shift
    theta = torch.tensor([[c * flip, -s, -tx], [s * flip, c, -ty]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, (1, *mask.shape), align_corners=False)
    return F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]


class MaskSource:
    """Deterministic new conditioning masks from training masks.

    Args:
        masks: (N, 1, h, w) {0, 1} training masks at the generator's resolution.
        cfg: the transforms.
        min_fraction: masks covering less than this share are never chosen (nobody to draw).
    """

    def __init__(self, masks: torch.Tensor, cfg: MaskSourceConfig, min_fraction: float = 0.01):
        self.cfg = cfg
        self.masks = masks
        self.choices = np.flatnonzero(masks.flatten(1).mean(dim=1).numpy() >= min_fraction)
        if self.choices.size == 0:
            raise InputError("no training mask has a person in it: the mask-conditioned generator needs labelled "
                             "people (check the training split's masks)")

    def __call__(self, seeds: list[int]) -> torch.Tensor:
        """(B, 1, h, w) {0, 1} masks, one per seed; nobody-left-in-frame draws are retried (bounded)."""
        out = []
        for seed in seeds:
            rng = np.random.default_rng([int(seed), 0x6D61736B])
            for _ in range(8):
                m = _affine(self.masks[rng.choice(self.choices)], rng, self.cfg)
                if rng.random() < self.cfg.combine:
                    m = torch.maximum(m, _affine(self.masks[rng.choice(self.choices)], rng, self.cfg))
                if m.mean() >= 0.01:
                    break
            out.append(m)
        return torch.stack(out)


def check_condition_masks(masks: torch.Tensor, size: int, where: str = "conditioning masks") -> None:
    """Refuse conditioning masks the generator cannot take: one clear line naming the fix."""
    if masks.ndim != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != (size, size):
        raise InputError(f"{where}: shape {tuple(masks.shape)} but the generator takes (B, 1, {size}, {size}); "
                         f"resize the masks to {size}x{size} (calibration.ddpm.image_size)")
    if not torch.isfinite(masks).all() or ((masks != 0) & (masks != 1)).any():
        raise InputError(f"{where}: values must be 0 or 1 (a binary person mask)")


def masks_to_model(masks: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B, 1, h, w) {0, 1} -> (B, H, W) uint8 {0, 1} at the model's size (bilinear, then > 0.5)."""
    up = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)
    return (up[:, 0] > 0.5).to(torch.uint8).numpy()


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
