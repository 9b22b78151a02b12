"""TensorRT engine backend: pinned host buffers, one stream, async copies, optional CUDA graphs.

Memory and streams come from cuda-python (``cuda.bindings.runtime``), not a hand-written
ctypes layer. Buffers are allocated once for the profile's maximum batch and reused; a call
copies the batch into a pinned host buffer, then host-to-device, runs, and copies back, all on
the runner's stream, and synchronises once (stage times come from CUDA events recorded on the
stream). With ``cuda_graphs=True`` each batch size's enqueue is captured once and replayed
(shapes are fixed per batch size); the graphs are destroyed on ``deactivate``.

The CUDA device is per host thread (CUDA runtime docs, ``cudaSetDevice``): every call sets the
runner's device first, because the micro-batcher runs inference in its own worker thread, not
in the thread that activated the runner.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgeseg.runtime.backends.base import Runner
from edgeseg.runtime.errors import BackendUnavailableError, InputError, IntegrityError
from edgeseg.runtime.spec import ModelSpec

log = logging.getLogger(__name__)


def import_cudart():
    """cuda-python's runtime module (new and old import paths), or a clear error."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise BackendUnavailableError("the TensorRT backend needs cuda-python: pip install 'edgeseg[gpu]'") from None
    return cudart


def check_cuda(result):
    """Unpack a cuda-python call's (error, *values), raising on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def check_engine_compatible(meta: dict, trt_version: str, compute_capability: str, gpu_name: str, engine: Path) -> None:
    """Refuse an engine built for another TensorRT version or GPU, naming the rebuild command."""
    problems = []
    if meta.get("tensorrt_version") != trt_version:
        problems.append(f"TensorRT {meta.get('tensorrt_version')} (this machine has {trt_version})")
    if meta.get("compute_capability") != compute_capability:
        problems.append(f"a GPU of compute capability {meta.get('compute_capability')} ({meta.get('gpu_name')}); "
                        f"this one is {compute_capability} ({gpu_name})")
    if problems:
        raise IntegrityError(f"{engine}: built for {' and '.join(problems)}; engines are specific to both. Rebuild it "
                             f"here: python build_engine.py (in the bundle) or edgeseg export engine --onnx "
                             f"<model.onnx> --precision {meta.get('precision', 'int8')}")


class TensorRTRunner(Runner):
    """A serialized TensorRT engine (with its ``.engine.json`` sidecar) on one GPU."""

    name = "tensorrt"

    def __init__(self, model_path: str | Path, spec: ModelSpec, device_id: int = 0, cuda_graphs: bool = False):
        super().__init__(model_path, spec)
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, object] = {}

    def _activate_impl(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailableError("TensorRT is not installed; use backend onnxruntime-cpu or install TensorRT "
                                          "(JetPack, or pip install 'edgeseg[gpu]' with NVIDIA's index)") from None
        cudart = import_cudart()
        self.cudart = cudart
        check_cuda(cudart.cudaSetDevice(self.device_id))
        sidecar = self.model_path.with_name(self.model_path.name + ".json")
        if not sidecar.is_file():
            raise InputError(f"{sidecar}: engine metadata is missing; rebuild with `edgeseg export engine`")
        meta = json.loads(sidecar.read_text())
        props = check_cuda(cudart.cudaGetDeviceProperties(self.device_id))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        check_engine_compatible(meta, trt.__version__, f"{props.major}.{props.minor}", name.strip("\x00"), self.model_path)
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.trt_logger)
        dla_core = int(meta.get("dla_core", -1))
        if dla_core >= 0:  # a DLA engine is deserialised by a runtime bound to its core (TensorRT DLA docs)
            runtime.DLA_core = dla_core
        # a static engine (DLA) runs one batch size: smaller batches are padded up to it
        profile = meta.get("profile", {})
        self.static_batch = int(profile["max"][0]) if profile and profile["min"][0] == profile["max"][0] else None
        self.engine = runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if self.engine is None:
            raise InputError(f"{self.model_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.stream = check_cuda(cudart.cudaStreamCreate())
        b = self.spec.max_batch
        in_dtype = np.uint8 if self.spec.fused else np.float32
        out_dtype = np.uint8 if self.spec.output == "mask" else np.float32
        h, w = self.spec.image_size
        self._in_shape_max = self.spec.input_shape(b)
        self._out_shape_max = (b, 1, h, w)
        self._host_in = self._pinned(self._in_shape_max, in_dtype)
        self._host_out = self._pinned(self._out_shape_max, out_dtype)
        self._dev_in = check_cuda(cudart.cudaMalloc(self._host_in.nbytes))
        self._dev_out = check_cuda(cudart.cudaMalloc(self._host_out.nbytes))
        self.context.set_tensor_address(self.spec.input_name, int(self._dev_in))
        self.context.set_tensor_address(self.spec.output_name, int(self._dev_out))
        self._events = [check_cuda(cudart.cudaEventCreate()) for _ in range(4)]

    def _pinned(self, shape, dtype) -> np.ndarray:
        """A numpy view of page-locked host memory (fast, truly asynchronous copies)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = check_cuda(self.cudart.cudaMallocHost(nbytes))
        buf = (np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(int(ptr))))
        self._pinned_ptrs = getattr(self, "_pinned_ptrs", []) + [ptr]
        return buf.view(dtype).reshape(shape)

    def _infer_impl(self, feed: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        check_cuda(cudart.cudaSetDevice(self.device_id))  # this thread's device (the batcher's worker too)
        batch = feed.shape[0]
        run_batch = self.static_batch or batch
        kind = cudart.cudaMemcpyKind
        host_in = self._host_in[:run_batch]
        host_out = self._host_out[:run_batch]
        e0, e1, e2, e3 = self._events
        host_in[:batch] = feed
        if run_batch > batch:
            host_in[batch:] = 0  # padding rows: computed and dropped
        check_cuda(cudart.cudaEventRecord(e0, self.stream))
        check_cuda(cudart.cudaMemcpyAsync(self._dev_in, host_in.ctypes.data, host_in.nbytes,
                                          kind.cudaMemcpyHostToDevice, self.stream))
        check_cuda(cudart.cudaEventRecord(e1, self.stream))
        self._enqueue(run_batch)
        check_cuda(cudart.cudaEventRecord(e2, self.stream))
        check_cuda(cudart.cudaMemcpyAsync(host_out.ctypes.data, self._dev_out, host_out.nbytes,
                                          kind.cudaMemcpyDeviceToHost, self.stream))
        check_cuda(cudart.cudaEventRecord(e3, self.stream))
        check_cuda(cudart.cudaStreamSynchronize(self.stream))  # the call's one synchronisation
        self.timings_ms = {"copy_in": float(check_cuda(cudart.cudaEventElapsedTime(e0, e1))),
                           "infer": float(check_cuda(cudart.cudaEventElapsedTime(e1, e2))),
                           "copy_out": float(check_cuda(cudart.cudaEventElapsedTime(e2, e3)))}
        return host_out[:batch]  # the pinned buffer itself: valid until the next call

    def _enqueue(self, batch: int) -> None:
        cudart = self.cudart
        if not self.context.set_input_shape(self.spec.input_name, self.spec.input_shape(batch)):
            raise InputError(f"{self.model_path}: batch {batch} is outside the engine's optimization profile")
        if not self.cuda_graphs:
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT enqueue failed")
            return
        graph_exec = self._graphs.get(batch)
        if graph_exec is None:
            self.context.execute_async_v3(self.stream)  # warm-up outside capture (allocations happen here)
            check_cuda(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
            self.context.execute_async_v3(self.stream)
            graph = check_cuda(cudart.cudaStreamEndCapture(self.stream))
            graph_exec = check_cuda(cudart.cudaGraphInstantiate(graph, 0))
            self._graphs[batch] = graph_exec
        check_cuda(cudart.cudaGraphLaunch(graph_exec, self.stream))

    def _deactivate_impl(self) -> None:
        cudart = self.cudart
        cudart.cudaSetDevice(self.device_id)
        for g in self._graphs.values():
            cudart.cudaGraphExecDestroy(g)
        self._graphs.clear()
        for e in getattr(self, "_events", []):
            cudart.cudaEventDestroy(e)
        cudart.cudaFree(self._dev_in)
        cudart.cudaFree(self._dev_out)
        for p in getattr(self, "_pinned_ptrs", []):
            cudart.cudaFreeHost(p)
        cudart.cudaStreamDestroy(self.stream)
        self.context = None
        self.engine = None
