"""``Segmenter``: person masks for lists of images of any size, from a bundle, ONNX file or engine.

    from edgeseg.runtime import Segmenter
    with Segmenter("runs/demo/bundle") as seg:          # backend="auto" picks the best available
        masks = seg.predict([image_a, image_b])         # HxWx3 uint8 in, HxW uint8 (1 = person) out
        future = seg.submit(image_c)                    # micro-batched with other callers' requests
        for mask in seg.stream(camera_frames):          # a video's frames in order, pipelined
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from edgeseg.runtime.backends.base import Runner
from edgeseg.runtime.batcher import MicroBatcher
from edgeseg.runtime.bundle import Bundle
from edgeseg.runtime.errors import BackendUnavailableError, ClosedError, InputError, IntegrityError
from edgeseg.runtime.images import to_rgb_uint8
from edgeseg.runtime.pipeline import BatchBuffers, Workers, check_images, finish, fit, prepare
from edgeseg.runtime.smoothing import DEFAULT_SMOOTHING
from edgeseg.runtime.spec import ModelSpec, engine_sidecar

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
STAGES = ("preprocess", "copy_in", "infer", "copy_out", "postprocess")


def available_backends() -> list[str]:
    """Backends this machine can run, best first (nothing is loaded to find out)."""
    import importlib.util

    import onnxruntime as ort

    providers = ort.get_available_providers()
    out = []
    # the native TensorRT backend needs TensorRT and cuda-python, not ONNX Runtime's CUDA provider
    cuda_python = importlib.util.find_spec("cuda") is not None
    if importlib.util.find_spec("tensorrt") is not None and cuda_python:
        out.append("tensorrt")
    if "TensorrtExecutionProvider" in providers:
        out.append("onnxruntime-tensorrt")
    if "CUDAExecutionProvider" in providers:
        out.append("onnxruntime-cuda")
    out.append("onnxruntime-cpu")
    return out


def _make_runner(backend: str, model: Path, spec: ModelSpec, threads: int, device_id: int,
                 cuda_graphs: bool = False, spin_after_run: bool = False) -> Runner:
    if backend == "tensorrt":
        from edgeseg.runtime.backends.tensorrt_engine import TensorRTRunner

        return TensorRTRunner(model, spec, device_id=device_id, cuda_graphs=cuda_graphs)
    from edgeseg.runtime.backends.onnxrt import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, spec, provider=backend.removeprefix("onnxruntime-"), threads=threads,
                             device_id=device_id, spin_after_run=spin_after_run)


class Segmenter:
    """Batched person segmentation.

    Args:
        path: a deploy bundle folder, an ``.onnx`` exported by edgeseg, or an ``.engine``.
        backend: ``auto`` (best available), or one of ``BACKENDS``.
        threads: ONNX Runtime CPU threads (0 = ORT's default).
        max_batch: largest batch per model call (default and cap: the model's profile maximum).
        max_wait_ms: how long ``submit`` waits to fill a batch.
        queue_size: pending ``submit`` requests before callers block (back-pressure).
        device_id: the CUDA GPU (TensorRT, ONNX Runtime CUDA/TensorRT EPs).
        cuda_graphs: replay a captured CUDA graph per batch size (native TensorRT backend only).
        exact_masks: resize each mask's float scores (the evaluations' masks, bit for bit) instead of
            uint8 scores, which is faster at camera sizes and may move a few boundary pixels
            (``pipeline.masks_at_source``; docs/results.md has the measured share).
        pre_threads: threads for a batch's per-image letterboxing and masks (0: as ``threads``,
            or every core when ``threads`` is 0).
        spin_after_run: let ONNX Runtime's CPU threads spin after each call returns (its own
            default). Off here: they would hold a core for about 50 ms after every batch, the core
            this batch's masks and the next batch's letterboxing need (docs/runtime.md).
    """

    def __init__(self, path: str | Path, backend: str = "auto", threads: int = 0, max_batch: int | None = None,
                 max_wait_ms: float = 5.0, queue_size: int = 64, device_id: int = 0, cuda_graphs: bool = False,
                 exact_masks: bool = False, pre_threads: int = 0, spin_after_run: bool = False):
        path = Path(path)
        self.cuda_graphs = cuda_graphs
        self.spin_after_run = spin_after_run
        if not path.exists():
            raise InputError(f"{path}: does not exist; pass a deploy bundle folder, an .onnx or an .engine file")
        self.bundle = Bundle(path) if path.is_dir() else None
        if self.bundle is not None:
            self.spec = self.bundle.spec
        elif path.suffix == ".onnx":
            self.spec = None  # read from the model by the runner's own session
        elif path.suffix in (".engine", ".plan"):
            import json

            sidecar = engine_sidecar(path)
            if not sidecar.is_file():
                raise InputError(f"{sidecar}: engine metadata missing; rebuild with `edgeseg export engine`")
            self.spec = ModelSpec.from_dict(json.loads(sidecar.read_text())["spec"])
        else:
            raise InputError(f"{path}: expected a bundle folder, .onnx or .engine")
        self.runner = self._open_runner(path, backend, threads, device_id)
        self.spec = self.runner.spec
        if max_batch is not None and not 1 <= max_batch <= self.spec.max_batch:
            self.runner.deactivate()
            raise InputError(f"max_batch must be in 1..{self.spec.max_batch} (the model's profile), got {max_batch}")
        self.max_batch = max_batch or self.spec.max_batch
        self.backend = self.runner.name
        self.device = self.runner.device
        self.model_path = self.runner.model_path
        self._buffers = BatchBuffers(self.spec)
        self.exact_masks = exact_masks
        self._workers = Workers(pre_threads or threads)
        self._lock = threading.Lock()
        self._batcher: MicroBatcher | None = None
        self._batcher_args = (max_wait_ms, queue_size)
        self._closed = False
        self.last_timings_ms: dict[str, float] = {s: 0.0 for s in STAGES}
        log.info("Segmenter: %s on %s (%s)", self.backend, self.device, self.model_path.name)

    def _open_runner(self, path: Path, backend: str, threads: int, device_id: int) -> Runner:
        if backend != "auto" and backend not in BACKENDS:
            raise InputError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {backend!r}")
        candidates = available_backends() if backend == "auto" else [backend]
        if path.suffix in (".engine", ".plan"):
            candidates = ["tensorrt"]
        elif path.suffix == ".onnx":
            candidates = [c for c in candidates if c != "tensorrt"]
        errors = []
        for name in candidates:
            try:
                model = self.bundle.model_for(name) if self.bundle else path
                runner = _make_runner(name, model, self.spec, threads, device_id, self.cuda_graphs, self.spin_after_run)
                runner.activate()
                return runner
            except (BackendUnavailableError, InputError, IntegrityError) as e:
                # IntegrityError: an engine built for another GPU or TensorRT; auto moves on, and says so
                if backend != "auto":
                    raise
                errors.append(f"{name}: {e}")
                log.log(logging.WARNING if isinstance(e, IntegrityError) else logging.INFO,
                        "backend %s not usable here, trying the next: %s", name, e)
        raise BackendUnavailableError("no backend can run this model here: " + " | ".join(errors))

    # --- synchronous, batched ----------------------------------------------------------------

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """HxWx3 uint8 RGB images (any sizes; grayscale, RGBA, 16-bit converted) -> HxW uint8 masks."""
        self._check_open("predict")
        images = check_images(images)
        masks: list[np.ndarray] = []
        for i in range(0, len(images), self.max_batch):
            masks.extend(self._run_batch(images[i:i + self.max_batch]))
        return masks

    def _run_batch(self, images: Sequence, fitted: bool = False, post: Callable | None = None) -> list[np.ndarray]:
        """One model call; ``fitted``: the images were already letterboxed (see ``submit``); ``post``:
        ``post(output, placements, workers) -> masks`` instead of ``finish`` (``stream``'s smoothing)."""
        with self._lock:  # one model call at a time; the buffers are shared
            t0 = time.perf_counter()
            feed, placements = prepare(images, self.spec, self._buffers, fitted=fitted, workers=self._workers)
            t1 = time.perf_counter()
            output = self.runner.infer(feed)
            t2 = time.perf_counter()
            if post is None:
                masks = finish(output, placements, self.spec, self._workers, quantised=not self.exact_masks)
            else:
                masks = post(output, placements, self._workers)
            t3 = time.perf_counter()
            r = self.runner.timings_ms
            self.last_timings_ms = {"preprocess": (t1 - t0) * 1000, "copy_in": r["copy_in"], "infer": r["infer"],
                                    "copy_out": r["copy_out"], "postprocess": (t3 - t2) * 1000,
                                    "total": (t3 - t0) * 1000}
            return masks

    # --- frames of a video or camera, in order ------------------------------------------------

    def stream(self, frames: Iterable[np.ndarray], smooth: float = DEFAULT_SMOOTHING, max_batch: int | None = None,
               max_wait_ms: float = 5.0, queue_frames: int | None = None, drop_late: bool = False) -> Iterator[np.ndarray]:
        """Masks of ``frames`` (HxWx3 uint8 RGB, any sizes) in input order, as a generator.

        A reader thread pulls and letterboxes the frames into a bounded queue while the model runs
        (back-pressure: it waits when ``queue_frames`` are pending); each batch takes what is
        waiting, up to ``max_batch``, waiting at most ``max_wait_ms`` after its first frame.
        ``smooth``: temporal smoothing strength of the probabilities (0 = off; on by default, as
        measured: see ``runtime.smoothing.DEFAULT_SMOOTHING``). ``drop_late``: for live sources, drop the oldest pending frame
        instead of waiting (no mask comes for it). See ``runtime.stream.FrameStream``.
        """
        from edgeseg.runtime.stream import FrameStream

        self._check_open("stream")
        pairs = iter(FrameStream(self, frames, max_batch, max_wait_ms, queue_frames, smooth, drop_late))

        def masks() -> Iterator[np.ndarray]:
            try:
                for _, mask in pairs:
                    yield mask
            finally:
                pairs.close()  # a caller that stops early stops the reader thread now, not at garbage collection

        return masks()

    # --- asynchronous, micro-batched ---------------------------------------------------------

    def submit(self, image: np.ndarray, timeout: float | None = None) -> Future:
        """Queue one image; the Future resolves to its mask. Blocks while the queue is full.

        The image is converted and letterboxed here, in the caller's thread, so that work
        overlaps the batch the model is running; the worker only copies and normalises.
        """
        self._check_open("submit")
        fitted = fit(to_rgb_uint8(image, name="submitted image"), self.spec)
        if self._batcher is None:
            with self._lock:
                self._check_open("submit")  # never a new batcher on a runner that close() released
                if self._batcher is None:
                    wait, size = self._batcher_args
                    self._batcher = MicroBatcher(lambda items: self._run_batch(items, fitted=True), self.max_batch,
                                                 wait, size)
        return self._batcher.submit(fitted, timeout=timeout)

    @property
    def mean_batch_size(self) -> float:
        """Mean batch size the micro-batcher has run (0 before any ``submit``)."""
        return self._batcher.mean_batch_size if self._batcher else 0.0

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClosedError(f"the segmenter is closed; {what}() needs an open one (create a new Segmenter)")

    def close(self, cancel: bool = False) -> None:
        """Finish (or with ``cancel`` fail) pending requests, then release the model. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._batcher is not None:
            self._batcher.close(cancel=cancel)
        with self._lock:  # after the last batch: no model call can be running
            try:
                self.runner.deactivate()
            finally:
                self._workers.close()

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
