"""Export benchmarks: ONNX Runtime CPU latency of FP32, s8s8 and u8s8 models, sizes and node counts.

Besides the shipped models, a few u8s8 variants answer where INT8 pays on this CPU
(QOperator vs Q/DQ, quantizing only convolutions); each is calibrated on the same set.
``activation_sweep`` times the student's architecture with SiLU (EfficientNet's own) and ReLU
encoders, FP32 vs u8s8: ONNX Runtime runs a quantized SiLU as a table Sigmoid plus an INT8 Mul,
while ReLU folds into the INT8 convolution. Latency does not depend on the weights' values, so
those students are untrained (batch-norm statistics set on the calibration images).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.timing import SETTLE_S, interleaved, ratio, with_spread
from edgeseg.export.config import Config
from edgeseg.runtime.sessions import cpu_session


def _variants(d: Path, tmp: Path, cfg: Config) -> dict[str, Path]:
    """The u8s8 alternatives, from the same calibration set."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from edgeseg.calibration.quantize import ArrayReader, batches_of, input_name
    from edgeseg.calibration.synth import load_calibration_images
    from edgeseg.export.int8 import input_transform
    from edgeseg.runtime.spec import ModelSpec

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


def _activation_sweep(cfg: Config, tmp: Path, rounds: int) -> dict:
    """FP32 and u8s8 latency (batch 8, default threads and 1 thread) of the configured student with each activation."""
    import dataclasses

    import torch

    from edgeseg.calibration.quantize import batches_of, quantize_qdq
    from edgeseg.calibration.synth import load_calibration_images
    from edgeseg.distill.models import build_model
    from edgeseg.distill.onnx_export import export_module
    from edgeseg.export.onnx_model import simplify
    from edgeseg.runtime.preprocess import normalise_batch

    h, w = cfg.data.image_size
    images = load_calibration_images(cfg.stage_dir("calibration") / "synthetic", (h, w), limit=64)
    batches = batches_of(images, lambda b: normalise_batch(b, cfg.data.mean, cfg.data.std))
    models = {}
    for act in ("silu", "relu"):
        torch.manual_seed(0)
        student = build_model(dataclasses.replace(cfg.student, activation=act, encoder_weights="none",
                                                   freeze_encoder=False)).train()
        with torch.no_grad():  # batch-norm statistics of real inputs keep the activation ranges sane
            for b in batches:
                student(torch.from_numpy(b))
        raw = export_module(student.eval(), tmp / f"{act}.raw.onnx", torch.from_numpy(batches[0][:1]), ["images"], ["logits"])
        fp32 = simplify(raw, tmp / f"{act}.onnx")
        models[f"{act}_fp32"] = fp32
        models[f"{act}_u8s8"] = quantize_qdq(fp32, tmp / f"{act}.u8s8.onnx", batches, flavour="u8s8")
    x = np.random.default_rng(0).standard_normal((8, 3, h, w)).astype(np.float32)
    out = {}
    for threads, tag in ((0, "default_threads"), (1, "threads_1")):
        sessions = {k: cpu_session(p, threads) for k, p in models.items()}
        res = interleaved({k: (lambda s=s: s.run(None, {"images": x})) for k, s in sessions.items()}, rounds=rounds,
                              settle_s=SETTLE_S)
        out[tag] = {act: {"fp32_ms": res[f"{act}_fp32"]["median_ms"], "u8s8_ms": res[f"{act}_u8s8"]["median_ms"],
                          "u8s8_vs_fp32": ratio(res, f"{act}_fp32", f"{act}_u8s8"),
                          "u8s8_vs_silu_fp32": ratio(res, "silu_fp32", f"{act}_u8s8")} for act in ("silu", "relu")}
    return out


