"""``report``: how well a calibration set stands in for real images, seen from the student's activations.

For the set under test, plus two references of the same size (uniform noise, and real training
images: the same three sets as the export's calibration matrix), against held-out real images
(``test``, else ``val``):

- coverage: per student tensor, the share of held-out real activation values inside the
  set's calibrated [min, max] (1.0 = nothing would be clipped); and the calibrated max over
  the real 99.99th percentile;
- histogram KL: KL(real || set) of each tensor's activation histogram (128 bins);
- SQNR: each set calibrates a symmetric int8 Q/DQ model; ONNX Runtime's ``qdq_loss_debug``
  gives each tensor's SQNR (float model vs Q/DQ model) on the held-out images; the report
  takes the median over tensors.

Activations come from ORT's own augmented model (every float tensor made an output), streamed
batch by batch, so memory stays flat however many images there are (``activations.py``). They
are the student checkpoint's own ONNX export: ``make calibrate`` runs before ``make export``,
so the shipped ``export/model.onnx`` does not exist yet.

The INT8 mIoU each set yields is not measured here: the export stage scores the INT8 models it
ships, calibrated on these same three sets (``export/accuracy.json``, ``matrix``), so there is one
model and one figure (``int8_miou`` names where).

For a labelled set also: label fidelity (condition IoU) judged by the teacher and by the
ground-truth-only student, each on the set and on the unfiltered pool; and for every set the
similarity to training data, with held-out real images measured by the same search beside it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.calibration.activations import activation_statistics
from edgeseg.calibration.synth import GENERATOR_SPLIT, MANIFEST, load_calibration_images
from edgeseg.calibration.config import CalibratedConfig
from edgeseg.runtime.files import write_json_atomic
from edgeseg.runtime.preprocess import fit_image

log = logging.getLogger(__name__)


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


def similarity_summary(manifest: dict, calib_dir: Path, cfg: CalibratedConfig, out_dir: Path, pairs: int = 8) -> dict:
    """How close the set's images are to training data: quantiles of SSIM to the nearest training
    image (approximate search, as synth recorded it in the manifest), of the dHash distance, and for
    the ``ddpm`` generator's img2img sets of SSIM to each image's own source; ``closest_pairs.png``
    (synthetic | nearest training image)."""
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
    by_name = {s.image.name: s.image for s in split_samples(cfg, GENERATOR_SPLIT)}
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


def _label(calib_dir: Path, entry: dict) -> np.ndarray:
    """The label of a manifest entry: images/NNNNN.png -> masks/NNNNN.png (pool/... likewise)."""
    from edgeseg.calibration.synth import label_file
    from edgeseg.distill.data import read_mask

    return read_mask(calib_dir / label_file(entry["file"]))


def pool_entries(manifest: dict) -> list[dict]:
    """Every generated pair of a set, before any filter: the set, the dropped and the surplus entries."""
    return list(manifest.get("images", [])) + list(manifest.get("dropped", [])) + list(manifest.get("surplus", []))


def measured_counts(manifest: dict, images: int) -> dict:
    """The manifest's counts with ``kept`` = passed every filter (measured) and ``written`` = the set.

    Sets written before ``written`` existed recorded the set's size as ``kept`` (equal to the count
    asked for by construction) and the rest of those that passed as ``surplus``: converted.
    """
    counts = dict(manifest.get("counts") or {"written": images})
    if "written" not in counts and "kept" in counts:
        counts["written"] = counts["kept"]
        counts["kept"] = counts["kept"] + counts.get("surplus", 0)
    return counts


def condition_iou_summary(cfg: CalibratedConfig, calib_dir: Path, manifest: dict) -> dict:
    """Label fidelity of a set labelled by its conditioning masks, on the set and on the unfiltered pool.

    ``condition_iou_*``: the teacher's mask vs the conditioning mask (the manifest's figures). The
    teacher scores (and may guide) the generator and the filter drops pairs it disagrees with, so
    its figure on the set could flatter; the ground-truth-only student (``distill train
    --baseline``, which never saw the teacher) judges again from the files on disk
    (``condition_iou_gt_only_student_*``), on the set and on every generated pair before the filters
    (``pool/``: those the filters dropped, and the surplus). ``*_set_*`` is the set as written,
    ``*_pool_*`` everything generated.
    """
    from edgeseg.calibration.guidance import TeacherView
    from edgeseg.calibration.masks import mask_iou
    from edgeseg.calibration.synth import teacher_probabilities
    from edgeseg.distill.models import load_model
    from edgeseg.runtime.images import read_rgb

    if manifest.get("labels") != "condition":
        return {}
    quantiles = lambda v: {f"p{q}": float(np.percentile(v, q)) for q in (5, 25, 50, 75, 95)}
    out: dict = {}
    teacher_set = [i["condition_iou"] for i in manifest["images"] if "condition_iou" in i]
    if teacher_set:
        out["condition_iou_median"] = float(np.median(teacher_set))  # the teacher on the set
        out["condition_iou_quantiles"] = quantiles(teacher_set)
    pool = pool_entries(manifest)
    teacher_pool = [i["condition_iou"] for i in pool if "condition_iou" in i]
    if len(teacher_pool) == len(pool):
        out["condition_iou_pool_median"] = float(np.median(teacher_pool))
        out["condition_iou_pool_quantiles"] = quantiles(teacher_pool)
        out["condition_pool_pairs"] = len(pool)
    ckpt = cfg.stage_dir("distill-baseline") / "best.pt"
    if not ckpt.is_file():
        out["condition_judge"] = f"none: {ckpt} missing (make distill BASELINE=1 trains it)"
        return out
    judge = TeacherView(load_model(cfg.student, ckpt, keys=("student",)), tuple(cfg.data.image_size), cfg.data.mean,
                        cfg.data.std)

    def judged(entries: list[dict]) -> list[float]:
        ious = []
        for k in range(0, len(entries), 64):
            chunk = entries[k:k + 64]
            probs = teacher_probabilities(judge, np.stack([read_rgb(calib_dir / e["file"]) for e in chunk]))
            ious += [mask_iou(p > 0.5, _label(calib_dir, e)) for p, e in zip(probs, chunk)]
        return ious

    on_set = judged(manifest["images"])
    out["condition_judge"] = str(ckpt)
    out["condition_iou_gt_only_student_set_median"] = float(np.median(on_set))
    rest = pool[len(manifest["images"]):]
    if all("file" in e and (calib_dir / e["file"]).is_file() for e in rest):
        on_pool = on_set + judged(rest)
        out["condition_iou_gt_only_student_pool_median"] = float(np.median(on_pool))
        out["condition_iou_gt_only_student_pool_quantiles"] = quantiles(on_pool)
    else:  # a set written before synth kept its pool
        out["condition_iou_gt_only_student_pool_median"] = None
        out["condition_pool_note"] = "no pool/ folder: regenerate the set (calibration synth) to judge the unfiltered pool"
    return out


_EXACT_CHECK = 50  # images of each kind (synthetic, held-out) whose nearest training image is also searched exactly
_EXACT_PIXELS = 7e8  # at most this many training-image pixels scored per kind (the demo: 50 x 800 x 128 x 128)


def held_out_similarity(cfg: CalibratedConfig, synthetic: np.ndarray, held_out: np.ndarray, held_out_split: str) -> dict:
    """Held-out real images' SSIM to their nearest training image (the search synth applies to each
    synthetic image), and how often that approximate search misses the exact nearest on a sample.

    ``held_out_train_ssim_*``: the yardstick for ``train_ssim_*`` (a new image is as far from the
    training set as a real one the model never saw). ``nearest_search``: the search, and on up to 50
    images of each kind the exact nearest (every training image scored): ``missed`` counts the
    images whose exact nearest has a higher SSIM than the one the shortlist found.
    """
    from edgeseg.calibration.similarity import TrainIndex
    from edgeseg.distill.data import split_samples

    train_paths = [s.image for s in split_samples(cfg, GENERATOR_SPLIT)]
    index = TrainIndex(real_images(train_paths, len(train_paths), tuple(cfg.data.image_size)))
    h, w = cfg.data.image_size
    approx = [index.nearest(i)["train_ssim"] for i in held_out]
    out = {"held_out_train_ssim_quantiles": {f"p{q}": float(np.percentile(approx, q)) for q in (5, 25, 50, 75, 95, 100)},
           "held_out_train_ssim_median": float(np.median(approx)), "held_out_train_ssim_split": held_out_split,
           "held_out_train_ssim_images": len(held_out)}
    n = min(_EXACT_CHECK, int(_EXACT_PIXELS // (len(train_paths) * h * w)))
    search = {"method": f"approximate: SSIM over the {index.shortlist} training images nearest by 16x16 grey "
                        "thumbnail correlation (calibration/similarity.py)", "training_images": len(train_paths)}
    if n == 0:
        search["exact_check"] = (f"not measured: {len(train_paths)} training images at {h}x{w} exceed the report's "
                                 "budget; the figures are from the approximate search")
        return {**out, "nearest_search": search}
    t0 = time.perf_counter()
    search.update(checked={}, missed={}, max_ssim_gap={}, exact_train_ssim_median={})
    for kind, images in (("synthetic", synthetic[:n]), ("held_out", held_out[:n])):
        found = [index.nearest(i)["train_ssim"] for i in images]
        exact = [index.exact_nearest(i)[1] for i in images]
        gaps = np.asarray(exact) - np.asarray(found)
        search["checked"][kind] = len(images)
        search["missed"][kind] = int(np.count_nonzero(gaps > 1e-6))
        search["max_ssim_gap"][kind] = float(gaps.max(initial=0.0))
        search["exact_train_ssim_median"][kind] = float(np.median(exact))
    checked = sum(search["checked"].values())
    search["miss_rate"] = sum(search["missed"].values()) / max(checked, 1)
    search["exact_check_seconds"] = time.perf_counter() - t0
    return {**out, "nearest_search": search}


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


@dataclass
class ReportImages:
    """The images a report compares: the calibration set and its two contrasts, and held-out real images."""

    sets: dict[str, np.ndarray]  # synthetic (the set under test), noise, real: (N, H, W, 3) uint8 each
    held_out: np.ndarray  # (M, H, W, 3) uint8 from held_out_split
    held_out_split: str  # test, else val


def report_images(cfg: CalibratedConfig, calib_dir: Path) -> ReportImages:
    """The set under test, uniform noise and real training images of its size, and the held-out real images."""
    from edgeseg.distill.data import has_split, split_samples

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
    return ReportImages(sets, held_out, held_out_split)


def teacher_sheets(cfg: CalibratedConfig, calib_dir: Path, manifest: dict, synthetic: np.ndarray, out_dir: Path) -> tuple[str, str | None]:
    """The teacher's masks over the set: the contact sheet, and (condition-labelled sets) the pairs sheet."""
    from edgeseg.calibration.guidance import TeacherView
    from edgeseg.calibration.synth import teacher_probabilities
    from edgeseg.distill.models import load_teacher
    from edgeseg.distill.visualize import save_png

    teacher = TeacherView(load_teacher(cfg), tuple(cfg.data.image_size), cfg.data.mean, cfg.data.std)
    probs = teacher_probabilities(teacher, synthetic[:64])
    sheet = save_png(contact_sheet(synthetic, probs > 0.5), out_dir / "contact_sheet.png")
    pairs = pairs_sheet(calib_dir, manifest, probs, out_dir) if len(manifest.get("images", [])) == len(synthetic) else None
    return str(sheet), pairs


