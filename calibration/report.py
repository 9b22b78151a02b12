"""``report``: how well a calibration set stands in for real images, seen from the student's activations.

For the set under test, plus two references of the same size (uniform noise, and real training
images), against held-out real (validation) images:

- coverage: per student tensor, the share of held-out real activation values inside the
  set's calibrated [min, max] (1.0 = nothing would be clipped); and the calibrated max over
  the real 99.99th percentile;
- histogram KL: KL(real || set) of each tensor's activation histogram (128 bins);
- SQNR: each set calibrates a symmetric int8 Q/DQ model; ONNX Runtime's ``qdq_loss_debug``
  gives each tensor's SQNR (float model vs Q/DQ model) on the held-out images; the report
  takes the median over tensors.

Activations come from ORT's own augmented model (every float tensor made an output), streamed
batch by batch, so memory stays flat however many images there are.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeseg.calibration.quantize import batches_of, quantize_qdq
from edgeseg.calibration.synth import MANIFEST, load_calibration_images
from edgeseg.distill.config import Config
from edgeseg.runtime.files import write_json_atomic
from edgeseg.runtime.preprocess import fit_image, normalise_batch

log = logging.getLogger(__name__)

_FINE_BINS = 1024  # real-activation histogram resolution (percentiles, coverage)
_KL_BINS = 128
_SAMPLES_PER_BATCH = 1 << 16  # activation values per tensor and batch that histograms and coverage look at


@dataclass
class TensorStats:
    """Streaming statistics of one activation tensor."""

    lo: float = np.inf
    hi: float = -np.inf
    count: int = 0
    hist: np.ndarray | None = None
    outside: dict = field(default_factory=dict)  # set name -> values outside that set's range


def _run_augmented(session, batches):
    """Yield {tensor name: flat values} per batch."""
    from onnxruntime.quantization.qdq_loss_debug import _TENSOR_SAVE_POSTFIX

    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    wanted = [o for o in outputs if o.endswith(_TENSOR_SAVE_POSTFIX)]
    for b in batches:
        values = session.run(wanted, {input_name: b})
        yield {n[: -len(_TENSOR_SAVE_POSTFIX)]: v for n, v in zip(wanted, values)}


def _ranges(session, batches) -> dict[str, tuple[float, float]]:
    out: dict[str, list[float]] = {}
    for acts in _run_augmented(session, batches):
        for name, v in acts.items():
            if v.size == 0:
                continue
            lo, hi = float(v.min()), float(v.max())
            r = out.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _histograms(session, batches, edges: dict[str, np.ndarray], ranges: dict[str, dict[str, tuple[float, float]]]):
    """Histograms over uniform ``edges`` (outer values into the end bins) and, per named range, values outside it.

    Both are estimated from a fixed strided sample of each tensor (at most 65536 values per batch).
    """
    hists = {k: np.zeros(len(e) - 1, np.int64) for k, e in edges.items()}
    outside = {k: {s: 0 for s in ranges} for k in edges}
    totals = {k: 0 for k in edges}
    for acts in _run_augmented(session, batches):
        for name, v in acts.items():
            if name not in edges:
                continue
            v = v[:: max(1, v.size // _SAMPLES_PER_BATCH)]  # a strided sample: shares, not extremes, are wanted here
            e = edges[name]
            width = (e[-1] - e[0]) / (len(e) - 1)
            idx = np.clip(((v - e[0]) / width).astype(np.int64), 0, len(e) - 2)
            hists[name] += np.bincount(idx, minlength=len(e) - 1)
            totals[name] += v.size
            for s, rng in ranges.items():
                lo, hi = rng.get(name, (-np.inf, np.inf))
                outside[name][s] += int(np.count_nonzero((v < lo) | (v > hi)))
    return hists, outside, totals


def _kl(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    p = p_counts.reshape(_KL_BINS, -1).sum(1).astype(np.float64) + 1e-3
    q = q_counts.reshape(_KL_BINS, -1).sum(1).astype(np.float64) + 1e-3
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


def _percentile_from_hist(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    c = np.cumsum(hist)
    k = np.searchsorted(c, q / 100 * c[-1])
    return float(edges[min(k + 1, len(edges) - 1)])


def sqnr_per_tensor(fp32_aug: Path, qdq_path: Path, real_batches, float_acts=None) -> tuple[dict[str, float], dict]:
    """Per-tensor SQNR (dB) of a Q/DQ model vs the float model on ``real_batches`` (ORT's qdq_loss_debug)."""
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    from edgeseg.calibration.quantize import ArrayReader, input_name

    name = input_name(fp32_aug)
    if float_acts is None:
        float_acts = collect_activations(str(fp32_aug), ArrayReader(name, real_batches))
    qdq_aug = qdq_path.with_name(qdq_path.stem + ".aug.onnx")
    modify_model_output_intermediate_tensors(str(qdq_path), str(qdq_aug))
    qdq_acts = collect_activations(str(qdq_aug), ArrayReader(name, real_batches))
    matching = {k: v for k, v in create_activation_matching(qdq_acts, float_acts).items() if "float" in v}
    errors = compute_activation_error(matching)
    return {k: v["xmodel_err"] for k, v in errors.items() if np.isfinite(v["xmodel_err"])}, float_acts


def noise_images(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Uniform random RGB images: the contrast a calibration set must beat."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *hw, 3), dtype=np.uint8)


def real_images(paths: list[Path], n: int, hw: tuple[int, int]) -> np.ndarray:
    from edgeseg.runtime.images import read_rgb

    step = max(1, len(paths) // max(n, 1))
    return np.stack([fit_image(read_rgb(p), hw, "letterbox")[0] for p in paths[::step][:n]])


def contact_sheet(images: np.ndarray, masks: np.ndarray, columns: int = 8, limit: int = 64) -> np.ndarray:
    """A grid of images with the teacher's masks tinted red."""
    n = min(len(images), limit)
    h, w = images.shape[1:3]
    rows = (n + columns - 1) // columns
    sheet = np.full((rows * h, columns * w, 3), 20, np.uint8)
    for i in range(n):
        img = images[i].astype(np.float32)
        m = masks[i].astype(bool)
        img[m] = img[m] * 0.5 + np.array([255, 0, 0]) * 0.5
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = img.astype(np.uint8)
    return sheet


def similarity_summary(manifest: dict, calib_dir: Path, cfg: Config, out_dir: Path, pairs: int = 8) -> dict:
    """How close the kept images are to training data: quantiles of SSIM to the nearest training
    image (and to the img2img source), and ``closest_pairs.png`` (synthetic | nearest training image)."""
    from edgeseg.distill.data import split_samples
    from edgeseg.distill.visualize import save_png
    from edgeseg.runtime.images import read_rgb
    from edgeseg.runtime.preprocess import fit_image

    images = [i for i in manifest.get("images", []) if "train_ssim" in i]
    if not images:
        return {}
    out: dict = {}
    for key in ("train_ssim", "source_ssim", "train_hash_bits"):
        values = [i[key] for i in images if key in i]
        if values:
            out[f"{key}_quantiles"] = {f"p{q}": float(np.percentile(values, q)) for q in (5, 25, 50, 75, 95, 100)}
    out["train_ssim_median"] = out["train_ssim_quantiles"]["p50"]
    by_name = {s.image.name: s.image for s in split_samples(cfg, "train")}
    hw = tuple(cfg.data.image_size)
    rows = []
    for i in sorted(images, key=lambda i: -i["train_ssim"])[:pairs]:
        synthetic = read_rgb(calib_dir / i["file"])
        nearest = fit_image(read_rgb(by_name[i["train_nearest"]]), hw, "letterbox")[0] if i["train_nearest"] in by_name \
            else np.zeros_like(synthetic)
        rows.append(np.concatenate([synthetic, nearest], axis=1))
    if rows:
        out["closest_pairs"] = str(save_png(np.concatenate(rows, axis=0), out_dir / "closest_pairs.png"))
    return out


def int8_miou(models: dict[str, Path], cfg: Config, split: str) -> dict[str, float]:
    """mIoU on ``split`` of each INT8 model (ONNX Runtime CPU), scored at original size like every figure."""
    import onnxruntime as ort

    from edgeseg.distill.data import SegmentationDataset, split_samples
    from edgeseg.distill.evaluation import load_eval_set, logits_to_masks, score

    ev = load_eval_set(SegmentationDataset(split_samples(cfg, split), cfg.data, train=False))
    out = {}
    for name, path in models.items():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        logits = np.concatenate([session.run(None, {feed: normalise_batch(ev.images[i:i + 32], cfg.data.mean, cfg.data.std)})[0][:, 0]
                                 for i in range(0, len(ev.images), 32)])
        out[name] = float(score(logits_to_masks(logits, ev.placements), ev.gt)["miou"])
    return out


def _label(calib_dir: Path, entry: dict) -> np.ndarray:
    """The label (masks/NNNNN.png) of a manifest entry (images/NNNNN.png)."""
    from edgeseg.distill.data import read_mask

    return read_mask(calib_dir / "masks" / Path(entry["file"]).name)


def independent_condition_iou(cfg: Config, calib_dir: Path, manifest: dict, images: np.ndarray) -> dict:
    """Label fidelity judged by a model that never saw the teacher: the ground-truth-only student.

    The teacher scores (and may guide) the generator, so its IoU with the conditioning mask could
    flatter; the baseline student (``distill train --baseline``) is trained on ground truth alone.
    """
    from edgeseg.calibration.guidance import TeacherView
    from edgeseg.calibration.synth import teacher_probabilities
    from edgeseg.calibration.masks import mask_iou
    from edgeseg.distill.models import load_model

    ckpt = cfg.stage_dir("distill-baseline") / "best.pt"
    if not ckpt.is_file() or manifest.get("labels") != "condition":
        return {}
    judge = TeacherView(load_model(cfg.student, ckpt, keys=("student",)), tuple(cfg.data.image_size), cfg.data.mean, cfg.data.std)
    probs = teacher_probabilities(judge, images)
    ious = [mask_iou(p > 0.5, _label(calib_dir, e))
            for p, e in zip(probs, manifest["images"])]
    return {"condition_iou_gt_only_student_median": float(np.median(ious)), "condition_judge": str(ckpt)}


def pairs_sheet(calib_dir: Path, manifest: dict, teacher_masks: np.ndarray, out_dir: Path, rows: int = 8) -> str | None:
    """``pairs.png``: for a labelled set, generated image | conditioning mask | teacher's mask, two pairs a row."""
    from edgeseg.distill.visualize import save_png
    from edgeseg.runtime.images import read_rgb

    if manifest.get("labels") != "condition":
        return None
    tiles = []
    for k, entry in enumerate(manifest["images"][: 2 * rows]):
        image = read_rgb(calib_dir / entry["file"])
        cond = _label(calib_dir, entry)
        grey = lambda m: np.repeat(m[:, :, None].astype(np.uint8) * 255, 3, axis=2)
        gap = np.full((image.shape[0], 4, 3), 20, np.uint8)
        tiles.append(np.concatenate([image, gap, grey(cond), gap, grey(teacher_masks[k] > 0.5), gap, gap], axis=1))
    if len(tiles) % 2:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[i:i + 2], axis=1) for i in range(0, len(tiles), 2)], axis=0)
    return str(save_png(grid, out_dir / "pairs.png"))


