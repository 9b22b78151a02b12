"""Frames in, masks out in input order: a reader thread, a bounded queue, micro-batches (``Segmenter.stream``).

A reader thread pulls frames from the caller's iterable, letterboxes each into the model's
size and puts it on a bounded queue; the consuming thread takes the first waiting frame,
waits at most ``max_wait_ms`` for more (up to ``max_batch``), runs them as one batch and
yields their masks in order. Reading and letterboxing the next frames overlap the model
(OpenCV and ONNX Runtime release the GIL). A full queue blocks the reader (back-pressure:
memory stays bounded whatever the source's length); with ``drop_late``, meant for live
sources, the oldest waiting frame is dropped instead, and counted.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from edgeseg.runtime.images import to_rgb_uint8
from edgeseg.runtime.pipeline import QUANT_STEPS, Workers, fit, masks_at_source
from edgeseg.runtime.smoothing import TemporalSmoother, probabilities, thumbnail
from edgeseg.runtime.sources import Frame

if TYPE_CHECKING:
    from edgeseg.runtime.segmenter import Segmenter


class LatencyHistogram:
    """Latencies in log-spaced bins 0.9% wide from 0.01 ms to 1000 s: percentiles in constant memory."""

    LO_MS, PER_DECADE, DECADES = 0.01, 250, 8

    def __init__(self):
        self.counts = np.zeros(self.PER_DECADE * self.DECADES + 1, np.int64)
        self.n = 0

    def add(self, ms: float) -> None:
        i = int(math.log10(max(ms, self.LO_MS) / self.LO_MS) * self.PER_DECADE)
        self.counts[min(i, len(self.counts) - 1)] += 1
        self.n += 1

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0-100) in ms, to within the bin width (None before any latency)."""
        if not self.n:
            return None
        i = int(np.searchsorted(np.cumsum(self.counts), max(1, math.ceil(q / 100 * self.n))))
        return self.LO_MS * 10 ** ((i + 0.5) / self.PER_DECADE)  # the bin's geometric centre


@dataclass
class StreamStats:
    """What a stream did so far (read while it runs, e.g. by a progress line)."""

    frames: int = 0  # masks delivered
    dropped: int = 0  # frames dropped by drop_late because the model fell behind a live source
    batches: int = 0  # model calls
    seconds: float = 0.0  # from the first frame read to the latest mask
    smoothing_resets: int = 0  # restarts of the moving average (scene cuts, size changes)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # read -> mask, per frame

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {"frames": self.frames, "dropped": self.dropped, "seconds": self.seconds, "fps": self.fps,
                "mean_batch": self.frames / self.batches if self.batches else 0.0,
                "latency_p50_ms": self.latency.percentile(50), "latency_p99_ms": self.latency.percentile(99),
                "smoothing_resets": self.smoothing_resets}


@dataclass
class _End:
    error: BaseException | None = None  # what ended the reader, re-raised after the frames before it


