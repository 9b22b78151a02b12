"""ONNX Runtime backends: CPU EP, CUDA EP (IOBinding into reused device buffers), TensorRT EP."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeseg.runtime.backends.base import Runner
from edgeseg.runtime.errors import BackendUnavailableError, InputError
from edgeseg.runtime.sessions import open_session, session_options
from edgeseg.runtime.spec import ModelSpec

log = logging.getLogger(__name__)

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def trt_profile(spec: ModelSpec) -> dict[str, str]:
    """The TensorRT EP's explicit optimization profile: batch 1 .. max_batch, tuned for opt_batch.

    Without it the EP builds an engine for the first batch size it sees and rebuilds whenever a
    larger one arrives. Format per ONNX Runtime's TensorRT EP docs: ``"name:1x3x128x128"``.
    """
    def shape(batch: int) -> str:
        return f"{spec.input_name}:" + "x".join(str(d) for d in spec.input_shape(batch))

    return {"trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(spec.opt_batch),
            "trt_profile_max_shapes": shape(spec.max_batch)}


class OnnxRuntimeRunner(Runner):
    """An ONNX model on one ONNX Runtime execution provider.

    On the CPU the output is bound (IOBinding) to a host buffer reused per batch size, so a
    call allocates nothing. On CUDA (and the TensorRT EP) the output lives in a device OrtValue
    allocated once per batch size and reused, and the host input is bound with
    ``bind_cpu_input``: ORT copies it in on its own stream, ordered before the run (timed with
    the run), then the output is copied back (timed apart).
    """

    def __init__(self, model_path: str | Path, spec: ModelSpec | None, provider: str = "cpu", threads: int = 0,
                 device_id: int = 0, cache_dir: str | Path | None = None, spin_after_run: bool = True):
        super().__init__(model_path, spec, threads)
        self.spin_after_run = spin_after_run
        if provider not in _PROVIDERS:
            raise InputError(f"ONNX Runtime provider must be one of {', '.join(_PROVIDERS)}, got {provider!r}")
        self.provider = provider
        self.name = f"onnxruntime-{provider}"
        self.device_id = device_id
        self.device = "cpu" if provider == "cpu" else f"cuda:{device_id}"
        self.cache_dir = Path(cache_dir) if cache_dir else self.model_path.parent / "trt_ep_cache"
        self._buffers: dict[int, tuple] = {}

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        if not self.model_path.is_file():
            raise InputError(f"{self.model_path}: model file does not exist")
        wanted = _PROVIDERS[self.provider]
        if wanted not in ort.get_available_providers():
            raise BackendUnavailableError(f"ONNX Runtime here has no {wanted}; install onnxruntime-gpu "
                                          "(pip install 'edgeseg[gpu]') on a CUDA machine, or use backend onnxruntime-cpu")
        so = session_options(self.threads, spin_after_run=self.spin_after_run)
        providers: list = [wanted]
        if self.provider == "cuda":
            providers = [(wanted, {"device_id": self.device_id}), "CPUExecutionProvider"]
        elif self.provider == "tensorrt":
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if self.spec is None:  # the profile needs the I/O contract before the TensorRT session exists
                self.spec = ModelSpec.from_session(self._session(ort, so, ["CPUExecutionProvider"]), self.model_path)
            providers = [(wanted, {"device_id": self.device_id, "trt_engine_cache_enable": True,
                                   "trt_engine_cache_path": str(self.cache_dir), "trt_fp16_enable": True,
                                   "trt_int8_enable": "int8" in self.model_path.name, **trt_profile(self.spec)}),
                         ("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
        self.session = self._session(ort, so, providers)
        # ONNX Runtime falls back to the next provider (at worst the CPU) without an error when the
        # one asked for fails to load (missing CUDA/TensorRT libraries): refuse instead of running slow.
        got = self.session.get_providers()[0]
        if got != wanted:
            self.session = None
            raise BackendUnavailableError(f"ONNX Runtime could not start {wanted} here (it fell back to {got}); "
                                          "check the CUDA/TensorRT libraries ONNX Runtime's log names, or pick "
                                          "another backend")
        if self.spec is None:
            self.spec = ModelSpec.from_session(self.session, self.model_path)
        self.binding = self.session.io_binding()

    def _session(self, ort, so, providers):
        return open_session(self.model_path, so, providers)

    def _output_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.spec.image_size
        return (batch, 1, h, w)

    def _output_dtype(self):
        return np.uint8 if self.spec.output == "mask" else np.float32

    def _infer_impl(self, feed: np.ndarray) -> np.ndarray:
        b = self.binding
        batch = feed.shape[0]
        if self.provider == "cpu":
            if batch not in self._buffers:  # the output buffer, once per batch size
                self._buffers[batch] = (np.empty(self._output_shape(batch), self._output_dtype()),)
            (out,) = self._buffers[batch]
            t0 = self._clock()
            b.bind_cpu_input(self.spec.input_name, feed)
            b.bind_output(self.spec.output_name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
            self.session.run_with_iobinding(b)
            self.timings_ms = {"copy_in": 0.0, "infer": self._clock() - t0, "copy_out": 0.0}
            return out
        import onnxruntime as ort

        if batch not in self._buffers:  # the device output, once per batch size
            y = ort.OrtValue.ortvalue_from_shape_and_type(self._output_shape(batch), self._output_dtype(), "cuda",
                                                          self.device_id)
            self._buffers[batch] = (y,)
        (y,) = self._buffers[batch]
        t0 = self._clock()
        # The host input is bound as it is: ORT copies it to the device on its own stream, ordered
        # before the run. OrtValue.update_inplace into a device buffer would copy from pageable
        # memory outside ORT's stream, so the run could read the previous batch.
        b.bind_cpu_input(self.spec.input_name, feed)
        b.bind_ortvalue_output(self.spec.output_name, y)
        self.session.run_with_iobinding(b)
        b.synchronize_outputs()
        t1 = self._clock()
        out = y.numpy()
        # the host-to-device copy is inside the run, so it is counted in "infer"
        self.timings_ms = {"copy_in": 0.0, "infer": t1 - t0, "copy_out": self._clock() - t1}
        return out

    def _deactivate_impl(self) -> None:
        self._buffers.clear()
        self.session = None
        self.binding = None
