"""The backend interface: cheap to construct, loads on ``__enter__``, validates every feed."""
from __future__ import annotations

import abc
import time
from pathlib import Path

import numpy as np

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.spec import ModelSpec


class Runner(abc.ABC):
    """One model on one device.

    ``infer`` checks the feed against the spec (name-free: one input) and calls ``_infer_impl``.
    A runner given no spec reads it from the model when activated (ONNX metadata).
    Subclasses fill ``timings_ms`` with the last call's ``copy_in``, ``infer`` and ``copy_out``.
    """

    name = "base"

    def __init__(self, model_path: str | Path, spec: ModelSpec | None, threads: int = 0):
        self.model_path = Path(model_path)
        self.spec = spec
        self.threads = threads
        self.device = "cpu"
        self._active = False
        self.timings_ms: dict[str, float] = {"copy_in": 0.0, "infer": 0.0, "copy_out": 0.0}

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def activate(self) -> None:
        if not self._active:
            self._activate_impl()
            self._active = True

    def deactivate(self) -> None:
        if self._active:
            self._deactivate_impl()
            self._active = False

    def infer(self, feed: np.ndarray) -> np.ndarray:
        """(B, ...) model input -> (B, 1, H, W) model output.

        The output may be a buffer the runner reuses: it is valid until the next call (copy it
        to keep it).
        """
        if not self._active:
            raise RuntimeError(f"{self.name}: call infer() inside `with runner:` (or after activate())")
        expected_dtype = np.uint8 if self.spec.fused else np.float32
        expected = self.spec.input_shape(feed.shape[0] if feed.ndim else 0)
        if feed.dtype != expected_dtype or feed.shape != expected:
            raise InputError(f"{self.name}: input '{self.spec.input_name}' got {feed.dtype} {tuple(feed.shape)}, "
                             f"expected {np.dtype(expected_dtype)} {expected}")
        if not 1 <= feed.shape[0] <= self.spec.max_batch:
            raise InputError(f"{self.name}: batch {feed.shape[0]} outside 1..{self.spec.max_batch} (the profile's maximum)")
        return self._infer_impl(np.ascontiguousarray(feed))

    @staticmethod
    def _clock() -> float:
        return time.perf_counter() * 1000.0

    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    def _deactivate_impl(self) -> None:
        pass

    @abc.abstractmethod
    def _infer_impl(self, feed: np.ndarray) -> np.ndarray: ...
