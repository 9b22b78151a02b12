"""INT8 artifacts from one calibration set, and the accuracy budget that keeps sensitive nodes in float.

From the calibration folder: ``model.int8.onnx`` (s8s8, symmetric: TensorRT and the accuracy
report), ``model.int8-cpu.onnx`` (u8s8: ONNX Runtime CPU) and ``calibration.cache`` (TensorRT 10
implicit INT8, from the s8s8 model's own scales). With ``contrast=True`` also the same s8s8
model calibrated on as many real training images and on uniform noise, for the report.

Accuracy budget, for each flavour (s8s8 for TensorRT, u8s8 for the CPU runtime): if it loses
more than ``max_miou_drop`` mIoU points against FP32 on the validation split (selection only;
reports use test), nodes are ranked by the SQNR of their output's own quantization (pre- vs
post-Q/DQ, ORT's ``qdq_loss_debug``) on the first quarter of the calibration set (images that
also calibrate the model: a ranking of quantization error, not a held-out measurement), and the
worst are kept in float, doubling their number until the budget holds and then bisecting down to
the fewest that do. The chosen models are ``model.int8-mixed.onnx`` and ``model.int8-cpu-mixed.onnx``.

``quantize.json`` records which calibration set made the models (``calibration``: folder, images
used and a hash of their bytes, the set's generator from its manifest) and the SHA-256 of the
``model.onnx`` they were quantized from, so the accuracy report scores only what this run wrote.

Calibration matrix (``contrast=True``): both flavours x {minmax, percentile} x {synthetic, real
training images, uniform noise} under ``matrix/``, so the accuracy report can show whether the
calibration source matters at all.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgeseg.calibration.quantize import activation_scales, batches_of, preprocess_for_quantization, quantize_qdq
from edgeseg.calibration.report import noise_images, real_images
from edgeseg.calibration.synth import load_calibration_images
from edgeseg.export.config import Config
from edgeseg.export.trt_rules import check_for_tensorrt
from edgeseg.export.accuracy import miou_of, onnx_runner, predict_masks
from edgeseg.export.trt_cache import write_cache
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import sha256_file, write_json_atomic
from edgeseg.runtime.images import list_images
from edgeseg.runtime.preprocess import normalise_batch
from edgeseg.runtime.spec import ModelSpec

log = logging.getLogger(__name__)


def input_transform(spec: ModelSpec) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 NHWC batch -> what the model's input takes."""
    if spec.fused:
        return lambda b: np.ascontiguousarray(b)
    return lambda b: normalise_batch(b, spec.mean, spec.std)


_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish")
_FUSED_PRODUCERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def fused_producers(pre_fp32: Path) -> dict[str, str]:
    """Activation node -> the Conv/MatMul feeding it, for the pairs ONNX Runtime quantizes as one unit.

    Conv -> Relu has no Q/DQ between them (the activation folds into the INT8 convolution), so
    the quantized tensor of that pair is the activation's output. Keeping only the activation
    in float would leave the convolution quantized: both must go (see :func:`with_fused`).
    """
    import onnx

    graph = onnx.load(str(pre_fp32)).graph
    producer = {o: n for n in graph.node for o in n.output}
    pairs = {}
    for node in graph.node:
        if node.op_type in _ACTIVATIONS and node.input:
            src = producer.get(node.input[0])
            if src is not None and src.op_type in _FUSED_PRODUCERS:
                pairs[node.name] = src.name
    return pairs


def with_fused(nodes: list[str], pairs: dict[str, str]) -> list[str]:
    """``nodes`` plus the fused producer of each activation among them."""
    out = list(nodes)
    out += [pairs[n] for n in nodes if n in pairs and pairs[n] not in out]
    return out


