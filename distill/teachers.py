"""The teachers a config names, made ready to run: the shipped demo teachers, a trained checkpoint, a user's file.

- the segmentation teacher: a UNet checkpoint (``teacher.checkpoint``; ``demo`` = the shipped one)
  or an ONNX person segmenter (``teacher.onnx.path``), run through IOBinding
  (:class:`edgeseg.distill.onnx_teacher.OnnxSegmentationTeacher`);
- the feature teacher: an ONNX model and the tensor to match (``feature_teacher.onnx``; ``demo`` =
  the shipped detector, exported on first use). When it is the segmentation teacher's own file, one
  session runs both, once per batch, with both outputs bound.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from edgeseg.distill.shipped import SHIPPED

log = logging.getLogger(__name__)


def feature_teacher_model(cfg) -> Path:
    """The feature teacher's ONNX file for ``cfg`` (the root config), made from the shipped detector if it names it."""
    path = cfg.feature_teacher_onnx
    if cfg.feature_teacher.onnx == SHIPPED:
        from edgeseg.distill.demo_feature_teacher import export_shipped_detector

        export_shipped_detector(path, tuple(cfg.data.image_size))
    return path


def teacher_io(cfg):
    """The ONNX teacher's I/O conventions (:class:`edgeseg.runtime.teacher_io.SegmenterIO`): its graph + the config."""
    from edgeseg.runtime.teacher_io import resolve_io

    return resolve_io(cfg.teacher.onnx.path, cfg.teacher.onnx.declared())


def onnx_teacher(cfg, device: torch.device | str | None = None, feature: str | None = None):
    """The ONNX segmentation teacher of ``cfg`` on ``device``; ``feature``: also bind that inner tensor."""
    from edgeseg.distill.feature_onnx import expose_tensor
    from edgeseg.distill.onnx_teacher import OnnxSegmentationTeacher

    path = Path(cfg.teacher.onnx.path)
    io = teacher_io(cfg)
    log.info("teacher %s (ONNX): %s", path.name, io.describe())
    model = expose_tensor(path, feature, keep_outputs=True) if feature else path
    return OnnxSegmentationTeacher(model, io, device or "cpu", cfg.data.mean, cfg.data.std, cfg.threads, feature)


def shares_feature_file(cfg) -> bool:
    """Whether the feature teacher is the ONNX segmentation teacher's own file (one run serves both)."""
    if not (cfg.teacher.is_onnx and cfg.feature_teacher.enabled) or cfg.feature_teacher.onnx == SHIPPED:
        return False
    a, b = Path(cfg.teacher.onnx.path), cfg.feature_teacher_onnx
    return a.is_file() and b.is_file() and a.resolve() == b.resolve()


def open_teachers(cfg, device: torch.device, logits: bool, features: bool):
    """(segmentation teacher or None, feature teacher or None) for a training run on ``device``.

    The feature teacher's tensor is exposed (pruned, cached) and its ONNX run through IOBinding; when
    it is the ONNX segmentation teacher's file, the two share one session and one run per batch.
    """
    from edgeseg.distill.models import load_teacher

    if features and shares_feature_file(cfg):
        teacher = onnx_teacher(cfg, device, feature=cfg.feature_teacher.tensor)
        log.info("the feature teacher is the teacher's own file: one run per batch binds the mask and %s",
                 cfg.feature_teacher.tensor)
        return (teacher if logits else None), teacher.feature_view()
    teacher = load_teacher(cfg, device) if logits else None
    feature = None
    if features:
        from edgeseg.distill.feature_onnx import expose_tensor
        from edgeseg.distill.onnx_teacher import OnnxFeatureTeacher

        exposed = expose_tensor(feature_teacher_model(cfg), cfg.feature_teacher.tensor)
        feature = OnnxFeatureTeacher(exposed, device, cfg.data.mean, cfg.data.std, threads=cfg.threads)
    return teacher, feature
