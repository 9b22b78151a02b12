"""TensorRT engine backend: pinned host buffers, one stream, async copies, optional CUDA graphs.

Memory and streams come from cuda-python (``cuda.bindings.runtime``), not a hand-written
ctypes layer. Buffers are allocated once for the profile's maximum batch and reused; a call
copies the batch into a pinned host buffer, then host-to-device, runs, and copies back, all on
the runner's stream, and synchronises once (stage times come from CUDA events recorded on the
stream).

Lifetimes follow TensorRT's rule: the ``IRuntime`` outlives the engine it deserialised, which
outlives its execution contexts (NVIDIA/TensorRT#4436, #3739: destroying the runtime first is
undefined behaviour), so the runner keeps all three and releases them in reverse order.
Everything ``activate`` creates is released by ``deactivate`` (or by a failed ``activate``),
and the runner is then in the state it had before: it can be activated again.

CUDA graphs (``cuda_graphs=True``): a graph fixes the execution context's state at capture
(input shapes, tensor addresses), so each batch size gets its own execution context, set up
once, and its own graph. Before capturing, the context runs once uncaptured (TensorRT's
deferred work after a shape change cannot be captured: Developer Guide, "CUDA Graphs"). The
capture is thread-local (``cudaStreamCaptureModeThreadLocal``), so CUDA calls other threads make
meanwhile (another model, the ONNX Runtime session next door) neither fail nor invalidate it.
The ``cudaGraph_t`` is destroyed once instantiated; the executable graphs on ``deactivate``.
Each context has its own activation memory: with graphs the memory grows with the number of
batch sizes served.

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
from edgeseg.runtime.spec import ModelSpec, engine_sidecar

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


def _dtype_names(spec: ModelSpec) -> dict[str, str]:
    """The TensorRT data type (name) each I/O tensor of ``spec`` must have in the engine."""
    return {spec.input_name: "UINT8" if spec.fused else "FLOAT",
            spec.output_name: "UINT8" if spec.output == "mask" else "FLOAT"}


def check_engine_io(engine, trt, spec: ModelSpec, path: Path) -> None:
    """Refuse an engine whose I/O tensors (names, direction, dtypes) are not the bundle's spec."""
    want = _dtype_names(spec)
    modes = {spec.input_name: trt.TensorIOMode.INPUT, spec.output_name: trt.TensorIOMode.OUTPUT}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    problems = []
    if sorted(names) != sorted(want):
        problems.append(f"I/O tensors {sorted(names)}, expected {sorted(want)}")
    for name in set(names) & set(want):
        mode, dtype = engine.get_tensor_mode(name), engine.get_tensor_dtype(name)
        if mode != modes[name]:
            problems.append(f"'{name}' is an {getattr(mode, 'name', mode)}, expected {modes[name].name}")
        if getattr(dtype, "name", str(dtype)) != want[name]:
            problems.append(f"'{name}' is {getattr(dtype, 'name', dtype)}, expected {want[name]}")
    if problems:
        raise IntegrityError(f"{path}: the engine does not match the model spec it was shipped with "
                             f"({'; '.join(problems)}); rebuild it from the bundle: python build_engine.py")


