"""Vectorised pre- and post-processing around the model: images of any size in, masks out.

``prepare`` letterboxes each image straight into its slot of a reusable uint8 batch buffer
(the only per-image work: a resize), then normalises the whole batch in one array operation,
unless the graph does it (fused preprocessing). ``finish`` turns the batch output into one
mask per image at that image's original size, cropping the letterbox exactly.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.images import to_rgb_uint8
from edgeseg.runtime.preprocess import Placement, fit_image, normalise_batch
from edgeseg.runtime.spec import ModelSpec


class BatchBuffers:
    """Host buffers reused across calls: the uint8 NHWC batch and the float NCHW input."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._u8: np.ndarray | None = None
        self._f32: np.ndarray | None = None

    def uint8(self, batch: int) -> np.ndarray:
        h, w = self.spec.image_size
        if self._u8 is None or self._u8.shape[0] < batch:
            self._u8 = np.empty((max(batch, self.spec.max_batch), h, w, 3), np.uint8)
        return self._u8[:batch]

    def float32(self, batch: int) -> np.ndarray:
        h, w = self.spec.image_size
        if self._f32 is None or self._f32.shape[0] < batch:
            self._f32 = np.empty((max(batch, self.spec.max_batch), 3, h, w), np.float32)
        return self._f32[:batch]


def check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Validate and convert a list of images to HxWx3 uint8 (grayscale, RGBA, 16-bit converted)."""
    if isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object:
        raise InputError("predict() takes a list of images; wrap a single image as [image]")
    if len(images) == 0:
        raise InputError("predict() got an empty list of images")
    return [to_rgb_uint8(img, name=f"image {i}") for i, img in enumerate(images)]


def fit(image: np.ndarray, spec: ModelSpec, out: np.ndarray | None = None) -> tuple[np.ndarray, Placement]:
    """One HxWx3 uint8 image letterboxed into ``out`` (or its own model-sized array), and its placement.

    The queue calls this in each caller's thread (OpenCV releases the GIL), so resizing the
    next requests overlaps the model running the current batch.
    """
    return fit_image(image, spec.image_size, spec.resize, spec.pad_value, out=out)


def prepare(images: Sequence, spec: ModelSpec, buffers: BatchBuffers,
            fitted: bool = False) -> tuple[np.ndarray, list[Placement]]:
    """(the model input for the batch, each image's placement).

    Args:
        images: HxWx3 uint8 images, letterboxed straight into the batch buffer; or, with
            ``fitted``, the (array, placement) pairs of :func:`fit`, copied into it.
    """
    batch = buffers.uint8(len(images))
    if fitted:
        placements = []
        for slot, (array, placement) in zip(batch, images):
            slot[...] = array
            placements.append(placement)
    else:
        placements = [fit(img, spec, out=slot)[1] for slot, img in zip(batch, images)]
    if spec.fused:
        return batch, placements
    return normalise_batch(batch, spec.mean, spec.std, out=buffers.float32(len(images))), placements


def finish(output: np.ndarray, placements: Sequence[Placement], spec: ModelSpec) -> list[np.ndarray]:
    """(B, 1, H, W) model output -> per image (h, w) uint8 masks (1 = person) at original size.

    The letterbox is cropped exactly, the crop's scores are resized to the original size
    (bilinear; nearest for a mask output) and thresholded there: at logit(threshold) for
    logits, so no sigmoid is ever computed.
    """
    if spec.output == "logits":
        cut = float(np.log(spec.threshold / (1 - spec.threshold)))
    elif spec.output == "probabilities":
        cut = spec.threshold
    else:
        cut = 0.5  # a 0/1 mask
    return masks_at_source(output, placements, cut, nearest=spec.output == "mask")


def masks_at_source(output: np.ndarray, placements: Sequence[Placement], cut: float,
                    nearest: bool = False) -> list[np.ndarray]:
    """(B, [1,] H, W) scores at model size -> per image (h, w) uint8 {0, 1} masks at original size.

    Crops each image's letterbox, resizes the crop's scores to the original size (bilinear, or
    nearest for 0/1 masks) and thresholds them at ``cut``. Shared by the runtime and by
    distillation's evaluation, so training-time and deployment figures are scored alike.
    """
    out = output[:, 0] if output.ndim == 4 else output
    resample = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    masks = []
    for scores, p in zip(out, placements):
        crop = scores[p.top:p.top + p.height, p.left:p.left + p.width]
        if crop.shape != p.src_hw:
            crop = cv2.resize(np.ascontiguousarray(crop), (p.src_hw[1], p.src_hw[0]), interpolation=resample)
        masks.append(np.greater(crop, cut).view(np.uint8))  # bool -> 0/1 uint8 without a copy
    return masks
