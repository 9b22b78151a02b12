"""The generated candidates and the screen that filters them, best first, into the set.

Each candidate is measured against real data (nearest training image, SSIM, the target images)
and then checked by the set's filters (:class:`SetFilter`), the most confident teacher first.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeseg.calibration.filters import Confidence, SetFilter

if TYPE_CHECKING:  # imported where used: the similarity search and the target domain load on demand
    from edgeseg.calibration.similarity import TrainIndex
    from edgeseg.calibration.target import TargetDomain


@dataclass
class Candidate:
    """One generated image and what the teacher made of it."""

    pool_index: int
    seed: int
    batch: int
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8 teacher mask
    conf: Confidence
    mode: int | str | None = None  # mode-guidance cluster, or the prompt
    source: int | None = None  # img2img: index of the training image it started from
    dhash: str = ""  # set by the filter
    similarity: dict = dataclasses.field(default_factory=dict)  # train_ssim, train_nearest, ... (synth.run)
    condition: np.ndarray | None = None  # (H, W) uint8 mask the image was generated for (conditional generator)
    condition_iou: float | None = None  # teacher mask vs conditioning mask
    target: int | None = None  # index of the target image whose statistics steered it

    @property
    def scores(self) -> dict:
        extra = {} if self.condition_iou is None else {"condition_iou": self.condition_iou}
        return {**dataclasses.asdict(self.conf), **self.similarity, **extra}


def pool_file(c: Candidate) -> str:
    """Where a pool pair beside the set is written."""
    return f"pool/images/{c.pool_index:05d}.png"


@dataclass
class Screen:
    """The filters over generated candidates, best first (most confident teacher): who passes, who is dropped and why."""

    flt: SetFilter
    index: TrainIndex  # the generator's corpus: nearest image and SSIM (manifest, filter, report)
    train_paths: list[Path]
    target: TargetDomain | None
    target_index: TrainIndex | None
    passing: list[Candidate] = field(default_factory=list)
    rejected: list[Candidate] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)  # the manifest's entries for the rejected, in order

    def add(self, candidates: list[Candidate]) -> None:
        """Measure each candidate's closeness to real data, then filter them, the most confident first."""
        for c in candidates:  # how close each image is to real data (manifest, filter, report)
            c.similarity = self.index.nearest(c.image)
            c.similarity["train_nearest"] = self.train_paths[c.similarity["train_nearest"]].name
            if c.source is not None:
                c.similarity["source_ssim"] = self.index.ssim(c.image, c.source % len(self.train_paths))
        for c in sorted(candidates, key=lambda c: -c.conf.confidence):
            if self.target is not None:  # the target images are read for statistics only: show they are not copied
                c.similarity["target_ssim"] = max(self.target_index.ssim(c.image, k) for k in range(len(self.target)))
            reason, h = self.flt.check(c.image, c.conf, c.similarity["train_ssim"], c.condition_iou)
            c.dhash = f"{h:016x}"
            if reason is None:
                self.passing.append(c)
            else:
                self.rejected.append(c)
                self.dropped.append({"pool_index": c.pool_index, "seed": c.seed, "reason": reason, **c.scores})

    def dropped_summary(self) -> str:
        """``near_copy 3, low_confidence 1``: each filter that dropped any, with its count."""
        return ", ".join(f"{k} {v}" for k, v in self.flt.dropped.items() if v)
