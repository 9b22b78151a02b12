"""A micro-batching queue: concurrent callers' images grouped into batches for one model.

``submit`` puts (image, Future) on a bounded queue (a full queue blocks the caller: back
pressure) and returns the Future. One worker thread takes the first waiting request, waits at
most ``max_wait_ms`` for more (up to ``max_batch``), runs them as one batch and resolves each
Future with its own result, or with the batch's exception. ``close`` finishes every request
already queued (or, with ``cancel=True``, fails them) and stops the worker.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

log = logging.getLogger(__name__)

_STOP = object()


class MicroBatcher:
    """Groups single requests into batches for ``run_batch`` (list of inputs -> list of outputs)."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int, max_wait_ms: float = 5.0,
                 queue_size: int = 64):
        if max_batch < 1 or max_wait_ms < 0 or queue_size < 1:
            raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0, queue_size >= 1; got {max_batch}, {max_wait_ms}, {queue_size}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._close_lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self._worker = threading.Thread(target=self._loop, name="edgeseg-batcher", daemon=True)
        self._worker.start()

    @property
    def mean_batch_size(self) -> float:
        return self.requests / self.batches if self.batches else 0.0

    def submit(self, item: object, timeout: float | None = None) -> Future:
        """Queue one request; blocks while the queue is full (raises queue.Full after ``timeout``)."""
        fut: Future = Future()
        with self._close_lock:  # so no request can slip in behind the stop marker
            if self._closed:
                raise RuntimeError("the segmenter is closed; submit() needs an open one")
            self._queue.put((item, fut), timeout=timeout)
        return fut

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list) -> None:
        futures = [f for _, f in batch]
        live = [i for i, f in enumerate(futures) if f.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self.run_batch([batch[i][0] for i in live])
        except Exception as e:  # every waiting caller gets the batch's error
            for i in live:
                futures[i].set_exception(e)
            return
        self.batches += 1
        self.requests += len(live)
        for i, r in zip(live, results):
            futures[i].set_result(r)

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests; finish (or with ``cancel`` fail) the queued ones; join the worker."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if cancel:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item[1].set_exception(RuntimeError("the segmenter was closed before this request ran"))
        self._queue.put(_STOP)
        self._worker.join(timeout)
