"""Static INT8 quantization with ONNX Runtime's tools: Q/DQ models calibrated on image arrays.

Two flavours from the same calibration: ``s8s8`` (symmetric int8 activations and weights,
zero-point 0: what TensorRT needs) and ``u8s8`` (uint8 activations, int8 weights: what ONNX
Runtime's CPU kernels run fastest). Nothing here is a hand-written quantizer: ranges, scales
and Q/DQ placement are ORT's (``quantize_static``).

Calibration (running the model with every tensor as an output over the set, then ORT's min/max or
histogram) is most of a quantization's time, and its result depends only on the float model, the
images, the method and its settings: not on the flavour or on which nodes stay in float. With a
``ranges_cache`` folder the ranges are computed once per such key and reused through
``quantize_static``'s ``calibration_cache_path`` (ORT >= 1.32; older versions calibrate every time).
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import sha256_file

log = logging.getLogger(__name__)

Flavour = Literal["s8s8", "u8s8"]
METHODS = ("minmax", "entropy", "percentile")


class ArrayReader:
    """ORT ``CalibrationDataReader`` over precomputed input batches."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self.input_name = input_name
        self.batches = list(batches)
        self._i = 0

    def get_next(self):
        if self._i >= len(self.batches):
            return None
        self._i += 1
        return {self.input_name: self.batches[self._i - 1]}

    def rewind(self):
        self._i = 0

    def __iter__(self):
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def batches_of(images: np.ndarray, to_input: Callable[[np.ndarray], np.ndarray], batch: int = 16) -> list[np.ndarray]:
    """Model inputs for (N, H, W, 3) uint8 images, ``batch`` at a time."""
    return [to_input(images[i:i + batch]) for i in range(0, len(images), batch)]


def input_name(model_path: str | Path) -> str:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def preprocess_for_quantization(fp32_path: str | Path, out_path: str | Path) -> Path:
    """ORT's ``quant_pre_process`` (shape inference + graph optimisation) into ``out_path``.

    Node names in its output are the ones ``exclude_nodes`` must use.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return Path(out_path)


def quantize_qdq(fp32_path: str | Path, out_path: str | Path, batches: Sequence[np.ndarray], method: str = "minmax",
                 flavour: Flavour = "s8s8", exclude_nodes: Iterable[str] = (), percentile: float = 99.999,
                 per_channel: bool = True, preprocessed: bool = False, ranges_cache: str | Path | None = None) -> Path:
    """Write a Q/DQ model of ``fp32_path`` calibrated on ``batches`` (model inputs).

    Args:
        method: minmax, entropy or percentile (ORT's calibrators).
        flavour: s8s8 (symmetric, for TensorRT) or u8s8 (for ONNX Runtime CPU).
        exclude_nodes: node names kept in float (the accuracy budget's choice), as named in the
            pre-processed model (see :func:`preprocess_for_quantization`).
        preprocessed: ``fp32_path`` already went through :func:`preprocess_for_quantization`.
        ranges_cache: a folder of calibration ranges keyed by model, images and method (module docstring);
            None calibrates from scratch.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise InputError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if not batches:
        raise InputError("quantization needs at least one calibration batch; the calibration set is empty")
    out_path = Path(out_path)
    t0 = time.perf_counter()
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    extra = {"ActivationSymmetric": flavour == "s8s8", "WeightSymmetric": True,
             # s8s8 is TensorRT's model: its ONNX parser takes DequantizeLinear only on int8/fp8/int4
             # inputs, not the int32 bias ORT writes by default (ORT issue 17738, onnx-tensorrt issue
             # 850), so Conv biases stay float there; TensorRT fuses them into its INT8 kernels anyway.
             "QuantizeBias": flavour != "s8s8"}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    with tempfile.TemporaryDirectory(prefix="edgeseg-q-") as tmp:
        pre = Path(fp32_path) if preprocessed else preprocess_for_quantization(fp32_path, Path(tmp) / "pre.onnx")
        reader = ArrayReader(input_name(pre), batches)
        partial = Path(tmp) / "q.onnx"
        cached = _cached_ranges(ranges_cache, pre, batches, method, percentile if method == "percentile" else None)
        hit = cached is not None and cached.is_file()
        fresh = Path(tmp) / "ranges.json"  # ORT writes a miss here; it joins the cache only once whole
        cache_arg = {} if cached is None else {"calibration_cache_path": str(cached if hit else fresh)}
        quantize_static(str(pre), str(partial), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8 if flavour == "s8s8" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=calib, nodes_to_exclude=list(exclude_nodes),
                        extra_options=extra, **cache_arg)
        if cached is not None and not hit and fresh.is_file():
            staged = cached.with_name(cached.name + ".tmp")
            shutil.copyfile(fresh, staged)
            os.replace(staged, cached)
        _copy_metadata(fp32_path, partial)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, out_path)
    log.info("quantized %s (%s, %s, %d float nodes%s) in %.1f s -> %s", Path(fp32_path).name, flavour, method,
             len(list(exclude_nodes)), ", cached ranges" if hit else "", time.perf_counter() - t0, out_path)
    return out_path


def _cached_ranges(folder: str | Path | None, pre: Path, batches: Sequence[np.ndarray], method: str,
                   percentile: float | None) -> Path | None:
    """The cache file for these calibration ranges (existing or not), or None when not caching."""
    from onnxruntime.quantization import quantize_static

    if folder is None or "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        return None
    h = hashlib.sha256(sha256_file(pre).encode())
    for b in batches:
        h.update(str(b.shape).encode() + str(b.dtype).encode())
        h.update(np.ascontiguousarray(b).tobytes())
    h.update(f"{method}:{percentile}".encode())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"ranges-{method}-{h.hexdigest()[:20]}.json"


def activation_scales(qdq_path: str | Path) -> dict[str, float]:
    """Activation tensor name -> int8 scale, read from the QuantizeLinear nodes of a Q/DQ model."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(qdq_path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    scales = {}
    for node in m.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            scale = inits.get(node.input[1])
            if scale is not None and scale.size == 1:
                scales[node.input[0]] = float(scale)
    return scales


def _copy_metadata(src: str | Path, dst: str | Path) -> None:
    """Carry the float model's ``metadata_props`` (I/O contract, config) into the quantized one."""
    import onnx

    a = onnx.load(str(src), load_external_data=False)
    b = onnx.load(str(dst))
    have = {p.key for p in b.metadata_props}
    for p in a.metadata_props:
        if p.key not in have:
            b.metadata_props.add(key=p.key, value=p.value)
    onnx.save(b, str(dst))
