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
- freed or foreign pointers are rejected (``cudaErrorInvalidValue``).
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
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorStreamCaptureUnsupported = 900


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


class _Event:
    def __init__(self):
        self.time: float | None = None


_local = threading.local()
_ids = itertools.count(0x1000)
_memory: dict[int, ctypes.Array] = {}  # pointer -> the buffer behind it (device and pinned alike)
_streams: dict[int, _Stream] = {}
_events: dict[int, _Event] = {}
_graphs: dict[int, list] = {}
_graph_execs: dict[int, list] = {}
calls: list[tuple] = []  # (function name, args): tests read the call sequence
lock = threading.Lock()


def reset() -> None:
    """Forget every allocation and recorded call (between tests)."""
    for d in (_memory, _streams, _events, _graphs, _graph_execs):
        d.clear()
    calls.clear()


def current_device() -> int:
    return getattr(_local, "device", 0)


def _record(name: str, *args) -> None:
    with lock:
        calls.append((name, args))


def live(kind: str) -> int:
    """How many objects of ``kind`` (memory, streams, events, graph_execs) are still alive."""
    return len({"memory": _memory, "streams": _streams, "events": _events, "graph_execs": _graph_execs}[kind])


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


def _alloc(nbytes: int) -> int:
    buf = (ctypes.c_uint8 * max(1, int(nbytes)))()
    ptr = ctypes.addressof(buf)
    _memory[ptr] = buf
    return ptr


def cudaMalloc(nbytes: int):  # noqa: N802
    _record("cudaMalloc", nbytes)
    return OK, _alloc(nbytes)


def cudaMallocHost(nbytes: int):  # noqa: N802
    _record("cudaMallocHost", nbytes)
    return OK, _alloc(nbytes)


def cudaFree(ptr):  # noqa: N802
    _record("cudaFree", int(ptr))
    return (OK,) if _memory.pop(int(ptr), None) is not None else (cudaError_t.cudaErrorInvalidValue,)


def cudaFreeHost(ptr):  # noqa: N802
    return cudaFree(ptr)


def cudaStreamCreate():  # noqa: N802
    _record("cudaStreamCreate")
    handle = next(_ids)
    _streams[handle] = _Stream(current_device())
    return OK, handle


def cudaStreamDestroy(stream):  # noqa: N802
    _record("cudaStreamDestroy", stream)
    return (OK,) if _streams.pop(int(stream), None) is not None else (cudaError_t.cudaErrorInvalidResourceHandle,)


def _stream(handle) -> _Stream:
    s = _streams.get(int(handle))
    if s is None:
        raise ValueError(f"fake CUDA: unknown stream {handle}")
    return s


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
    base = max((p for p in _memory if p <= ptr), default=None)
    return base is not None and ptr + nbytes <= base + len(_memory[base])


def cudaMemcpyAsync(dst, src, nbytes, kind, stream):  # noqa: N802
    _record("cudaMemcpyAsync", int(dst), int(src), int(nbytes), kind, stream)
    device_side = int(dst) if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else int(src)
    if not _checked(device_side, int(nbytes)):
        return (cudaError_t.cudaErrorInvalidValue,)
    return (enqueue(stream, lambda: ctypes.memmove(int(dst), int(src), int(nbytes))),)


def cudaStreamSynchronize(stream):  # noqa: N802
    _record("cudaStreamSynchronize", stream)
    s = _streams.get(int(stream))
    if s is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    if s.capture is not None:
        return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
    while s.queue:
        s.queue.pop(0)()
    return (OK,)


def cudaEventCreate():  # noqa: N802
    handle = next(_ids)
    _events[handle] = _Event()
    return OK, handle


def cudaEventDestroy(event):  # noqa: N802
    return (OK,) if _events.pop(int(event), None) is not None else (cudaError_t.cudaErrorInvalidResourceHandle,)


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
    if s.queue:  # pending work is not part of the graph: flush it first, as a real stream would run it
        cudaStreamSynchronize(stream)
    s.capture = []
    return (OK,)


def cudaStreamEndCapture(stream):  # noqa: N802
    _record("cudaStreamEndCapture", stream)
    s = _stream(stream)
    handle = next(_ids)
    _graphs[handle], s.capture = s.capture or [], None
    return OK, handle


def cudaGraphInstantiate(graph, flags):  # noqa: N802
    _record("cudaGraphInstantiate", graph, flags)
    ops = _graphs.pop(int(graph), None)
    if ops is None:
        return cudaError_t.cudaErrorInvalidValue, None
    handle = next(_ids)
    _graph_execs[handle] = ops
    return OK, handle


def cudaGraphLaunch(graph_exec, stream):  # noqa: N802
    _record("cudaGraphLaunch", graph_exec, stream)
    ops = _graph_execs.get(int(graph_exec))
    if ops is None:
        return (cudaError_t.cudaErrorInvalidValue,)
    for op in ops:
        err = enqueue(stream, op)
        if err != OK:
            return (err,)
    return (OK,)


def cudaGraphExecDestroy(graph_exec):  # noqa: N802
    _record("cudaGraphExecDestroy", graph_exec)
    return (OK,) if _graph_execs.pop(int(graph_exec), None) is not None else (cudaError_t.cudaErrorInvalidValue,)