class FrameStream:
    """``(frame, mask)`` pairs for ``frames`` in input order (see the module docstring).

    Args:
        seg: an open Segmenter.
        frames: HxWx3 uint8 RGB arrays (any size; converted like ``predict``'s) or :class:`Frame` objects.
        max_batch: most frames per model call (default: the segmenter's).
        max_wait_ms: how long a batch waits for more frames after its first (bounds added latency).
        queue_frames: frames the reader may hold ahead of the model (default: twice the batch).
        smooth: temporal smoothing strength (:class:`TemporalSmoother`; 0 = off).
        drop_late: when the queue is full, drop the oldest waiting frame instead of blocking the reader.
    """

    def __init__(self, seg: "Segmenter", frames: Iterable, max_batch: int | None = None, max_wait_ms: float = 5.0,
                 queue_frames: int | None = None, smooth: float = 0.0, drop_late: bool = False):
        from edgeseg.runtime.errors import InputError

        self.seg, self.frames = seg, frames
        self.max_batch = max_batch or seg.max_batch
        if not 1 <= self.max_batch <= seg.max_batch:
            raise InputError(f"the batch (--batch, max_batch) must be in 1..{seg.max_batch} (the model's profile), got {max_batch}")
        if max_wait_ms < 0 or (queue_frames is not None and queue_frames < 1):
            raise InputError(f"need max_wait_ms >= 0 and queue_frames >= 1, got {max_wait_ms} and {queue_frames}")
        try:
            self.smoother = TemporalSmoother(smooth) if smooth else None
        except ValueError as e:
            raise InputError(str(e)) from None
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_frames = queue_frames or 2 * self.max_batch
        self.drop_late = drop_late
        self.stats = StreamStats()
        self._thumbs: list[np.ndarray] = []

    # --- the reader thread ----------------------------------------------------------------------

    def _read(self, q: queue.Queue, stop: threading.Event) -> None:
        end = _End()
        try:
            spec = self.seg.spec
            for i, item in enumerate(self.frames):
                if stop.is_set():
                    return
                frame = item if isinstance(item, Frame) else Frame(
                    i, to_rgb_uint8(item, name=f"frame {i}"), f"{i:05d}", time.perf_counter())
                fitted = fit(frame.image, spec)  # here, so the letterbox overlaps the model's batch
                thumb = thumbnail(frame.image) if self.smoother is not None else None
                self._put(q, (frame, fitted, thumb), stop)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which raises it
            end = _End(e)
        finally:
            while not stop.is_set():  # the end marker is never dropped
                try:
                    q.put(end, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _put(self, q: queue.Queue, item, stop: threading.Event) -> None:
        if self.drop_late:
            while True:
                try:
                    q.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        q.get_nowait()  # the oldest waiting frame: it would be the latest answered
                        self.stats.dropped += 1
                    except queue.Empty:
                        pass
        while not stop.is_set():  # back-pressure: wait for room, but never past a stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # --- the consuming thread -------------------------------------------------------------------

    def _post(self, output: np.ndarray, placements, workers: Workers) -> list[np.ndarray]:
        """Masks of a batch through the moving average (frames in order: the average is sequential)."""
        spec, smoother = self.seg.spec, self.smoother
        probs = np.empty((output.shape[0], *output.shape[-2:]), np.float32)
        for i, p in enumerate(placements):
            probs[i] = smoother(probabilities(output[i, 0] if output.ndim == 4 else output[i], spec), self._thumbs[i], p)
        self.stats.smoothing_resets = smoother.resets
        cut = 0.5 if spec.output == "mask" else spec.threshold
        steps = None if self.seg.exact_masks else QUANT_STEPS["probabilities"]
        return masks_at_source(probs, placements, cut, workers=workers, quant_steps=steps)

    def _next_batch(self, q: queue.Queue) -> tuple[list, _End | None]:
        """The first waiting frame, then more for at most max_wait_s (up to max_batch); and the end marker if met."""
        first = q.get()
        if isinstance(first, _End):
            return [], first
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = q.get(timeout=remaining) if remaining > 0 else q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _End):
                return batch, item
            batch.append(item)
        return batch, None

    def __iter__(self) -> Iterator[tuple[Frame, np.ndarray]]:
        q: queue.Queue = queue.Queue(self.queue_frames)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(q, stop), name="edgeseg-reader", daemon=True)
        reader.start()
        stats, t0 = self.stats, None
        post = self._post if self.smoother is not None else None
        try:
            end = None
            while end is None:
                batch, end = self._next_batch(q)
                if not batch:
                    break
                t0 = t0 if t0 is not None else min(f.t_read for f, _, _ in batch)
                self._thumbs = [t for _, _, t in batch]
                masks = self.seg._run_batch([fitted for _, fitted, _ in batch], fitted=True, post=post)
                now = time.perf_counter()
                for frame, _, _ in batch:
                    stats.latency.add((now - frame.t_read) * 1000.0)
                stats.frames += len(batch)
                stats.batches += 1
                stats.seconds = now - t0
                for (frame, _, _), mask in zip(batch, masks):
                    yield frame, mask
            if end is not None and end.error is not None:
                raise end.error
        finally:
            stop.set()
            try:
                while True:
                    q.get_nowait()  # a reader blocked on a full queue sees the stop
            except queue.Empty:
                pass
            # a source blocked in a read returns within its own timeout (CaptureSource.timeout_s)
            reader.join(timeout=max(5.0, getattr(self.frames, "timeout_s", 0.0) + 1.0))
