"""Export benchmarks: ONNX Runtime CPU latency of FP32, s8s8 and u8s8 models, sizes and node counts.

Besides the shipped models, a few u8s8 variants answer where INT8 pays on this CPU
(QOperator vs Q/DQ, quantizing only convolutions); each is calibrated on the same set.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.timing import interleaved, ratio
from distill.config import Config


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _variants(d: Path, tmp: Path, cfg: Config) -> dict[str, Path]:
    """The u8s8 alternatives, from the same calibration set."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from calibration.quantize import ArrayReader, batches_of, input_name
    from calibration.synth import load_calibration_images
    from export.int8 import input_transform
    from runtime.spec import ModelSpec

    spec = ModelSpec.from_onnx(d / "model.onnx")
    images = load_calibration_images(cfg.stage_dir("calibration") / "synthetic", tuple(spec.image_size), limit=64)
    batches = batches_of(images, input_transform(spec))
    pre = d / "model.pre.onnx"
    out = {}
    for name, fmt, ops in (("u8s8_qoperator", QuantFormat.QOperator, None), ("u8s8_qdq_conv_only", QuantFormat.QDQ, ["Conv"]),
                           ("u8s8_qoperator_conv_only", QuantFormat.QOperator, ["Conv"])):
        path = tmp / f"{name}.onnx"
        quantize_static(str(pre), str(path), ArrayReader(input_name(pre), batches), quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=ops)
        out[name] = path
    return out


def run(cfg: Config, rounds: int = 20) -> dict:
    d = cfg.stage_dir("export")
    models = {"fp32": d / "model.onnx", "s8s8": d / "model.int8.onnx", "u8s8": d / "model.int8-cpu.onnx"}
    missing = [str(p) for p in models.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"run `make export` first: {', '.join(missing)}")
    onnx_report = json.loads((d / "onnx.json").read_text())
    out = {"image_size": list(cfg.data.image_size),
           "files_mb": {k: p.stat().st_size / 2**20 for k, p in models.items()},
           "nodes_before_onnxsim": onnx_report["nodes_before_onnxsim"],
           "nodes_after_onnxsim": onnx_report["nodes_after_onnxsim"]}
    h, w = cfg.data.image_size
    with tempfile.TemporaryDirectory() as tmp:
        variants = {**models, **_variants(d, Path(tmp), cfg)}
        for threads in (1, 2):
            sessions = {k: _session(p, threads) for k, p in variants.items()}
            for batch in (1, 8):
                x = np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)
                res = interleaved({k: (lambda s=s: s.run(None, {"images": x})) for k, s in sessions.items()}, rounds=rounds)
                key = f"threads_{threads}_batch_{batch}"
                out[key] = {k: {"median_ms": r["median_ms"], "speedup_vs_fp32": ratio(res, "fp32", k)}
                            for k, r in res.items()}
    # headline figures: batch 8, one thread (steadier); the 2-thread table is kept beside it
    b8 = out["threads_1_batch_8"]
    out["u8s8_vs_fp32_speedup_batch8"] = b8["u8s8"]["speedup_vs_fp32"]
    out["s8s8_vs_fp32_speedup_batch8"] = b8["s8s8"]["speedup_vs_fp32"]
    out["best_u8s8_variant_batch8"] = max((k for k in b8 if k.startswith("u8s8")), key=lambda k: b8[k]["speedup_vs_fp32"])
    return out
