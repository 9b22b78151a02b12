"""The end-to-end accuracy budget: teacher -> student -> FP32 ONNX -> INT8, on the validation set.

Every backend is evaluated through the runtime's own pre- and post-processing (letterbox in,
exact inverse out, masks at each image's original size), so the figures are what a deployed
bundle delivers. Torch models run through :class:`TorchRunner`, a runtime ``Runner`` that
lives here because the runtime itself never imports torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgeseg.runtime.backends.base import Runner
from edgeseg.runtime.metrics import SegmentationMeter, score_masks as score_all
from edgeseg.runtime.pipeline import BatchBuffers, finish, prepare
from edgeseg.runtime.spec import ModelSpec

log = logging.getLogger(__name__)

BOUNDARY_PX = 2  # boundary IoU band width at the evaluation resolution


class TorchRunner(Runner):
    """A torch module (normalised NCHW float in, logits out) behind the runtime's Runner interface."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, spec: ModelSpec):
        super().__init__(Path("<torch>"), spec)
        self.module = module.eval()

    def _activate_impl(self) -> None:
        pass

    @torch.no_grad()
    def _infer_impl(self, feed: np.ndarray) -> np.ndarray:
        t0 = self._clock()
        out = self.module(torch.from_numpy(feed)).numpy()
        self.timings_ms = {"copy_in": 0.0, "infer": self._clock() - t0, "copy_out": 0.0}
        return out


def onnx_runner(path: Path, threads: int = 0) -> Runner:
    from edgeseg.runtime.backends.onnxrt import OnnxRuntimeRunner

    return OnnxRuntimeRunner(path, None, "cpu", threads=threads)  # the spec comes from its own session


def predict_masks(runner: Runner, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Masks at original size for each image, through the runtime's pipeline (max batch at a time)."""
    out = []
    with runner:  # activated first: an ONNX runner reads its spec from the model
        buffers = BatchBuffers(runner.spec)
        batch = runner.spec.max_batch
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            feed, placements = prepare(chunk, runner.spec, buffers)
            out.extend(finish(runner.infer(feed), placements, runner.spec))
    return out


@dataclass
class BackendScore:
    """One backend's figures on the validation set."""

    name: str
    miou: float
    person_iou: float
    boundary_iou: float
    agreement_fp32: float | None
    per_image_iou: list[float]

    def to_dict(self) -> dict:
        return {"miou": self.miou, "person_iou": self.person_iou, "boundary_iou": self.boundary_iou,
                "agreement_fp32": self.agreement_fp32}


def score_masks(name: str, preds: list[np.ndarray], gts: list[np.ndarray],
                fp32: list[np.ndarray] | None = None) -> BackendScore:
    s = score_all(preds, gts, fp32, boundary_px=BOUNDARY_PX)
    return BackendScore(name, s["miou"], s["person_iou"], s["boundary_iou"], s.get("agreement"), s["per_image_iou"])


def miou_of(preds: list[np.ndarray], gts: list[np.ndarray]) -> float:
    meter = SegmentationMeter()
    for p, g in zip(preds, gts):
        meter.update(p, g)
    return meter.miou


def gallery(images: list[np.ndarray], gts: list[np.ndarray], preds: dict[str, list[np.ndarray]],
            scores: dict[str, BackendScore], worst: int = 6, size: int = 96) -> np.ndarray:
    """One row per backend: its ``worst`` images (lowest IoU), each as image | GT | prediction."""
    from PIL import Image, ImageDraw

    def tile(a: np.ndarray, rgb: bool) -> np.ndarray:
        a = a if rgb else np.repeat((a.astype(np.uint8) * 255)[:, :, None], 3, axis=2)
        return np.asarray(Image.fromarray(a).resize((size, size), Image.NEAREST))

    rows = []
    for name, masks in preds.items():
        order = np.argsort(scores[name].per_image_iou)[:worst]
        cells = [np.concatenate([tile(images[i], True), tile(gts[i], False), tile(masks[i], False)], axis=1) for i in order]
        row = np.concatenate(cells, axis=1)
        label = Image.new("RGB", (row.shape[1], 14), (30, 30, 30))
        ImageDraw.Draw(label).text((3, 1), f"{name}: worst {len(order)} (image | GT | prediction), IoU "
                                   + ", ".join(f"{scores[name].per_image_iou[i]:.2f}" for i in order), fill=(230, 230, 230))
        rows.append(np.concatenate([np.asarray(label), row], axis=0))
    return np.concatenate(rows, axis=0)
