"""A DeepStream ``nvinfer`` configuration (and the ONNX it needs) from a deploy bundle.

``nvinfer`` preprocesses with one ``net-scale-factor`` and per-channel ``offsets``:
``y = net-scale-factor * (x - offsets)``, which cannot express ImageNet's per-channel std. So the
DeepStream ONNX carries the normalisation inside the graph: its input is float NCHW RGB in
[0, 255] and the config's scale is 1 and offsets 0.

The segmentation output is read by nvinfer's default parser (``network-type=2``): per pixel,
the class whose value is the largest *and* above ``segmentation-threshold`` (starting from -1),
else no class. The threshold must be a probability: nvinfer refuses a negative one ("Negative
value specified for segmentation-threshold"), which ``logit(t)`` is for t < 0.5, and a logit
below -1 could never win anyway. So a logits model gets a Sigmoid at its end in the DeepStream
ONNX, whose output is then probabilities and the threshold is the bundle's t in [0, 1].

INT8: ``int8-calib-file`` is an implicit-INT8 calibration cache, which exists only up to
TensorRT 10 (removed in 11). Its header names the TensorRT version that must read it, and
TensorRT ignores a cache of another version (nvinfer then has no images to calibrate with), so
the cache is rewritten for the target TensorRT (``trt_version``) with only the tensors of the
DeepStream ONNX. For TensorRT 11+ the config asks for FP16 (``network-mode=2``) and says why.
Keys follow the DeepStream ``Gst-nvinfer`` documentation's property table.
"""
from __future__ import annotations

from pathlib import Path

from edgeseg.export.trt_cache import DEFAULT_TRT_VERSION, version_code
from edgeseg.runtime.bundle import Bundle
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path, write_text_atomic

# Gst-nvinfer configuration keys (DeepStream documentation, "Gst-nvinfer File Configuration Specifications")
NVINFER_KEYS = {
    "gpu-id", "net-scale-factor", "offsets", "model-color-format", "onnx-file", "model-engine-file",
    "int8-calib-file", "batch-size", "network-mode", "network-type", "num-detected-classes", "interval",
    "gie-unique-id", "output-blob-names", "segmentation-threshold", "segmentation-output-order", "infer-dims",
    "maintain-aspect-ratio", "symmetric-padding", "process-mode", "output-tensor-meta", "workspace-size",
    "scaling-filter", "scaling-compute-hw", "cluster-mode", "labelfile-path", "uff-input-order",
}
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}


PROBABILITIES = "mask_probs"  # the Sigmoid's output in the DeepStream ONNX of a logits model (edgeseg's name)


