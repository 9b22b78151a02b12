"""The five distillation loss terms, the temperature schedules, and the loss module with its projection head."""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.distill.config import LossConfig, TemperatureConfig

log = logging.getLogger(__name__)


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) mean over everything but the batch axis."""
    return x.flatten(1).mean(dim=1)


def binary_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
              per_sample: bool = False) -> torch.Tensor:
    """Mean binary KL(p || q), p = sigmoid(t / T), q = sigmoid(s / T), times T^2.

    ``p log(p/q) + (1-p) log((1-p)/(1-q))`` per pixel, computed from log-sigmoids so that
    saturated logits stay finite (this is not the softmax KL over a class axis).
    ``per_sample``: (B,) means, one per image, instead of the scalar.
    """
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return (_per_sample(kl) if per_sample else kl.mean()) * temperature ** 2


def probability_mse(teacher_logits: torch.Tensor, student_logits: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """MSE between teacher and student probabilities (sigmoid of the logits); (B,) with ``per_sample``."""
    d = (torch.sigmoid(student_logits.float()) - torch.sigmoid(teacher_logits.float())) ** 2
    return _per_sample(d) if per_sample else d.mean()


def bce_loss(student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of logits against a {0, 1} mask."""
    return F.binary_cross_entropy_with_logits(student_logits.float(), mask.float())


def dice_loss(probs: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - soft Dice over the whole batch: 1 - 2|P.G| / (|P| + |G|).

    Dice of [1, 1, 1, 1] vs [1, 1, 0, 0] is 2/3, so the loss is 1/3.
    """
    p, g = probs.float().flatten(), mask.float().flatten()
    intersection = (p * g).sum()
    return 1 - 2 * intersection / (p.sum() + g.sum()).clamp_min(eps)


def channel_normalise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per sample and channel over (H, W)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)
    return (x - mean) / (std + eps)


def feature_mse(projected: torch.Tensor, target: torch.Tensor, normalise: bool = False,
                per_sample: bool = False) -> torch.Tensor:
    """MSE between the projected student feature and the teacher feature (same shape); (B,) with ``per_sample``."""
    a, b = projected.float(), target.float()
    if normalise:
        a, b = channel_normalise(a), channel_normalise(b)
    d = (a - b) ** 2
    return _per_sample(d) if per_sample else d.mean()


class ProjectionHead(nn.Module):
    """Maps the student's feature onto the feature teacher's: 1x1 conv, BN, ReLU, 1x1 conv.

    The feature loss's alignment layer (as ModelOpt's ``MGDLoss`` owns its ``align``): it belongs
    to :class:`DistillationLoss`, trains beside the student and is saved under the checkpoint key
    ``projection``, so exporting the student is taking the student.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, 1),
        )

    @classmethod
    def from_state_dict(cls, state: dict) -> "ProjectionHead":
        """A head shaped like the one that saved ``state`` (a checkpoint's ``projection``), loaded strictly."""
        hidden, in_channels = state["net.0.weight"].shape[:2]
        head = cls(in_channels, hidden, state["net.3.weight"].shape[0])
        head.load_state_dict(state)
        return head

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, C_s, h, w) -> (B, C_t, h, w)."""
        return self.net(feature)


class DistillationModel(nn.Module):
    """The student plus the feature loss's projection head, as one module for the optimizer and DDP.

    The head is the loss's (``DistillationLoss.projection``, the same object); the wrapper only lets
    DDP all-reduce its gradients with the student's. Exporting takes ``.student`` alone.
    """

    def __init__(self, student: nn.Module, projection: ProjectionHead | None):
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> logits (B, 1, H, W) and the projected feature (B, C_t, h, w) or None."""
        if self.projection is None:
            return self.student(x), None
        logits, feature = self.student.forward_features(x)
        return logits, self.projection(feature)


