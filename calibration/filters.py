"""Filters a synthetic image must pass: teacher confidence, near-duplicates, validation leaks.

Near-duplicates and leaks are found with a 64-bit difference hash (dHash: the sign of the
horizontal gradient of a 9x8 grayscale thumbnail), compared by Hamming distance. It is cheap,
robust to small colour and blur changes, and needs no model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from edgeseg.calibration.config import FilterConfig


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of an (H, W, 3) uint8 image."""
    small = np.asarray(Image.fromarray(image).convert("L").resize((9, 8), Image.BILINEAR), np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: np.ndarray | int) -> np.ndarray:
    """Bit distance between hash ``a`` and each of ``b``."""
    x = np.bitwise_xor(np.uint64(a), np.asarray(b, dtype=np.uint64))
    return np.unpackbits(np.atleast_1d(x).view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


@dataclass(frozen=True)
class Confidence:
    """What the teacher says about one image."""

    person_fraction: float  # share of pixels with p > 0.5
    uncertain_fraction: float  # share of pixels with p in (0.3, 0.7)
    confidence: float  # mean over pixels of max(p, 1 - p)


def teacher_confidence(probs: np.ndarray) -> list[Confidence]:
    """Per image of (N, H, W) teacher probabilities."""
    out = []
    for p in probs:
        out.append(Confidence(float((p > 0.5).mean()), float(((p > 0.3) & (p < 0.7)).mean()),
                              float(np.maximum(p, 1 - p).mean())))
    return out


class SetFilter:
    """Decides, image by image, what enters the set; counts every drop by reason.

    Args:
        cfg: thresholds.
        validation_hashes: dHashes of the validation images (the leak check).
    """

    REASONS = ("empty_mask", "uncertain_mask", "condition_mismatch", "near_duplicate", "validation_leak", "train_copy")

    def __init__(self, cfg: FilterConfig, validation_hashes: list[int]):
        self.cfg = cfg
        self.validation = np.asarray(validation_hashes, dtype=np.uint64)
        self.kept_hashes: list[int] = []
        self.dropped = {r: 0 for r in self.REASONS}

    def check(self, image: np.ndarray, conf: Confidence, train_ssim: float | None = None,
              condition_iou: float | None = None) -> tuple[str | None, int]:
        """(the reason to drop it or None, its hash); a kept image is remembered for dedup.

        ``train_ssim``: SSIM to the nearest training image (None: not measured, not checked).
        ``condition_iou``: teacher mask vs the mask it was generated for (None: unconditional).
        """
        h = dhash(image)
        reason = None
        if train_ssim is not None and train_ssim > self.cfg.max_train_ssim:
            reason = "train_copy"
        elif conf.person_fraction < self.cfg.min_person_fraction:
            reason = "empty_mask"
        elif conf.uncertain_fraction > self.cfg.max_uncertain_fraction:
            reason = "uncertain_mask"
        elif condition_iou is not None and condition_iou < self.cfg.min_condition_iou:
            reason = "condition_mismatch"
        elif self.validation.size and hamming(h, self.validation).min() <= self.cfg.leak_bits:
            reason = "validation_leak"
        elif self.kept_hashes and hamming(h, np.asarray(self.kept_hashes, np.uint64)).min() <= self.cfg.dedup_bits:
            reason = "near_duplicate"
        if reason is None:
            self.kept_hashes.append(h)
        else:
            self.dropped[reason] += 1
        return reason, h
