"""Vectorised pre- and post-processing around the model: images of any size in, masks out.

``prepare`` letterboxes each image straight into its slot of a reusable uint8 batch buffer and
normalises that slot into the float input (unless the graph normalises: fused preprocessing).
``finish`` turns the batch output into one mask per image at that image's original size,
cropping the letterbox exactly. Both do their per-image work in :class:`Workers`: a batch's
images split across threads (OpenCV and numpy release the GIL), so a camera batch's resizing
uses the cores the model uses, one stage after the other.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Sequence

import cv2
import numpy as np

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.images import to_rgb_uint8
from edgeseg.runtime.preprocess import Placement, fit_image, normalise_batch
from edgeseg.runtime.spec import ModelSpec

# Scores go to uint8 before the mask's resize in steps of 1/QUANT_STEPS around the cut (logits:
# +-4 around logit(threshold) in steps of 1/32; probabilities: the whole range, step 1/255). Finer
# steps clip more logits and coarser ones round more: on the demo student's logits at VGA, 16, 32
# and 64 steps moved 0.024%, 0.014% and 0.009% of pixels; 32 keeps the clipping rare.
QUANT_STEPS = {"logits": 32.0, "probabilities": 255.0}


class Workers:
    """Runs a batch's per-image work in ``threads`` contiguous chunks: the first in the caller's thread.

    ``threads`` 1 runs everything in the caller's thread (no pool). Batches of one image, and
    images too small to be worth a hand-over (``min_pixels`` of source per chunk), stay there too.
    """

    def __init__(self, threads: int = 0, min_pixels: int = 64 * 64 * 8):
        self.threads = max(1, threads or usable_cores())
        self.min_pixels = min_pixels
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="edgeseg-pre") if self.threads > 1 else None

    def each(self, fn: Callable[[int], None], count: int, pixels: int = 0) -> None:
        """``fn(i)`` for every ``i`` in ``range(count)``; ``pixels``: the batch's source pixels (to decide)."""
        pool = self._pool
        n = min(self.threads, count, max(1, pixels // self.min_pixels)) if pool else 1
        if n <= 1:
            for i in range(count):
                fn(i)
            return
        bounds = [count * k // n for k in range(n + 1)]

        def chunk(k: int) -> None:
            for i in range(bounds[k], bounds[k + 1]):
                fn(i)

        futures = [pool.submit(chunk, k) for k in range(1, n)]
        try:
            chunk(0)
        finally:
            wait(futures)  # no chunk outlives the call, even when this thread's chunk failed
        for f in futures:
            f.result()  # re-raises a worker's error here

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_SERIAL = Workers(1)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container may limit), else the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def prepare(images: Sequence, spec: ModelSpec, buffers: BatchBuffers, fitted: bool = False,
            workers: Workers | None = None) -> tuple[np.ndarray, list[Placement]]:
    """(the model input for the batch, each image's placement).

    Args:
        images: HxWx3 uint8 images, letterboxed straight into the batch buffer; or, with
            ``fitted``, the (array, placement) pairs of :func:`fit`, copied into it.
        workers: splits the per-image work (letterbox, normalisation) across threads.
    """
    batch = buffers.uint8(len(images))
    feed = batch if spec.fused else buffers.float32(len(images))
    placements: list[Placement | None] = [None] * len(images)

    def one(i: int) -> None:
        if fitted:
            array, placements[i] = images[i]
            batch[i] = array
        else:
            placements[i] = fit(images[i], spec, out=batch[i])[1]
        if not spec.fused:
            normalise_batch(batch[i:i + 1], spec.mean, spec.std, out=feed[i:i + 1])

    pixels = sum(img[0].size if fitted else img.size for img in images) // 3
    (workers or _SERIAL).each(one, len(images), pixels)
    return feed, placements


def score_cut(spec: ModelSpec) -> float:
    """The output value above which a pixel is a person: logit(threshold) for logits (no sigmoid is computed)."""
    if spec.output == "logits":
        return float(np.log(spec.threshold / (1 - spec.threshold)))
    return spec.threshold if spec.output == "probabilities" else 0.5  # a 0/1 mask


def finish(output: np.ndarray, placements: Sequence[Placement], spec: ModelSpec, workers: Workers | None = None,
           quantised: bool = False) -> list[np.ndarray]:
    """(B, 1, H, W) model output -> per image (h, w) uint8 masks (1 = person) at original size.

    The letterbox is cropped exactly, the crop's scores are resized to the original size
    (bilinear; nearest for a mask output) and thresholded there. ``quantised``: the runtime's
    faster path (:func:`masks_at_source`), which may move boundary pixels only.
    """
    steps = QUANT_STEPS.get(spec.output) if quantised else None
    return masks_at_source(output, placements, score_cut(spec), nearest=spec.output == "mask",
                           workers=workers, quant_steps=steps)


def quantise_scores(scores: np.ndarray, cut: float, steps: float) -> np.ndarray:
    """``ceil((scores - cut) * steps) + 128`` clipped to 0..255, as uint8: above 128 exactly where above the cut."""
    q = np.subtract(scores, cut, dtype=np.float32)
    q *= steps
    np.ceil(q, out=q)
    q += 128
    np.clip(q, 0, 255, out=q)
    return q.astype(np.uint8)


_scratch = threading.local()


SCRATCH_MAX_PIXELS = 1080 * 1920  # larger frames get a fresh array each time: no thread keeps more than 8 MiB


def _float_scratch(hw: tuple[int, int]) -> np.ndarray | None:
    """This thread's reusable float image of ``hw`` (the resized scores before thresholding), or None
    above SCRATCH_MAX_PIXELS (OpenCV then allocates)."""
    if hw[0] * hw[1] > SCRATCH_MAX_PIXELS:
        return None
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.shape != hw:
        buf = _scratch.buf = np.empty(hw, np.float32)
    return buf


def masks_at_source(output: np.ndarray, placements: Sequence[Placement], cut: float, nearest: bool = False,
                    workers: Workers | None = None, quant_steps: float | None = None) -> list[np.ndarray]:
    """(B, [1,] H, W) scores at model size -> per image (h, w) uint8 {0, 1} masks at original size.

    Crops each image's letterbox, resizes the crop's scores to the original size (bilinear, or
    nearest for 0/1 masks) and thresholds them at ``cut``. Shared by the runtime and by the
    evaluations, so deployment and evaluation figures are scored alike.

    ``quant_steps``: resize uint8 scores instead of floats, ``ceil((s - cut) * quant_steps) + 128``
    clipped to 0..255, and keep pixels above 128. A source pixel keeps its side of the cut
    exactly (the ceil maps every score above the cut to >= 129 and every other to <= 128), and
    a bilinear value is a convex combination of four source pixels: where all four agree, so
    does the mask. Only pixels between source pixels of both sides (the boundary) can move,
    by the rounding of the scores and of OpenCV's fixed-point weights (tests bound it).
    Resizing uint8 moves a quarter of the bytes of float32 and thresholds in place.

    The masks of one call are views of one array (a caller keeping one mask keeps the block).
    """
    out = output[:, 0] if output.ndim == 4 else output
    resample = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    # One allocation for the batch's masks, each mask a view of its own part: B fresh arrays of a
    # camera frame's size cost a page fault per 4 KiB each call (1.2 ms for 8 VGA masks, against
    # 0.1 ms for one block that the allocator keeps and hands out again).
    sizes = [p.src_hw[0] * p.src_hw[1] for p in placements]
    block = np.empty(sum(sizes), np.uint8)
    starts = np.cumsum([0, *sizes]).tolist()
    masks = [block[a:b].reshape(p.src_hw) for a, b, p in zip(starts, starts[1:], placements)]

    def one(i: int) -> None:
        p, mask = placements[i], masks[i]
        crop = out[i, p.top:p.top + p.height, p.left:p.left + p.width]
        size = (p.src_hw[1], p.src_hw[0])
        if crop.shape == p.src_hw:
            np.greater(crop, cut, out=mask.view(bool))  # bool written as 0/1 uint8
        elif quant_steps and not nearest:
            cv2.resize(quantise_scores(crop, cut, quant_steps), size, dst=mask, interpolation=cv2.INTER_LINEAR)
            cv2.threshold(mask, 128, 1, cv2.THRESH_BINARY, dst=mask)
        else:
            dst = _float_scratch(p.src_hw) if crop.dtype == np.float32 else None
            scores = cv2.resize(np.ascontiguousarray(crop), size, dst=dst, interpolation=resample)
            np.greater(scores, cut, out=mask.view(bool))

    (workers or _SERIAL).each(one, len(placements), sum(sizes))
    return masks
