"""A fake of cuda-python 12.x ``cuda.bindings.runtime`` (the CUDA runtime API), for CPU tests.

Mirrors (cuda-python 12.x docs, "cuda.bindings.runtime"): every call returns a tuple whose first
element is a ``cudaError_t`` (``int(err) == 0`` on success) followed by the call's outputs.
Memory is real host memory (so pointers can be read with ctypes), and work is queued per stream
and executed only at ``cudaStreamSynchronize`` or on a graph launch, so code that reads results
without synchronising sees stale data, as on a GPU. Rules enforced, from the CUDA Runtime API
and the CUDA C++ Programming Guide ("Stream and Event Behavior", "CUDA Graphs"):

- the current device is per host thread (``cudaSetDevice``); a kernel launch into a stream of
  another device fails (``cudaErrorInvalidResourceHandle``): see ``launch``;
- ``cudaStreamSynchronize`` on a capturing stream is illegal (``cudaErrorStreamCaptureUnsupported``);
- ``cudaEventElapsedTime`` of an event not yet reached fails (``cudaErrorNotReady``);
- device memory (``cudaMalloc``) and pinned host memory (``cudaMallocHost``) are two pools:
  ``cudaFree`` takes only the first and ``cudaFreeHost`` only the second ("must have been
  returned by a previous call to ..."); a freed, foreign or other-pool pointer is
  ``cudaErrorInvalidValue``;
- a graph made by ``cudaStreamEndCapture`` lives until ``cudaGraphDestroy``, independently of the
  executable graphs instantiated from it (CUDA Programming Guide, "CUDA Graphs": the
  ``cudaGraph_t`` may be destroyed once instantiated): ``live("graphs")`` counts leaks;
- stream capture modes (``cudaStreamBeginCapture``, ``cudaThreadExchangeStreamCaptureMode``):
  under ``cudaStreamCaptureModeGlobal`` *any* thread's potentially unsafe call (``cudaMalloc``,
  ``cudaMallocHost``, ``cudaFree``, ``cudaFreeHost``) fails with
  ``cudaErrorStreamCaptureUnsupported`` and invalidates the capture
  (``cudaStreamEndCapture`` -> ``cudaErrorStreamCaptureInvalidated``); under
  ``cudaStreamCaptureModeThreadLocal`` only the capturing thread's own unsafe calls do;
- an operation that fails when the stream runs it is a sticky launch error, reported by the
  next ``cudaStreamSynchronize`` (``cudaErrorLaunchFailure``).

Every call that returns an error is also appended to ``errors`` (function name, error), so a
test can assert that code which ignores a return value did nothing wrong.
"""
from __future__ import annotations

import ctypes
import enum
import itertools
import os
import threading
import time


class cudaError_t(enum.IntEnum):  # noqa: N801 (the real name)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorIllegalState = 401
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorLaunchFailure = 719
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureWrongThread = 908


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


OK = cudaError_t.cudaSuccess
DEVICE_COUNT = int(os.environ.get("EDGESEG_FAKE_GPUS", "2"))
DEVICE_NAME = os.environ.get("EDGESEG_FAKE_GPU_NAME", "Fake Orin")
DEVICE_CC = tuple(int(x) for x in os.environ.get("EDGESEG_FAKE_GPU_CC", "8.7").split("."))


class _Props:
    def __init__(self, device: int):
        self.name = f"{DEVICE_NAME} {device}".encode()
        self.major, self.minor = DEVICE_CC


class _Stream:
    def __init__(self, device: int):
        self.device = device
        self.queue: list = []
        self.capture: list | None = None
        self.capture_mode: int | None = None
        self.capture_thread: int | None = None
        self.capture_invalidated = False
        self.sticky: cudaError_t | None = None


class _Event:
    def __init__(self):
        self.time: float | None = None


_local = threading.local()
_ids = itertools.count(0x1000)
_device: dict[int, ctypes.Array] = {}  # cudaMalloc: pointer -> the buffer behind it
_pinned: dict[int, ctypes.Array] = {}  # cudaMallocHost: a pool of its own
_streams: dict[int, _Stream] = {}
_events: dict[int, _Event] = {}
_graphs: dict[int, list] = {}
_graph_execs: dict[int, list] = {}
calls: list[tuple] = []  # (function name, args): tests read the call sequence
errors: list[tuple] = []  # (function name, error) of every call that failed
lock = threading.Lock()


def reset() -> None:
    """Forget every allocation and recorded call (between tests)."""
    for d in (_device, _pinned, _streams, _events, _graphs, _graph_execs):
        d.clear()
    calls.clear()
    errors.clear()


def current_device() -> int:
    return getattr(_local, "device", 0)


def _record(name: str, *args) -> None:
    with lock:
        calls.append((name, args))


