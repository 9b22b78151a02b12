"""A fake of the TensorRT Python API (10.x and 11.x), for CPU tests of edgeseg's call sequences.

The version comes from ``EDGESEG_FAKE_TRT`` (default ``10.3.0``) and decides which classes and
flags exist, as the real bindings do. Sources followed:

- TensorRT Python API reference (``Builder``, ``IBuilderConfig``, ``IOptimizationProfile``,
  ``OnnxParser``, ``Runtime``, ``ICudaEngine``, ``IExecutionContext``): signatures and the
  bool/None return conventions (``set_input_shape``, ``set_timing_cache``,
  ``execute_async_v3`` -> bool; ``build_serialized_network``, ``deserialize_cuda_engine`` ->
  None on failure).
- "Migrating from TensorRT 10.x to 11.x" (Python API reference): 11.x removed
  ``BuilderFlag.FP16/INT8/...``, ``IBuilderConfig.int8_calibrator`` and
  ``set_calibration_profile``; networks are always strongly typed and ``STRONGLY_TYPED`` is
  accepted but ignored. ``EXPLICIT_BATCH`` is deprecated and ignored in 10.x.
- Developer Guide, "Working with DLA": DLA engines need static shapes (min = opt = max) and a
  DLA core; a DLA engine is deserialised by a runtime whose ``DLA_core`` is set. Which
  versions have DLA ("Working with DLA", TensorRT 11.4.1): 10.x up to 10.7 ("the last 10.x
  release that supported DLA"); none in 11.0-11.3; 11.4.0 only on Windows on ARM (beta, not
  Orin); 11.4.1+ on Jetson AGX Orin (JetPack 7.2.2+), strongly typed, GPU fallback as in 10.x.
- onnx-tensorrt / "Working with Quantized Types": ``DequantizeLinear`` takes quantized inputs
  only (int8, fp8, int4, fp4), never int32 (a quantized bias) or uint8; Q/DQ zero-points are 0
  (TensorRT quantization is symmetric), whether an initializer or a ``Constant`` node gives
  them; per-channel scales only on constant weights, activations are quantized per tensor.
- Calibration caches: header ``TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2``; a cache of
  another version is not used (the builder would calibrate again, and a replay-only calibrator
  has no batches, so the build fails).
- Engine compatibility (Developer Guide, "Version Compatibility"): without the version-compatible
  build flag, a plan deserialises only in the exact TensorRT version that built it.
- Lifetimes: destroying an ``IRuntime`` before the engines it deserialised is undefined
  behaviour; TensorRT logs "Destroying a runtime before destroying deserialized engines created
  by the runtime leads to undefined behavior" (NVIDIA/TensorRT#4436, #3739: "construct
  IRuntime -> ICudaEngine -> IExecutionContext and destruct in reverse order"). The fake
  holds the runtime only weakly from its engines, as the C++ object does, records the breach
  in ``violations`` and fails every later use of those engines. A context keeps its engine
  alive (the bindings' keep-alive), so contexts go first by construction.
- CUDA graphs (Developer Guide, "CUDA Graphs"): the first ``enqueueV3`` after an input-shape
  change does deferred work that cannot be captured, so call it once outside capture; a graph
  is valid only for the context state it captured: after ``set_input_shape`` changes that
  context's shapes, replaying an older graph of it is invalid (the fake fails the kernel,
  which the stream reports as a launch failure). Hence one execution context per captured shape.

An engine is a JSON plan; its execution context runs the parsed ONNX with ONNX Runtime on the
CPU, reading and writing the fake CUDA memory, so results can be compared with ORT's. An FP16
build (weakly typed FP16 flag without INT8) runs the graph converted to FP16, so FP16 engines
do not silently compute in FP32; implicit-INT8 (calibration cache) builds run in FP32.
"""
from __future__ import annotations

import enum
import hashlib
import json
import os
import weakref
from pathlib import Path

__version__ = os.environ.get("EDGESEG_FAKE_TRT", "10.3.0")
_MAJOR = int(__version__.split(".")[0])
_VERSION = tuple(int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
_CODE = _VERSION[0] * 10000 + _VERSION[1] * 100 + _VERSION[2]
# DLA on Orin: TensorRT 10.0-10.7 and 11.4.1+ ("Working with DLA", TensorRT 11.4.1)
HAS_DLA = (10, 0, 0) <= _VERSION < (10, 8, 0) or _VERSION >= (11, 4, 1)
DLA_CORES = 2
log: list[str] = []  # everything the fake "printed" through loggers
builds: list[dict] = []  # every build_serialized_network call: what was configured
violations: list[str] = []  # API-usage errors TensorRT reports but survives (object lifetimes)


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2):
        self.min_severity = min_severity


