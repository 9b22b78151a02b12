"""The frozen teachers' outputs, computed once per image and moved with each sample's augmentation.

Both teachers are frozen, so what they say about an image never changes: the segmentation
teacher's logits and the feature teacher's tensor are computed once, on the un-augmented
(letterboxed) image, and every epoch moves them with the sample's own flip, zoom and crop
(:func:`edgeseg.distill.data.warp_like`, bilinear, on the training device). The teachers' forward
passes leave the training step. Colour jitter then reaches only the student's input: the student
learns to give the teacher's answer for the image under any jitter (consistency training); the seed
study's ``kd_site_live`` arm measures what that changes against teachers run on every augmented batch.

Where the zoomed-out view shows the letterbox pad, a target takes what the teacher says about an
image of pad colour alone (its mean logit, the feature teacher's per-channel mean).

The cache lives in memory (float16 by default) for the samples of the run's fixed sources and is
extended when a regenerated source (hard examples) brings new ones. ``train.teacher_targets: auto``
caches when the estimate fits ``train.cache_limit_mb``, and runs the teachers on every batch otherwise.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from edgeseg.distill.data import Sample, SegmentationDataset, pad_colour, warp_like

log = logging.getLogger(__name__)


def cache_bytes(images: int, image_hw: tuple[int, int], feature_shape: tuple[int, int, int] | None,
                dtype: torch.dtype = torch.float16) -> int:
    """What caching ``images`` images' teacher outputs costs in memory."""
    per = image_hw[0] * image_hw[1] + (feature_shape[0] * feature_shape[1] * feature_shape[2] if feature_shape else 0)
    return images * per * torch.finfo(dtype).bits // 8


class TeacherTargets:
    """Teacher logits (N, 1, H, W) and feature-teacher tensors (N, C, h, w) of every cached sample.

    Args:
        teacher: the segmentation teacher, (B, 3, H, W) normalised -> (B, 1, H, W) logits; or None.
        feature_teacher: the feature teacher, same input -> (B, C, h, w); or None.
        data: the data config (image size, normalisation) the samples are read with.
        device: where the cache lives and the targets are warped (the training device).
        dtype: the cache's dtype (float16 halves it; the targets are warped in float32).
        batch_size: images per teacher call while filling the cache.
    """

    def __init__(self, teacher: Callable | None, feature_teacher: Callable | None, data, device: torch.device,
                 dtype: torch.dtype = torch.float16, batch_size: int = 32):
        self.teacher, self.feature_teacher = teacher, feature_teacher
        self.data, self.device, self.dtype, self.batch_size = data, device, dtype, batch_size
        self.rows: dict[Path, int] = {}  # sample image path -> row
        self.logits: torch.Tensor | None = None
        self.features: torch.Tensor | None = None
        self.logit_fill, self.feature_fill = self._pad_response()

    @torch.no_grad()
    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logits = self.teacher(images).float() if self.teacher is not None else None
        feature = self.feature_teacher(images).float().clone() if self.feature_teacher is not None else None
        return logits, feature  # clone: the feature teacher reuses its bound output buffer

    def _pad_response(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the teachers say about an image of the letterbox pad colour alone: the targets' fill."""
        h, w = self.data.image_size
        mean = torch.tensor(self.data.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.data.std).view(1, 3, 1, 1)
        pad = torch.tensor(pad_colour(self.data), dtype=torch.float32).view(1, 3, 1, 1) / 255
        images = ((pad - mean) / std).expand(1, 3, h, w).contiguous().to(self.device)
        logits, feature = self._run(images)
        logit_fill = logits.mean() if logits is not None else torch.zeros(())
        feature_fill = feature.mean(dim=(0, 2, 3)) if feature is not None else None
        return logit_fill, feature_fill

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logits, self.features) if t is not None)

    def ensure(self, samples: list[Sample]) -> None:
        """Compute and keep the targets of every sample not cached yet (un-augmented, in batches)."""
        new = [s for s in dict.fromkeys(s.image for s in samples) if s not in self.rows]
        if not new:
            return
        t0 = time.perf_counter()
        dataset = SegmentationDataset([Sample(image=p) for p in new], self.data, train=False)
        # its own generator: a loader draws its base seed from the global RNG otherwise, and filling the cache
        # mid-training (a regenerated source) must not move the training's random streams (exact resume)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                                             generator=torch.Generator())
        logits, features = [], []
        for images, _, _ in loader:
            lg, ft = self._run(images.to(self.device))
            if lg is not None:
                logits.append(lg.to(self.dtype))
            if ft is not None:
                features.append(ft.to(self.dtype))
        for name, parts in (("logits", logits), ("features", features)):
            if parts:
                old = getattr(self, name)
                setattr(self, name, torch.cat(([old] if old is not None else []) + parts))
        start = len(self.rows)
        self.rows.update({p: start + i for i, p in enumerate(new)})
        log.info("teacher targets: %d images cached in %.1f s (%d in all, %.1f MB on %s)", len(new),
                 time.perf_counter() - t0, len(self.rows), self.nbytes / 2**20, self.device)

    def rows_of(self, samples: list[Sample]) -> torch.Tensor:
        """(N,) the cache row of each sample, in order."""
        return torch.tensor([self.rows[s.image] for s in samples], dtype=torch.long)

    def targets(self, rows: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The batch's teacher logits (B, 1, H, W) and features (B, C, h, w), float32, moved by each item's ``theta``."""
        rows = rows.to(self.device)
        logits = warp_like(self.logits[rows], theta, self.logit_fill) if self.logits is not None else None
        features = warp_like(self.features[rows], theta, self.feature_fill) if self.features is not None else None
        return logits, features