def set_summary(sets, per_tensor: list[dict], sqnr: dict[str, dict[str, float]]) -> dict:
    """Per set: mean coverage, median histogram KL, median SQNR and median calibrated max over the real p99.99."""
    out = {}
    for s in sets:
        out[f"coverage_{s}"] = float(np.mean([r[f"coverage_{s}"] for r in per_tensor]))
        out[f"hist_kl_{s}"] = float(np.median([r[f"kl_{s}"] for r in per_tensor]))
        out[f"sqnr_db_{s}"] = float(np.median(list(sqnr[s].values())))
        out[f"max_over_p9999_{s}"] = float(np.median([r[f"max_{s}"] / r["real_p9999"] for r in per_tensor
                                                       if r["real_p9999"] > 0]))
    return out


def build_report(cfg: CalibratedConfig, calib_dir: str | Path, student_checkpoint: str | Path | None = None,
                 out_dir: str | Path | None = None) -> dict:
    """Compute the report for ``calib_dir``; write ``report.json`` and ``contact_sheet.png`` to ``out_dir``.

    1. the images (the set, its noise and real contrasts, held-out real images); 2. the student's
    activation statistics per tensor; 3. the teacher's sheets; 4. the summary: per-set figures,
    label fidelity, similarity and counts; 5. ``report.json``.
    """
    from edgeseg.distill.models import load_model

    t0 = time.perf_counter()
    calib_dir = Path(calib_dir)
    out_dir = Path(out_dir) if out_dir else calib_dir.parent
    images = report_images(cfg, calib_dir)  # 1
    synthetic, n = images.sets["synthetic"], len(images.sets["synthetic"])
    student_ckpt = Path(student_checkpoint) if student_checkpoint else cfg.stage_dir("distill") / "best.pt"
    student = load_model(cfg.student, student_ckpt, keys=("student",))
    per_tensor, sqnr = activation_statistics(cfg, student, images.sets, images.held_out)  # 2
    manifest = json.loads((calib_dir / MANIFEST).read_text()) if (calib_dir / MANIFEST).is_file() else {}
    sheet, pairs = teacher_sheets(cfg, calib_dir, manifest, synthetic, out_dir)  # 3
    report = {"calibration_dir": str(calib_dir), "images": n, "held_out_images": len(images.held_out),  # 4
              "held_out_split": images.held_out_split, "student_checkpoint": str(student_ckpt),
              # activations and SQNR: this checkpoint's own ONNX export (make calibrate runs before make export)
              "activation_model": "ONNX export of student_checkpoint",
              "tensors": len(per_tensor), "calibration_method": cfg.export.calibration_method,
              **set_summary(images.sets, per_tensor, sqnr)}
    # coverage and SQNR did not separate noise from real images: the INT8 mIoU each set yields decides,
    # measured once, by the export stage on the models it ships (one model, one figure)
    report["int8_miou"] = {"see": str(cfg.stage_dir("export") / "accuracy.json"),
                           "rows": "matrix, calibration synthetic | real | noise (these sets), on the report splits"}
    report.update(condition_iou_summary(cfg, calib_dir, manifest))
    if pairs:
        report["pairs_sheet"] = pairs
    report.update(similarity_summary(manifest, calib_dir, cfg, out_dir))
    report.update(held_out_similarity(cfg, synthetic, images.held_out, images.held_out_split))
    report["counts"] = measured_counts(manifest, n)
    if "generated" in report["counts"]:  # measured: passed every filter / generated (extra rounds included)
        report["pass_rate"] = report["counts"]["kept"] / report["counts"]["generated"]
    report["generator"] = manifest.get("generator", {})
    report["contact_sheet"] = sheet
    report["seconds"] = time.perf_counter() - t0
    report["per_tensor"] = per_tensor
    path = write_json_atomic(out_dir / "report.json", report)  # 5
    log.info("calibration report (%.0f s) -> %s", report["seconds"], path)
    return report
