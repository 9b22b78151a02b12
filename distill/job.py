"""What one training run trains: the role, the network, its settings and where it writes.

``job_for`` derives the three jobs of a config: the teacher (ground truth only), the student
(distillation) and the baseline (the student on ground truth only).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeseg.distill.config import DistillConfig, LossConfig, ModelConfig, TrainConfig

Role = Literal["teacher", "student", "baseline"]


@dataclass(frozen=True)
class TrainJob:
    """What one run trains and how."""

    role: Role  # teacher: GT only; student: distillation; baseline: the student on GT only
    model: ModelConfig  # the network being trained
    train: TrainConfig
    loss: LossConfig
    out_dir: Path
    freeze_encoder: bool = False
    feature_stride: int = 8

    @property
    def state_key(self) -> str:
        """Checkpoint key of the trained network's state_dict."""
        return "model" if self.role == "teacher" else "student"


def job_for(cfg: DistillConfig, role: Role) -> TrainJob:
    """The job ``make teacher`` / ``make distill`` / the baseline run for this config."""
    gt_only = dataclasses.replace(cfg.loss, kl=0.0, mse=0.0, feature=0.0)
    if role == "teacher":
        return TrainJob("teacher", cfg.teacher, cfg.teacher_train, gt_only, cfg.stage_dir("teacher"))
    loss = cfg.loss if role == "student" else gt_only
    train = cfg.train
    if role == "baseline":  # ground truth alone: no teacher-guided or teacher-filtered synthetic pairs, no unlabelled images
        train = dataclasses.replace(train, extra_data="", extra_share=0.0, unlabelled_share=0.0,
                                    hard_examples=dataclasses.replace(train.hard_examples, share=0.0))
    if role == "student" and not cfg.feature_teacher.enabled:
        loss = dataclasses.replace(loss, feature=0.0)
    out = cfg.stage_dir("distill") if role == "student" else cfg.stage_dir("distill-baseline")
    return TrainJob(role, cfg.student, train, loss, out, cfg.student.freeze_encoder, cfg.student.feature_stride)