def _err(msg: str) -> None:
    log.append(msg)


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5


_ONNX_TO_TRT = {"FLOAT": "FLOAT", "FLOAT16": "HALF", "INT8": "INT8", "INT32": "INT32", "BOOL": "BOOL", "UINT8": "UINT8"}


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


if _MAJOR < 11:
    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0  # deprecated and ignored in 10.x
        STRONGLY_TYPED = 1

    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        INT8 = 1
        DEBUG = 2
        GPU_FALLBACK = 3
        REFIT = 5
        DISABLE_TIMING_CACHE = 6
        OBEY_PRECISION_CONSTRAINTS = 11

    class IInt8EntropyCalibrator2:
        """Subclassed by users; TensorRT calls get_batch_size/get_batch/read_calibration_cache."""

        def __init__(self):
            pass
else:
    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1  # accepted, ignored: every 11.x network is strongly typed

    class BuilderFlag(enum.IntEnum):
        DEBUG = 2
        GPU_FALLBACK = 3
        REFIT = 5
        DISABLE_TIMING_CACHE = 6


class INetworkDefinition:
    def __init__(self, flags: int):
        self.strongly_typed = _MAJOR >= 11 or bool(flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        self.onnx: str | None = None
        self.inputs: dict[str, list] = {}
        self.outputs: dict[str, str] = {}
        self.dtypes: dict[str, str] = {}  # I/O tensor -> DataType name
        self.tensors: set[str] = set()
        self._layers: list = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> "_Tensor":
        return _Tensor(list(self.inputs)[index])

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_layer(self, index: int) -> "_Layer":
        return self._layers[index]


class _Tensor:
    def __init__(self, name: str):
        self.name = name


class _Layer:
    def __init__(self, outputs: list[str]):
        self._outputs = outputs

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> _Tensor:
        return _Tensor(self._outputs[index])


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger):
        self.network, self.errors = network, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]

    def parse_from_file(self, path: str) -> bool:
        import onnx
        from onnx import TensorProto, numpy_helper

        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        g = model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
        types.update({i.name: i.data_type for i in g.initializer})
        inits = {i.name for i in g.initializer}
        constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
                types[n.output[0]] = n.attribute[0].t.data_type
        producer = {o: n for n in g.node for o in n.output}
        quantized = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4, TensorProto.FLOAT4E2M1)
        for node in g.node:
            if node.op_type == "DequantizeLinear" and types.get(node.input[0]) not in quantized:
                self.errors.append(f"{node.name}: only activation types allowed as input to this layer.")
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                zp = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                if zp is not None and zp.astype("float32").any():
                    self.errors.append(f"{node.name}: non-zero zero-point; TensorRT quantization is symmetric")
                scale = constants.get(node.input[1])
                x = node.input[0]
                weight = x in constants or (node.op_type == "DequantizeLinear" and x in producer
                                            and producer[x].op_type == "QuantizeLinear" and producer[x].input[0] in constants)
                if scale is not None and scale.size > 1 and not weight:
                    self.errors.append(f"{node.name}: per-channel scales on an activation; activations are quantized per tensor")
            if node.op_type != "Cast" and any(types.get(i) == TensorProto.UINT8 for i in node.input):
                self.errors.append(f"{node.name}: UINT8 is only allowed at network I/O through Cast")
        if self.errors:
            return False
        self.network.onnx = str(path)
        self.network.inputs = {i.name: [d.dim_value or -1 for d in i.type.tensor_type.shape.dim]
                               for i in g.input if i.name not in inits}
        self.network.outputs = {o.name: TensorProto.DataType.Name(o.type.tensor_type.elem_type) for o in g.output}
        self.network.dtypes = {v.name: _ONNX_TO_TRT.get(TensorProto.DataType.Name(v.type.tensor_type.elem_type), "FLOAT")
                               for v in [*g.input, *g.output] if v.name not in inits}
        self.network.tensors = {o for n in g.node for o in n.output} | set(self.network.inputs)
        self.network._layers = [_Layer(list(n.output)) for n in g.node]
        return True


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 (the real parameter names)
        lo, mid, hi = tuple(min), tuple(opt), tuple(max)
        if not (len(lo) == len(mid) == len(hi)) or not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise ValueError(f"invalid profile for {input}: min {lo} <= opt {mid} <= max {hi} does not hold")
        self.shapes[input] = (lo, mid, hi)


class ITimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return json.dumps({"timing_cache": __version__}).encode()


