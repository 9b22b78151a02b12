"""Confidence-guided hard examples for distillation (ConfiG), generated against the current student.

The mask-conditioned generator samples pairs for new conditioning masks, every sample guided to
maximise ``t^g + (1 - s)^g`` (the teacher confident, the student not: see
``guidance.ConfidenceGuide``). Each image is labelled by the mask it was generated for, so the
label does not come from a teacher that may itself be wrong on it; the usual filters (teacher
agrees with the condition, no copies, no leaks) decide what enters.

``distill train`` calls it every ``train.hard_examples.every`` epochs as a regenerated sample source
(:func:`hard_example_generator`, wired into the trainer by the ``edgeseg`` command or a caller).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from edgeseg.calibration.config import CalibratedConfig

from edgeseg.distill.config import HardExamplesConfig
from edgeseg.distill.sources import Generate


def hard_example_generator(cfg: CalibratedConfig) -> Generate:
    """The trainer's ``hard_examples`` source: ``(student, folder, seed) -> summary`` for this config."""
    return lambda student, folder, seed: hard_example_set(cfg, student, folder, cfg.train.hard_examples, seed)


def hard_example_set(cfg: CalibratedConfig, student, out_dir: str | Path, hard: HardExamplesConfig, seed: int) -> dict:
    """Write ``count`` hard pairs (images/, masks/, manifest.json) to ``out_dir``; returns a summary.

    Args:
        student: the student network being trained (a copy: guidance puts it in eval mode).
        hard: the training job's settings (count, guidance strength and range).
        seed: base seed of this set (a new one per regeneration).
    """
    from edgeseg.calibration.synth import Synthesizer

    cal = cfg.calibration
    g = cal.guidance
    h = hard
    guidance = dataclasses.replace(g, mode="confidence", hard_fraction=1.0, scale=h.scale, t_start=h.t_start,
                                   t_stop=h.t_stop, resolution=g.resolution or cal.ddpm.image_size)
    cal = dataclasses.replace(cal, generator="conditional", img2img_strength=0.0, guidance=guidance,
                              target=dataclasses.replace(cal.target, images=""),
                              model=cal.model if cal.generator == "conditional" else "")
    run = dataclasses.replace(cfg, calibration=cal)
    manifest = Synthesizer(run, "confidence", student_model=student, sample_seed=seed).run(out_dir, hard.count, overwrite=True)
    ious = [im["condition_iou"] for im in manifest["images"]]
    return {"kept": len(ious), "condition_iou_median": float(np.median(ious)), "seconds": manifest["seconds"]["total"]}
