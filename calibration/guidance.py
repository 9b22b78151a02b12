"""Teacher guidance for the sampler: task, confidence and mode losses on the predicted clean image.

Each guide maps a batch of predicted clean images ``x0`` ((B, 3, h, w) in [-1, 1], the
generator's resolution) to a per-sample loss; the sampler differentiates it with respect to
``x0`` and nudges the noise prediction along the (normalised, clipped) gradient. The teacher
sees ``x0`` as the model would: resized to the model's input and normalised.

- task (UniDD-style): the teacher should segment confidently and find someone: mean binary
  entropy of its mask plus a hinge on the person fraction.
- confidence (ConfiG-style): maximise ``t^g + (1 - f)^g`` with t the teacher's and f the
  student's confidence: images the teacher is sure of and the student is not.
- mode (D4M / mode-guided): pull the teacher-encoder embedding towards the sample's
  assigned k-means prototype of real-image embeddings.
A diversity term (any guide) pushes each sample's embedding away from its batch-mates'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgeseg.distill.models import UnetSegmenter


class TeacherView:
    """Runs a UNet on generator-space images: (B, 3, h, w) in [-1, 1] -> logits and an embedding."""

    def __init__(self, model: UnetSegmenter, image_hw: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        # NHWC: oneDNN's faster convolutions for the guide's forward and backward (as for sampling, sampler.py)
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.image_hw = tuple(image_hw)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x01 = (x.clamp(-1, 1) + 1) / 2
        if tuple(x01.shape[-2:]) != self.image_hw:
            x01 = F.interpolate(x01, size=self.image_hw, mode="bilinear", align_corners=False)
        return ((x01 - self.mean.to(x.device)) / self.std.to(x.device)).contiguous(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else getattr(self.model, "device", torch.device("cpu"))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, 1, H, W) and the deepest encoder feature, average-pooled (B, C).

        Inputs are moved to the model's device (differentiably); the synthesizer keeps the model
        on the generator's device, so guidance makes no copies. A model that is not a UNet (an ONNX
        teacher) gives its logits and no embedding: it labels and filters, it cannot guide.
        """
        if not isinstance(self.model, UnetSegmenter):
            return self.model(self.prepare(x.to(self.device))), None
        features = self.model.encoder(self.prepare(x.to(self.device)))
        logits = self.model.segmentation_head(self.model.decoder(features))
        return logits, features[-1].mean(dim=(2, 3))


def binary_entropy(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@dataclass
class TaskGuide:
    """Confident teacher masks with someone in them."""

    teacher: TeacherView
    min_person_fraction: float = 0.05  # below this mean probability, the hinge pushes people in
    presence_weight: float = 2.0

    def __call__(self, x0: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, emb = self.teacher(x0)
        p = torch.sigmoid(logits)
        entropy = binary_entropy(p).mean(dim=(1, 2, 3))
        presence = F.relu(self.min_person_fraction - p.mean(dim=(1, 2, 3)))
        return entropy + self.presence_weight * presence, emb


@dataclass
class ConfidenceGuide:
    """Teacher confident, student not: maximise t^g + (1 - f)^g (per-pixel confidences)."""

    teacher: TeacherView
    student: TeacherView
    gamma: float = 2.0

    def __call__(self, x0: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_logits, emb = self.teacher(x0)
        s_logits, _ = self.student(x0)
        t = torch.sigmoid(t_logits)
        t_conf = torch.maximum(t, 1 - t)
        s = torch.sigmoid(s_logits)
        # the student's confidence in the teacher's answer: low where they disagree or it hesitates
        f = torch.where(t > 0.5, s, 1 - s)
        objective = (t_conf ** self.gamma + (1 - f) ** self.gamma).mean(dim=(1, 2, 3))
        return -objective, emb


@dataclass
class MaskGuide:
    """The teacher should find people exactly where the conditioning mask has them (mean pixel BCE).

    For the mask-conditioned generator: ``masks`` holds each pool image's conditioning mask, at
    any resolution (resized to the teacher's logits).
    """

    teacher: TeacherView
    masks: dict  # pool index -> (1, h, w) {0, 1} conditioning mask, filled by the synthesizer per batch

    def __call__(self, x0: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, emb = self.teacher(x0)
        target = torch.stack([self.masks[int(i)] for i in index]).to(logits)
        target = F.interpolate(target, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2, 3)), emb


@dataclass
class ModeGuide:
    """Pull each sample towards the prototype (k-means centre) of its assigned mode."""

    teacher: TeacherView
    prototypes: torch.Tensor  # (K, C) unit-norm centres of real-image embeddings
    assignment: torch.Tensor  # (N,) mode of each image in the pool, indexed by ``index``

    def __call__(self, x0: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, emb = self.teacher(x0)
        target = self.prototypes[self.assignment[index]]
        return 1 - F.cosine_similarity(emb, target, dim=1), emb


@dataclass
class MixedGuide:
    """Per sample, one of two guides: the hard (confidence) minority and the task-guided rest."""

    task: TaskGuide
    hard: ConfidenceGuide
    is_hard: torch.Tensor  # (N,) bool over the pool, indexed by ``index``

    def __call__(self, x0: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hard = self.is_hard[index]
        task_loss, emb = self.task(x0, index)
        if not hard.any():
            return task_loss, emb
        hard_loss, _ = self.hard(x0, index)
        return torch.where(hard, hard_loss, task_loss), emb


def diversity_loss(emb: torch.Tensor) -> torch.Tensor:
    """(B,) mean cosine similarity of each embedding to the other samples of the batch."""
    b = emb.shape[0]
    if b < 2:
        return emb.new_zeros(b)
    z = F.normalize(emb, dim=1)
    sim = z @ z.t()
    return (sim.sum(dim=1) - sim.diagonal()) / (b - 1)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Plain k-means++ on (N, C) rows: (centres (k, C), labels (N,)). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = min(k, n)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(n, p=d / d.sum()) if d.sum() > 0 else rng.integers(n)])
    c = np.asarray(centres, np.float64)
    labels = np.zeros(n, np.int64)
    for _ in range(iters):
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(axis=1)
        new = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c.astype(np.float32), labels


def medoids(x: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Index of the real row nearest each centre, within its cluster."""
    out = []
    for j, c in enumerate(centres):
        members = np.flatnonzero(labels == j)
        members = members if members.size else np.arange(len(x))
        out.append(members[((x[members] - c) ** 2).sum(1).argmin()])
    return np.asarray(out)
