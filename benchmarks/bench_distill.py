"""Distill benchmarks: the seed study, student vs teacher speed, the decoder sweep, IOBinding vs session.run.

The seed study trains the distilled and the ground-truth-only student on several seeds (same
teacher, same data, same budget) and scores both on test and test_shift: the gain of
distillation with its spread, paired by seed. Seed 0 is the demo's own run (reused, not retrained).

Speed is a property of the architecture, not of the weights, so the sweep exports each variant
with random weights; every variant runs on ONNX Runtime CPU at the demo resolution, interleaved.
The sweep uses EfficientNet's SiLU; the configured student (the headline) is added with its own
activation when that differs.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import interleaved, ratio, strip_samples, with_spread
from edgeseg.distill.config import Config
from edgeseg.distill.models import UnetSegmenter
from edgeseg.distill.onnx_export import export_module

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


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


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
            sessions[name] = _session(path, threads)
        res = interleaved({n: (lambda s=s: s.run(None, {"images": x})) for n, s in sessions.items()}, rounds=rounds)
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

    exposed = expose_tensor(cfg.feature_teacher_onnx, cfg.feature_teacher.tensor)
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


TARGET_SHARE = 0.25  # share of each epoch from target-domain pairs: fixed beforehand, not tuned on these figures
HARD = {"share": 0.2, "count": 64, "every": 3, "start": 2}  # ConfiG hard examples, fixed beforehand likewise


def _variants(cfg: Config, run: Config, seed: int) -> dict[str, Config]:
    """The synthetic-data variants of one seed's distillation (same seed, data, teachers and budget)."""
    import dataclasses

    from edgeseg.distill.config import HardExamplesConfig

    out = {}
    target_set = cfg.stage_dir("calibration") / "target"
    base = cfg.stage_dir("seeds") / f"seed{seed}"
    pinned = dataclasses.replace(run, data=dataclasses.replace(run.data, root=str(cfg.data_root)),
                                 teacher=dataclasses.replace(run.teacher, checkpoint=str(cfg.teacher_checkpoint)),
                                 feature_teacher=dataclasses.replace(run.feature_teacher, onnx=str(cfg.feature_teacher_onnx)),
                                 calibration=dataclasses.replace(run.calibration, model=str(cfg.stage_dir("calibration") / "cddpm")))
    if (target_set / "masks").is_dir():
        out["target"] = dataclasses.replace(pinned, run_dir=f"{base}-target", train=dataclasses.replace(
            run.train, extra_data=str(target_set), extra_share=TARGET_SHARE))
    else:
        log.warning("seed study: no target-domain pairs in %s (make calibrate writes them): target variant skipped", target_set)
    if cfg.calibration.generator == "conditional":
        out["hard"] = dataclasses.replace(pinned, run_dir=f"{base}-hard", train=dataclasses.replace(
            run.train, hard_examples=HardExamplesConfig(**HARD)))
    return out


def _hard_cost(run_dir: Path) -> dict:
    """What the hard examples cost one run: generation seconds (manifests) beside training seconds (metrics,
    which exclude generation: it happens before each epoch's clock starts)."""
    import json

    gen = [json.loads(m.read_text())["seconds"]["total"] for m in sorted((run_dir / "distill" / "hard").glob("*/manifest.json"))]
    metrics = run_dir / "distill" / "metrics.jsonl"
    train = sum(json.loads(line)["epoch_time_s"] for line in metrics.read_text().splitlines()) if metrics.is_file() else 0.0
    return {"generations": len(gen), "generate_s": float(sum(gen)), "train_s": float(train),
            "generation_share": float(sum(gen) / max(sum(gen) + train, 1e-9))}


