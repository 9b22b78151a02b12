"""Distill benchmarks: student vs teacher speed, the decoder sweep, IOBinding vs session.run, the training step.

The distillation study (training the arms on several seeds) is ``make study`` (benchmarks/study.py),
not part of ``make bench``.

Speed is a property of the architecture, not of the weights, so the sweep exports each variant
with random weights; every variant runs on ONNX Runtime CPU at the demo resolution, interleaved.
The sweep uses EfficientNet's SiLU; the configured student (the headline) is added with its own
activation when that differs.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import SETTLE_S, interleaved, ratio, strip_samples, with_spread
from edgeseg.export.config import Config
from edgeseg.distill.models import UnetSegmenter
from edgeseg.distill.onnx_export import export_module
from edgeseg.runtime.sessions import cpu_session

log = logging.getLogger(__name__)

TEACHER = ("tu-efficientnet_b3", (256, 128, 64, 32, 16))
SWEEP = {  # name -> B0 decoder widths; 4 blocks = half-resolution output (+ x2 upsample)
    "b0_standard_256-128-64-32-16": (256, 128, 64, 32, 16),
    "b0_128-64-32-16-8": (128, 64, 32, 16, 8),
    "b0_64-32-16-16-8": (64, 32, 16, 16, 8),
    "b0_half_96-48-24-16": (96, 48, 24, 16),
    "b0_half_64-32-16-16": (64, 32, 16, 16),
    "b0_half_32-16-16-8": (32, 16, 16, 8),
}


def bench_decoders(cfg: Config, batch: int, threads: int, rounds: int) -> dict:
    hw = tuple(cfg.data.image_size)
    models = {"teacher_b3_standard": (*TEACHER, "silu"), **{k: ("tu-efficientnet_b0", v, "silu") for k, v in SWEEP.items()}}
    dec = tuple(cfg.student.decoder_channels)
    default = ("b0_half_" if len(dec) == 4 else "b0_") + "-".join(map(str, dec))
    if cfg.student.activation != "silu":
        default += f"_{cfg.student.activation}"
    if default not in models:
        models[default] = (cfg.student.encoder, dec, cfg.student.activation)
    x = np.random.default_rng(0).standard_normal((batch, 3, *hw)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions, params = {}, {}
        for name, (enc, dec, act) in models.items():
            torch.manual_seed(0)
            m = UnetSegmenter(enc, dec, activation=act).eval()
            params[name] = sum(p.numel() for p in m.parameters())
            path = export_module(m, Path(tmp) / f"{name}.onnx", torch.zeros(1, 3, *hw), ["images"], ["mask_logits"])
            sessions[name] = cpu_session(path, threads)
        res = interleaved({n: (lambda s=s: s.run(None, {"images": x})) for n, s in sessions.items()}, rounds=rounds,
                          settle_s=SETTLE_S)
    sweep = {n: {"decoder_channels": list(models[n][1]), "activation": models[n][2], "params": params[n],
                 "median_ms": r["median_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
                 "speedup_vs_teacher": ratio(res, "teacher_b3_standard", n)} for n, r in res.items()}
    out = {"default_student": default, "sweep": sweep, "threads": threads or "default"}
    with_spread(out, "student_vs_teacher_speedup", res, "teacher_b3_standard", default)
    return out


def bench_iobinding(cfg: Config, batch: int, rounds: int, threads: int = 0) -> dict:
    """The feature teacher call: session.run with numpy copies vs IOBinding into the preallocated tensor."""
    from edgeseg.distill.feature_onnx import expose_tensor
    from edgeseg.distill.onnx_teacher import OnnxFeatureTeacher

    from edgeseg.distill.teachers import feature_teacher_model

    exposed = expose_tensor(feature_teacher_model(cfg), cfg.feature_teacher.tensor)
    teacher = OnnxFeatureTeacher(exposed, "cpu", cfg.data.mean, cfg.data.std, threads=threads)
    images = torch.randn(batch, 3, *cfg.data.image_size)
    first = teacher(images)
    res = interleaved({"session_run_copies": lambda: teacher.run_with_copies(images),
                       "iobinding": lambda: teacher(images)}, rounds=rounds)
    out = {"iobinding_output_is_preallocated": teacher(images).data_ptr() == first.data_ptr(),
           "iobinding_equals_run": bool(torch.equal(teacher(images).clone(), teacher.run_with_copies(images))),
           "feature_shape": list(first.shape), "batch": batch, "timings": strip_samples(res)}
    with_spread(out, "iobinding_vs_run_speedup", res, "session_run_copies", "iobinding")
    return out


# the training step's variants: config changes over the demo's student (the demo student: cached targets, channels_last)
STEP_VARIANTS = {
    "live_nchw": ({"train.teacher_targets": "live", "train.channels_last": False}, "student"),  # the step before
    "live": ({"train.teacher_targets": "live"}, "student"),  # the teachers run on every batch
    "cached": ({"train.teacher_targets": "cached"}, "student"),  # the teachers' outputs cached (the default)
    "onnx_teacher_live": ({"train.teacher_targets": "live", "teacher.onnx.path": "{teacher_onnx}"}, "student"),
    "baseline": ({}, "baseline"),  # ground truth only: the student's own forward and backward
}


def _first_batch(trainer) -> tuple:
    """The first batch of the trainer's first epoch, as its step takes it."""
    from edgeseg.distill.sampler import EpochSampler

    dataset, mix = trainer._epoch_data()
    bs = trainer.job.train.batch_size
    sampler = EpochSampler(len(trainer.train_set), trainer.cfg.seed, 0, batch_size=bs, mix=mix,
                           length=trainer.data.epoch_length)
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=bs, sampler=sampler, drop_last=True)))