def temperature_at(cfg: TemperatureConfig, progress: float) -> float:
    """T for ``progress`` in [0, 1] of training: constant, or t0 -> t1 by the schedule."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return cfg.t0
    if cfg.schedule == "linear":
        return cfg.t0 + (cfg.t1 - cfg.t0) * p
    if cfg.schedule == "cosine":
        return cfg.t1 + (cfg.t0 - cfg.t1) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "exponential":
        return cfg.t0 * (cfg.t1 / cfg.t0) ** p
    raise ValueError(f"unknown temperature schedule {cfg.schedule!r}")


class DistillationLoss(nn.Module):
    """Weighted sum of KL, MSE, BCE, Dice and feature terms.

    Args:
        weights: the loss config (a weight of 0 skips the term).
        channel_norm: channel-normalise both features before the feature MSE.
        projection: the feature term's alignment head (student feature -> teacher feature), owned
            here; None without a feature teacher.
    """

    def __init__(self, weights: LossConfig, channel_norm: bool = False, projection: ProjectionHead | None = None):
        super().__init__()
        self.weights = weights
        self.channel_norm = channel_norm
        self.projection = projection
        self._warned_resize = False

    def forward(self, student_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                teacher_logits: torch.Tensor | None = None, projected_feature: torch.Tensor | None = None,
                teacher_feature: torch.Tensor | None = None,
                labelled: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and each term's unweighted value (detached).

        Args:
            student_logits: (B, 1, H, W); mask: (B, 1, H, W) in {0, 1}.
            teacher_logits: (B, 1, H, W) from the frozen teacher, or None.
            projected_feature: (B, C_t, h', w') the student's feature after the projection head.
            teacher_feature: (B, C_t, h, w) from the feature teacher; the projected feature is
                resized (bilinear) to (h, w) if its grid differs.
            labelled: (B,) bool, which samples have a ground-truth mask (None: all). BCE and Dice
                are computed on those alone (a batch without any has no ground-truth term); the
                teacher terms on every sample. With unlabelled samples in the batch, the terms
                also come per group: ``kl_labelled``, ``kl_unlabelled`` (each the group's mean).
        """
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        gt_logits, gt_mask = student_logits, mask
        if labelled is not None and not bool(labelled.all()):
            gt_logits, gt_mask = student_logits[labelled], mask[labelled]
        if len(gt_logits):
            if w.bce > 0:
                terms["bce"] = bce_loss(gt_logits, gt_mask)
            if w.dice > 0:
                terms["dice"] = dice_loss(torch.sigmoid(gt_logits.float()), gt_mask)
        per: dict[str, torch.Tensor] = {}  # teacher terms, one value per sample
        if teacher_logits is not None and w.kl > 0:
            per["kl"] = binary_kl(teacher_logits, student_logits, temperature, per_sample=True)
        if teacher_logits is not None and w.mse > 0:
            per["mse"] = probability_mse(teacher_logits, student_logits, per_sample=True)
        if teacher_feature is not None and w.feature > 0:
            if projected_feature is None:
                raise ValueError("the feature loss needs the projected student feature")
            projected = projected_feature
            if projected.shape[-2:] != teacher_feature.shape[-2:]:
                if not self._warned_resize:
                    log.info("student feature grid %s differs from the feature teacher's %s: resizing the projected "
                             "feature bilinearly", tuple(projected.shape[-2:]), tuple(teacher_feature.shape[-2:]))
                    self._warned_resize = True
                projected = F.interpolate(projected, size=teacher_feature.shape[-2:], mode="bilinear", align_corners=False)
            per["feature"] = feature_mse(projected, teacher_feature, self.channel_norm, per_sample=True)
        for name, values in per.items():
            terms[name] = values.mean()
        total = sum((getattr(w, name) * value for name, value in terms.items()), student_logits.new_zeros(()).float())
        out = {k: v.detach() for k, v in terms.items()}
        if labelled is not None and per:
            for name, values in per.items():
                for group, sel in (("labelled", labelled), ("unlabelled", ~labelled)):
                    if bool(sel.any()):
                        out[f"{name}_{group}"] = values[sel].detach().mean()
        return total, out