def normalised_onnx(src: Path, dst: Path, mean, std, sigmoid: bool = False) -> Path:
    """``src`` with ``(x / 255 - mean) / std`` in front: input float NCHW RGB in [0, 255].

    ``sigmoid``: also turn the (single) logits output into probabilities, output ``mask_probs``.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inp = g.input[0]
    raw = inp.name + "_raw"
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(1, 3, 1, 1)
    bias = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, 3, 1, 1)
    g.initializer.extend([numpy_helper.from_array(scale, "ds_scale"), numpy_helper.from_array(bias, "ds_bias")])
    scaled = inp.name + "_scaled"
    nodes = [helper.make_node("Mul", [raw, "ds_scale"], [scaled], name="ds_normalise_scale"),
             helper.make_node("Add", [scaled, "ds_bias"], [inp.name], name="ds_normalise_bias")]
    new_input = helper.make_tensor_value_info(raw, onnx.TensorProto.FLOAT,
                                              [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim])
    old = list(g.node)
    tail = []
    if sigmoid:
        out = g.output[0]
        tail = [helper.make_node("Sigmoid", [out.name], [PROBABILITIES], name="ds_sigmoid")]
        probs = helper.make_tensor_value_info(PROBABILITIES, onnx.TensorProto.FLOAT,
                                              [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim])
        g.output.remove(out)
        g.output.insert(0, probs)
    del g.node[:]
    g.node.extend(nodes + old + tail)
    g.input.remove(inp)
    g.input.insert(0, new_input)
    onnx.checker.check_model(model)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    return dst


def _calibration_cache(cache: Path, onnx_path: Path, out: Path, trt_version: str) -> int:
    """Rewrite ``cache`` for ``trt_version`` with only the tensors of ``onnx_path``; returns how many are kept."""
    import onnx

    from edgeseg.export.trt_cache import read_cache, write_cache

    _, scales = read_cache(cache)
    g = onnx.load(str(onnx_path)).graph
    names = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    kept = {n: s for n, s in scales.items() if n in names}
    if not kept:
        raise InputError(f"{cache}: none of its tensors is in {onnx_path.name}; re-export the model and its "
                         "calibration together (make export deploy)")
    write_cache(kept, out, trt_version)
    return len(kept)


def write_config(bundle_dir: str | Path, out: str | Path, batch_size: int | None = None, gpu_id: int = 0,
                 trt_version: str = DEFAULT_TRT_VERSION) -> dict:
    """Write ``config_infer_edgeseg.txt`` and ``model.deepstream.onnx`` into ``out``; returns the key values.

    Args:
        trt_version: the TensorRT the DeepStream host runs (DeepStream 7.1 / JetPack 6.1-6.2: 10.3.0).
            It decides whether INT8 can be implicit (TensorRT <= 10: calibration cache) and is
            written into the cache's header.
    """
    bundle = Bundle(bundle_dir)
    spec = bundle.spec
    if spec.fused:
        raise InputError(f"{bundle_dir}: its model takes uint8 NHWC (fused preprocessing); nvinfer feeds float NCHW. "
                         "Re-export with export.fuse_preprocessing: false for DeepStream")
    if spec.output == "mask":
        raise InputError(f"{bundle_dir}: its model outputs a uint8 mask; nvinfer's parser reads a float map. "
                         "Re-export with export.output: logits (or probabilities)")
    if not 0.0 <= spec.threshold <= 1.0:
        raise InputError(f"{bundle_dir}: threshold {spec.threshold} is not a probability; re-export with "
                         "export.threshold in [0, 1]")
    batch = batch_size or spec.max_batch
    if not 1 <= batch <= spec.max_batch:
        raise InputError(f"--batch-size must be in 1..{spec.max_batch} (the bundle's profile), got {batch}")
    implicit_int8 = version_code(trt_version) < 110000  # TensorRT 11 removed implicit INT8 (calibrators, caches)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logits = spec.output == "logits"
    onnx_path = normalised_onnx(bundle.file("fp32"), out / "model.deepstream.onnx", spec.mean, spec.std, sigmoid=logits)
    precision = bundle.precision
    notes = []
    calib = bundle.file("calibration-cache")
    if precision == "int8" and not implicit_int8:
        precision = "fp16"
        notes.append(f"# network-mode=2 (FP16), not INT8: TensorRT {trt_version} has no implicit INT8 (removed in 11.0), "
                     "so nvinfer cannot\n# calibrate this FP32 ONNX; for INT8 there, build the engine from the bundle's "
                     "Q/DQ ONNX (python build_engine.py)\n# and point model-engine-file at it.")
    elif precision == "int8" and calib is None:
        raise InputError(f"{bundle_dir}: an int8 bundle without its calibration cache; rebuild it with `make deploy`")
    h, w = spec.image_size
    values = {
        "gpu-id": gpu_id,
        "net-scale-factor": 1.0,  # the normalisation is inside model.deepstream.onnx
        "offsets": "0;0;0",
        "model-color-format": 0,  # RGB
        "onnx-file": onnx_path.name,
        "model-engine-file": f"model.deepstream.onnx_b{batch}_gpu{gpu_id}_{precision}.engine",
        "batch-size": batch,
        "network-mode": NETWORK_MODE[precision],
        "network-type": 2,  # segmentation
        "num-detected-classes": 1,
        "output-blob-names": PROBABILITIES if logits else spec.output_name,
        "segmentation-threshold": spec.threshold,  # a probability: the output is probabilities
        "segmentation-output-order": 0,  # NCHW
        "infer-dims": f"3;{h};{w}",
        "maintain-aspect-ratio": int(spec.resize == "letterbox"),
        "symmetric-padding": 1,  # centred letterbox, as edgeseg's runtime pads
        "gie-unique-id": 1,
        "process-mode": 1,
        "interval": 0,
    }
    calibration_tensors = None
    if precision == "int8":
        calibration_tensors = _calibration_cache(calib, onnx_path, out / "calibration.cache", trt_version)
        values["int8-calib-file"] = "calibration.cache"
    unknown = set(values) - NVINFER_KEYS
    if unknown:  # a guard on this module itself
        raise AssertionError(f"not nvinfer keys: {sorted(unknown)}")
    lines = [
        "# edgeseg person segmentation for DeepStream nvinfer (written by `edgeseg serve deepstream`).",
        f"# For a DeepStream host with TensorRT {trt_version}.",
        "# The ONNX normalises inside the graph (x / 255 - mean) / std, so net-scale-factor is 1 and",
        "# offsets are 0: nvinfer's one scale and per-channel offsets cannot express per-channel std.",
        "# Its output is probabilities" + (" (a Sigmoid after the model's logits)" if logits else "")
        + f": a pixel is a person where it exceeds segmentation-threshold = {spec.threshold}.",
        *([f"# int8-calib-file: the bundle's scales for TensorRT {trt_version} (a cache of another version is "
           "ignored by TensorRT);\n# rewrite it for another version with --tensorrt-version."] if precision == "int8" else []),
        *notes,
        "[property]",
        *[f"{k}={v}" for k, v in values.items()],
    ]
    write_text_atomic(out / "config_infer_edgeseg.txt", "\n".join(lines) + "\n")
    return {"config": str(out / "config_infer_edgeseg.txt"), "onnx": str(onnx_path), "tensorrt_version": trt_version,
            "calibration_tensors": calibration_tensors, **values}


def read_config(path: str | Path) -> dict[str, str]:
    """The ``[property]`` keys of an nvinfer config file."""
    values, section = {}, None
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "property":
            k, _, v = line.partition("=")
            values[k.strip()] = v.strip()
    return values