def live(kind: str) -> int:
    """How many objects of ``kind`` (memory, device_memory, pinned_memory, streams, events, graphs,
    graph_execs) are still alive."""
    if kind == "memory":
        return len(_device) + len(_pinned)
    return len({"device_memory": _device, "pinned_memory": _pinned, "streams": _streams, "events": _events,
                "graphs": _graphs, "graph_execs": _graph_execs}[kind])


def _result(name: str, err: cudaError_t, *values):
    """The call's return tuple; failures are also logged in ``errors``."""
    if err != OK:
        with lock:
            errors.append((name, err))
    return (err, *values)


def _unsafe(name: str) -> cudaError_t:
    """Whether an unsafe call (allocation, free) is prohibited now by an ongoing capture; if so the
    capture is invalidated (CUDA Runtime API, cudaStreamBeginCapture / cudaStreamCaptureMode)."""
    me = threading.get_ident()
    for s in _streams.values():
        if s.capture is None or s.capture_mode == cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed:
            continue
        if s.capture_mode == cudaStreamCaptureMode.cudaStreamCaptureModeGlobal or s.capture_thread == me:
            s.capture_invalidated = True
            return cudaError_t.cudaErrorStreamCaptureUnsupported
    return OK


def cudaGetDeviceCount():  # noqa: N802
    _record("cudaGetDeviceCount")
    return OK, DEVICE_COUNT


def cudaSetDevice(device: int):  # noqa: N802
    _record("cudaSetDevice", device)
    if not 0 <= device < DEVICE_COUNT:
        return (cudaError_t.cudaErrorInvalidDevice,)
    _local.device = device
    return (OK,)


def cudaGetDeviceProperties(device: int):  # noqa: N802
    _record("cudaGetDeviceProperties", device)
    if not 0 <= device < DEVICE_COUNT:
        return cudaError_t.cudaErrorInvalidDevice, None
    return OK, _Props(device)


def _alloc(pool: dict, nbytes: int) -> int:
    buf = (ctypes.c_uint8 * max(1, int(nbytes)))()
    ptr = ctypes.addressof(buf)
    pool[ptr] = buf
    return ptr


def cudaMalloc(nbytes: int):  # noqa: N802
    _record("cudaMalloc", nbytes)
    err = _unsafe("cudaMalloc")
    return _result("cudaMalloc", err, None) if err != OK else (OK, _alloc(_device, nbytes))


def cudaMallocHost(nbytes: int):  # noqa: N802
    _record("cudaMallocHost", nbytes)
    err = _unsafe("cudaMallocHost")
    return _result("cudaMallocHost", err, None) if err != OK else (OK, _alloc(_pinned, nbytes))


def _free(name: str, pool: dict, ptr) -> tuple:
    _record(name, int(ptr))
    err = _unsafe(name)
    if err == OK and pool.pop(int(ptr), None) is None:
        err = cudaError_t.cudaErrorInvalidValue  # freed twice, never allocated, or from the other pool
    return _result(name, err)


def cudaFree(ptr):  # noqa: N802
    return _free("cudaFree", _device, ptr)


def cudaFreeHost(ptr):  # noqa: N802
    return _free("cudaFreeHost", _pinned, ptr)


def cudaStreamCreate():  # noqa: N802
    _record("cudaStreamCreate")
    handle = next(_ids)
    _streams[handle] = _Stream(current_device())
    return OK, handle


def cudaStreamDestroy(stream):  # noqa: N802
    _record("cudaStreamDestroy", stream)
    ok = _streams.pop(int(stream), None) is not None
    return _result("cudaStreamDestroy", OK if ok else cudaError_t.cudaErrorInvalidResourceHandle)


def _stream(handle) -> _Stream:
    s = _streams.get(int(handle))
    if s is None:
        raise ValueError(f"fake CUDA: unknown stream {handle}")
    return s


def is_capturing(stream) -> bool:
    """Whether ``stream`` is in a stream capture (``cudaStreamIsCapturing``)."""
    s = _streams.get(int(stream))
    return s is not None and s.capture is not None


def enqueue(stream, op, kernel: bool = False) -> cudaError_t:
    """Queue ``op`` on ``stream`` (or into its capture); a kernel checks the thread's device."""
    s = _streams.get(int(stream))
    if s is None:
        return cudaError_t.cudaErrorInvalidResourceHandle
    if kernel and s.device != current_device():
        return cudaError_t.cudaErrorInvalidResourceHandle  # launch into another device's stream
    (s.capture if s.capture is not None else s.queue).append(op)
    return OK


def _checked(ptr: int, nbytes: int) -> bool:
    """``ptr .. ptr + nbytes`` lies inside one live device allocation."""
    base = max((p for p in _device if p <= ptr), default=None)
    return base is not None and ptr + nbytes <= base + len(_device[base])


