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


@torch.no_grad()
def detection_val_loss(model: DemoDetector, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 64) -> float:
    """Mean detection loss over held-out images (the selection metric of the detector's training)."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(images), batch_size):
        x, t = images[i:i + batch_size].float() / 255, targets[i:i + batch_size]
        total += detection_loss(model(x), t)[0].item() * len(x)
        n += len(x)
    model.train()
    return total / max(n, 1)


def train_demo_detector(samples, image_hw: tuple[int, int], epochs: int = 40, batch_size: int = 32,
                        lr: float = 3e-3, seed: int = 0, val_samples=None, patience: int = 4,
                        min_delta: float = 0.002, state_file: str | Path | None = None) -> tuple[DemoDetector, dict]:
    """Train the detector on ``samples`` (the teacher corpus); returns it (eval mode) and a summary.

    With ``val_samples`` it trains until the val detection loss stops improving (``patience``
    epochs without a relative gain of ``min_delta``; ``epochs`` is the ceiling the cosine schedule
    spans) and returns the best epoch's weights. ``state_file``: a checkpoint written after every
    epoch (atomically) and resumed from, so a stopped run loses at most one epoch.
    """
    from edgeseg.runtime.files import atomic_path
    from edgeseg.runtime.progress import LoggedProgress

    t0 = time.perf_counter()
    images, targets = _load_corpus(samples, image_hw)
    val = _load_corpus(val_samples, image_hw) if val_samples else None
    torch.manual_seed(seed)
    model = DemoDetector()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    per_epoch = len(images) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(epochs * per_epoch, 1))
    g = torch.Generator().manual_seed(seed)
    key = {"images": len(images), "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
           "val": len(val[0]) if val else 0, "image_hw": list(image_hw)}
    state = {"epoch": 0, "curve": [], "best": None, "best_loss": float("inf"), "best_epoch": 0}
    if state_file and Path(state_file).is_file():
        saved = torch.load(state_file, weights_only=False)
        if saved.get("key") == key:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            g.set_state(saved["generator"])
            state = saved["state"]
            log.info("resuming the demo detector at epoch %d from %s", state["epoch"], state_file)
    model.train()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    stale = 0 if not state["curve"] else state["epoch"] - state["best_epoch"]
    while state["epoch"] < epochs and not (val is not None and patience and stale >= patience):
        order = torch.randperm(len(images), generator=g)
        for k in LoggedProgress(range(per_epoch), desc=f"demo detector epoch {state['epoch'] + 1}/{epochs}", logger=log):
            idx = order[k * batch_size:(k + 1) * batch_size]
            x, t = images[idx].float() / 255, targets[idx]
            if k % 2:  # a horizontal flip every other batch: boxes are symmetric
                x, t = x.flip(-1), t.flip(-1)
            loss, last = detection_loss(model(x), t)
            first = first or last
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "train_loss": last.get("heatmap", 0.0) + last.get("size", 0.0)}
        if val is not None:
            record["val_loss"] = detection_val_loss(model, *val)
            if record["val_loss"] < state["best_loss"] * (1 - min_delta):
                state["best_loss"], state["best_epoch"] = record["val_loss"], state["epoch"]
                state["best"] = {k: v.clone() for k, v in model.state_dict().items()}
            stale = state["epoch"] - state["best_epoch"]
            log.info("demo detector epoch %d: val loss %.4f (best %.4f at epoch %d)", state["epoch"],
                     record["val_loss"], state["best_loss"], state["best_epoch"])
        state["curve"].append(record)
        if state_file:
            with atomic_path(state_file) as tmp:
                torch.save({"key": key, "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "generator": g.get_state(), "state": state}, tmp)
    if state["best"] is not None:
        model.load_state_dict(state["best"])
    model.eval()
    summary = {"images": len(images), "epochs": state["epoch"], "epochs_max": epochs, "steps": state["epoch"] * per_epoch,
               "first_loss": first, "final_loss": last, "curve": state["curve"],
               "best_epoch": state["best_epoch"] or state["epoch"], "best_val_loss": state["best_loss"] if val else None,
               "stopped_early": state["epoch"] < epochs, "train_seconds": time.perf_counter() - t0}
    log.info("demo feature teacher: %d epochs on %d teacher-corpus images in %.0f s (best val loss %.4f at epoch %d)",
             state["epoch"], len(images), summary["train_seconds"], state["best_loss"], summary["best_epoch"])
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


def export_shipped_detector(out: str | Path, image_hw: tuple[int, int]) -> Path:
    """The shipped demo detector (fp16 weights, SHA-256 checked) as the feature teacher ONNX at ``out``.

    Exported once per (weights, input size): a stamp beside ``out`` records both, so a later call is free.
    """
    from edgeseg.distill.shipped import DETECTOR, load_checked, read_meta, weights_path
    from edgeseg.runtime.files import write_json_atomic

    out = Path(out)
    weights = weights_path(DETECTOR)
    state = load_checked(weights)  # checks the hash every time: a changed file never serves silently
    meta = read_meta(weights)
    key = {"sha256": meta["sha256"], "image_size": list(image_hw)}
    stamp = out.with_suffix(".json")
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return out
    detector = DemoDetector(width=meta.get("width", 16))
    detector.load_state_dict(state)
    export_demo_feature_teacher(detector, out, image_hw, {"shipped": str(weights), "sha256": meta["sha256"]})
    write_json_atomic(stamp, {"key": key, "source": str(weights)})
    log.info("feature teacher: the shipped demo detector (sha256 %s) exported to %s", meta["sha256"][:12], out)
    return out
