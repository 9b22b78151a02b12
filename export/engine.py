"""TensorRT engine builds that pick the path the installed TensorRT supports.

TensorRT 10 still has the FP16/INT8 builder flags and the ``IInt8*Calibrator`` classes
(deprecated since 10.1); TensorRT 11 removed both: INT8 comes only from Q/DQ nodes and FP16
only from an FP16 graph, in strongly typed networks. So:

=========  ===================================  ========================================
precision  TensorRT 10 (JetPack 6)               TensorRT 11+
=========  ===================================  ========================================
int8       Q/DQ ONNX + INT8 (+FP16) flags         Q/DQ ONNX, strongly typed
int8 DLA   FP32 ONNX + INT8 flag + cache          11.4.1+: Q/DQ ONNX, strongly typed
fp16 DLA   FP32 ONNX + FP16 flag                  11.4.1+: FP16 ONNX graph, strongly typed
fp16       FP32 ONNX + FP16 flag                  FP16 ONNX graph, strongly typed
fp32       FP32 ONNX                              FP32 ONNX, strongly typed
=========  ===================================  ========================================

DLA exists in TensorRT 10.0-10.7 ("TensorRT 10.7 was the last 10.x release that supported
DLA") and again from 11.4.1 on Jetson AGX Orin with JetPack 7.2.2+ (strongly typed, GPU
fallback as in 10.x); 11.0-11.3 have none, and 11.4.0 only on Windows on ARM (TensorRT 11.4.1
"Working with DLA"). DLA builds on any other version are refused before TensorRT is called.

Everything that decides (version parsing, plan, profile shapes, paths, metadata) is plain
Python and unit-tested anywhere; only :func:`build_engine` needs TensorRT and a GPU.
"""
from __future__ import annotations

import importlib.util

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from edgeseg.runtime.errors import BackendUnavailableError, InputError
from edgeseg.runtime.files import atomic_path, sha256_file, write_json_atomic
from edgeseg.runtime.spec import engine_sidecar

log = logging.getLogger(__name__)

Precision = Literal["int8", "fp16", "fp32"]


@dataclass(frozen=True)
class TrtCapabilities:
    """What an installed TensorRT version offers."""

    version: str  # e.g. "10.3.0"
    major: int
    precision_flags: bool  # BuilderFlag.FP16 / INT8 exist (TensorRT <= 10)
    implicit_int8: bool  # IInt8*Calibrator and calibration caches work (TensorRT <= 10)
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED exists (TensorRT >= 9)
    dla: Literal["weakly-typed", "strongly-typed", None] = None  # how DLA builds work on Orin; None: no DLA


def _version_tuple(version: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in version.split(".")[:3]]
    except ValueError:
        raise InputError(f"cannot parse TensorRT version {version!r}") from None
    return tuple((parts + [0, 0, 0])[:3])


def capabilities(version: str) -> TrtCapabilities:
    """Parse a TensorRT version string into what it can do."""
    v = _version_tuple(version)
    major = v[0]
    if major < 10:
        # Below 10 a network needs NetworkDefinitionCreationFlag.EXPLICIT_BATCH and the bindings API
        # (execute_async_v2); edgeseg uses the name-based I/O of TensorRT 10 (set_tensor_address,
        # execute_async_v3), so it refuses rather than fail half way through a build.
        raise BackendUnavailableError(f"TensorRT {version} is too old; edgeseg needs TensorRT 10 or newer "
                                      "(JetPack 6, or pip install 'edgeseg[gpu]')")
    dla = "weakly-typed" if v < (10, 8, 0) else "strongly-typed" if v >= (11, 4, 1) else None
    return TrtCapabilities(version=version, major=major, precision_flags=major <= 10, implicit_int8=major <= 10,
                           strongly_typed=major >= 9, dla=dla)


@dataclass(frozen=True)
class BuildPlan:
    """One engine build, fully decided."""

    precision: Precision
    onnx: str  # the ONNX file the builder parses
    flags: tuple[str, ...]  # BuilderFlag names to set
    strongly_typed: bool
    calibration_cache: str | None  # implicit INT8 only (TensorRT 10 DLA)
    dla_core: int  # -1: GPU only