def bench_training_step(cfg: Config, rounds: int, threads: int = 0) -> dict:
    """One distillation step per variant of :data:`STEP_VARIANTS`, interleaved on the same first batch.

    ``onnx_teacher_step_ratio``: the teacher given as ONNX (the demo's, exported) over the torch teacher,
    both run on every batch; ``cached_step_speedup``: the live step over the cached one; and
    ``channels_last_step_speedup``: the NCHW step over the NHWC one.
    """
    from benchmarks.study import derived_config
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer
    from edgeseg.export.onnx_model import export_teacher_onnx

    teacher_onnx = export_teacher_onnx(cfg, cfg.stage_dir("seeds") / "teacher.onnx").resolve()
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (changes, role) in STEP_VARIANTS.items():
            changes = {k: v.format(teacher_onnx=teacher_onnx) if isinstance(v, str) else v for k, v in changes.items()}
            run = derived_config(cfg, Path(tmp) / name, cfg.seed, {**changes, "threads": threads}, f"step {name}")
            trainer = Trainer(run, job_for(run, role))
            trainer._setup()
            trainer.targets = trainer._teacher_targets()  # as run() does: the cache filled before the first epoch
            if name == "cached" and trainer.targets is None:
                raise RuntimeError("the cached variant has no teacher targets: it would time the live step")
            steps[name] = (trainer, _first_batch(trainer))
        res = interleaved({n: (lambda t=t, b=b: t._step(*b)) for n, (t, b) in steps.items()}, rounds=rounds,
                          settle_s=SETTLE_S)
    out = {"batch": cfg.train.batch_size, "threads": threads or "default", "step_timings": strip_samples(res)}
    with_spread(out, "onnx_teacher_step_ratio", res, "onnx_teacher_live", "live")  # ONNX over torch: <= 1 is no slower
    with_spread(out, "cached_step_speedup", res, "live", "cached")
    with_spread(out, "channels_last_step_speedup", res, "live_nchw", "live")
    with_spread(out, "cached_vs_baseline_step", res, "cached", "baseline")
    return out


def training_peak_memory(cfg: Config) -> dict:
    """``distill_train_peak_rss_mb``: the peak RSS of the demo's own student training (its own process, its metrics)."""
    jsonl = cfg.stage_dir("distill") / "metrics.jsonl"
    peaks = [json.loads(line).get("peak_rss_mb") for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    peaks = [p for p in peaks if p is not None]
    return {"distill_train_peak_rss_mb": max(peaks), "distill_train_batch": cfg.train.batch_size} if peaks else {}


def run(cfg: Config, rounds: int = 20) -> dict:
    """Headline speeds at the machine's default thread count; ``threads_1`` holds the 1-thread figures."""
    import os

    out = {"image_size": list(cfg.data.image_size), "backend": "onnxruntime-cpu (FP32)",
           "default_threads": os.cpu_count()}
    default = bench_decoders(cfg, batch=8, threads=0, rounds=rounds)  # 0: ONNX Runtime's default (all cores)
    one = bench_decoders(cfg, batch=8, threads=1, rounds=rounds)
    out.update(default)
    io_default = bench_iobinding(cfg, batch=cfg.train.batch_size, rounds=rounds * 2)
    io_one = bench_iobinding(cfg, batch=cfg.train.batch_size, rounds=rounds * 2, threads=1)
    out.update(io_default)
    step_default = bench_training_step(cfg, rounds)
    step_one = bench_training_step(cfg, rounds, threads=1)
    out.update(step_default)
    out["threads_1"] = {**one, **{k: v for k, v in io_one.items() if k.startswith("iobinding_vs")}, **step_one}
    return out
