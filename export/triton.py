"""A Triton Inference Server model repository from a deploy bundle (the server's launcher: ``triton_server.py``).

Repository layout (``edgeseg serve triton --bundle B --out REPO``)::

    REPO/
      edgeseg/                   Python backend: the bundle through edgeseg's runtime (ONNX Runtime CPU,
        config.pbtxt             or the engine where TensorRT exists). IMAGE uint8 [H, W, 3], any size ->
        1/model.py               MASK uint8 [H, W] at the image's size. Dynamic batching; instance groups.
        1/bundle/                a copy of the bundle (hash-verified when the model loads)
      edgeseg_preprocess/        Python: letterbox + normalise -> INPUT float [3, h, w] and PLACEMENT
      edgeseg_postprocess/       Python: logits + PLACEMENT + the original size -> MASK
      edgeseg_trt/               tensorrt_plan: the engine, built on the server's GPU (build_engine.py)
      edgeseg_onnx/              onnxruntime backend with the TensorRT accelerator (GPU servers)
      edgeseg_gpu/               ensemble: preprocess -> edgeseg_trt -> postprocess

Every ``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf (shipped in
``tritonclient``, which rejects unknown fields and wrong types) and written in protobuf's text
format. The Python models are real modules in ``triton_models/``, copied in as ``model.py``.
Only ``edgeseg`` runs on a CPU server (the ``nvidia-pytriton`` wheel's ``tritonserver`` has the
Python backend only); the GPU models are validated, not run, here.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from edgeseg.export.triton_server import CPU_MODEL, find_tritonserver  # noqa: F401  (the documented entry point: `from edgeseg.export.triton import find_tritonserver`)
from edgeseg.runtime.bundle import Bundle
from edgeseg.runtime.errors import BackendUnavailableError, InputError
from edgeseg.runtime.files import replace_dir, staging_dir
from edgeseg.runtime.spec import engine_sidecar

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent / "triton_models"
# The Python-backend models of the repository: model name -> its module in triton_models/, copied as model.py.
PYTHON_MODELS = {CPU_MODEL: "segment.py", "edgeseg_preprocess": "preprocess.py", "edgeseg_postprocess": "postprocess.py"}


def _tensor(name: str, data_type: str, dims: list[int]) -> dict:
    return {"name": name, "data_type": data_type, "dims": dims}


def model_config(fields: dict, note: str = "") -> str:
    """config.pbtxt text of ``fields`` (``ModelConfig`` field names), built as Triton's ``ModelConfig``
    protobuf (which refuses unknown fields and wrong types) and printed by protobuf's text format;
    ``note``: comment lines put above it."""
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise BackendUnavailableError("writing Triton configs needs tritonclient: pip install 'edgeseg[serve]'") from None
    config = json_format.ParseDict(fields, model_config_pb2.ModelConfig())
    comments = "".join(f"# {line}\n" for line in note.splitlines())
    return comments + text_format.MessageToString(config)


def cpu_config(name: str, max_batch: int, instances: int, max_queue_delay_us: int, threads: int = 0,
               preferred_batch: list[int] | None = None) -> str:
    """config.pbtxt of the Python-backend model (runs anywhere the runtime runs).

    ``preferred_batch``: the dynamic batcher's preferred sizes (it sends a batch as soon as one
    of them is ready instead of waiting out ``max_queue_delay_us``); default ``[max_batch]``.
    """
    return model_config({
        "name": name, "backend": "python", "max_batch_size": max_batch,
        "input": [_tensor("IMAGE", "TYPE_UINT8", [-1, -1, 3])],
        "output": [_tensor("MASK", "TYPE_UINT8", [-1, -1])],
        "dynamic_batching": {"preferred_batch_size": preferred_batch or [max_batch],
                             "max_queue_delay_microseconds": max_queue_delay_us},
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
        "parameters": {"backend": {"string_value": "auto"}, "threads": {"string_value": str(threads)}},
    }, "edgeseg person segmentation through edgeseg's runtime (Python backend). Triton batches\n"
       "requests of equal image size; masks come back at each image's own size.")


# Parameters Triton's onnxruntime backend accepts for its TensorRT accelerator; any other key fails the
# model load ("unknown parameter ... is provided for TensorRT Execution Accelerator"): the backend's
# README table and src/onnxruntime.cc. precision_mode maps FP16 -> trt_fp16_enable, INT8 -> trt_int8_enable.
ORT_TRT_ACCELERATOR_PARAMETERS = {
    "precision_mode", "max_workspace_size_bytes", "trt_max_partition_iterations", "trt_min_subgraph_size",
    "int8_calibration_table_name", "int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core",
    "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_dump_subgraphs",
    "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback",
    "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log",
    "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level", "trt_auxiliary_streams",
    "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes", "trt_profile_max_shapes",
    "trt_profile_opt_shapes", "trt_cuda_graph_enable", "trt_dump_ep_context_model", "trt_ep_context_file_path",
    "trt_ep_context_embed_mode",
}
ORT_TRT_PRECISION_MODES = {"FP32", "FP16", "BF16", "INT8"}


def ort_trt_accelerator(bundle: Bundle, max_batch: int, opt_batch: int) -> dict[str, str]:
    """The TensorRT accelerator parameters of ``edgeseg_onnx``.

    An int8 bundle serves its Q/DQ ONNX, which a weakly typed TensorRT build only honours with
    ``trt_int8_enable``: ``precision_mode "INT8"`` (one value per model: layers outside the Q/DQ
    pairs then run in FP32). An explicit profile for batch 1..max_batch, tuned for opt_batch,
    builds one engine for every batch the dynamic batcher forms, instead of one per new size.
    """
    from edgeseg.runtime.backends.onnxrt import trt_profile

    precision = {"int8": "INT8", "fp16": "FP16"}.get(bundle.precision, "FP32")
    params = {"precision_mode": precision, "max_workspace_size_bytes": "1073741824", "trt_engine_cache_enable": "1",
              **trt_profile(replace(bundle.spec, max_batch=max_batch, opt_batch=opt_batch))}
    unknown = set(params) - ORT_TRT_ACCELERATOR_PARAMETERS
    if unknown or precision not in ORT_TRT_PRECISION_MODES:  # a guard on this module itself
        raise AssertionError(f"not Triton onnxruntime TensorRT parameters: {sorted(unknown)} / {precision}")
    return params


def plan_engine(bundle: Bundle, max_batch: int) -> tuple[Path | None, dict | None]:
    """The device-built engine ``edgeseg_trt`` can serve (and its sidecar), or (None, None).

    Triton's dynamic batcher sends any batch from 1 to max_batch, so the engine must be a GPU
    engine of the bundle's precision whose profile covers that range: a DLA engine (static
    shape, one batch size, and a DLA core Triton does not select) is never chosen.
    """
    for engine in bundle.device_engines():
        meta = json.loads(engine_sidecar(engine).read_text())
        lo, hi = (meta.get("profile", {}).get(k, [0])[0] for k in ("min", "max"))
        if (f".{bundle.precision}." in engine.name and int(meta.get("dla_core", -1)) < 0 and ".dla" not in engine.name
                and not meta.get("static_batch") and lo <= 1 and hi >= max_batch):
            return engine, meta
    return None, None


def gpu_configs(bundle: Bundle, max_batch: int, opt_batch: int, instances: int, max_queue_delay_us: int,
                engine_meta: dict | None = None) -> dict[str, str]:
    """config.pbtxt of the GPU models: TensorRT plan, ONNX Runtime (TensorRT accelerator), pre/post, ensemble."""
    spec = bundle.spec
    h, w = spec.image_size
    in_dims = [h, w, 3] if spec.fused else [3, h, w]
    in_type = "TYPE_UINT8" if spec.fused else "TYPE_FP32"
    out_type = "TYPE_UINT8" if spec.output == "mask" else "TYPE_FP32"
    image, mask = _tensor("IMAGE", "TYPE_UINT8", [-1, -1, 3]), _tensor("MASK", "TYPE_UINT8", [-1, -1])
    placement = _tensor("PLACEMENT", "TYPE_INT32", [6])
    gpu_model = {"max_batch_size": max_batch,
                 "input": [_tensor(spec.input_name, in_type, in_dims)],
                 "output": [_tensor(spec.output_name, out_type, [1, h, w])],
                 "dynamic_batching": {"preferred_batch_size": [opt_batch, max_batch],
                                      "max_queue_delay_microseconds": max_queue_delay_us},
                 "instance_group": [{"count": instances, "kind": "KIND_GPU"}]}
    cpu_group = [{"count": instances, "kind": "KIND_CPU"}]
    if engine_meta:
        plan_note = (f"model.plan: built by TensorRT {engine_meta.get('tensorrt_version')} for "
                     f"{engine_meta.get('gpu_name')} (compute capability {engine_meta.get('compute_capability')}); an "
                     "engine runs only in the TensorRT version that built it,\nso serve it with a Triton whose "
                     f"TensorRT is {engine_meta.get('tensorrt_version')} (each Triton release names its TensorRT)")
    else:
        plan_note = ("no engine yet: build it on this GPU with the TensorRT of the Triton that serves it (an engine runs "
                     "only in the\nTensorRT version that built it): python build_engine.py in the bundle, then copy "
                     f"model.{bundle.precision}.device.engine to edgeseg_trt/1/model.plan")
    accelerator = {"name": "tensorrt", "parameters": ort_trt_accelerator(bundle, max_batch, opt_batch)}

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> dict:
        return {"model_name": model, "model_version": -1, "input_map": inputs, "output_map": outputs}

    return {
        "edgeseg_trt": model_config({"name": "edgeseg_trt", "platform": "tensorrt_plan", **gpu_model}, plan_note),
        "edgeseg_onnx": model_config({
            "name": "edgeseg_onnx", "backend": "onnxruntime", **gpu_model,
            "optimization": {"execution_accelerators": {"gpu_execution_accelerator": [accelerator]}}}),
        "edgeseg_preprocess": model_config({
            "name": "edgeseg_preprocess", "backend": "python", "max_batch_size": max_batch, "input": [image],
            "output": [_tensor("INPUT", in_type, in_dims), placement], "instance_group": cpu_group},
            "letterbox + normalise on the CPU; PLACEMENT = top, left, height, width, src_h, src_w"),
        "edgeseg_postprocess": model_config({
            "name": "edgeseg_postprocess", "backend": "python", "max_batch_size": max_batch,
            "input": [_tensor("LOGITS", out_type, [1, h, w]), placement], "output": [mask],
            "instance_group": cpu_group}),
        "edgeseg_gpu": model_config({
            "name": "edgeseg_gpu", "platform": "ensemble", "max_batch_size": max_batch, "input": [image],
            "output": [mask],
            "ensemble_scheduling": {"step": [
                step("edgeseg_preprocess", {"IMAGE": "IMAGE"}, {"INPUT": "model_input", "PLACEMENT": "placement"}),
                step("edgeseg_trt", {spec.input_name: "model_input"}, {spec.output_name: "logits"}),
                step("edgeseg_postprocess", {"LOGITS": "logits", "PLACEMENT": "placement"}, {"MASK": "MASK"}),
            ]}}, "preprocess (CPU) -> TensorRT (GPU) -> postprocess (CPU)"),
    }


def validate_config(text: str, where: str = "config.pbtxt"):
    """Parse with Triton's ModelConfig protobuf; raise InputError on unknown fields or wrong types."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise BackendUnavailableError("validating Triton configs needs tritonclient: pip install 'edgeseg[serve]'") from None
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise InputError(f"{where}: not a valid Triton model config ({e})") from None
    return config


