"""Binary segmentation metrics accumulated over a data set: mIoU, person IoU, boundary IoU, agreement, flicker."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` (..., H, W) bool within ``width`` pixels of its contour (inner band).

    As defined by Cheng et al. 2021 (Boundary IoU) and their reference ``mask_to_boundary``: the
    mask is padded with background, so the image border counts as contour and a mask cut by the
    border has a band there too. Erosion by a (2*width+1)^2 square, as ``width`` 3x3 min-filters.
    One deviation: the band width is a fixed ``width`` in pixels (the reference derives it from
    2% of the image diagonal); the reports state the width they used.
    """
    eroded = mask.copy()
    for _ in range(width):
        p = np.pad(eroded, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)], mode="constant", constant_values=False)
        e = p[..., 1:-1, 1:-1].copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                e &= p[..., dy:dy + mask.shape[-2], dx:dx + mask.shape[-1]]
        eroded = e
    return mask & ~eroded


@dataclass
class SegmentationMeter:
    """Accumulates confusion counts of predicted vs reference binary masks.

    ``update(pred, ref)`` takes bool or {0, 1} arrays of the same shape (one mask or a batch).
    mIoU is the mean of the person and background IoUs over all pixels seen (data-set level,
    not a mean of per-image scores). Boundary IoU (Cheng et al., 2021) compares the bands of
    ``boundary_px`` pixels inside each mask's edge.
    """

    boundary_px: int = 0  # 0 = do not compute boundary IoU
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    b_inter: int = 0
    b_union: int = 0
    per_image_iou: list[float] = field(default_factory=list)

    def update(self, pred: np.ndarray, ref: np.ndarray) -> None:
        pred = np.asarray(pred).astype(bool)
        ref = np.asarray(ref).astype(bool)
        if pred.shape != ref.shape:
            raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
        self.tp += int(np.count_nonzero(pred & ref))
        self.fp += int(np.count_nonzero(pred & ~ref))
        self.fn += int(np.count_nonzero(~pred & ref))
        self.tn += int(np.count_nonzero(~pred & ~ref))
        images = pred.reshape(-1, *pred.shape[-2:]), ref.reshape(-1, *ref.shape[-2:])
        for p, r in zip(*images):
            union = np.count_nonzero(p | r)
            self.per_image_iou.append(1.0 if union == 0 else np.count_nonzero(p & r) / union)
        if self.boundary_px:
            bp, br = boundary(images[0], self.boundary_px), boundary(images[1], self.boundary_px)
            self.b_inter += int(np.count_nonzero(bp & br))
            self.b_union += int(np.count_nonzero(bp | br))

    @property
    def person_iou(self) -> float:
        denom = self.tp + self.fp + self.fn
        return self.tp / denom if denom else 1.0

    @property
    def background_iou(self) -> float:
        denom = self.tn + self.fp + self.fn
        return self.tn / denom if denom else 1.0

    @property
    def miou(self) -> float:
        return 0.5 * (self.person_iou + self.background_iou)

    @property
    def agreement(self) -> float:
        """Share of pixels where prediction and reference agree (pixel accuracy)."""
        total = self.tp + self.fp + self.fn + self.tn
        return (self.tp + self.tn) / total if total else 1.0

    @property
    def boundary_iou(self) -> float:
        return self.b_inter / self.b_union if self.b_union else 1.0

    def summary(self) -> dict[str, float]:
        out = {"miou": self.miou, "person_iou": self.person_iou, "agreement": self.agreement}
        if self.boundary_px:
            out["boundary_iou"] = self.boundary_iou
        return out


def score_masks(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], reference: Sequence[np.ndarray] | None = None,
                boundary_px: int = 0) -> dict:
    """The one scoring path of every report: per-image masks at each image's original size.

    Distillation's validation and evaluation and the export stage's accuracy report all score
    here, on masks whose letterbox was already cropped (``runtime.pipeline.finish``), so padding
    never counts as correctly predicted background.

    Args:
        preds, gts: (h, w) {0, 1} masks, image by image (sizes may differ between images).
        reference: optional masks to measure ``agreement`` against (e.g. the teacher's, FP32's).
        boundary_px: band width of boundary IoU in pixels; 0 leaves it out.

    Returns:
        ``miou``, ``person_iou`` (data-set level), ``boundary_iou`` (if asked), ``agreement``
        (share of pixels equal to ``reference``, if given) and ``per_image_iou`` (person IoU).
    """
    if len(preds) != len(gts) or (reference is not None and len(reference) != len(preds)):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth masks"
                         + (f" and {len(reference)} reference masks" if reference is not None else ""))
    meter = SegmentationMeter(boundary_px=boundary_px)
    agree = SegmentationMeter() if reference is not None else None
    for i, (p, g) in enumerate(zip(preds, gts)):
        meter.update(p, g)
        if agree is not None:
            agree.update(p, reference[i])
    out: dict = meter.summary()
    del out["agreement"]  # pixel accuracy vs ground truth is not what "agreement" means in the reports
    if agree is not None:
        out["agreement"] = agree.agreement
    out["per_image_iou"] = list(meter.per_image_iou)
    return out


@dataclass
class FlickerMeter:
    """Temporal flicker of a mask sequence against its ground truth, accumulated frame by frame.

    ``flicker``: over consecutive frame pairs, the share of pixels whose predicted label changes
    among the pixels whose ground-truth label does not (a moving person's true edge may change;
    a still pixel's prediction should not). ``update(pred, ref, follows=False)`` starts a new
    pair chain, e.g. after a dropped frame or a change of frame size.
    """

    changed: int = 0  # stable ground-truth pixels whose prediction changed
    stable: int = 0  # pixels whose ground truth did not change, over all pairs
    pairs: int = 0  # consecutive frame pairs compared
    _prev: tuple | None = field(default=None, repr=False)

    def update(self, pred: np.ndarray, ref: np.ndarray, follows: bool = True) -> None:
        pred, ref = np.asarray(pred).astype(bool), np.asarray(ref).astype(bool)
        if pred.shape != ref.shape:
            raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
        if follows and self._prev is not None and self._prev[0].shape == pred.shape:
            still = self._prev[1] == ref
            self.stable += int(np.count_nonzero(still))
            self.changed += int(np.count_nonzero(still & (self._prev[0] != pred)))
            self.pairs += 1
        self._prev = (pred, ref)

    @property
    def flicker(self) -> float:
        return self.changed / self.stable if self.stable else 0.0