def node_sensitivity(pre_fp32: Path, qdq: Path, batches: list[np.ndarray], work: Path) -> list[tuple[str, float]]:
    """(node name, SQNR dB of its output's quantization) for the pre-processed FP32 model, worst first."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                         compute_signal_to_quantization_noice_ratio,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    from edgeseg.calibration.quantize import ArrayReader, input_name

    aug = work / "qdq.aug.onnx"
    modify_model_output_intermediate_tensors(str(qdq), str(aug))
    acts = collect_activations(str(aug), ArrayReader(input_name(qdq), batches))
    # each tensor's own quantization error: its value before vs after its Q/DQ pair (SQNR, dB).
    # (compute_activation_error also wants the float model's activations, which this does not need.)
    errors = {t: compute_signal_to_quantization_noice_ratio(m["pre_qdq"], m["post_qdq"])
              for t, m in create_activation_matching(acts).items() if "pre_qdq" in m and "post_qdq" in m}
    producer = {o: n.name for n in onnx.load(str(pre_fp32)).graph.node for o in n.output}
    ranked = [(producer[t], float(e)) for t, e in errors.items() if t in producer and np.isfinite(e)]
    return sorted(ranked, key=lambda x: x[1])


def budget_search(evaluate: Callable[[list[str]], float], ranked: list[str], fp32_miou: float, budget_points: float,
                  max_nodes: int) -> tuple[list[str], float, list[dict]]:
    """The fewest worst-ranked nodes to keep in float so that FP32 mIoU - mIoU <= budget.

    ``evaluate(nodes)`` quantizes with ``nodes`` in float and returns the mIoU. Returns (nodes,
    their mIoU, every trial); if no count up to ``max_nodes`` meets the budget, the best trial.
    """
    trials: list[dict] = []

    def ok(k: int) -> bool:
        m = evaluate(ranked[:k])
        trials.append({"float_nodes": k, "miou": m})
        return fp32_miou - m <= budget_points / 100

    limit = min(max_nodes, len(ranked))
    k, last_bad = 1, 0
    while k <= limit and not ok(k):
        last_bad = k
        k = min(k * 2, limit) if k < limit else limit + 1
    if k > limit:  # budget unreachable: report the best we saw
        best = max(trials, key=lambda t: t["miou"])
        return ranked[:best["float_nodes"]], best["miou"], trials
    lo, hi = last_bad, k  # lo fails (or is 0, untested), hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return ranked[:hi], next(t["miou"] for t in reversed(trials) if t["float_nodes"] == hi), trials


def calibration_provenance(calib_dir: Path, limit: int | None = None) -> dict:
    """Which calibration set quantizes: the folder, the images used (as ``load_calibration_images``
    takes them: sorted, the first ``limit``) with one SHA-256 over their names and bytes, and the
    set's generator, seed and guidance from its ``manifest.json`` (a folder without one says so)."""
    from edgeseg.calibration.synth import MANIFEST

    calib_dir = Path(calib_dir)
    src = calib_dir / "images" if (calib_dir / "images").is_dir() else calib_dir
    paths = list_images(src)[:limit] if limit else list_images(src)
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode() + b"\0" + bytes.fromhex(sha256_file(p)))
    out = {"dir": str(calib_dir), "images": len(paths), "images_sha256": digest.hexdigest()}
    manifest = calib_dir / MANIFEST
    if not manifest.is_file():
        return {**out, "generator": "none recorded: a folder of images without manifest.json"}
    m = json.loads(manifest.read_text())
    return {**out, "manifest_sha256": sha256_file(manifest), "generator": m.get("generator", {}), "seed": m.get("seed"),
            "guidance": (m.get("guidance") or {}).get("mode"), "labels": m.get("labels"),
            "target_folder": (m.get("target") or {}).get("folder")}


CALIBRATION_CHOICES = ("synthetic", "site", "real")  # export.calibration, or a folder


def resolve_calibration(cfg: Config, choice: str | None = None) -> tuple[str, Path]:
    """(name, folder) of the set the deployed INT8 models are calibrated on (``export.calibration``)."""
    choice = choice or cfg.export.calibration
    if choice == "synthetic":
        return choice, cfg.stage_dir("calibration") / "synthetic"
    if choice == "site":
        site = target_sources(cfg).get("target_images")
        if site is None:
            raise InputError("--calibration site needs the deployment site's frames: set calibration.target.images "
                             "(a folder of a few unlabelled frames from the site)")
        return choice, site
    if choice == "real":
        return choice, cfg.data_root / cfg.data.train
    folder = Path(choice)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a calibration set; use one of {', '.join(CALIBRATION_CHOICES)} or a folder of images")
    return "folder", folder