def build_report(cfg: Config, calib_dir: str | Path, student_checkpoint: str | Path | None = None,
                 out_dir: str | Path | None = None) -> dict:
    """Compute the report for ``calib_dir``; write ``report.json`` and ``contact_sheet.png`` to ``out_dir``."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    from edgeseg.calibration.guidance import TeacherView
    from edgeseg.calibration.synth import teacher_probabilities
    from edgeseg.distill.data import has_split, split_samples
    from edgeseg.distill.models import load_model
    from edgeseg.distill.onnx_export import export_module
    from edgeseg.distill.visualize import save_png

    t0 = time.perf_counter()
    calib_dir = Path(calib_dir)
    out_dir = Path(out_dir) if out_dir else calib_dir.parent
    hw = tuple(cfg.data.image_size)
    synthetic = load_calibration_images(calib_dir, hw, limit=cfg.export.calibration_images)
    n = len(synthetic)
    sets = {
        "synthetic": synthetic,
        "noise": noise_images(n, hw, seed=cfg.calibration.seed),
        "real": real_images([s.image for s in split_samples(cfg, "train")], n, hw),
    }
    held_out_split = "test" if has_split(cfg, "test") else "val"  # val chose the checkpoint: test when there is one
    held_out = real_images([s.image for s in split_samples(cfg, held_out_split)], cfg.calibration.report_images, hw)
    to_input = lambda b: normalise_batch(b, cfg.data.mean, cfg.data.std)
    student_ckpt = Path(student_checkpoint) if student_checkpoint else cfg.stage_dir("distill") / "best.pt"
    student = load_model(cfg.student, student_ckpt, keys=("student",))

    with tempfile.TemporaryDirectory(prefix="edgeseg-report-") as tmp:
        tmp = Path(tmp)
        fp32 = export_module(student, tmp / "student.onnx", torch.zeros(1, 3, *hw), ["images"], ["mask_logits"])
        aug = tmp / "student.aug.onnx"
        modify_model_output_intermediate_tensors(str(fp32), str(aug))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        session = ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"])
        real_batches = batches_of(held_out, to_input)

        # ranges: held-out real (for histogram edges) and each calibration set
        real_rng = _ranges(session, real_batches)
        set_batches = {k: batches_of(v, to_input) for k, v in sets.items()}
        set_rng = {k: _ranges(session, b) for k, b in set_batches.items()}
        edges = {}
        for name, (lo, hi) in real_rng.items():
            lo = min([lo] + [r[name][0] for r in set_rng.values() if name in r])
            hi = max([hi] + [r[name][1] for r in set_rng.values() if name in r])
            if hi > lo:
                edges[name] = np.linspace(lo, hi, _FINE_BINS + 1)
        real_hist, outside, totals = _histograms(session, real_batches, edges, set_rng)
        set_hist = {k: _histograms(session, b, edges, {})[0] for k, b in set_batches.items()}

        per_tensor = []
        for name in sorted(edges):
            row = {"tensor": name, "real_p9999": _percentile_from_hist(real_hist[name], edges[name], 99.99)}
            for s in sets:
                row[f"coverage_{s}"] = 1 - outside[name][s] / max(totals[name], 1)
                row[f"max_{s}"] = set_rng[s][name][1]
                row[f"kl_{s}"] = _kl(real_hist[name], set_hist[s][name])
            per_tensor.append(row)

        sqnr, float_acts, q_models = {}, None, {}
        for s, batches in set_batches.items():
            q = quantize_qdq(fp32, tmp / f"q_{s}.onnx", batches, cfg.export.calibration_method, "s8s8",
                             percentile=cfg.export.percentile)
            sqnr[s], float_acts = sqnr_per_tensor(aug, q, real_batches, float_acts)
            q_models[s] = tmp / f"q_{s}.onnx"
        for row in per_tensor:
            for s in sets:
                row[f"sqnr_db_{s}"] = sqnr[s].get(row["tensor"])
        # coverage and SQNR did not separate noise from real images (0.993 vs 0.997): the mIoU each
        # set's INT8 model reaches on the held-out splits does, or shows that it does not matter
        eval_splits = [sp for sp in ("test", "test_shift") if has_split(cfg, sp)] or ["val"]
        miou = {sp: int8_miou(q_models, cfg, sp) for sp in eval_splits}

    teacher = TeacherView(load_model(cfg.teacher, cfg.teacher_checkpoint), hw, cfg.data.mean, cfg.data.std)
    probs = teacher_probabilities(teacher, synthetic[:64])
    sheet = save_png(contact_sheet(synthetic, probs > 0.5), out_dir / "contact_sheet.png")
    manifest = json.loads((calib_dir / MANIFEST).read_text()) if (calib_dir / MANIFEST).is_file() else {}
    pairs = pairs_sheet(calib_dir, manifest, probs, out_dir) if len(manifest.get("images", [])) == n else None
    report = {"calibration_dir": str(calib_dir), "images": n, "held_out_images": len(held_out),
              "held_out_split": held_out_split,
              "tensors": len(per_tensor), "calibration_method": cfg.export.calibration_method}
    for s in sets:
        report[f"coverage_{s}"] = float(np.mean([r[f"coverage_{s}"] for r in per_tensor]))
        report[f"hist_kl_{s}"] = float(np.median([r[f"kl_{s}"] for r in per_tensor]))
        report[f"sqnr_db_{s}"] = float(np.median(list(sqnr[s].values())))
        report[f"max_over_p9999_{s}"] = float(np.median([r[f"max_{s}"] / r["real_p9999"] for r in per_tensor
                                                          if r["real_p9999"] > 0]))
        report[f"int8_miou_{s}"] = {sp: miou[sp][s] for sp in miou}
    report["int8_method"] = cfg.export.calibration_method
    ious = [i["condition_iou"] for i in manifest.get("images", []) if "condition_iou" in i]
    if ious:
        report["condition_iou_median"] = float(np.median(ious))
        report["condition_iou_quantiles"] = {f"p{q}": float(np.percentile(ious, q)) for q in (5, 25, 50, 75, 95)}
        report.update(independent_condition_iou(cfg, calib_dir, manifest, synthetic))
    if pairs:
        report["pairs_sheet"] = pairs
    report.update(similarity_summary(manifest, calib_dir, cfg, out_dir))
    report["counts"] = manifest.get("counts", {"kept": n})
    report["generator"] = manifest.get("generator", {})
    report["contact_sheet"] = str(sheet)
    report["seconds"] = time.perf_counter() - t0
    report["per_tensor"] = per_tensor
    path = write_json_atomic(out_dir / "report.json", report)
    log.info("calibration report (%.0f s) -> %s", report["seconds"], path)
    return report
