"""Strip: the inference student from a distillation checkpoint, without anything training-only.

The projection head was never part of the student (it belongs to the feature loss and is saved
under its own checkpoint key), so stripping is loading the ``student`` weights strictly into a fresh UNet.
:func:`verify_stripped` proves it: the stripped model's output equals the training model's
segmentation output exactly, and it holds no projection parameters.
"""
from __future__ import annotations

from pathlib import Path

import torch

from edgeseg.distill.checkpoint import load_checkpoint
from edgeseg.export.config import Config
from edgeseg.distill.losses import DistillationModel, ProjectionHead
from edgeseg.distill.models import UnetSegmenter, build_model, check_activation
from edgeseg.runtime.errors import InputError


def load_student(cfg: Config, checkpoint: str | Path) -> tuple[UnetSegmenter, dict]:
    """The student UNet (eval mode) and the checkpoint dict it came from.

    Raises InputError when the file has no ``student`` weights (e.g. a teacher checkpoint) or
    they do not fit the configured student.
    """
    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt.get("student"), dict):
        keys = ", ".join(sorted(k for k in ckpt if isinstance(k, str))[:8])
        raise InputError(f"{checkpoint}: has no 'student' weights (keys: {keys}); pass a distillation checkpoint "
                         "such as <run_dir>/distill/best.pt")
    check_activation(ckpt, cfg.student.activation, checkpoint)
    model = build_model(cfg.student, cfg.student.feature_stride)
    try:
        model.load_state_dict(ckpt["student"], strict=True)
    except RuntimeError as e:
        raise InputError(f"{checkpoint}: student weights do not fit encoder {cfg.student.encoder} with decoder "
                         f"{list(cfg.student.decoder_channels)} ({str(e).splitlines()[1:2]})") from None
    return model.eval(), ckpt


def training_model(cfg: Config, ckpt: dict) -> torch.nn.Module:
    """The student + the feature loss's projection head exactly as training ran them (for the strip check)."""
    student = build_model(cfg.student, cfg.student.feature_stride)
    student.load_state_dict(ckpt["student"])
    projection = ProjectionHead.from_state_dict(ckpt["projection"]) if ckpt.get("projection") else None
    return DistillationModel(student, projection).eval()


@torch.no_grad()
def verify_stripped(stripped: UnetSegmenter, trained: torch.nn.Module, image_hw: tuple[int, int], batch: int = 2,
                    seed: int = 0) -> dict:
    """Check the stripped model against the training model; returns what was checked.

    Raises AssertionError if an output differs by any bit or a projection parameter remains.
    """
    import copy

    g = torch.Generator().manual_seed(seed)
    # both in the training module's memory layout (NHWC when it trained channels_last): the same weights run
    # the same kernels, so any difference is in the weights, not in the convolution algorithm
    nhwc = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in trained.parameters())
    layout = torch.channels_last if nhwc else torch.contiguous_format
    x = torch.randn(batch, 3, *image_hw, generator=g).contiguous(memory_format=layout)
    reference, _ = trained(x)
    out = copy.deepcopy(stripped).to(memory_format=layout)(x)
    if not torch.equal(out, reference):
        raise AssertionError(f"stripped student differs from the training model (max |diff| {(out - reference).abs().max():.3g})")
    leftover = [n for n, _ in stripped.named_parameters() if "projection" in n]
    if leftover:
        raise AssertionError(f"stripped student still holds projection parameters: {leftover[:3]}")
    n_train = sum(p.numel() for p in trained.parameters())
    n_strip = sum(p.numel() for p in stripped.parameters())
    return {"bit_identical": True, "training_params": n_train, "stripped_params": n_strip,
            "removed_params": n_train - n_strip}