def plan_build(caps: TrtCapabilities, precision: Precision, files: dict[str, str], dla_core: int = -1) -> BuildPlan:
    """Choose the ONNX file, flags and typing for ``precision`` on this TensorRT.

    Args:
        files: available artifacts: ``fp32`` (required), ``int8`` (Q/DQ), ``fp16`` (FP16
            graph), ``cache`` (calibration cache).

    Raises:
        InputError: the artifact the plan needs is missing, or the combination is impossible.
    """
    def need(key: str, what: str) -> str:
        if not files.get(key):
            raise InputError(f"a {precision} engine on TensorRT {caps.version} needs the {what}; "
                             f"run `edgeseg export quantize` / `edgeseg export onnx` first")
        return files[key]

    need("fp32", "FP32 ONNX")
    if dla_core >= 0:
        return _plan_dla(caps, precision, files, dla_core, need)
    if caps.precision_flags:  # TensorRT 10: weakly typed, flags allow the precisions
        if precision == "int8":
            return BuildPlan("int8", need("int8", "Q/DQ INT8 ONNX"), ("INT8", "FP16"), False, None, -1)
        if precision == "fp16":
            return BuildPlan("fp16", files["fp32"], ("FP16",), False, None, -1)
        return BuildPlan("fp32", files["fp32"], (), False, None, -1)
    # TensorRT 11+: strongly typed, the graph decides
    key = {"int8": "int8", "fp16": "fp16", "fp32": "fp32"}[precision]
    what = {"int8": "Q/DQ INT8 ONNX", "fp16": "FP16 ONNX graph", "fp32": "FP32 ONNX"}[precision]
    return BuildPlan(precision, need(key, what), (), True, None, -1)


def _plan_dla(caps: TrtCapabilities, precision: Precision, files: dict[str, str], dla_core: int, need) -> BuildPlan:
    """The DLA build: implicit INT8 / FP16 flag on TensorRT 10.0-10.7, strongly typed on 11.4.1+."""
    if precision not in ("int8", "fp16"):
        raise InputError(f"DLA runs int8 or fp16 only (got {precision} on TensorRT {caps.version})")
    if caps.dla is None:
        if precision == "int8" and not caps.implicit_int8:
            why = (f"DLA INT8 needs implicit INT8 with a calibration cache, which TensorRT {caps.version} removed; "
                   "strongly typed (Q/DQ) DLA builds exist from TensorRT 11.4.1")
        else:
            why = f"TensorRT {caps.version} has no DLA"
        raise InputError(f"{why} (DLA: TensorRT 10.0-10.7, and 11.4.1+ on Jetson AGX Orin with JetPack 7.2.2+; none in "
                         "10.8+ or 11.0-11.4.0); build for the GPU (dla_core -1), or use one of those versions")
    if caps.dla == "strongly-typed":  # 11.4.1+: the graph's types decide, layers DLA cannot run fall back to the GPU
        key, what = ("int8", "Q/DQ INT8 ONNX") if precision == "int8" else ("fp16", "FP16 ONNX graph")
        return BuildPlan(precision, need(key, what), ("GPU_FALLBACK",), True, None, dla_core)
    if precision == "int8":
        return BuildPlan("int8", files["fp32"], ("INT8", "FP16", "GPU_FALLBACK"), False,
                         need("cache", "calibration cache"), dla_core)
    return BuildPlan("fp16", files["fp32"], ("FP16", "GPU_FALLBACK"), False, None, dla_core)