def quantize_all(cfg: Config, export_dir: Path, calib_dir: Path, contrast: bool = True,
                 val: tuple[list[np.ndarray], list[np.ndarray]] | None = None, choice: str = "folder") -> dict:
    """Write every INT8 artifact into ``export_dir``; returns the quantization report.

    Args:
        val: (images, masks) at original size for the accuracy budget; None skips the budget.
        choice: what ``calib_dir`` is (synthetic, site, real, folder): recorded, and real frames are letterboxed.
    """
    t0 = time.perf_counter()
    e = cfg.export
    fp32 = export_dir / "model.onnx"
    spec = ModelSpec.from_onnx(fp32)
    hw = tuple(spec.image_size)
    images = load_calibration_images(calib_dir, hw, limit=e.calibration_images, fit=choice != "synthetic")
    to_input = input_transform(spec)
    batches = batches_of(images, to_input)
    pre = preprocess_for_quantization(fp32, export_dir / "model.pre.onnx")
    q = dict(method=e.calibration_method, percentile=e.percentile, preprocessed=True, ranges_cache=ranges_cache(export_dir))
    s8 = quantize_qdq(pre, export_dir / "model.int8.onnx", batches, flavour="s8s8", **q)
    check_for_tensorrt(s8)  # the TensorRT model: fail here, not on the device
    u8 = quantize_qdq(pre, export_dir / "model.int8-cpu.onnx", batches, flavour="u8s8", **q)
    cache = write_cache(activation_scales(s8), export_dir / "calibration.cache")
    report = {"calibration_dir": str(calib_dir), "calibration_images": len(images), "calibration_choice": choice,
              "method": e.calibration_method,
              "calibration": calibration_provenance(calib_dir, e.calibration_images), "fp32_sha256": sha256_file(fp32),
              "files": {"int8": str(s8), "int8_cpu": str(u8), "cache": str(cache)}}
    if contrast:
        from edgeseg.distill.data import split_samples

        sources = {"synthetic": batches,
                   "real": batches_of(real_images([s.image for s in split_samples(cfg, "train")], len(images), hw),
                                      to_input),
                   "noise": batches_of(noise_images(len(images), hw, cfg.calibration.seed), to_input)}
        for name in ("real", "noise"):  # the contrasts of the report's chain, as before
            path = quantize_qdq(pre, export_dir / f"model.int8-{name}.onnx", sources[name], flavour="s8s8", **q)
            report["files"][f"int8_{name}"] = str(path)
        for name, folder in target_sources(cfg).items():  # the deployment domain, when there is one
            if name == "target_images":  # the user's own photographs: any size, fitted like real images
                paths = list_images(folder)
                imgs = real_images(paths, len(paths), hw)
            else:
                imgs = load_calibration_images(folder, hw, limit=e.calibration_images)
            sources[name] = batches_of(imgs, to_input)
            report[f"{name}_dir"] = str(folder)
        report["matrix"] = write_matrix(pre, export_dir, sources, e.percentile, report["files"], e.calibration_method)
    if val is not None:
        report["budget"] = run_budget(cfg, export_dir, pre, s8, batches, val, "s8s8", calibration=report["calibration"])
        check_for_tensorrt(export_dir / "model.int8-mixed.onnx")
        report["budget_cpu"] = run_budget(cfg, export_dir, pre, u8, batches, val, "u8s8",
                                          fp32_miou=report["budget"]["fp32_miou"], calibration=report["calibration"])
    report["seconds"] = time.perf_counter() - t0
    write_json_atomic(export_dir / "quantize.json", report)
    return report


def ranges_cache(export_dir: Path) -> Path:
    """Where this export keeps calibration ranges: a flavour, a budget trial or a rerun reuses them
    (keyed by the float model, the images and the method: ``quantize_qdq``)."""
    return export_dir / "calibration_ranges"


MATRIX_METHODS = ("minmax", "percentile")
MATRIX_SOURCES = ("synthetic", "real", "noise")  # always; "target" and "target_images" when they exist


def target_sources(cfg: Config) -> dict[str, Path]:
    """Deployment-domain calibration sources that exist for this run, by matrix name.

    ``target``: the target-domain synthetic set (``<run_dir>/calibration/target``, written by
    ``calibration synth --images``); ``target_images``: the few unlabelled target images
    alone (calibration.target.images, or the demo's ``<data>/target_images``).
    """
    out = {}
    if (cfg.stage_dir("calibration") / "target" / "images").is_dir():
        out["target"] = cfg.stage_dir("calibration") / "target"
    if cfg.calibration.target.images:  # the user named it: it must be there
        from edgeseg.calibration.target import check_target_folder

        check_target_folder(cfg.calibration.target.images)
        out["target_images"] = Path(cfg.calibration.target.images)
    elif cfg.data.source == "demo" and (cfg.data_root / "target_images").is_dir() and list_images(cfg.data_root / "target_images"):
        out["target_images"] = cfg.data_root / "target_images"
    return out
FLAVOURS = ("s8s8", "u8s8")


def matrix_name(flavour: str, method: str, calibration: str) -> str:
    return f"matrix/{flavour}-{method}-{calibration}.onnx"