class IBuilderConfig:
    def __init__(self):
        self.flags: set = set()
        self.pools: dict = {}
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self.profiles: list[IOptimizationProfile] = []
        self._timing_cache: ITimingCache | None = None
        if _MAJOR < 11:
            self.int8_calibrator = None
            self._calibration_profile = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[pool] = int(pool_size)

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(BuilderFlag(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return flag in self.flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    if _MAJOR < 11:
        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            self._calibration_profile = profile
            return True

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache.data and json.loads(cache.data or b"{}").get("timing_cache") != __version__ and not ignore_mismatch:
            return False  # made by another TensorRT: refused unless ignore_mismatch
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._timing_cache


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(int(flags))

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
        record = {"strongly_typed": network.strongly_typed, "flags": sorted(f.name for f in config.flags),
                  "device": config.default_device_type.name, "dla_core": config.DLA_core,
                  "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles]}
        builds.append(record)
        if network.onnx is None:
            return _fail("network is empty: parse a model first")
        if network.strongly_typed and config.flags & {getattr(BuilderFlag, f, None) for f in ("FP16", "INT8")}:
            return _fail("precision flags (FP16/INT8) are not allowed on a strongly typed network")
        dynamic = any(d < 0 for dims in network.inputs.values() for d in dims)
        if dynamic and not config.profiles:
            return _fail("network has dynamic inputs but no optimization profile")
        for p in config.profiles:
            missing = set(network.inputs) - set(p.shapes)
            if missing:
                return _fail(f"optimization profile is missing input(s) {sorted(missing)}")
        if config.default_device_type == DeviceType.DLA:
            if not HAS_DLA:
                return _fail(f"DLA is not supported by TensorRT {__version__} (10.x up to 10.7, or 11.4.1+ on Orin)")
            if not 0 <= config.DLA_core < DLA_CORES:
                return _fail(f"DLA build needs DLA_core in 0..{DLA_CORES - 1}, got {config.DLA_core}")
            if any(lo != hi or lo != mid for p in config.profiles for lo, mid, hi in p.shapes.values()):
                return _fail("DLA does not support dynamic shapes: the profile needs min = opt = max")
        if _MAJOR < 11 and BuilderFlag.INT8 in config.flags and not _has_qdq(network.onnx):
            calibrator = config.int8_calibrator
            if calibrator is None:
                return _fail("INT8 without Q/DQ needs an int8_calibrator (implicit quantization)")
            cache = calibrator.read_calibration_cache()
            header, names = _read_cache(cache)
            record["cache_header"] = header
            record["cache_names_not_in_network"] = sorted(set(names) - network.tensors)
            record["network_tensors_without_scale"] = sorted(network.tensors - set(names))
            if header != f"TRT-{_CODE}-EntropyCalibration2":
                return _fail(f"calibration cache {header!r} is not for TensorRT {__version__}; calibrating again needs "
                             "batches and the calibrator has none")
            if config._calibration_profile is None and dynamic:
                return _fail("implicit INT8 with dynamic shapes needs set_calibration_profile")
        if config._timing_cache is None:
            config._timing_cache = ITimingCache(b"")
        # what the engine computes in: an FP16-flag build without INT8 runs the graph in FP16
        fp16 = _MAJOR < 11 and BuilderFlag.FP16 in config.flags and BuilderFlag.INT8 not in config.flags
        record["compute"] = "fp16" if fp16 else "as-typed"
        plan = {"fake_tensorrt": __version__, "onnx": network.onnx,
                "onnx_sha256": hashlib.sha256(Path(network.onnx).read_bytes()).hexdigest(),
                "inputs": network.inputs, "outputs": network.outputs, "dtypes": network.dtypes,
                "profiles": record["profiles"], "compute": record["compute"],
                "dla_core": config.DLA_core if config.default_device_type == DeviceType.DLA else -1}
        return json.dumps(plan).encode()


def _fail(message: str):
    _err(message)
    return None


def _has_qdq(path: str) -> bool:
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)


def _read_cache(data: bytes) -> tuple[str, list[str]]:
    lines = bytes(data or b"").decode().splitlines()
    return (lines[0] if lines else ""), [line.rpartition(": ")[0] for line in lines[1:] if line.strip()]


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger
        self.DLA_core = -1
        self._engines: weakref.WeakSet = weakref.WeakSet()
        self._alive = [True]  # shared with its engines, which hold the runtime only weakly

    def deserialize_cuda_engine(self, serialized_engine: bytes):
        try:
            plan = json.loads(bytes(serialized_engine))
        except ValueError:
            return _fail("engine plan file is corrupt")
        if plan.get("fake_tensorrt") != __version__:  # exact version, unless built version-compatible
            return _fail(f"engine plan built by TensorRT {plan.get('fake_tensorrt')} is not compatible with {__version__}")
        if plan["dla_core"] >= 0 and self.DLA_core < 0:
            return _fail("a DLA engine needs IRuntime.DLA_core set before deserialisation")
        engine = ICudaEngine(plan, self.DLA_core, self._alive)
        self._engines.add(engine)
        return engine

    def __del__(self):
        self._alive[0] = False
        if len(self._engines):
            msg = ("IRuntime::~IRuntime: Destroying a runtime before destroying deserialized engines created by the "
                   "runtime leads to undefined behavior.")
            violations.append(msg)
            _err(msg)


class ICudaEngine:
    def __init__(self, plan: dict, dla_core: int, runtime_alive: list):
        self.plan, self.dla_core = plan, dla_core
        self._names = [*plan["inputs"], *plan["outputs"]]
        self._runtime_alive = runtime_alive

    def _usable(self) -> bool:
        if not self._runtime_alive[0]:
            _err("engine used after its IRuntime was destroyed (undefined behaviour)")
        return self._runtime_alive[0]

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        if name not in self._names:
            return TensorIOMode.NONE
        return TensorIOMode.INPUT if name in self.plan["inputs"] else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self.plan.get("dtypes", {}).get(name, "FLOAT")]

    def create_execution_context(self) -> "IExecutionContext | None":
        if not self._usable():
            return None
        return IExecutionContext(self)


class IExecutionContext:
    """Runs the engine's ONNX with ONNX Runtime (CPU) on the fake CUDA memory."""

    def __init__(self, engine: ICudaEngine):
        self.engine = engine  # the bindings keep the engine alive while a context exists
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}
        self._generation = 0  # bumped when an input shape changes: invalidates graphs captured before
        self._needs_flush = False  # a shape changed and no enqueue ran outside capture since
        self._session = None

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine._names:
            return bool(_fail(f"no tensor named {name}"))
        self.addresses[name] = int(memory)
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        profile = self.engine.plan["profiles"][0][name] if self.engine.plan["profiles"] else None
        if profile is not None:
            lo, _, hi = profile
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                _err(f"set_input_shape({name}, {shape}) is outside the profile {lo}..{hi}")
                return False
        if self.shapes.get(name) != shape:
            self._generation += 1
            self._needs_flush = True
        self.shapes[name] = shape
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        from cuda.bindings import runtime as cudart

        if not self.engine._usable():
            return False
        inputs = dict(self.shapes)
        addresses = dict(self.addresses)
        if set(inputs) != set(self.engine.plan["inputs"]) or set(addresses) != set(self.engine._names):
            return bool(_fail("execute_async_v3: every input needs a shape and every tensor an address"))
        capturing = cudart.is_capturing(stream_handle)
        if capturing and self._needs_flush:
            return bool(_fail("enqueueV3 during stream capture right after an input-shape change: run it once "
                              "outside capture first"))
        generation = self._generation

        def kernel():
            if self._generation != generation:
                raise RuntimeError("replayed a CUDA graph captured before this context's input shapes changed")
            if not self.engine._usable():
                raise RuntimeError("kernel of an engine whose IRuntime was destroyed")
            self._run(inputs, addresses)

        err = cudart.enqueue(stream_handle, kernel, kernel=True)
        if err == cudart.OK and not capturing:
            self._needs_flush = False
        return err == cudart.OK

    def _run(self, shapes: dict, addresses: dict) -> None:
        import ctypes

        import numpy as np
        import onnxruntime as ort

        if self._session is None:
            model = self.engine.plan["onnx"]
            if self.engine.plan.get("compute") == "fp16":
                import onnx
                from onnxconverter_common import float16

                model = float16.convert_float_to_float16(onnx.load(model), keep_io_types=True).SerializeToString()
            self._session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        dtypes = self.engine.plan.get("dtypes", {})
        np_types = {"UINT8": np.uint8, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_}
        feeds = {}
        for i in self._session.get_inputs():
            dtype = np_types.get(dtypes.get(i.name, "FLOAT"), np.float32)
            shape = shapes[i.name]
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            buf = (ctypes.c_uint8 * n).from_address(addresses[i.name])
            feeds[i.name] = np.frombuffer(buf, dtype=dtype).reshape(shape).copy()
        for o, value in zip(self._session.get_outputs(), self._session.run(None, feeds)):
            value = np.ascontiguousarray(value, dtype=np_types.get(dtypes.get(o.name, "FLOAT"), np.float32))
            ctypes.memmove(addresses[o.name], value.ctypes.data, value.nbytes)
