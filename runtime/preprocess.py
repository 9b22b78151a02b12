"""Fitting images of any size into the model's input (the inverse is ``runtime.pipeline.finish``).

One implementation serves training data loading, export evaluation and the runtime, so the
pixels a deployed model sees are the pixels it was trained and evaluated on. Resizing is
OpenCV's: area averaging when shrinking (no aliasing), bilinear when enlarging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import cv2
import numpy as np

from edgeseg.runtime.errors import InputError

ResizeMode = Literal["letterbox", "stretch"]


@dataclass(frozen=True)
class Placement:
    """Where a source image of ``src_hw`` lands inside the model input of ``dst_hw``."""

    src_hw: tuple[int, int]  # original (height, width)
    dst_hw: tuple[int, int]  # model input (height, width)
    top: int  # first row of the resized image inside the input
    left: int  # first column
    height: int  # rows the resized image occupies
    width: int  # columns


def place(src_hw: Sequence[int], dst_hw: Sequence[int], mode: ResizeMode = "letterbox") -> Placement:
    """Compute the placement: letterbox keeps the aspect ratio and centres; stretch fills."""
    sh, sw = int(src_hw[0]), int(src_hw[1])
    dh, dw = int(dst_hw[0]), int(dst_hw[1])
    if sh <= 0 or sw <= 0:
        raise InputError(f"image has zero size {(sh, sw)}")
    if mode == "stretch":
        return Placement((sh, sw), (dh, dw), 0, 0, dh, dw)
    if mode != "letterbox":
        raise InputError(f"resize mode must be 'letterbox' or 'stretch', got {mode!r}")
    scale = min(dh / sh, dw / sw)
    h = max(1, min(dh, round(sh * scale)))
    w = max(1, min(dw, round(sw * scale)))
    return Placement((sh, sw), (dh, dw), (dh - h) // 2, (dw - w) // 2, h, w)


def fit_image(image: np.ndarray, dst_hw: Sequence[int], mode: ResizeMode = "letterbox",
              pad_value: Sequence[int] = (124, 116, 104), out: np.ndarray | None = None) -> tuple[np.ndarray, Placement]:
    """Resize an HxWx3 uint8 image into ``dst_hw`` (bilinear), padding with ``pad_value``.

    Args:
        image: (H, W, 3) uint8 RGB.
        dst_hw: model input (height, width).
        out: optional (H', W', 3) uint8 array to write into (e.g. a slot of a batch buffer).

    Returns:
        The (H', W', 3) uint8 input and its placement.
    """
    p = place(image.shape[:2], dst_hw, mode)
    if out is None:
        out = np.empty((p.dst_hw[0], p.dst_hw[1], 3), np.uint8)
    if (p.height, p.width) == tuple(image.shape[:2]):
        resized = image
    else:
        resized = resize_image(image, (p.height, p.width))
    pad_into(resized, p, pad_value, out)
    return out, p


def pad_into(resized: np.ndarray, p: Placement, pad_value: Sequence[int], out: np.ndarray) -> np.ndarray:
    """Copy the image resized to (p.height, p.width) into ``out`` at its placement, padding the rest."""
    bottom, right = p.dst_hw[0] - p.top - p.height, p.dst_hw[1] - p.left - p.width
    # the padded copy written straight into ``out`` (a numpy broadcast fill costs 50x more)
    cv2.copyMakeBorder(resized, p.top, bottom, p.left, right, cv2.BORDER_CONSTANT, dst=out,
                       value=tuple(int(v) for v in pad_value))
    return out


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to ``hw``: area averaging down, bilinear up.

    Shrinking by more than 2x (a camera frame into a small model input) goes bilinear to twice
    the target, then averages 2x2 blocks (OpenCV's exact-2x area fast path): faster than one
    INTER_AREA pass on a VGA frame and within a fraction of a grey level of it (a test bounds
    the difference; benchmarks/results/runtime.json `vga_480x640` has the pre/post times). At
    most 2x it is one INTER_AREA pass.
    """
    h, w = hw
    sh, sw = image.shape[:2]
    if h >= sh and w >= sw:
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if sh > 2 * h and sw > 2 * w:
        image = cv2.resize(image, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def fit_mask(mask: np.ndarray, placement: Placement) -> np.ndarray:
    """Place an (H, W) uint8 mask like its image (nearest neighbour, zero padding)."""
    out = np.zeros(placement.dst_hw, np.uint8)
    m = mask if mask.shape == (placement.height, placement.width) else cv2.resize(
        mask, (placement.width, placement.height), interpolation=cv2.INTER_NEAREST)
    out[placement.top:placement.top + placement.height, placement.left:placement.left + placement.width] = m
    return out


def normalise_batch(batch: np.ndarray, mean: Sequence[float], std: Sequence[float],
                    out: np.ndarray | None = None) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 ``(x / 255 - mean) / std`` in one vectorised pass.

    Args:
        out: optional preallocated (B, 3, H, W) float32 buffer (reused across batches).
    """
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise InputError(f"expected a (B, H, W, 3) uint8 batch, got shape {batch.shape}")
    std_arr = np.asarray(std, np.float32)
    scale = (1.0 / (255.0 * std_arr)).reshape(1, 3, 1, 1)
    bias = (-np.asarray(mean, np.float32) / std_arr).reshape(1, 3, 1, 1)
    nchw = batch.transpose(0, 3, 1, 2)
    if out is None:
        out = np.empty(nchw.shape, np.float32)
    np.multiply(nchw, scale, out=out, dtype=np.float32, casting="unsafe")
    out += bias
    return out