def write_repository(bundle_dir: str | Path, out: str | Path, max_batch: int | None = None, instances: int = 1,
                     max_queue_delay_us: int = 2000, threads: int = 0, preferred_batch: list[int] | None = None) -> dict:
    """Write the model repository for ``bundle_dir`` into ``out`` (atomically); returns what was written.

    ``threads``: ONNX Runtime threads of each instance of the CPU model (0: every core);
    ``preferred_batch``: its dynamic batcher's preferred sizes (default: the largest batch).
    """
    bundle = Bundle(bundle_dir)  # verified: a repository is never made from a changed bundle
    spec = bundle.spec
    max_batch = max_batch or spec.max_batch
    if not 1 <= max_batch <= spec.max_batch:
        raise InputError(f"--max-batch must be in 1..{spec.max_batch} (the bundle's profile), got {max_batch}")
    if instances < 1 or max_queue_delay_us < 0:
        raise InputError(f"--instances must be >= 1 and --max-queue-delay-us >= 0, got {instances}, {max_queue_delay_us}")
    preferred_batch = sorted(set(preferred_batch or [max_batch]))
    if not all(1 <= b <= max_batch for b in preferred_batch):
        raise InputError(f"--preferred-batch sizes must be in 1..{max_batch} (the max batch), got {preferred_batch}")
    out = Path(out)
    engine, engine_meta = plan_engine(bundle, max_batch)
    tmp = staging_dir(out)
    configs = {CPU_MODEL: cpu_config(CPU_MODEL, max_batch, instances, max_queue_delay_us, threads, preferred_batch),
               **gpu_configs(bundle, max_batch, min(spec.opt_batch, max_batch), instances, max_queue_delay_us,
                             engine_meta)}
    for name, text in configs.items():
        (tmp / name / "1").mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(text)
    shutil.copytree(bundle.path, tmp / CPU_MODEL / "1" / "bundle")
    for name, module in PYTHON_MODELS.items():
        shutil.copyfile(MODELS_DIR / module, tmp / name / "1" / "model.py")
        if name != CPU_MODEL:  # pre/post read the bundle's I/O contract beside them
            (tmp / name / "1" / "spec.json").write_text(json.dumps(spec.to_dict()))
    onnx = bundle.file("int8" if bundle.precision == "int8" else "fp32") or bundle.file("fp32")
    shutil.copyfile(onnx, tmp / "edgeseg_onnx" / "1" / "model.onnx")
    if engine is not None:
        shutil.copyfile(engine, tmp / "edgeseg_trt" / "1" / "model.plan")
    replace_dir(tmp, out)
    log.info("Triton repository (%s, max batch %d, %d instance(s)) -> %s", ", ".join(configs), max_batch, instances, out)
    return {"repository": str(out), "models": sorted(configs), "served_here": CPU_MODEL, "max_batch": max_batch,
            "engine_included": engine is not None}