def budget_study(cfg: Config, budget_points: float = 0.0) -> dict:
    """The demo student with a lossless budget (``export.max_miou_drop=0``): plain INT8 misses it on
    val whenever it changes a single pixel, so the search must keep nodes in float. Nodes are chosen
    on val; the plain and mixed models are then scored on test and test_shift."""
    import dataclasses
    import shutil

    from edgeseg.calibration.quantize import batches_of
    from edgeseg.calibration.synth import load_calibration_images
    from edgeseg.distill.data import report_splits
    from edgeseg.export.accuracy import miou_of, onnx_runner, predict_masks
    from edgeseg.export.int8 import calibration_provenance, input_transform, run_budget
    from edgeseg.export.stage import eval_set, validation_set
    from edgeseg.runtime.spec import ModelSpec

    src = cfg.stage_dir("export")
    tight = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, max_miou_drop=budget_points))
    spec = ModelSpec.from_onnx(src / "model.onnx")
    calib_dir = cfg.stage_dir("calibration") / "synthetic"
    calib = load_calibration_images(calib_dir, tuple(spec.image_size), limit=cfg.export.calibration_images)
    batches = batches_of(calib, input_transform(spec))
    val = validation_set(cfg)
    splits = report_splits(cfg)[0]
    sets = {s: eval_set(cfg, s) for s in splits}
    cal = calibration_provenance(calib_dir, cfg.export.calibration_images)  # the set it measured (a rerun says which)
    out = {"budget_points": budget_points, "selection_split": "val", "report_splits": splits, "calibration": cal}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for f in ("model.onnx", "model.pre.onnx", "model.int8.onnx", "model.int8-cpu.onnx"):
            shutil.copyfile(src / f, d / f)
        for flavour, plain in (("s8s8", "model.int8.onnx"), ("u8s8", "model.int8-cpu.onnx")):
            b = run_budget(tight, d, d / "model.pre.onnx", d / plain, batches, val, flavour, calibration=cal)
            row = {"val": {k: b[k] for k in ("fp32_miou", "int8_miou", "mixed_miou", "met")},
                   "float_nodes": [f["node"] for f in b["float_nodes"]], "trials": b["trials"]}
            for split, (images, gts) in sets.items():
                row[split] = {name: miou_of(predict_masks(onnx_runner(d / f), images), gts)
                              for name, f in (("fp32", "model.onnx"), ("plain", plain), ("mixed", Path(b["model"]).name))}
            out[flavour] = row
    return out


def hardware_shares(models: dict[str, Path], hw: tuple[int, int], timings: dict) -> dict:
    """Achieved arithmetic at batch 8 beside the CPU's peak (``int8_share_of_peak``, ``fp32_share_of_peak``), at
    the default thread count and at 1 thread, and where the u8s8 model's time goes by kind of op."""
    import onnxruntime as ort

    from benchmarks.hardware import cpu_peak, model_macs, op_time_split, share_of_peak

    work = model_macs(models["fp32"], hw)
    out = {"macs_per_image": work["macs_per_image"], "macs_by_kind": work["by_kind"]}
    for tag, cores in (("default", None), ("1", 1)):
        peak = cpu_peak(cores=cores)
        b8 = timings[f"threads_{tag}_batch_8"]
        fig = {"peak": peak,
               "int8_share_of_peak": share_of_peak(work["macs_per_image"], 8, b8["u8s8"]["median_ms"], peak["int8_peak_gops"]),
               "fp32_share_of_peak": share_of_peak(work["macs_per_image"], 8, b8["fp32"]["median_ms"], peak["fp32_peak_gflops"])}
        if "amx_int8_peak_gops" in peak:
            fig["int8_share_of_amx_peak"] = share_of_peak(work["macs_per_image"], 8, b8["u8s8"]["median_ms"],
                                                          peak["amx_int8_peak_gops"])
        if tag == "default":
            out.update(fig)
        else:
            out["threads_1"] = fig
    x = np.random.default_rng(0).standard_normal((8, 3, *hw)).astype(np.float32)
    out["u8s8_time_by_kind"] = op_time_split(
        lambda so: ort.InferenceSession(str(models["u8s8"]), so, providers=["CPUExecutionProvider"]),
        {"images": x}, work["node_kind"])
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
        headline = {}
        for threads in (0, 1):  # 0: ONNX Runtime's default, every core (the headline); 1 thread beside it
            sessions = {k: cpu_session(p, threads) for k, p in variants.items()}
            tag = "default" if threads == 0 else "1"
            for batch in (1, 8):
                x = np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)
                res = interleaved({k: (lambda s=s: s.run(None, {"images": x})) for k, s in sessions.items()}, rounds=rounds,
                              settle_s=SETTLE_S)
                out[f"threads_{tag}_batch_{batch}"] = {
                    k: {"median_ms": r["median_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
                        "speedup_vs_fp32": ratio(res, "fp32", k)} for k, r in res.items()}
                if batch == 8:
                    h8: dict = {}
                    with_spread(h8, "u8s8_vs_fp32_speedup_batch8", res, "fp32", "u8s8")
                    with_spread(h8, "s8s8_vs_fp32_speedup_batch8", res, "fp32", "s8s8")
                    b8 = out[f"threads_{tag}_batch_8"]
                    h8["best_u8s8_variant_batch8"] = max((k for k in b8 if k.startswith("u8s8")),
                                                         key=lambda k: b8[k]["speedup_vs_fp32"])
                    headline[tag] = h8
        out["activation_sweep"] = _activation_sweep(cfg, Path(tmp), rounds)
    out["student_activation"] = cfg.student.activation
    out["default_threads"] = os.cpu_count()
    out["hardware"] = hardware_shares(models, (h, w), out)
    out.update({k: out["hardware"][k] for k in ("int8_share_of_peak", "fp32_share_of_peak")})
    # headline figures: batch 8 at the machine's default thread count; the 1-thread ones in threads_1
    out.update(headline["default"])
    out["threads_1"] = headline["1"]
    out["budget_study"] = budget_study(cfg)
    return out
