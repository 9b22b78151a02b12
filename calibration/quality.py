"""How close a generator's images are to real ones: KID on the teacher's encoder features.

Kernel Inception Distance (Binkowski et al. 2018): the unbiased squared MMD between two feature
sets under the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
The features are the teacher encoder's deepest map, globally average-pooled: a network trained on
this world, where an Inception net trained on photographs would see the demo's drawn people as
nothing it knows. Unbiased, so it can dip below zero for two samples of one distribution; the
floor it is read against is two disjoint sets of held-out real images.

Generated images are sampled unguided (the generator alone, no teacher pulling), for the
conditioning masks of the generator's own mask source, with the configured sampler. Real images
are compared at the generator's resolution (box-reduced to it, then enlarged to the model's size
as generated images are), so the distance measures what the generator draws, not the 2x
enlargement both generators share; the ``native`` figures beside compare at full resolution.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID between feature sets ``a`` (n, d) and ``b`` (m, d): mean and std over random subsets."""
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    size = min(subset_size, len(a), len(b))
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)].astype(np.float64)
        y = b[rng.choice(len(b), size, replace=False)].astype(np.float64)
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        n = size
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


@torch.no_grad()
def encoder_features(teacher, images: np.ndarray, mean: Sequence[float], std: Sequence[float], batch: int = 32) -> np.ndarray:
    """(N, H, W, 3) uint8 at the model's size -> (N, C) pooled deepest encoder features of ``teacher``."""
    teacher = teacher.eval()
    device = next(teacher.parameters()).device
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).to(device).permute(0, 3, 1, 2).float() / 255
        out.append(teacher.encoder((x - m) / s)[-1].mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out)


def at_generator_resolution(images: np.ndarray, resolution: int) -> np.ndarray:
    """Real images as a ``resolution``-px generator's would be: box-reduced, then enlarged bicubically."""
    from edgeseg.calibration.pixels import signed_to_uint8, uint8_to_signed

    x = uint8_to_signed(images)
    small = F.interpolate(x, size=(resolution, resolution), mode="area")
    return signed_to_uint8(F.interpolate(small, size=images.shape[1:3], mode="bicubic", align_corners=False))


def unguided_samples(unet, scheduler_config: dict, mask_source, sampler_cfg, count: int, size: tuple[int, int],
                     seed: int = 0, batch: int = 32) -> np.ndarray:
    """``count`` images (N, H, W, 3) uint8 at the model's size from a mask-conditioned generator, unguided."""
    from edgeseg.calibration.ddpm import ConditionedUNet
    from edgeseg.calibration.sampler import sample
    from edgeseg.calibration.synth import images_to_model
    from edgeseg.calibration.config import GuidanceConfig

    out = []
    for start in range(0, count, batch):
        seeds = list(range(seed + start, seed + min(start + batch, count)))
        cond = ConditionedUNet(unet, mask_source(seeds))
        x = sample(cond, scheduler_config, seeds, sampler_cfg, GuidanceConfig(mode="none"))
        out.append(images_to_model(x, size))
        log.info("unguided samples: %d/%d", start + len(seeds), count)
    return np.concatenate(out)
