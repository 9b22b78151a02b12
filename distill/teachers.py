"""The teachers a config names, made ready to run: the shipped demo teachers, a trained checkpoint, or a user's file.

``feature_teacher_model`` gives the feature teacher's ONNX file, exporting the shipped demo
detector there first when the config says ``feature_teacher.onnx: demo``.
"""
from __future__ import annotations

from pathlib import Path

from edgeseg.distill.shipped import SHIPPED


def feature_teacher_model(cfg) -> Path:
    """The feature teacher's ONNX file for ``cfg`` (the root config), made from the shipped detector if it names it."""
    path = cfg.feature_teacher_onnx
    if cfg.feature_teacher.onnx == SHIPPED:
        from edgeseg.distill.demo_feature_teacher import export_shipped_detector

        export_shipped_detector(path, tuple(cfg.data.image_size))
    return path
