"""The demo's stand-in for the YOLOv9 feature teacher: a small person detector, trained and exported to ONNX.

A different model trained on a different task, as YOLOv9 is a detector: a CNN that predicts, on
a stride-8 grid, a person-centre heatmap and box sizes. Its targets come from the teacher
corpus's masks (each connected person region is one box), so it never sees the student's data.
Like the real model it takes plain [0, 1] RGB at a fixed spatial size (dynamic batch), has a
neck that concatenates the stride-8 feature with the upsampled stride-16 feature, and its tensor
names are flattened the way the real model's are (``/neck/Concat_output_0`` ->
``neck_Concat_output_0``), so the demo exercises the same expose-by-name path: the wanted tensor
is a Concat inside the graph, and the head after it is pruned away.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEMO_TENSOR = "neck_Concat_output_0"
MIN_BOX_PIXELS = 16  # person regions smaller than this are not boxes (slivers left by occluders)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class _Neck(nn.Module):
    def forward(self, f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
        return torch.cat([f8, F.interpolate(f16, scale_factor=2.0, mode="nearest")], dim=1)


class DemoDetector(nn.Module):
    """(B, 3, H, W) [0, 1] RGB -> (B, 3, H/8, W/8): centre-heatmap logit, box height and width (fractions).

    The neck's Concat, (B, 6 * width, H/8, W/8), is the feature the student matches.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.stem = _block(3, w, 2)  # stride 2
        self.s4 = _block(w, 2 * w, 2)
        self.s8 = _block(2 * w, 2 * w, 2)
        self.s16 = _block(2 * w, 4 * w, 2)
        self.neck = _Neck()
        self.head = nn.Sequential(nn.Conv2d(6 * w, 4 * w, 3, 1, 1), nn.SiLU(), nn.Conv2d(4 * w, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f8 = self.s8(self.s4(self.stem(x)))
        return self.head(self.neck(f8, self.s16(f8)))


def detection_targets(mask: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """(3, h, w) float32 targets from a (H, W) {0, 1} mask: Gaussian centre heatmap, box height and width.

    Each connected person region (8-connectivity, at least ``MIN_BOX_PIXELS``) is one box; sizes are
    fractions of the image side, written at the box centre's cell (elsewhere 0, and not trained).
    """
    from scipy import ndimage

    H, W = mask.shape
    h, w = grid_hw
    out = np.zeros((3, h, w), np.float32)
    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        region = labels[sl] > 0
        if region.sum() < MIN_BOX_PIXELS:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        cy, cx = (y0 + y1) / 2 / H * h - 0.5, (x0 + x1) / 2 / W * w - 0.5
        sigma = max(0.6, 0.15 * min((y1 - y0) / H * h, (x1 - x0) / W * w))
        out[0] = np.maximum(out[0], np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2)))
        iy, ix = int(np.clip(round(cy), 0, h - 1)), int(np.clip(round(cx), 0, w - 1))
        out[1, iy, ix], out[2, iy, ix] = (y1 - y0) / H, (x1 - x0) / W
    return out


def _load_corpus(samples, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) uint8 and targets (N, 3, H/8, W/8) of the corpus, letterboxed like training."""
    from edgeseg.distill.data import load_sample
    from edgeseg.runtime.preprocess import fit_image, fit_mask

    grid = (image_hw[0] // 8, image_hw[1] // 8)
    images, targets = [], []
    for s in samples:
        image, mask = load_sample(s)
        fitted, placement = fit_image(image, image_hw, "letterbox", (124, 116, 104))
        images.append(fitted.transpose(2, 0, 1))
        targets.append(detection_targets(fit_mask(mask, placement), grid))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))


def detection_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Heatmap BCE (positives weighted up: few cells hold a centre) + L1 of box sizes at the centres."""
    heat_t = target[:, 0:1]
    weight = 1 + 20 * heat_t
    heat = F.binary_cross_entropy_with_logits(pred[:, 0:1], heat_t, weight=weight)
    centres = (target[:, 1:2] > 0).float()
    size = (F.l1_loss(pred[:, 1:], target[:, 1:], reduction="none") * centres).sum() / centres.sum().clamp_min(1) / 2
    return heat + size, {"heatmap": heat.item(), "size": size.item()}


def train_demo_detector(samples, image_hw: tuple[int, int], epochs: int = 4, batch_size: int = 32,
                        lr: float = 3e-3, seed: int = 0) -> tuple[DemoDetector, dict]:
    """Train the detector on ``samples`` (the teacher corpus); returns it (eval mode) and a summary."""
    from edgeseg.runtime.progress import LoggedProgress

    t0 = time.perf_counter()
    images, targets = _load_corpus(samples, image_hw)
    torch.manual_seed(seed)
    model = DemoDetector()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    model.train()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for step in LoggedProgress(range(steps), desc="demo feature teacher (detector)", logger=log):
        if step % (len(images) // batch_size) == 0:
            order = torch.randperm(len(images), generator=g)
        k = step % (len(images) // batch_size)
        idx = order[k * batch_size:(k + 1) * batch_size]
        x, t = images[idx].float() / 255, targets[idx]
        if step % 2:  # a horizontal flip every other batch: boxes are symmetric
            x, t = x.flip(-1), t.flip(-1)
        loss, last = detection_loss(model(x), t)
        first = first or last
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    summary = {"images": len(images), "epochs": epochs, "steps": steps, "first_loss": first, "final_loss": last,
               "train_seconds": time.perf_counter() - t0}
    log.info("demo feature teacher: %d steps on %d teacher-corpus images in %.0f s (heatmap %.4f, size %.4f)",
             steps, len(images), summary["train_seconds"], last.get("heatmap", 0.0), last.get("size", 0.0))
    return model, summary


def _flatten_names(model) -> None:
    """Rename every tensor like the YOLOv9 ONNX: strip the leading '/', '/' and '.' -> '_'."""
    def flat(name: str) -> str:
        return re.sub(r"[/.]", "_", name.lstrip("/")) if name.startswith("/") else name

    g = model.graph
    for node in g.node:
        node.input[:] = [flat(n) for n in node.input]
        node.output[:] = [flat(n) for n in node.output]
        node.name = flat(node.name)
    for v in list(g.value_info) + list(g.output):
        v.name = flat(v.name)


def export_demo_feature_teacher(detector: DemoDetector, out: str | Path, image_hw: tuple[int, int],
                                summary: dict | None = None) -> Path:
    """Export the detector to ``out`` at a fixed ``image_hw`` input, dynamic batch (atomically); return the path.

    ``summary`` (its training) is stored in the model's metadata.
    """
    from edgeseg.distill.onnx_export import export_module

    meta = {"edgeseg_feature_teacher": json.dumps({"task": "person centre heatmap + box size", **(summary or {})})}
    return export_module(detector.eval(), out, torch.rand(1, 3, *image_hw), ["images"], ["detections"],
                         transform=_flatten_names, metadata=meta)