class TensorRTRunner(Runner):
    """A serialized TensorRT engine (with its ``.engine.json`` sidecar) on one GPU."""

    name = "tensorrt"

    def __init__(self, model_path: str | Path, spec: ModelSpec, device_id: int = 0, cuda_graphs: bool = False):
        super().__init__(model_path, spec)
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        self.cuda_graphs = cuda_graphs
        self._clear()

    def _clear(self) -> None:
        """The inactive state: nothing allocated (set before activate and after deactivate)."""
        self.cudart = None
        self.trt_logger = None
        self.runtime = None  # kept: it must outlive the engine (NVIDIA/TensorRT#4436)
        self.engine = None
        self.context = None  # the uncaptured path's context
        self._contexts: dict[int, object] = {}  # batch size -> context of its CUDA graph
        self._graphs: dict[int, object] = {}  # batch size -> cudaGraphExec_t
        self.stream = None
        self._dev_in = self._dev_out = None
        self._pinned_ptrs: list = []
        self._host_in = self._host_out = None
        self._events: list = []
        self.static_batch: int | None = None

    def _activate_impl(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailableError("TensorRT is not installed; use backend onnxruntime-cpu or install TensorRT "
                                          "(JetPack, or pip install 'edgeseg[gpu]' with NVIDIA's index)") from None
        cudart = import_cudart()
        sidecar = engine_sidecar(self.model_path)
        if not sidecar.is_file():
            raise InputError(f"{sidecar}: engine metadata is missing; rebuild with `edgeseg export engine`")
        meta = json.loads(sidecar.read_text())
        self.cudart = cudart
        try:
            self._load(trt, cudart, meta)
        except BaseException:
            self._release(raise_errors=False)  # a failed activate leaves nothing behind
            raise

    def _load(self, trt, cudart, meta: dict) -> None:
        check_cuda(cudart.cudaSetDevice(self.device_id))
        props = check_cuda(cudart.cudaGetDeviceProperties(self.device_id))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        check_engine_compatible(meta, trt.__version__, f"{props.major}.{props.minor}", name.strip("\x00"), self.model_path)
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.trt_logger)
        dla_core = int(meta.get("dla_core", -1))
        if dla_core >= 0:  # a DLA engine is deserialised by a runtime bound to its core (TensorRT DLA docs)
            self.runtime.DLA_core = dla_core
        # a static engine (DLA) runs one batch size: smaller batches are padded up to it
        profile = meta.get("profile", {})
        self.static_batch = int(profile["max"][0]) if profile and profile["min"][0] == profile["max"][0] else None
        self.engine = self.runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if self.engine is None:
            raise InputError(f"{self.model_path}: TensorRT could not deserialize the engine")
        check_engine_io(self.engine, trt, self.spec, self.model_path)
        self.stream = check_cuda(cudart.cudaStreamCreate())
        b = self.spec.max_batch
        in_dtype = np.uint8 if self.spec.fused else np.float32
        out_dtype = np.uint8 if self.spec.output == "mask" else np.float32
        h, w = self.spec.image_size
        self._host_in = self._pinned(self.spec.input_shape(b), in_dtype)
        self._host_out = self._pinned((b, 1, h, w), out_dtype)
        self._dev_in = check_cuda(cudart.cudaMalloc(self._host_in.nbytes))
        self._dev_out = check_cuda(cudart.cudaMalloc(self._host_out.nbytes))
        self._events = [check_cuda(cudart.cudaEventCreate()) for _ in range(4)]
        if not self.cuda_graphs:
            self.context = self._new_context()

    def _new_context(self, batch: int | None = None):
        """An execution context bound to the runner's buffers (and to ``batch``'s shape, if given)."""
        context = self.engine.create_execution_context()
        if context is None:
            raise RuntimeError(f"{self.model_path}: TensorRT could not create an execution context (see its log)")
        for tensor, ptr in ((self.spec.input_name, self._dev_in), (self.spec.output_name, self._dev_out)):
            if not context.set_tensor_address(tensor, int(ptr)):
                raise RuntimeError(f"{self.model_path}: TensorRT refused the device address of '{tensor}'")
        if batch is not None:
            self._set_batch(context, batch)
        return context

    def _set_batch(self, context, batch: int) -> None:
        if not context.set_input_shape(self.spec.input_name, self.spec.input_shape(batch)):
            raise InputError(f"{self.model_path}: batch {batch} is outside the engine's optimization profile")

    def _pinned(self, shape, dtype) -> np.ndarray:
        """A numpy view of page-locked host memory (fast, truly asynchronous copies)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = check_cuda(self.cudart.cudaMallocHost(nbytes))
        self._pinned_ptrs.append(ptr)  # recorded at once: freed even if a later step fails
        buf = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(int(ptr)))
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
        if not self.cuda_graphs:
            self._set_batch(self.context, batch)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError(f"{self.model_path}: TensorRT enqueue failed (batch {batch}; see its log)")
            return
        graph_exec = self._graphs.get(batch)
        if graph_exec is None:
            graph_exec = self._capture(batch)
        check_cuda(self.cudart.cudaGraphLaunch(graph_exec, self.stream))

    def _capture(self, batch: int):
        """Capture ``batch``'s enqueue into a CUDA graph on a context of its own; returns the executable graph."""
        cudart = self.cudart
        context = self._contexts.get(batch)
        if context is None:
            context = self._contexts[batch] = self._new_context(batch)
        # uncaptured first: TensorRT's deferred work after a shape change cannot be captured
        if not context.execute_async_v3(self.stream):
            raise RuntimeError(f"{self.model_path}: TensorRT enqueue failed before capturing batch {batch}'s CUDA graph")
        check_cuda(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            captured = context.execute_async_v3(self.stream)
        finally:  # always end the capture, or the stream stays unusable
            graph = check_cuda(cudart.cudaStreamEndCapture(self.stream))
        try:
            if not captured:
                raise RuntimeError(f"{self.model_path}: TensorRT enqueue failed while capturing batch {batch}'s CUDA graph")
            graph_exec = check_cuda(cudart.cudaGraphInstantiate(graph, 0))
        finally:
            check_cuda(cudart.cudaGraphDestroy(graph))  # the executable graph does not need it
        self._graphs[batch] = graph_exec
        return graph_exec

    def _deactivate_impl(self) -> None:
        self._release(raise_errors=True)

    def _release(self, raise_errors: bool) -> None:
        """Free everything, in reverse order of creation (graphs, contexts, engine, runtime, CUDA objects).

        Every step runs even if one fails; the failures are raised together at the end.
        """
        cudart, failures = self.cudart, []

        def call(what: str, result) -> None:
            err = result[0] if isinstance(result, tuple) else result
            if int(err) != 0:
                failures.append(f"{what}: CUDA error {err}")

        if cudart is not None:
            call("cudaSetDevice", cudart.cudaSetDevice(self.device_id))
            if self.stream is not None:  # nothing may still run on what is freed below
                call("cudaStreamSynchronize", cudart.cudaStreamSynchronize(self.stream))
            for g in self._graphs.values():
                call("cudaGraphExecDestroy", cudart.cudaGraphExecDestroy(g))
        self._graphs.clear()
        # TensorRT objects: contexts, then the engine, then the runtime (NVIDIA/TensorRT#4436, #3739)
        self.context = None
        self._contexts.clear()
        self.engine = None
        self.runtime = None
        if cudart is not None:
            for e in self._events:
                call("cudaEventDestroy", cudart.cudaEventDestroy(e))
            for ptr in (self._dev_in, self._dev_out):
                if ptr is not None:
                    call("cudaFree", cudart.cudaFree(ptr))
            for ptr in self._pinned_ptrs:
                call("cudaFreeHost", cudart.cudaFreeHost(ptr))
            if self.stream is not None:
                call("cudaStreamDestroy", cudart.cudaStreamDestroy(self.stream))
        self._clear()
        if failures and raise_errors:
            raise RuntimeError(f"{self.model_path}: releasing the TensorRT runner failed: {'; '.join(failures)}")
