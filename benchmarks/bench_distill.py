"""Distill benchmarks: the seed study, student vs teacher speed, the decoder sweep, IOBinding vs session.run.

The seed study trains the arms of "distillation where it pays" (a label budget, a teacher that
knows more, unlabelled source and site frames, each loss family switched off) on several seeds,
same teacher, data and step budget, and scores each on test and test_shift: gains paired by seed.
Seed 0's ground-truth-only and site students are the demo's own runs (reused, not retrained).

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


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std; the std of a single value is None (no spread measured), never 0."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


# The study's arms: (training role, config changes over the demo's own, what it is). Fixed before any arm
# ran, from the demo's settings (shares, epochs, label budget), not tuned on these figures.
ARMS: dict[str, tuple[str, dict, str]] = {
    "gt_only": ("baseline", {}, "a: ground truth only, the labelled subset"),
    "kd_labelled": ("student", {"train.unlabelled_share": 0.0}, "b: distillation, the labelled subset only"),
    "kd_unlabelled": ("student", {"data.unlabelled": ""}, "c: distillation + the unlabelled source frames (the pool)"),
    "kd_site": ("student", {}, "d: c + the unlabelled site frames (the demo's own student)"),
    "kd_no_feature": ("student", {"data.unlabelled": "", "loss.feature": 0.0}, "e: c with the feature term off"),
    "kd_feature_only": ("student", {"data.unlabelled": "", "loss.kl": 0.0, "loss.mse": 0.0},
                        "f: c with the logit terms (KL, MSE) off: ground truth + feature teacher only"),
    # a new site from a handful of frames (README "At a new site"): {site8} is <data>/target_images (8 unlabelled
    # frames of test_shift's site), {site8_synth} those 8 beside SITE_SYNTH_COUNT synthetic site images
    "site8": ("student", {"data.unlabelled": "{site8}"}, "g: c + the 8 unlabelled site frames (repeated to d's share)"),
    "site8_synth": ("student", {"data.unlabelled": "{site8_synth}"},
                    "h: c + the 8 site frames and synthetic site images steered by them, teacher-labelled"),
    "site8_synth_hard": ("student", {"data.unlabelled": "{site8_synth}", "train.hard_examples.share": 0.1},
                         "i: h + ConfiG hard examples against the current student (confidence objective)"),
    "full_gt_only": ("baseline", {"data.labelled_count": 0}, "a with every train image labelled"),
    "full_kd": ("student", {"data.labelled_count": 0, "data.unlabelled": "", "train.unlabelled_share": 0.0},
                "distillation with every train image labelled"),
}
# What runs where, in this order (the study's budget on 2 cores): the arms the targets compare on every
# seed first, then the ablations and the full-label contrast on the first seed only.
EVERY_SEED = ("gt_only", "kd_unlabelled", "kd_site", "site8", "site8_synth")
FIRST_SEED_ONLY = ("site8_synth_hard", "kd_labelled", "kd_no_feature", "kd_feature_only", "full_gt_only", "full_kd")
SITE_ARMS = ("site8", "site8_synth", "site8_synth_hard")  # `--only site` reruns these beside a, c and d
# gains between site arms whose plain key (`<key>_mean`) is test_shift's, test's beside as `<key>_test_*`
SITE_HEADLINE = ("site8_synth_vs_site8", "site8_synth_vs_kd_site", "site8_synth_hard_vs_site8_synth")
# N, the synthetic site images of arm h: as many as arm d has real site frames, so h is d's synthetic
# counterpart at an equal count (what synthesis buys over the 8 frames, against what 400 real frames buy)
SITE_SYNTH_COUNT = 400
# every key a study writes, and those of the study this one replaced (synthetic variants in the old demo
# world): dropped before a rerun writes its own, so a rerun with fewer arms leaves no figure of another run
STALE_PREFIXES = ("distill_gain", "student_test", "nodistill_", "target_", "hard_", "per_seed", "seeds", "splits",
                  "arms", "arm_", "label_budget", "unlabelled_share", "gain_", "feature_term", "logit_terms",
                  "shift_loss", "site_recovered", "teacher_test", *(f"{a}_" for a in ARMS))


def _arm_config(cfg: Config, arm: str, seed: int) -> tuple[Config, str]:
    """The config and training role of ``arm`` on ``seed``: the demo's own runs for its seed, else a run of its
    own under <run_dir>/seeds, sharing the data, the teacher and the feature teacher."""
    from edgeseg.distill.config import config_to_dict, parse_config

    from edgeseg.distill.teachers import feature_teacher_model

    role, changes, _ = ARMS[arm]
    if seed == cfg.seed and arm in ("gt_only", "kd_site"):
        return cfg, role  # make distill trained these two
    folders = site_folders(cfg) if any("{site8" in str(v) for v in changes.values()) else {}
    raw = config_to_dict(cfg)
    raw.update(seed=seed, run_dir=str(cfg.stage_dir("seeds") / f"seed{seed}-{arm}"))
    raw["data"]["root"] = str(cfg.data_root)
    raw["teacher"]["checkpoint"] = str(cfg.teacher_checkpoint)
    raw["feature_teacher"]["onnx"] = str(feature_teacher_model(cfg))
    for key, value in changes.items():
        *sections, field = key.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[field] = str(value).format(**folders) if isinstance(value, str) else value
    return parse_config(raw, type(cfg), source=f"seed study arm {arm}"), role


def site_folders(cfg: Config, count: int | None = None) -> dict[str, str]:
    """``{site8}`` (the 8 frames) and ``{site8_synth}`` (the frames + SITE_SYNTH_COUNT synthetic site images), made once.

    The synthetic images come from the shipped generator steered by the 8 frames (calibration.target), as
    ``make calibrate-target`` makes them: the teacher, itself hurt by the shift, does not filter them on
    confidence. Their conditioning masks are not used: arm h reads the folder as unlabelled, so the teacher
    labels every image (its soft outputs and features).
    """
    import dataclasses
    import shutil

    from edgeseg.calibration.synth import Synthesizer

    frames = cfg.data_root / "target_images"
    synth = cfg.stage_dir("seeds") / "site_synth"
    if not (synth / "manifest.json").is_file():
        cal = cfg.calibration
        run = dataclasses.replace(cfg, calibration=dataclasses.replace(
            cal, filter=dataclasses.replace(cal.filter, max_uncertain_fraction=1.0)))
        count = count or SITE_SYNTH_COUNT
        log.info("synthesising %d site images steered by the 8 frames in %s -> %s", count, frames, synth)
        Synthesizer(run, target_images=frames).run(synth, count, overwrite=True)
    both = cfg.stage_dir("seeds") / "site8_synth_frames"
    wanted = [(p, f"frame_{p.name}") for p in sorted(frames.glob("*.png"))] + \
             [(p, f"synth_{p.name}") for p in sorted((synth / "images").glob("*.png"))]
    if sorted(q.name for q in both.glob("*.png")) != sorted(name for _, name in wanted):
        tmp = both.with_name(both.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for src, name in wanted:
            shutil.copyfile(src, tmp / name)
        shutil.rmtree(both, ignore_errors=True)
        tmp.rename(both)
    return {"site8": str(frames.resolve()), "site8_synth": str(both.resolve())}  # absolute: data.unlabelled is read under the data root otherwise


def _runnable(cfg: Config, arm: str) -> bool:
    """Whether the config has what the arm needs (a label budget with a pool; site frames)."""
    if arm in ("full_gt_only", "full_kd"):
        return cfg.data.labelled_count > 0  # without a budget the full-label arms are a and b
    if arm in ("kd_unlabelled", "kd_no_feature", "kd_feature_only"):
        return cfg.data.labelled_count > 0 and cfg.train.unlabelled_share > 0
    if arm == "kd_site":
        return bool(cfg.data.unlabelled) and cfg.train.unlabelled_share > 0
    if arm in SITE_ARMS:
        return (cfg.data_root / "target_images").is_dir() and cfg.train.unlabelled_share > 0
    return True


def _train_seconds(run_dir: Path) -> float:
    import json

    path = run_dir / "metrics.jsonl"
    return float(sum(json.loads(line)["epoch_time_s"] for line in path.read_text().splitlines())) if path.is_file() else 0.0


def _paired(per_seed: list[dict], split: str, a: str, b: str) -> list[float]:
    """b - a on ``split`` for every seed where both arms ran."""
    return [r[split][b] - r[split][a] for r in per_seed if a in r[split] and b in r[split]]


def seed_study(cfg: Config, seeds: tuple[int, ...] = (0, 1, 2), arms: tuple[str, ...] | None = None) -> dict:
    """Distillation where it pays: the arms of :data:`ARMS` over ``seeds``, scored on test and test_shift.

    :data:`EVERY_SEED` arms run on every seed, then :data:`FIRST_SEED_ONLY` on the first (the study's
    budget on 2 cores); ``arms`` keeps only those named. Gains are paired by seed. A completed arm
    (its ``last.pt`` complete) is reused, so an interrupted study resumes.
    """
    from edgeseg.distill.data import has_split
    from edgeseg.distill.evaluation import score_split
    from edgeseg.distill.device import resolve_device
    from edgeseg.distill.models import load_model, load_teacher
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer

    from edgeseg.calibration.hard_examples import hard_example_generator
    splits = [s for s in ("test", "test_shift") if has_split(cfg, s)] or ["val"]
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg, device)
    unknown = set(arms or ()) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arm(s) {sorted(unknown)}; choose from {', '.join(ARMS)}")
    wanted = [a for a in ARMS if (arms is None or a in arms) and _runnable(cfg, a)]
    plan = [(s, a) for s in seeds for a in EVERY_SEED if a in wanted] + \
           [(seeds[0], a) for a in FIRST_SEED_ONLY if a in wanted]
    trained: dict[tuple[int, str], Path] = {}
    arm_seeds, seconds = {}, {}
    for n, (seed, arm) in enumerate(plan, 1):
        run, role = _arm_config(cfg, arm, seed)
        job = job_for(run, role)
        log.info("seed study %d/%d: seed %d, arm %s (%s) -> %s", n, len(plan), seed, arm, ARMS[arm][2], job.out_dir)
        # calibration's hard-example generator, as the `edgeseg` command wires it into `distill train` (arm i)
        Trainer(run, job, generators={"hard_examples": hard_example_generator(run)}).run()
        trained[seed, arm] = job.out_dir / "best.pt"
        arm_seeds.setdefault(arm, []).append(seed)
        seconds.setdefault(arm, []).append(_train_seconds(job.out_dir))
    # every seed's students scored in one pass per split beside one pass of the teacher (seed-independent)
    models = {"teacher": teacher}
    for (seed, arm), path in trained.items():
        models[f"{arm}@{seed}"] = load_model(cfg.student, path, cfg.student.feature_stride, keys=("student",)).to(device)
    scores = {split: score_split(cfg, models, split, device) for split in splits}
    per_seed = []
    for seed in seeds:
        row = {"seed": seed}
        for split in splits:
            sc = {name.split("@")[0]: v for name, v in scores[split].items() if name == "teacher" or name.endswith(f"@{seed}")}
            row[split] = {name: v["miou"] for name, v in sc.items()}
            row[split]["agreement"] = {name: v["agreement"] for name, v in sc.items() if name != "teacher"}
        per_seed.append(row)
    out: dict = {"seeds": list(seeds), "splits": splits, "per_seed": per_seed,
                 "seeds_completed": [r["seed"] for r in per_seed if all(a in r[splits[0]] for a in EVERY_SEED
                                                                        if a in wanted)],
                 "arms": {a: ARMS[a][2] for a in arm_seeds}, "arm_seeds": arm_seeds,
                 "arm_train_seconds": {a: float(np.mean(v)) for a, v in seconds.items()},
                 "label_budget": cfg.data.labelled_count, "unlabelled_share": cfg.train.unlabelled_share}
    for split in splits:
        for arm in ["teacher", *arm_seeds]:
            vals = [r[split][arm] for r in per_seed if arm in r[split]]
            out[f"{arm}_{split}_miou_mean"], out[f"{arm}_{split}_miou_std"] = _mean_std(vals)
    gains = {  # key -> (from arm a, to arm b): b - a, paired by seed
        "gain_kd_unlabelled_vs_gt_only": ("gt_only", "kd_unlabelled"),
        "gain_kd_labelled_vs_gt_only": ("gt_only", "kd_labelled"),
        "gain_unlabelled_vs_labelled_only": ("kd_labelled", "kd_unlabelled"),
        "gain_site_vs_source": ("kd_unlabelled", "kd_site"),
        "feature_term_effect": ("kd_no_feature", "kd_unlabelled"),
        "logit_terms_effect": ("kd_feature_only", "kd_unlabelled"),
        "gain_kd_full_labels": ("full_gt_only", "full_kd"),
        # the site arms over c (no site data), as gain_site_vs_source is d over c
        "site8_gain": ("kd_unlabelled", "site8"),
        "site8_synth_gain": ("kd_unlabelled", "site8_synth"),
        "site8_synth_hard_gain": ("kd_unlabelled", "site8_synth_hard"),
        # between site arms: questions about the site, so their plain key is test_shift's (SITE_HEADLINE)
        "site8_synth_vs_site8": ("site8", "site8_synth"),
        "site8_synth_vs_kd_site": ("kd_site", "site8_synth"),
        "site8_synth_hard_vs_site8_synth": ("site8_synth", "site8_synth_hard"),
    }
    for key, (a, b) in gains.items():
        for split in splits:
            vals = _paired(per_seed, split, a, b)
            if vals:
                headline = "test_shift" if key in SITE_HEADLINE and "test_shift" in splits else "test"
                name = key if split == headline else f"{key}_{split}"
                out[f"{name}_mean"], out[f"{name}_std"] = _mean_std(vals)
                out[f"{name}_n"] = len(vals)
    if "test_shift" in splits and "gt_only" in arm_seeds:
        # what the shift costs the ground-truth-only student, paired by seed: what site frames should win back
        out["shift_loss_mean"], out["shift_loss_std"] = _mean_std(
            [r["test"]["gt_only"] - r["test_shift"]["gt_only"] for r in per_seed])
        if "gain_site_vs_source_test_shift_mean" in out and out["shift_loss_mean"] > 0:
            out["site_recovered_shift_share"] = out["gain_site_vs_source_test_shift_mean"] / out["shift_loss_mean"]
    if "test_shift" in splits:  # what h (and g, i) recover of what d recovers over c, paired by seed
        for arm in SITE_ARMS:
            own = _paired(per_seed, "test_shift", "kd_unlabelled", arm)
            full = [r["test_shift"]["kd_site"] - r["test_shift"]["kd_unlabelled"] for r in per_seed
                    if arm in r["test_shift"] and "kd_site" in r["test_shift"] and "kd_unlabelled" in r["test_shift"]]
            if own and np.mean(full) > 0:
                out[f"{arm}_recovered_share_of_site"] = float(np.mean(own) / np.mean(full))
        if "site8_synth" in arm_seeds:
            synth = site_folders(cfg)["site8_synth"]
            out["site8_synth_images"] = {"frames": len(list(Path(synth).glob("frame_*.png"))),
                                         "synthetic": len(list(Path(synth).glob("synth_*.png"))),
                                         "why_n": "as many as arm d's real site frames: h is d's synthetic counterpart"}
    out.update(training_peak_memory(cfg))
    if "kd_unlabelled_test_miou_mean" in out:
        out["kd_unlabelled_vs_teacher_test"] = out["kd_unlabelled_test_miou_mean"] / out["teacher_test_miou_mean"]
    if "gain_kd_unlabelled_vs_gt_only_mean" in out:
        gain, std = out["gain_kd_unlabelled_vs_gt_only_mean"], out["gain_kd_unlabelled_vs_gt_only_std"]
        out["gain_kd_unlabelled_verdict"] = (
            f"gain {gain * 100:+.2f} points over 1 seed: no spread measured" if std is None else
            f"gain {gain * 100:+.2f} points, std {std * 100:.2f} over {out['gain_kd_unlabelled_vs_gt_only_n']} seeds: "
            + ("beyond 2 std" if gain > 2 * std else "within noise (under 2 std)"))
    return out


def training_peak_memory(cfg: Config) -> dict:
    """``distill_train_peak_rss_mb``: the peak RSS of the demo's own student training (its own process, its metrics)."""
    jsonl = cfg.stage_dir("distill") / "metrics.jsonl"
    peaks = [json.loads(line).get("peak_rss_mb") for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    peaks = [p for p in peaks if p is not None]
    return {"distill_train_peak_rss_mb": max(peaks), "distill_train_batch": cfg.train.batch_size} if peaks else {}


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