def write_matrix(pre: Path, export_dir: Path, sources: dict[str, list[np.ndarray]], percentile: float,
                 files: dict[str, str], method: str) -> list[dict]:
    """Both flavours x two calibration methods x every source; models already written are reused."""
    import shutil

    reuse = {("s8s8", method, "synthetic"): files["int8"], ("u8s8", method, "synthetic"): files["int8_cpu"],
             ("s8s8", method, "real"): files["int8_real"], ("s8s8", method, "noise"): files["int8_noise"]}
    rows = []
    counts = {name: int(sum(len(b) for b in batches)) for name, batches in sources.items()}
    equal = counts.get("synthetic", max(counts.values()))  # every source at the calibration set's count if it has it
    for flavour in FLAVOURS:
        for m in MATRIX_METHODS:
            for source in sources:
                path = export_dir / matrix_name(flavour, m, source)
                path.parent.mkdir(exist_ok=True)
                if (flavour, m, source) in reuse:
                    shutil.copyfile(reuse[(flavour, m, source)], path)
                else:
                    quantize_qdq(pre, path, sources[source], m, flavour, percentile=percentile, preprocessed=True,
                                 ranges_cache=ranges_cache(export_dir))
                row = {"flavour": flavour, "method": m, "calibration": source, "model": str(path), "images": counts[source]}
                if counts[source] < equal:
                    row["note"] = f"{counts[source]} images: all the source has (the others use {equal})"
                rows.append(row)
    return rows


def run_budget(cfg: Config, export_dir: Path, pre: Path, quantized: Path, calib_batches: list[np.ndarray],
               val: tuple[list[np.ndarray], list[np.ndarray]], flavour: str = "s8s8",
               fp32_miou: float | None = None, calibration: dict | None = None) -> dict:
    """The accuracy budget of one flavour on the validation split (selection, never the reported split).

    Writes ``model.int8-mixed.onnx`` (s8s8) or ``model.int8-cpu-mixed.onnx`` (u8s8): the plain model
    when it meets the budget, else the one with the fewest nodes in float that does.
    ``calibration``: where ``calib_batches`` came from (:func:`calibration_provenance`), recorded in
    the result so that a study rerun later says which set it measured.
    """
    import shutil
    import tempfile

    e = cfg.export
    images, gts = val
    if fp32_miou is None:  # callers checking both flavours measure FP32 once
        fp32_miou = miou_of(predict_masks(onnx_runner(export_dir / "model.onnx"), images), gts)
    int8_miou = miou_of(predict_masks(onnx_runner(quantized), images), gts)
    out = {"flavour": flavour, "split": "val", "fp32_miou": fp32_miou, "int8_miou": int8_miou,
           "budget_points": e.max_miou_drop}
    if calibration is not None:
        out["calibration"] = calibration
    mixed = export_dir / ("model.int8-mixed.onnx" if flavour == "s8s8" else "model.int8-cpu-mixed.onnx")
    out["model"] = str(mixed)
    if fp32_miou - int8_miou <= e.max_miou_drop / 100:
        shutil.copyfile(quantized, mixed)
        out.update(mixed_miou=int8_miou, float_nodes=[], trials=[], met=True)
        return out
    ranking_batches = calib_batches[: max(1, len(calib_batches) // 4)]  # a quarter of the calibration set itself
    with tempfile.TemporaryDirectory(prefix="edgeseg-budget-") as tmp:
        tmp = Path(tmp)
        ranked = node_sensitivity(pre, quantized, ranking_batches, tmp)
        names = [n for n, _ in ranked]
        pairs = fused_producers(pre)

        def evaluate(nodes: list[str]) -> float:
            path = quantize_qdq(pre, tmp / f"m{len(nodes)}.onnx", calib_batches, e.calibration_method, flavour,
                                exclude_nodes=with_fused(nodes, pairs), percentile=e.percentile,
                                preprocessed=True, ranges_cache=ranges_cache(export_dir))
            return miou_of(predict_masks(onnx_runner(path), images), gts)

        nodes, miou, trials = budget_search(evaluate, names, fp32_miou, e.max_miou_drop, e.max_float_nodes)
        if miou <= int8_miou:  # unreachable and nothing better than the plain model: ship the plain one
            nodes, miou = [], int8_miou
        quantize_qdq(pre, mixed, calib_batches, e.calibration_method, flavour,
                     exclude_nodes=with_fused(nodes, pairs), percentile=e.percentile, preprocessed=True,
                     ranges_cache=ranges_cache(export_dir))
    sqnr = dict(ranked)
    out.update(mixed_miou=miou, float_nodes=[{"node": n, "sqnr_db": sqnr[n]} for n in nodes], trials=trials,
               met=fp32_miou - miou <= e.max_miou_drop / 100)
    log.info("accuracy budget (%s, val): %d float nodes -> mIoU %.4f (FP32 %.4f, plain INT8 %.4f)", flavour,
             len(nodes), miou, fp32_miou, int8_miou)
    return out
