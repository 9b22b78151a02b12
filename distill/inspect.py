"""A look at the teacher before a long run: its masks on a few of the user's images, and the usual mistakes flagged.

``edgeseg distill inspect-teacher`` runs the configured teacher (torch or ONNX) on a few images
through exactly the preprocessing training uses (letterbox, normalisation, then the ONNX teacher's
own input conventions), and reports its masks: a picture, the mIoU against the masks there are,
the mean person fraction and the share of uncertain pixels. It also reads the images the other
way a zoo model is most often mis-declared (the channel order; for an ONNX teacher the [0, 1] vs
[0, 255] range) and says which reading agrees better with the labels, or, without labels, gives
the more confident masks; an output in [0, 1] read as logits, and a teacher that finds nobody.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeseg.distill.data import Sample, SegmentationDataset, folder_samples, image_samples, split_samples
from edgeseg.distill.evaluation import load_eval_set, logits_to_masks, score
from edgeseg.runtime.errors import InputError

log = logging.getLogger(__name__)

UNCERTAIN = (0.1, 0.9)  # a pixel whose teacher probability lies strictly inside is "uncertain"
MIOU_MARGIN = 0.05  # the other reading must beat the configured one by this much mIoU (with labels) ...
CONFIDENCE_MARGIN = 0.10  # ... or by this much confidence (without labels) to be flagged
EMPTY_FRACTION = 0.001  # a mean person fraction below this on every image: the teacher finds nobody


@dataclass
class Reading:
    """The teacher's masks under one reading of the input."""

    probs: np.ndarray  # (N, H, W) person probabilities at the model input (letterboxed)
    masks: list[np.ndarray]  # at each image's own size
    miou: float | None  # against the labels, where there are labels

    @property
    def person_fraction(self) -> float:
        return float(np.mean([m.mean() for m in self.masks]))

    @property
    def uncertain(self) -> float:
        return float(((self.probs > UNCERTAIN[0]) & (self.probs < UNCERTAIN[1])).mean())

    @property
    def confidence(self) -> float:
        """Mean |2p - 1|: 1 when every pixel is certain, 0 when every pixel is a coin toss."""
        return float(np.abs(2 * self.probs - 1).mean())