def seed_study(cfg: Config, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Distilled vs ground-truth-only student over ``seeds``: test and test_shift mIoU, paired gains.

    Beside them, the distilled student with target-domain pairs (``target``) and with ConfiG hard
    examples (``hard``), each paired by seed with the plain distilled student.
    """
    import dataclasses

    from edgeseg.distill.data import has_split
    from edgeseg.distill.evaluation import score_split
    from edgeseg.distill.models import load_model
    from edgeseg.distill.trainer import Trainer, job_for, resolve_device

    splits = [s for s in ("test", "test_shift") if has_split(cfg, s)] or ["val"]
    device = resolve_device(cfg.device)
    teacher = load_model(cfg.teacher, cfg.teacher_checkpoint).to(device)
    per_seed = []
    for seed in seeds:
        # seed 0 is the demo's own run; other seeds train beside it, sharing data and teachers
        run = cfg if seed == cfg.seed else dataclasses.replace(
            cfg, seed=seed, run_dir=str(cfg.stage_dir("seeds") / f"seed{seed}"),
            data=dataclasses.replace(cfg.data, root=str(cfg.data_root)),
            teacher=dataclasses.replace(cfg.teacher, checkpoint=str(cfg.teacher_checkpoint)),
            feature_teacher=dataclasses.replace(cfg.feature_teacher, onnx=str(cfg.feature_teacher_onnx)))
        models = {"teacher": teacher}
        for role, name in (("student", "student"), ("baseline", "nodistill")):
            job = job_for(run, role)
            log.info("seed study: seed %d, %s -> %s", seed, role, job.out_dir)
            Trainer(run, job).run()
            models[name] = load_model(cfg.student, job.out_dir / "best.pt", cfg.student.feature_stride,
                                      keys=("student",)).to(device)
        row = {"seed": seed}
        for variant, vrun in _variants(cfg, run, seed).items():
            job = job_for(vrun, "student")
            log.info("seed study: seed %d, student + %s -> %s", seed, variant, job.out_dir)
            Trainer(vrun, job).run()
            models[variant] = load_model(cfg.student, job.out_dir / "best.pt", cfg.student.feature_stride,
                                         keys=("student",)).to(device)
            if variant == "hard":
                row["hard_cost"] = _hard_cost(Path(vrun.run_dir))
        for split in splits:
            sc = score_split(cfg, models, split, device)
            row[split] = {"student_miou": sc["student"]["miou"], "nodistill_miou": sc["nodistill"]["miou"],
                          "teacher_miou": sc["teacher"]["miou"], "agreement": sc["student"]["agreement"],
                          "distill_gain": sc["student"]["miou"] - sc["nodistill"]["miou"]}
            for variant in ("target", "hard"):
                if variant in sc:
                    row[split][f"{variant}_miou"] = sc[variant]["miou"]
                    row[split][f"{variant}_gain"] = sc[variant]["miou"] - sc["student"]["miou"]
        per_seed.append(row)
    out: dict = {"seeds": list(seeds), "splits": splits, "per_seed": per_seed}
    for split in splits:
        tag = "test" if split == "test" else split
        for key, name in (("student_miou", "student"), ("nodistill_miou", "nodistill")):
            mean, std = _mean_std([r[split][key] for r in per_seed])
            out[f"{name}_{tag}_miou_mean"], out[f"{name}_{tag}_miou_std"] = mean, std
        mean, std = _mean_std([r[split]["distill_gain"] for r in per_seed])
        suffix = "" if split == "test" else f"_{tag}"
        out[f"distill_gain{suffix}_mean"], out[f"distill_gain{suffix}_std"] = mean, std
    if "test_shift" in splits:
        # what the shift costs the distilled student (no synthetic data involved), paired by seed
        out["shift_loss_mean"], out["shift_loss_std"] = _mean_std(
            [r["test"]["student_miou"] - r["test_shift"]["student_miou"] for r in per_seed])
    for variant, name in (("target", "target_domain"), ("hard", "hard_examples")):
        if not all(f"{variant}_gain" in r[splits[0]] for r in per_seed):
            continue
        for split in splits:
            mean, std = _mean_std([r[split][f"{variant}_gain"] for r in per_seed])
            if split == "test":  # on the source domain the question is what it costs: a delta
                out[f"{name}_delta_test_mean"], out[f"{name}_delta_test_std"] = mean, std
            else:
                out[f"{name}_gain_{split}_mean"], out[f"{name}_gain_{split}_std"] = mean, std
            m, sd = _mean_std([r[split][f"{variant}_miou"] for r in per_seed])
            out[f"{variant}_{split}_miou_mean"], out[f"{variant}_{split}_miou_std"] = m, sd
        if "test_shift" in splits and out.get("shift_loss_mean", 0) > 0:
            out[f"{name}_recovered_shift_share"] = out[f"{name}_gain_test_shift_mean"] / out["shift_loss_mean"]
    if all("hard_cost" in r for r in per_seed):
        out["hard_examples_cost"] = {k: float(np.mean([r["hard_cost"][k] for r in per_seed]))
                                     for k in per_seed[0]["hard_cost"]}
        out["hard_examples_settings"] = dict(HARD)
    if any("target_miou" in r[splits[0]] for r in per_seed):
        out["target_domain_share"] = TARGET_SHARE
    gain, std = out["distill_gain_mean"], out["distill_gain_std"]
    out["distill_gain_verdict"] = (f"gain {gain * 100:+.2f} points, std {std * 100:.2f} over {len(seeds)} seeds: "
                                   + ("beyond 2 std" if gain > 2 * std else "within noise (under 2 std)"))
    return out


def run(cfg: Config, rounds: int = 20, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
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
    out["threads_1"] = {**one, **{k: v for k, v in io_one.items() if k.startswith("iobinding_vs")}}
    out.update(seed_study(cfg, seeds))
    return out