def cudaMemcpyAsync(dst, src, nbytes, kind, stream):  # noqa: N802
    _record("cudaMemcpyAsync", int(dst), int(src), int(nbytes), kind, stream)
    device_side = int(dst) if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else int(src)
    if not _checked(device_side, int(nbytes)):
        return _result("cudaMemcpyAsync", cudaError_t.cudaErrorInvalidValue)
    return _result("cudaMemcpyAsync", enqueue(stream, lambda: ctypes.memmove(int(dst), int(src), int(nbytes))))


def cudaStreamSynchronize(stream):  # noqa: N802
    _record("cudaStreamSynchronize", stream)
    s = _streams.get(int(stream))
    if s is None:
        return _result("cudaStreamSynchronize", cudaError_t.cudaErrorInvalidResourceHandle)
    if s.capture is not None:
        s.capture_invalidated = True
        return _result("cudaStreamSynchronize", cudaError_t.cudaErrorStreamCaptureUnsupported)
    while s.queue:
        op = s.queue.pop(0)
        try:
            op()
        except Exception as e:  # the kernel failed: a sticky error, as after a bad launch on a GPU
            s.sticky = cudaError_t.cudaErrorLaunchFailure
            errors.append(("kernel", repr(e)))
    return _result("cudaStreamSynchronize", s.sticky or OK)


def cudaEventCreate():  # noqa: N802
    handle = next(_ids)
    _events[handle] = _Event()
    return OK, handle


def cudaEventDestroy(event):  # noqa: N802
    ok = _events.pop(int(event), None) is not None
    return _result("cudaEventDestroy", OK if ok else cudaError_t.cudaErrorInvalidResourceHandle)


def cudaEventRecord(event, stream):  # noqa: N802
    e = _events.get(int(event))
    if e is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    e.time = None

    def reach():
        e.time = time.perf_counter()

    return (enqueue(stream, reach),)


def cudaEventElapsedTime(start, end):  # noqa: N802
    a, b = _events.get(int(start)), _events.get(int(end))
    if a is None or b is None:
        return cudaError_t.cudaErrorInvalidResourceHandle, 0.0
    if a.time is None or b.time is None:
        return cudaError_t.cudaErrorNotReady, 0.0
    return OK, (b.time - a.time) * 1000.0


def cudaStreamBeginCapture(stream, mode):  # noqa: N802
    _record("cudaStreamBeginCapture", stream, mode)
    s = _stream(stream)
    if s.capture is not None:
        return _result("cudaStreamBeginCapture", cudaError_t.cudaErrorIllegalState)
    if s.queue:  # pending work is not part of the graph: flush it first, as a real stream would run it
        cudaStreamSynchronize(stream)
    s.capture, s.capture_mode, s.capture_thread = [], cudaStreamCaptureMode(mode), threading.get_ident()
    s.capture_invalidated = False
    return (OK,)


def cudaStreamEndCapture(stream):  # noqa: N802
    _record("cudaStreamEndCapture", stream)
    s = _stream(stream)
    if s.capture is None:
        return _result("cudaStreamEndCapture", cudaError_t.cudaErrorIllegalState, None)
    if s.capture_thread != threading.get_ident() and s.capture_mode != cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed:
        return _result("cudaStreamEndCapture", cudaError_t.cudaErrorStreamCaptureWrongThread, None)
    ops, invalidated = s.capture, s.capture_invalidated
    s.capture, s.capture_mode, s.capture_thread, s.capture_invalidated = None, None, None, False
    if invalidated:
        return _result("cudaStreamEndCapture", cudaError_t.cudaErrorStreamCaptureInvalidated, None)
    handle = next(_ids)
    _graphs[handle] = ops
    return OK, handle


def cudaGraphInstantiate(graph, flags):  # noqa: N802
    _record("cudaGraphInstantiate", graph, flags)
    ops = _graphs.get(int(graph))  # the graph stays alive until cudaGraphDestroy
    if ops is None:
        return _result("cudaGraphInstantiate", cudaError_t.cudaErrorInvalidValue, None)
    handle = next(_ids)
    _graph_execs[handle] = list(ops)
    return OK, handle


def cudaGraphDestroy(graph):  # noqa: N802
    _record("cudaGraphDestroy", graph)
    ok = _graphs.pop(int(graph), None) is not None
    return _result("cudaGraphDestroy", OK if ok else cudaError_t.cudaErrorInvalidValue)


def cudaGraphLaunch(graph_exec, stream):  # noqa: N802
    _record("cudaGraphLaunch", graph_exec, stream)
    ops = _graph_execs.get(int(graph_exec))
    if ops is None:
        return _result("cudaGraphLaunch", cudaError_t.cudaErrorInvalidValue)
    for op in ops:
        err = enqueue(stream, op)
        if err != OK:
            return _result("cudaGraphLaunch", err)
    return (OK,)


def cudaGraphExecDestroy(graph_exec):  # noqa: N802
    _record("cudaGraphExecDestroy", graph_exec)
    ok = _graph_execs.pop(int(graph_exec), None) is not None
    return _result("cudaGraphExecDestroy", OK if ok else cudaError_t.cudaErrorInvalidValue)
