"""A Triton Inference Server model repository from a deploy bundle, and a launcher for the server.

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

Every ``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf (shipped in
``tritonclient``), which rejects unknown fields and wrong types. Only ``edgeseg`` runs on a CPU
server (the ``nvidia-pytriton`` wheel's ``tritonserver`` has the Python backend only); the GPU
models are validated, not run, here. The launcher for that server is ``triton_server.py``.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from edgeseg.export.triton_server import CPU_MODEL
from edgeseg.export.triton_server import TritonServer  # noqa: F401  (benchmarks/bench_serving.py imports it from here)
from edgeseg.runtime.bundle import Bundle
from edgeseg.runtime.errors import BackendUnavailableError, InputError
from edgeseg.runtime.files import replace_dir, staging_dir

log = logging.getLogger(__name__)


# Shared by the generated Python models: imports, the launcher's site folders, tensors through DLPack.
_PRELUDE = '''import json
import os
import site
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# A stub started by `edgeseg serve start` (or the tests) names the launching environment's site
# folders, so edgeseg and its dependencies import here as they do there (.pth files included).
for _d in filter(None, os.environ.get("EDGESEG_SITE_DIRS", "").split(os.pathsep)):
    site.addsitedir(_d)


def _array(request, name):
    # DLPack, not as_numpy(): the backend's numpy bridge is built against NumPy 1's ABI and, under
    # NumPy 2, reads inputs as zeros and sends outputs empty without an error. DLPack is ABI-stable.
    return np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name))


def _tensor(name, array):
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))
'''

# Pre/post models read the bundle's I/O contract from spec.json beside them.
_WITH_SPEC = '''

class _WithSpec:
    def initialize(self, args):
        from edgeseg.runtime.spec import ModelSpec

        self.spec = ModelSpec.from_dict(json.loads((Path(__file__).parent / "spec.json").read_text()))
'''

_PYTHON_MODEL = '''"""Triton Python backend model: edgeseg's runtime serving a deploy bundle (written by edgeseg serve triton)."""
''' + _PRELUDE + '''

class TritonPythonModel:
    def initialize(self, args):
        from edgeseg.runtime import Segmenter

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / "bundle"
        self.segmenter = Segmenter(bundle, backend=params.get("backend", "auto"), threads=int(params.get("threads", "0")))

    def execute(self, requests):
        # Triton hands over the requests its dynamic batcher grouped; they are run as model batches.
        images, owners, responses = [], [], [None] * len(requests)
        for r, request in enumerate(requests):
            x = _array(request, "IMAGE")
            problem = _check(x)
            if problem:
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
                continue
            images.extend(x)
            owners.extend([r] * len(x))
        if images:
            try:
                masks = self.segmenter.predict(images)
            except Exception as e:  # one bad batch fails its requests, the server keeps serving
                for r in set(owners):
                    responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"edgeseg: {e}"))
                masks = None
            if masks is not None:
                for r in sorted(set(owners)):
                    mine = np.stack([m for m, o in zip(masks, owners) if o == r])
                    responses[r] = pb_utils.InferenceResponse(output_tensors=[_tensor("MASK", mine)])
        return responses

    def finalize(self):
        self.segmenter.close()


def _check(x):
    if x.dtype != np.uint8:
        return f"IMAGE must be uint8 RGB, got {x.dtype}"
    if x.ndim != 4 or x.shape[-1] != 3:
        return f"IMAGE must be [batch, height, width, 3], got {list(x.shape)}"
    if x.shape[1] == 0 or x.shape[2] == 0:
        return f"IMAGE is empty ({x.shape[1]}x{x.shape[2]}); send a real image"
    return None
'''


def cpu_config(name: str, max_batch: int, instances: int, max_queue_delay_us: int, threads: int = 0) -> str:
    """config.pbtxt of the Python-backend model (runs anywhere the runtime runs)."""
    return f'''# edgeseg person segmentation through edgeseg's runtime (Python backend). Triton batches
