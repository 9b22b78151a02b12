"""A DeepStream ``nvinfer`` configuration (and the ONNX it needs) from a deploy bundle.

``nvinfer`` preprocesses with one ``net-scale-factor`` and per-channel ``offsets``:
``y = net-scale-factor * (x - offsets)``, which cannot express ImageNet's per-channel std. So the
DeepStream ONNX carries the normalisation inside the graph: its input is float NCHW RGB in
[0, 255] and the config's scale is 1 and offsets 0. The segmentation output is read by
nvinfer's default parser (``network-type=2``): per pixel, the class whose value exceeds
``segmentation-threshold``; our model has one channel of logits (or probabilities), so the
threshold is written in the output's own units (``log(t / (1 - t))`` for logits).
Keys follow the DeepStream ``Gst-nvinfer`` documentation's property table.
"""
from __future__ import annotations

import math
from pathlib import Path

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


def normalised_onnx(src: Path, dst: Path, mean, std) -> Path:
    """``src`` with ``(x / 255 - mean) / std`` in front: input float NCHW RGB in [0, 255]."""
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
    del g.node[:]
    g.node.extend(nodes + old)
    g.input.remove(inp)
    g.input.insert(0, new_input)
    onnx.checker.check_model(model)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    return dst


def write_config(bundle_dir: str | Path, out: str | Path, batch_size: int | None = None, gpu_id: int = 0) -> dict:
    """Write ``config_infer_edgeseg.txt`` and ``model.deepstream.onnx`` into ``out``; returns the key values."""
    bundle = Bundle(bundle_dir)
    spec = bundle.spec
    if spec.fused:
        raise InputError(f"{bundle_dir}: its model takes uint8 NHWC (fused preprocessing); nvinfer feeds float NCHW. "
                         "Re-export with export.fuse_preprocessing: false for DeepStream")
    if spec.output == "mask":
        raise InputError(f"{bundle_dir}: its model outputs a uint8 mask; nvinfer's parser reads a float map. "
                         "Re-export with export.output: logits (or probabilities)")
    batch = batch_size or spec.max_batch
    if not 1 <= batch <= spec.max_batch:
        raise InputError(f"--batch-size must be in 1..{spec.max_batch} (the bundle's profile), got {batch}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = normalised_onnx(bundle.file("fp32"), out / "model.deepstream.onnx", spec.mean, spec.std)
    precision = bundle.precision
    threshold = (math.log(spec.threshold / (1 - spec.threshold)) if spec.output == "logits" else spec.threshold)
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
        "output-blob-names": spec.output_name,
        "segmentation-threshold": round(threshold, 6),
        "segmentation-output-order": 0,  # NCHW
        "infer-dims": f"3;{h};{w}",
        "maintain-aspect-ratio": int(spec.resize == "letterbox"),
        "symmetric-padding": 1,  # centred letterbox, as edgeseg's runtime pads
        "gie-unique-id": 1,
        "process-mode": 1,
        "interval": 0,
    }
    calib = bundle.file("calibration-cache")
    if precision == "int8" and calib is not None:
        import shutil

        shutil.copyfile(calib, out / "calibration.cache")
        values["int8-calib-file"] = "calibration.cache"
    unknown = set(values) - NVINFER_KEYS
    if unknown:  # a guard on this module itself
        raise AssertionError(f"not nvinfer keys: {sorted(unknown)}")
    lines = [
        "# edgeseg person segmentation for DeepStream nvinfer (written by `edgeseg serve deepstream`).",
        "# The ONNX normalises inside the graph (x / 255 - mean) / std, so net-scale-factor is 1 and",
        "# offsets are 0: nvinfer's one scale and per-channel offsets cannot express per-channel std.",
        f"# segmentation-threshold is in the output's units ({spec.output}): "
        + (f"log(t / (1 - t)) for t = {spec.threshold}." if spec.output == "logits" else f"t = {spec.threshold}."),
        "# int8-calib-file is the TensorRT 10 calibration cache (JetPack 6); TensorRT 11 needs the Q/DQ ONNX.",
        "[property]",
        *[f"{k}={v}" for k, v in values.items()],
    ]
    write_text_atomic(out / "config_infer_edgeseg.txt", "\n".join(lines) + "\n")
    return {"config": str(out / "config_infer_edgeseg.txt"), "onnx": str(onnx_path), **values}


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
