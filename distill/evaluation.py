"""Predicting masks over a data set, scoring them, and timing models per image."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from edgeseg.distill.data import SegmentationDataset, load_sample
from edgeseg.runtime.metrics import score_masks
from edgeseg.runtime.pipeline import masks_at_source
from edgeseg.runtime.preprocess import Placement, fit_image, fit_mask


def make_loader(dataset: SegmentationDataset, batch_size: int, workers: int = 0) -> torch.utils.data.DataLoader:
    """An in-order loader (validation, evaluation)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader, device: torch.device) -> np.ndarray:
    """(N, H, W) float32 logits of ``model`` over ``loader``, in order."""
    was_training = model.training
    model.eval()
    out = []
    for images, _, _ in loader:
        out.append(model(images.to(device, non_blocking=True))[:, 0].float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0, 0), np.float32)


@dataclass
class EvalSet:
    """What scoring an un-augmented data set needs, loaded once."""

    gt: list[np.ndarray]  # (h, w) uint8 {0, 1} ground truth at each image's original size
    placements: list[Placement]  # where each image sits in the letterboxed model input
    images: np.ndarray  # (N, H, W, 3) uint8 letterboxed images (visualisation)
    gt_fitted: np.ndarray  # (N, H, W) uint8 letterboxed ground truth (visualisation)


def load_eval_set(dataset: SegmentationDataset) -> EvalSet:
    gt, placements, images, fitted = [], [], [], []
    for sample in dataset.samples:  # each file read once; fitted exactly as the un-augmented dataset does
        source_image, source_mask = load_sample(sample)
        image, placement = fit_image(source_image, dataset.size, "letterbox", dataset.pad)
        gt.append((source_mask > 0).astype(np.uint8))
        placements.append(placement)
        images.append(image)
        fitted.append(fit_mask(source_mask, placement))
    return EvalSet(gt, placements, np.stack(images), np.stack(fitted))


def logits_to_masks(logits: np.ndarray, placements: list[Placement]) -> list[np.ndarray]:
    """(N, H, W) letterboxed logits -> per image masks at original size, exactly as the runtime does."""
    return masks_at_source(logits, placements, cut=0.0)


def score(pred: list[np.ndarray], gt: list[np.ndarray], reference: list[np.ndarray] | None = None,
          boundary_px: int = 0) -> dict[str, float]:
    """mIoU / person IoU (/ boundary IoU) of ``pred`` vs ``gt``, and agreement with ``reference``.

    Masks at original size (see :func:`logits_to_masks`): the one scoring path shared with the
    export stage's accuracy report (:func:`edgeseg.runtime.metrics.score_masks`).
    """
    out = score_masks(pred, gt, reference, boundary_px)
    del out["per_image_iou"]
    return out


def score_split(cfg, models: dict[str, torch.nn.Module], split: str, device: torch.device,
                reference: str | None = "teacher") -> dict[str, dict[str, float]]:
    """Every model's scores on one split; ``agreement`` is measured against ``reference``'s masks."""
    from edgeseg.distill.data import split_samples

    dataset = SegmentationDataset(split_samples(cfg, split), cfg.data, train=False)
    loader = make_loader(dataset, 16, cfg.data.workers)
    ev = load_eval_set(dataset)
    masks = {n: logits_to_masks(predict_logits(m, loader, device), ev.placements) for n, m in models.items()}
    ref = masks.get(reference) if reference else None
    out = {n: score(p, ev.gt, ref if n != reference else None) for n, p in masks.items()}
    for s in out.values():
        s["images"] = len(dataset)
    return out


@torch.no_grad()
def latency_ms(models: dict[str, torch.nn.Module], image_hw: tuple[int, int], device: torch.device,
               repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median per-image latency (batch 1, torch eager) of each model, measured interleaved.

    The models take turns within each repeat, so a slow spell of a shared machine hits all of
    them alike and their ratio stays meaningful.
    """
    x = torch.randn(1, 3, *image_hw, device=device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        m.eval()
    for i in range(warmup + repeats):
        for name, m in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            m(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t) * 1000) for name, t in times.items()}
