"""A micro-batching queue: concurrent callers' images grouped into batches for one model.

``submit`` appends (image, Future) to a bounded queue and returns the Future; a full queue
blocks the caller (back pressure) until there is room, its ``timeout`` runs out
(``queue.Full``) or the queue closes (:class:`ClosedError`). One worker thread takes the first
waiting request, waits at most ``max_wait_ms`` for more (up to ``max_batch``), runs them as one
batch and resolves each Future with its own result, or with the batch's exception. ``close``
finishes every request already queued (or, with ``cancel=True``, fails them) and stops the worker.

All state sits behind one condition variable, and every wait on it releases the lock: a caller
blocked on a full queue never holds up other callers' timeouts or ``close()``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

from edgeseg.runtime.errors import ClosedError

log = logging.getLogger(__name__)


class MicroBatcher:
    """Groups single requests into batches for ``run_batch`` (list of inputs -> list of outputs)."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int, max_wait_ms: float = 5.0,
                 queue_size: int = 64):
        if max_batch < 1 or max_wait_ms < 0 or queue_size < 1:
            raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0, queue_size >= 1; got {max_batch}, {max_wait_ms}, {queue_size}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._pending: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        self.requests = 0
        self._worker = threading.Thread(target=self._loop, name="edgeseg-batcher", daemon=True)
        self._worker.start()

    @property
    def mean_batch_size(self) -> float:
        return self.requests / self.batches if self.batches else 0.0

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, item: object, timeout: float | None = None) -> Future:
        """Queue one request; blocks while the queue is full.

        Raises:
            queue.Full: the queue stayed full for ``timeout`` seconds.
            ClosedError: the queue is closed (before or while waiting for room).
        """
        fut: Future = Future()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise ClosedError("the segmenter is closed; submit() needs an open one (create a new Segmenter)")
                if len(self._pending) < self.queue_size:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Full(f"the request queue stayed full ({self.queue_size}) for {timeout} s")
                self._cond.wait(remaining)  # releases the lock: others submit, time out or close meanwhile
            self._pending.append((item, fut))
            self._cond.notify_all()
        return fut

    def _next_batch(self) -> list | None:
        """Wait for the first request, then up to ``max_wait_s`` for more; None once closed and drained."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            batch = [self._pending.popleft()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                if self._pending:
                    batch.append(self._pending.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._cond.notify_all()  # room for callers blocked on a full queue
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _run(self, batch: list) -> None:
        futures = [f for _, f in batch]
        live = [i for i, f in enumerate(futures) if f.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = list(self.run_batch([batch[i][0] for i in live]))
            if len(results) != len(live):  # never leave a caller waiting on a result that will not come
                raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(live)} "
                                   "requests; this is a bug in the backend")
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
        with self._cond:
            already = self._closed
            self._closed = True
            if cancel:
                while self._pending:
                    self._pending.popleft()[1].set_exception(
                        ClosedError("the segmenter was closed before this request ran"))
            self._cond.notify_all()  # wakes the worker and every caller blocked on a full queue
        if not already or cancel:
            self._worker.join(timeout)
