"""Predicting masks over a data set, scoring them, and timing models per image."""
from __future__ import annotations

import time

import numpy as np
import torch

from edgeseg.distill.data import SegmentationDataset
from edgeseg.runtime.metrics import SegmentationMeter


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


def dataset_masks(dataset: SegmentationDataset) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 ground-truth masks and (N, H, W, 3) uint8 images of an un-augmented set."""
    masks, images = [], []
    for i in range(len(dataset)):
        _, mask, raw = dataset[i]
        masks.append(mask[0].numpy().astype(np.uint8))
        images.append(raw.numpy().transpose(1, 2, 0))
    return np.stack(masks), np.stack(images)


def score(pred: np.ndarray, gt: np.ndarray, reference: np.ndarray | None = None, boundary_px: int = 0) -> dict[str, float]:
    """mIoU / person IoU (/ boundary IoU) of ``pred`` vs ``gt``, and agreement with ``reference``."""
    meter = SegmentationMeter(boundary_px=boundary_px)
    meter.update(pred, gt)
    out = meter.summary()
    del out["agreement"]  # pixel accuracy vs GT is not what "agreement" means here
    if reference is not None:
        agree = SegmentationMeter()
        agree.update(pred, reference)
        out["agreement"] = agree.agreement
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