def profile_shapes(layout: str, image_hw: tuple[int, int], max_batch: int, opt_batch: int,
                   min_batch: int = 1) -> dict[str, tuple[int, ...]]:
    """The optimization profile (min/opt/max) for the input ``images``."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InputError(f"profile needs 1 <= min <= opt <= max batch, got {min_batch}, {opt_batch}, {max_batch}")
    h, w = image_hw
    shape = (lambda b: (b, h, w, 3)) if layout.startswith("NHWC") else (lambda b: (b, 3, h, w))
    return {"min": shape(min_batch), "opt": shape(opt_batch), "max": shape(max_batch)}


def engine_paths(out_dir: Path, precision: Precision, dla_core: int = -1, device_build: bool = False) -> dict[str, Path]:
    """Engine, sidecar metadata and the timing cache shared by every build in ``out_dir``.

    ``device_build``: built inside a deploy bundle on its target device (``build_engine.py``).
    Those get a name of their own (``model.int8.device.engine``) and never replace a file the
    bundle's manifest hashes, so the bundle still verifies after the build.
    """
    suffix = (f".dla{dla_core}" if dla_core >= 0 else "") + (".device" if device_build else "")
    engine = out_dir / f"model.{precision}{suffix}.engine"
    return {"engine": engine,
            "metadata": engine_sidecar(engine),
            "timing_cache": out_dir / ("device.timing.cache" if device_build else "timing.cache")}


def engine_metadata(plan: BuildPlan, caps: TrtCapabilities, gpu: dict, profile: dict, io: dict,
                    build_seconds: float) -> dict:
    """The sidecar JSON: what the engine is and what it was built for (the runtime checks it)."""
    return {
        "format": "edgeseg-engine/1",
        "tensorrt_version": caps.version,
        "gpu_name": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "precision": plan.precision,
        "plan": asdict(plan),
        "profile": {k: list(v) for k, v in profile.items()},
        "spec": io,  # the runtime's ModelSpec: a bare engine file can be opened with its sidecar
        "inputs": [{"name": io["input_name"], "layout": io["input_layout"]}],
        "outputs": [{"name": io["output_name"], "kind": io["output"]}],
        "onnx_sha256": sha256_file(plan.onnx),
        "build_seconds": build_seconds,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def availability() -> tuple[bool, str]:
    """(can build, why not): TensorRT importable and a CUDA GPU visible (no torch needed)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed (JetPack, or pip install 'edgeseg[gpu]' with NVIDIA's index)"
    try:
        if gpu_count() == 0:
            return False, "no CUDA GPU is visible"
    except (BackendUnavailableError, RuntimeError) as e:
        return False, f"cannot query CUDA: {e}"
    return True, ""


def gpu_count() -> int:
    from edgeseg.runtime.backends.tensorrt_engine import check_cuda, import_cudart

    return int(check_cuda(import_cudart().cudaGetDeviceCount()))


def gpu_info(device_id: int = 0) -> dict:
    from edgeseg.runtime.backends.tensorrt_engine import check_cuda, import_cudart

    props = check_cuda(import_cudart().cudaGetDeviceProperties(device_id))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def network_tensor_names(network) -> set[str]:
    """Every tensor name of a parsed TensorRT network (the ONNX tensor names), via the network API."""
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        names.update(layer.get_output(j).name for j in range(layer.num_outputs))
    return names


def cache_calibrator(cache_path: str, batch: int):
    """An implicit-INT8 calibrator that only replays a calibration cache (TensorRT 10, DLA)."""
    import tensorrt as trt

    class Replay(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.cache = Path(cache_path).read_bytes()

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            return None  # never called when the cache covers every tensor

        def read_calibration_cache(self):
            return self.cache

        def write_calibration_cache(self, cache):
            return None

    return Replay()


def build_engine(plan: BuildPlan, caps: TrtCapabilities, profile: dict, io: dict, out_dir: Path,
                 workspace_mib: int, device_build: bool = False) -> dict:
    """Build and write the engine + sidecar (needs TensorRT and a GPU); returns the metadata.

    1. check the ONNX against TensorRT's rules and parse it; 2. rewrite the calibration cache for
    the parsed network (implicit INT8); 3. the builder config: workspace, flags, DLA, profile,
    timing cache; 4. build and write the engine and the timing cache; 5. the sidecar.
    """
    import tensorrt as trt

    paths = engine_paths(out_dir, plan.precision, plan.dla_core, device_build)
    t0 = time.perf_counter()
    # the parser holds the weights the network points at: it lives as long as the build
    builder, network, _parser = _parse(trt, plan, caps)  # 1
    plan, cache_report = _network_cache(plan, caps, network, paths["engine"])  # 2
    config = _builder_config(trt, builder, plan, profile, io, workspace_mib, paths["timing_cache"])  # 3
    serialized = builder.build_serialized_network(network, config)  # 4
    if serialized is None:
        raise RuntimeError(f"TensorRT {caps.version} failed to build the {plan.precision} engine (see its log above)")
    with atomic_path(paths["engine"]) as tmp:
        tmp.write_bytes(bytes(serialized))
    with atomic_path(paths["timing_cache"]) as tmp:  # shared by later builds: never half-written
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = engine_metadata(plan, caps, gpu_info(), profile, io, time.perf_counter() - t0)  # 5
    meta["engine_sha256"] = sha256_file(paths["engine"])
    meta["dla_core"] = plan.dla_core
    meta["static_batch"] = profile["min"][0] == profile["max"][0]
    if cache_report:
        meta["calibration_cache"] = cache_report
    write_json_atomic(paths["metadata"], meta)
    log.info("built %s (%.0f s) -> %s", plan.precision, meta["build_seconds"], paths["engine"])
    return meta


def _parse(trt, plan: BuildPlan, caps: TrtCapabilities):
    """(builder, network, parser) with ``plan.onnx`` parsed; an ONNX TensorRT cannot take is an InputError."""
    if importlib.util.find_spec("onnx") is not None:  # absent on a runtime-only device: its parser speaks then
        from edgeseg.export.trt_rules import check_for_tensorrt

        check_for_tensorrt(plan.onnx)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{plan.onnx}: TensorRT {caps.version} cannot parse it ({errors[:300]})")
    return builder, network, parser


def _network_cache(plan: BuildPlan, caps: TrtCapabilities, network, engine: Path) -> tuple[BuildPlan, dict | None]:
    """The plan with its calibration cache rewritten for this network and TensorRT, and what was kept (or no cache)."""
    if not plan.calibration_cache:
        return plan, None
    # The cache is written now, for this TensorRT (its header carries the version) and with
    # only the tensor names of the network just parsed: the export-time cache holds the
    # Q/DQ model's names and a default version, which TensorRT would ignore or not match.
    from edgeseg.export.trt_cache import read_cache, write_cache

    _, scales = read_cache(plan.calibration_cache)
    names = network_tensor_names(network)
    kept = {n: s for n, s in scales.items() if n in names}
    if not kept:
        raise InputError(f"{plan.calibration_cache}: none of its tensors is in {plan.onnx}; re-export the model "
                         "and its calibration together (make export)")
    build_cache = write_cache(kept, engine.with_name(engine.name + ".calibration.cache"), caps.version)
    cache_report = {"file": str(build_cache), "tensors": len(kept), "dropped_not_in_network": len(scales) - len(kept),
                    "network_tensors_without_scale": len(names - set(kept)), "header_version": caps.version}
    log.info("calibration cache for TensorRT %s: %d tensors (%d not in the parsed network dropped)", caps.version,
             len(kept), len(scales) - len(kept))
    return replace(plan, calibration_cache=str(build_cache)), cache_report


def _builder_config(trt, builder, plan: BuildPlan, profile: dict, io: dict, workspace_mib: int, timing_cache_path: Path):
    """The builder config: workspace, the plan's flags, DLA, calibrator, the optimisation profile, the timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    for name in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    if plan.calibration_cache:
        config.int8_calibrator = cache_calibrator(plan.calibration_cache, profile["opt"][0])
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(io["input_name"], profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(opt_profile)
    if plan.calibration_cache:
        config.set_calibration_profile(opt_profile)
    # one timing cache for every build in the folder: later builds skip measured tactics
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        # IBuilderConfig.setTimingCache returns false when the cache was made by another TensorRT or
        # GPU (TensorRT API docs): build without the stale entries rather than fail.
        log.warning("%s: timing cache does not match this TensorRT/GPU; starting a fresh one", timing_cache_path)
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise RuntimeError("TensorRT refused an empty timing cache")
    return config
