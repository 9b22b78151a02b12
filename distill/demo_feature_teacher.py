"""The demo's stand-in for the YOLOv9 feature teacher: an ONNX detector-like model.

Built from the trained B3 teacher's encoder: [0, 1] RGB in, normalised inside the graph (as a
detector that takes plain RGB would), a neck that concatenates the stride-8 feature with the
upsampled stride-16 feature, and a small head after it. Tensor names are flattened the way the
real model's are (``/neck/Concat_output_0`` -> ``neck_Concat_output_0``), so the demo exercises
the same expose-by-name path: the wanted tensor is a Concat output inside the graph, and the
head after it is pruned away.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from edgeseg.distill.models import UnetSegmenter

log = logging.getLogger(__name__)

DEMO_TENSOR = "neck_Concat_output_0"


class _Neck(nn.Module):
    def forward(self, f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
        return torch.cat([f8, nn.functional.interpolate(f16, scale_factor=2.0, mode="nearest")], dim=1)


class DemoFeatureExtractor(nn.Module):
    """(B, 3, H, W) [0, 1] RGB -> (B, 8, H/8, W/8) "detections"; the neck's Concat is the feature."""

    def __init__(self, teacher: UnetSegmenter, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.encoder = teacher.encoder
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.neck = _Neck()
        c8, c16 = teacher.encoder.out_channels[3], teacher.encoder.out_channels[4]
        self.head = nn.Conv2d(c8 + c16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder((x - self.mean) / self.std)
        return self.head(self.neck(f[3], f[4]))


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


def export_demo_feature_teacher(teacher: UnetSegmenter, out: str | Path, image_hw: tuple[int, int],
                                mean: Sequence[float], std: Sequence[float]) -> Path:
    """Export the stand-in feature teacher to ``out`` (atomically); return the path."""
    from edgeseg.distill.onnx_export import export_module

    module = DemoFeatureExtractor(teacher, mean, std).eval()
    torch.manual_seed(0)
    nn.init.normal_(module.head.weight, std=0.01)
    return export_module(module, out, torch.rand(1, 3, *image_hw), ["images"], ["detections"], transform=_flatten_names)
