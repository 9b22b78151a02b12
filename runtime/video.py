"""One source through the Segmenter into one sink, pipelined: ``edgeseg runtime infer --images SOURCE``.

Three stages overlap: the reader thread decodes and letterboxes (``runtime.stream``), the
calling thread runs the batches, and a writer thread encodes masks and overlays (``runtime.sinks``)
and scores them against ground truth when given. Both queues are bounded, so a slow writer
holds the model back and a slow model holds the reader back (back-pressure), and memory does
not grow with the clip's length. A file's frames are never dropped or reordered; a live
source's are dropped only with ``drop_late``, and counted. Whatever ends the run, the sink is
closed, so the videos written so far are finalised and playable.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.metrics import FlickerMeter, SegmentationMeter
from edgeseg.runtime.progress import LoggedProgress
from edgeseg.runtime.sinks import ImageSink, Sink, VideoSink
from edgeseg.runtime.smoothing import DEFAULT_SMOOTHING
from edgeseg.runtime.sources import DEFAULT_FPS, Frame, Source
from edgeseg.runtime.stream import FrameStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How ``run`` streams one source."""

    smooth: float = DEFAULT_SMOOTHING  # temporal smoothing strength (0 = off; runtime.smoothing)
    drop_late: bool = False  # live sources only: drop the oldest pending frame when the model falls behind
    max_batch: int | None = None  # most frames per model call (None: the model's maximum)
    max_wait_ms: float = 5.0  # how long a batch waits for more frames after its first
    save_masks: bool = False  # video sources: also write masks/NNNNN.png (0/255, exact)
    progress_every_s: float = 5.0  # the progress log line's period


class TruthScorer:
    """Masks scored against ground-truth PNGs named like the frames (``NNNNN.png`` for a video's frames).

    Torch-free: mIoU and person IoU as ``metrics.score_masks`` counts them, and the flicker figure
    (``metrics.FlickerMeter``). A ground-truth mask is person where any channel is above 0.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: ground-truth folder does not exist; pass the folder of NNNNN.png masks")
        self.meter, self.flicker = SegmentationMeter(), FlickerMeter()
        self.missing = 0
        self._last_index: int | None = None

    def update(self, frame: Frame, mask: np.ndarray) -> None:
        from edgeseg.runtime.images import open_image

        path = self.folder / f"{frame.name}.png"
        if not path.is_file():
            self.missing += 1
            self._last_index = None
            return
        ref = np.asarray(open_image(path, noun="ground-truth mask", what="mask image", fix=""))
        ref = (ref.max(axis=2) if ref.ndim == 3 else ref) > 0
        if ref.shape != mask.shape:
            raise InputError(f"{path}: ground truth is {ref.shape[1]}x{ref.shape[0]}, the frame "
                             f"{mask.shape[1]}x{mask.shape[0]}; pass the masks of this clip")
        self.meter.update(mask, ref)
        self.flicker.update(mask, ref, follows=self._last_index is not None and frame.index == self._last_index + 1)
        self._last_index = frame.index

    def summary(self) -> dict:
        return {"truth": str(self.folder), "scored_frames": len(self.meter.per_image_iou), "missing_truth": self.missing,
                "miou": self.meter.miou, "person_iou": self.meter.person_iou, "flicker": self.flicker.flicker,
                "flicker_pairs": self.flicker.pairs}


def sink_for(source: Source, folder: Path, save_masks: bool = False) -> Sink:
    """PNGs per image for image sources; a mask and an overlay video for video files, cameras and streams."""
    if source.kind == "images":
        return ImageSink(folder)
    if source.fps is None:
        log.info("%s does not say its frame rate: the videos are written at %g fps", source.name, DEFAULT_FPS)
    return VideoSink(folder, source.fps or DEFAULT_FPS, save_masks)


def run(seg, source: Source, sink: Sink, options: RunOptions = RunOptions(), truth: TruthScorer | None = None) -> dict:
    """Stream an open ``source`` through ``seg`` into ``sink``; returns the run's summary (see ``summary_line``).

    Raises what ended the run early (e.g. :class:`~edgeseg.runtime.sources.StreamLostError`) after
    closing the sink, with the summary of what was written in the error's ``summary`` attribute.
    """
    drop = options.drop_late and source.live
    if options.drop_late and not source.live:
        log.warning("--drop-late applies to live sources; %s is a file: every frame is kept", source.name)
    stream = FrameStream(seg, source, options.max_batch, options.max_wait_ms, smooth=options.smooth, drop_late=drop)
    stats = stream.stats
    pending: queue.Queue = queue.Queue(2 * stream.max_batch)
    failure: list[BaseException] = []
    bar = LoggedProgress(total=source.total, desc=f"segmenting {source.name}", unit="frame", logger=log,
                         every_s=options.progress_every_s, status=lambda: f"{stats.dropped} dropped")

    def write() -> None:
        try:
            while (item := pending.get()) is not None:
                sink.write(*item)
                if truth is not None:
                    truth.update(*item)
                bar.update(1)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            failure.append(e)

    writer = threading.Thread(target=write, name="edgeseg-writer", daemon=True)
    writer.start()
    error: BaseException | None = None
    t0 = time.perf_counter()
    pairs = iter(stream)
    try:
        for item in pairs:
            while not failure:  # back-pressure: wait for the writer, unless it has failed
                try:
                    pending.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if failure:
                break
    except BaseException as e:  # noqa: BLE001 - finish the files, then raise
        error = e
    finally:
        pairs.close()  # stops the reader thread (early on a writer's failure)
        while writer.is_alive():
            try:
                pending.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        writer.join()
        bar.close()
        sink.close()
    error = error or (failure[0] if failure else None)
    summary = {"source": source.name, "kind": source.kind, **stats.summary(), "written": sink.written,
               "seconds": time.perf_counter() - t0, "backend": seg.backend, "device": seg.device,
               "smooth": options.smooth, "reconnects": source.reconnects, "outputs": sink.outputs()}
    summary["fps"] = summary["written"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    if source.kind == "images":
        summary["skipped"] = len(source.skipped)
    if getattr(source, "truncated", False):
        summary["truncated"] = True
    if truth is not None:
        summary.update(truth.summary())
    if error is not None:
        summary["error"] = str(error)
        error.summary = summary  # type: ignore[attr-defined]
        raise error
    return summary


def summary_line(s: dict) -> str:
    """One line: frames, seconds, frames/s, p50/p99 latency per frame, drops and the backend that ran."""
    lat = (f"latency p50 {s['latency_p50_ms']:.1f} ms, p99 {s['latency_p99_ms']:.1f} ms per frame"
           if s.get("latency_p50_ms") is not None else "no latency (no frame)")
    line = (f"{s['written']} frames in {s['seconds']:.1f} s: {s['fps']:.1f} frames/s, {lat}, "
            f"{s['dropped']} dropped; {s['backend']} on {s['device']}")
    if "miou" in s:
        line += f"; vs truth: mIoU {s['miou']:.4f}, flicker {s['flicker'] * 100:.3f}% ({s['scored_frames']} frames)"
    return line