def inspection_samples(cfg, images: str | Path | None, limit: int) -> list[Sample]:
    """The images to look at: ``images`` (a split folder with masks/, or a folder of frames), else val."""
    if images is None:
        samples = split_samples(cfg, "val")
    else:
        folder = Path(images)
        samples = folder_samples(folder) if (folder / "masks").is_dir() else image_samples(folder)
    if limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    step = max(1, len(samples) // limit)  # spread over the folder, not its first few files
    return samples[::step][:limit]


class _Alternative:
    """The teacher run on another reading of the same batch: channels swapped, or the range off by 255."""

    def __init__(self, teacher, mean, std):
        self.teacher = teacher
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def swapped(self, x: torch.Tensor) -> torch.Tensor:
        from edgeseg.distill.onnx_teacher import OnnxSegmentationTeacher

        t = self.teacher
        if isinstance(t, OnnxSegmentationTeacher):
            other = "rgb" if t.io.channels == "bgr" else "bgr"
            return t.person_logits(t.raw_output(x, channels=other), tuple(x.shape[2:]))
        rgb = x * self.std + self.mean  # a torch UNet reads RGB normalised by data.mean/std: feed it BGR instead
        return t(((rgb.flip(1) - self.mean) / self.std).contiguous())

    def rescaled(self, x: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        other = "byte" if t.io.range == "unit" else "unit"
        return t.person_logits(t.raw_output(x, pixel_range=other), tuple(x.shape[2:]))


def inspect_teacher(cfg, images: str | Path | None = None, limit: int = 16, out_dir: str | Path | None = None,
                    device: torch.device | None = None) -> dict:
    """Run the teacher on up to ``limit`` images; the report (figures, flags) and ``inspect.png`` under ``out_dir``."""
    from edgeseg.distill.models import load_teacher
    from edgeseg.distill.onnx_teacher import OnnxSegmentationTeacher
    from edgeseg.distill.visualize import comparison_grid, save_png

    device = device or torch.device("cpu")
    samples = inspection_samples(cfg, images, limit)
    labelled = all(s.labelled for s in samples)
    dataset = SegmentationDataset(samples, cfg.data, train=False)
    ev = load_eval_set(dataset)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    teacher = load_teacher(cfg, device).eval()
    is_onnx = isinstance(teacher, OnnxSegmentationTeacher)
    alt = _Alternative(teacher, cfg.data.mean, cfg.data.std)

    def reading(logits: torch.Tensor) -> Reading:
        z = logits[:, 0].float().cpu().numpy()
        masks = logits_to_masks(z, ev.placements)
        return Reading(1 / (1 + np.exp(-z)), masks, score(masks, ev.gt)["miou"] if labelled else None)

    with torch.no_grad():
        configured = reading(teacher(x))
        readings = {"channels swapped": reading(alt.swapped(x))}
        if is_onnx:
            readings["range off by 255"] = reading(alt.rescaled(x))
        raw = teacher.raw_output(x).float() if is_onnx else None
    flags = _flags(cfg, configured, readings, raw, teacher.io.kind if is_onnx else None, labelled,
                   teacher.io.to_dict() if is_onnx else None)
    report = {"images": len(samples), "labelled": labelled, "source": str(images or "val split"),
              "teacher": str(cfg.teacher.onnx.path if is_onnx else cfg.teacher_checkpoint),
              "io": teacher.io.to_dict() if is_onnx else {"preprocessing": "the training data's mean/std",
                                                          "mean": list(cfg.data.mean), "std": list(cfg.data.std)},
              "miou": configured.miou, "person_fraction": configured.person_fraction,
              "uncertain_share": configured.uncertain, "uncertain_band": list(UNCERTAIN),
              "confidence": configured.confidence,
              "other_readings": {k: {"miou": r.miou, "confidence": r.confidence, "person_fraction": r.person_fraction}
                                 for k, r in readings.items()},
              "flags": flags}
    if out_dir is not None:
        from edgeseg.runtime.files import write_json_atomic

        out_dir = Path(out_dir)
        fitted = (configured.probs > 0.5).astype(np.uint8)
        grid = comparison_grid(ev.images, ev.gt_fitted if labelled else np.zeros_like(fitted), {"teacher": fitted})
        report["picture"] = str(save_png(grid, out_dir / "inspect.png"))
        report["report"] = str(out_dir / "inspect.json")
        write_json_atomic(out_dir / "inspect.json", report)
    return report


def _flags(cfg, configured: Reading, readings: dict[str, Reading], raw: torch.Tensor | None, kind: str | None,
           labelled: bool, io: dict | None = None) -> list[str]:
    """One line per likely mistake, each with its fix (``kind``, ``io``: the ONNX teacher's resolved output kind and
    I/O, None for a torch teacher)."""
    flags, is_onnx = [], kind is not None
    io = io or {}
    fixes = {"channels swapped": ("teacher.onnx.channels: " + ("rgb" if io.get("channels") == "bgr" else "bgr"))
                                 if is_onnx else
                                 "it looks trained on BGR images: export it to ONNX and give it as teacher.onnx with "
                                 "channels: bgr",
             "range off by 255": "teacher.onnx.range: " + ("unit" if io.get("range") == "byte" else "byte")}
    for name, r in readings.items():
        if labelled and r.miou is not None and r.miou > configured.miou + MIOU_MARGIN:
            flags.append(f"{name}: the teacher agrees better with the labels that way (mIoU {r.miou:.3f} vs "
                         f"{configured.miou:.3f} as configured); set {fixes[name]}")
        elif not labelled and r.confidence > configured.confidence + CONFIDENCE_MARGIN:
            flags.append(f"{name}: the teacher is more confident that way (confidence {r.confidence:.2f} vs "
                         f"{configured.confidence:.2f} as configured; no labels to decide by); try {fixes[name]}")
    if raw is not None and kind == "logits" and float(raw.min()) >= 0 and float(raw.max()) <= 1:
        flags.append("the output lies in [0, 1] but is read as logits: it looks like probabilities or an alpha matte; "
                     "set teacher.onnx.kind: matte (or probabilities)")
    if configured.person_fraction < EMPTY_FRACTION:
        flags.append(f"the teacher finds nobody (person fraction {configured.person_fraction:.4f} over "
                     f"{len(configured.masks)} images): check teacher.onnx.output, person_channel, channels and range"
                     if is_onnx else "the teacher finds nobody: check teacher.checkpoint and data.mean/std")
    return flags