# requests of equal image size; masks come back at each image's own size.
name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }} ]
output [ {{ name: "MASK" data_type: TYPE_UINT8 dims: [ -1, -1 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters [
  {{ key: "backend" value: {{ string_value: "auto" }} }},
  {{ key: "threads" value: {{ string_value: "{threads}" }} }}
]
'''


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
        meta = json.loads(engine.with_name(engine.name + ".json").read_text())
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
    in_dims = f"[ {h}, {w}, 3 ]" if spec.fused else f"[ 3, {h}, {w} ]"
    in_type = "TYPE_UINT8" if spec.fused else "TYPE_FP32"
    out_type = "TYPE_UINT8" if spec.output == "mask" else "TYPE_FP32"
    model_io = (f'input [ {{ name: "{spec.input_name}" data_type: {in_type} dims: {in_dims} }} ]\n'
                f'output [ {{ name: "{spec.output_name}" data_type: {out_type} dims: [ 1, {h}, {w} ] }} ]\n')
    batching = (f"dynamic_batching {{ preferred_batch_size: [ {opt_batch}, {max_batch} ] "
                f"max_queue_delay_microseconds: {max_queue_delay_us} }}\n")
    gpu_group = f"instance_group [ {{ count: {instances} kind: KIND_GPU }} ]\n"
    if engine_meta:
        plan_note = (f"# model.plan: built by TensorRT {engine_meta.get('tensorrt_version')} for "
                     f"{engine_meta.get('gpu_name')} (compute capability {engine_meta.get('compute_capability')}); an "
                     "engine runs only in the TensorRT version that built it,\n# so serve it with a Triton whose "
                     f"TensorRT is {engine_meta.get('tensorrt_version')} (each Triton release names its TensorRT)\n")
    else:
        plan_note = ("# no engine yet: build it on this GPU with the TensorRT of the Triton that serves it (an engine runs "
                     "only in the\n# TensorRT version that built it): python build_engine.py in the bundle, then copy "
                     f"model.{bundle.precision}.device.engine to edgeseg_trt/1/model.plan\n")
    accelerator = " ".join(f'parameters {{ key: "{k}" value: "{v}" }}'
                           for k, v in ort_trt_accelerator(bundle, max_batch, opt_batch).items())
    return {
        "edgeseg_trt": (plan_note + f'name: "edgeseg_trt"\nplatform: "tensorrt_plan"\nmax_batch_size: {max_batch}\n'
                        + model_io + batching + gpu_group),
        "edgeseg_onnx": (f'name: "edgeseg_onnx"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch}\n' + model_io
                         + batching + gpu_group
                         + 'optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
                         + accelerator + ' } ] } }\n'),
        "edgeseg_preprocess": ('# letterbox + normalise on the CPU; PLACEMENT = top, left, height, width, src_h, src_w\n'
                               f'name: "edgeseg_preprocess"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
                               'input [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] } ]\n'
                               f'output [ {{ name: "INPUT" data_type: {in_type} dims: {in_dims} }}, '
                               '{ name: "PLACEMENT" data_type: TYPE_INT32 dims: [ 6 ] } ]\n'
                               f'instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n'),
        "edgeseg_postprocess": (f'name: "edgeseg_postprocess"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
                                f'input [ {{ name: "LOGITS" data_type: {out_type} dims: [ 1, {h}, {w} ] }}, '
                                '{ name: "PLACEMENT" data_type: TYPE_INT32 dims: [ 6 ] } ]\n'
                                'output [ { name: "MASK" data_type: TYPE_UINT8 dims: [ -1, -1 ] } ]\n'
                                f'instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n'),
        "edgeseg_gpu": (f'# preprocess (CPU) -> TensorRT (GPU) -> postprocess (CPU)\nname: "edgeseg_gpu"\n'
                        f'platform: "ensemble"\nmax_batch_size: {max_batch}\n'
                        'input [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] } ]\n'
                        'output [ { name: "MASK" data_type: TYPE_UINT8 dims: [ -1, -1 ] } ]\n'
                        'ensemble_scheduling { step [\n'
                        '  { model_name: "edgeseg_preprocess" model_version: -1 input_map { key: "IMAGE" value: "IMAGE" } '
                        'output_map { key: "INPUT" value: "model_input" } output_map { key: "PLACEMENT" value: "placement" } },\n'
                        f'  {{ model_name: "edgeseg_trt" model_version: -1 input_map {{ key: "{spec.input_name}" '
                        f'value: "model_input" }} output_map {{ key: "{spec.output_name}" value: "logits" }} }},\n'
                        '  { model_name: "edgeseg_postprocess" model_version: -1 input_map { key: "LOGITS" value: "logits" } '
                        'input_map { key: "PLACEMENT" value: "placement" } output_map { key: "MASK" value: "MASK" } }\n'
                        '] }\n'),
    }


_PRE_MODEL = '''"""Triton Python model: letterbox + normalise with edgeseg's runtime (written by edgeseg serve triton)."""
''' + _PRELUDE + _WITH_SPEC + '''

class TritonPythonModel(_WithSpec):
    def execute(self, requests):
        from edgeseg.runtime.pipeline import BatchBuffers, prepare

        out = []
        for request in requests:
            images = list(_array(request, "IMAGE"))
            feed, placements = prepare(images, self.spec, BatchBuffers(self.spec))
            place = np.array([[p.top, p.left, p.height, p.width, *p.src_hw] for p in placements], np.int32)
            out.append(pb_utils.InferenceResponse(output_tensors=[_tensor("INPUT", feed), _tensor("PLACEMENT", place)]))
        return out
'''

_POST_MODEL = '''"""Triton Python model: masks at each image's size with edgeseg's runtime (written by edgeseg serve triton)."""
''' + _PRELUDE + _WITH_SPEC + '''

class TritonPythonModel(_WithSpec):
    def execute(self, requests):
        from edgeseg.runtime.pipeline import finish
        from edgeseg.runtime.preprocess import Placement

        out = []
        for request in requests:
            logits = _array(request, "LOGITS")
            place = _array(request, "PLACEMENT")
            placements = [Placement((int(p[4]), int(p[5])), tuple(self.spec.image_size), *map(int, p[:4])) for p in place]
            masks = finish(logits, placements, self.spec)
            if len({m.shape for m in masks}) != 1:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("images of one request must share a size")))
                continue
            out.append(pb_utils.InferenceResponse(output_tensors=[_tensor("MASK", np.stack(masks))]))
        return out
'''


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
                     max_queue_delay_us: int = 2000, threads: int = 0) -> dict:
    """Write the model repository for ``bundle_dir`` into ``out`` (atomically); returns what was written."""
    bundle = Bundle(bundle_dir)  # verified: a repository is never made from a changed bundle
    spec = bundle.spec
    max_batch = max_batch or spec.max_batch
    if not 1 <= max_batch <= spec.max_batch:
        raise InputError(f"--max-batch must be in 1..{spec.max_batch} (the bundle's profile), got {max_batch}")
    if instances < 1 or max_queue_delay_us < 0:
        raise InputError(f"--instances must be >= 1 and --max-queue-delay-us >= 0, got {instances}, {max_queue_delay_us}")
    out = Path(out)
    engine, engine_meta = plan_engine(bundle, max_batch)
    tmp = staging_dir(out)
    configs = {CPU_MODEL: cpu_config(CPU_MODEL, max_batch, instances, max_queue_delay_us, threads),
               **gpu_configs(bundle, max_batch, min(spec.opt_batch, max_batch), instances, max_queue_delay_us,
                             engine_meta)}
    for name, text in configs.items():
        validate_config(text, f"{name}/config.pbtxt")
        (tmp / name / "1").mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(text)
    shutil.copytree(bundle.path, tmp / CPU_MODEL / "1" / "bundle")
    (tmp / CPU_MODEL / "1" / "model.py").write_text(_PYTHON_MODEL)
    for name, code in (("edgeseg_preprocess", _PRE_MODEL), ("edgeseg_postprocess", _POST_MODEL)):
        (tmp / name / "1" / "model.py").write_text(code)
        (tmp / name / "1" / "spec.json").write_text(json.dumps(spec.to_dict()))
    onnx = bundle.file("int8" if bundle.precision == "int8" else "fp32") or bundle.file("fp32")
    shutil.copyfile(onnx, tmp / "edgeseg_onnx" / "1" / "model.onnx")
    if engine is not None:
        shutil.copyfile(engine, tmp / "edgeseg_trt" / "1" / "model.plan")
    replace_dir(tmp, out)
    log.info("Triton repository (%s, max batch %d, %d instance(s)) -> %s", ", ".join(configs), max_batch, instances, out)
    return {"repository": str(out), "models": sorted(configs), "served_here": CPU_MODEL, "max_batch": max_batch,
            "engine_included": engine is not None}
