"""``make study``: the distillation study at convergence, resumable per arm and seed, outside ``make bench`` and CI.

    python -m benchmarks.study --config configs/demo.yaml [--seeds 0,1,2] [--arms gt_only,kd_site] [--more-seeds]

Each arm is the demo's student schedule (set on val before the study: ``benchmarks/results/schedule.json``)
with one change, trained on several seeds against the same teachers and data, and scored on ``test``
and ``test_shift``; gains are paired by seed. Arms a, c and d run on every seed first, then the
rest on the first seed, then (``--more-seeds``) the single-seed arms on the other seeds. A finished
arm (its ``last.pt`` complete) is reused, so a stopped study resumes where it stopped. An arm whose run is not
on this machine (a new clone) but whose scores ``distill.json`` already holds under the same schedule, label
budget and unlabelled share is kept as recorded, so the committed results are what a study resumes from; and
the results accumulate: arms and seeds an earlier study recorded stay when a later one asks for others.

Writes the study's keys of ``benchmarks/results/distill.json`` (the speed keys there are ``make bench``'s),
with what the study cost (``study_train_seconds``: every arm's training, across resumes).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click
import numpy as np

from edgeseg.export.config import Config

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"

# The study's arms: (training role, config changes over the demo's own, what it is). Fixed before any arm ran.
# {site8}: <data>/target_images, 8 unlabelled frames of test_shift's site; {site8_synth}: those 8 beside
# SITE_SYNTH_COUNT synthetic site images steered by them; {teacher_onnx}: the demo's teacher exported to ONNX.
ARMS: dict[str, tuple[str, dict, str]] = {
    "gt_only": ("baseline", {}, "a: ground truth only, the 150 labelled images"),
    "full_labels": ("baseline", {"data.labelled_count": 0}, "b: ground truth only, all 800 labels: the student's own ceiling"),
    "kd_unlabelled": ("student", {"data.unlabelled": ""}, "c: distillation + the unlabelled source frames (the pool)"),
    "kd_site": ("student", {}, "d: c + the 400 unlabelled site frames (the demo's own student)"),
    "kd_no_feature": ("student", {"data.unlabelled": "", "loss.feature": 0.0}, "e: c without the feature term"),
    "kd_feature_only": ("student", {"data.unlabelled": "", "loss.kl": 0.0, "loss.mse": 0.0},
                        "f: c with the feature term alone (ground truth + feature teacher, no KL or MSE)"),
    "site8": ("student", {"data.unlabelled": "{site8}"}, "g: c + the 8 unlabelled site frames (repeated to d's share)"),
    "site8_synth": ("student", {"data.unlabelled": "{site8_synth}"},
                    "h: c + the 8 site frames and synthetic site images steered by them, teacher-labelled"),
    "kd_site_live": ("student", {"train.teacher_targets": "live"},
                     "d with the teachers run on every augmented batch instead of cached targets"),
    "kd_site_onnx_teacher": ("student", {"teacher.onnx.path": "{teacher_onnx}"},
                             "d with the segmentation teacher given as an ONNX file (teacher.onnx)"),
}
EVERY_SEED = ("gt_only", "kd_unlabelled", "kd_site")  # what the headline targets compare: every seed first
FIRST_SEED = ("full_labels", "kd_no_feature", "kd_feature_only", "site8", "site8_synth", "kd_site_live",
              "kd_site_onnx_teacher")
MORE_SEEDS = ("site8", "site8_synth", "full_labels", "kd_no_feature", "kd_feature_only")  # --more-seeds, in this order
SITE_ARMS = ("site8", "site8_synth")
# gains between site arms: a question about the site, so the plain key is test_shift's (test's beside as `_test`)
SITE_HEADLINE = ("site8_synth_vs_site8",)
# N, the synthetic site images of arm h: as many as arm d has real site frames (h is d's synthetic counterpart)
SITE_SYNTH_COUNT = 400
# every key a study writes, and those of the studies it replaced: dropped before a rerun writes its own
STALE_PREFIXES = ("distill_gain", "student_test", "nodistill_", "target_", "hard_", "per_seed", "seeds", "splits",
                  "arms", "arm_", "label_budget", "unlabelled_share", "gain_", "feature_term", "logit_terms",
                  "shift_loss", "site_recovered", "teacher_test", "teacher_minus", "site8", "seed_study", "study_",
                  "onnx_teacher_test", "torch_teacher_test", "live_teacher", "kd_", "gt_only", "full_", "schedule",
                  "onnx_teacher_effect")
GAINS = {  # key -> (from arm, to arm): to - from, paired by seed
    "gain_kd_unlabelled_vs_gt_only": ("gt_only", "kd_unlabelled"),
    "gain_site_vs_source": ("kd_unlabelled", "kd_site"),
    "gain_kd_site_vs_gt_only": ("gt_only", "kd_site"),
    "gain_full_labels_vs_gt_only": ("gt_only", "full_labels"),
    "feature_term_effect": ("kd_no_feature", "kd_unlabelled"),
    "logit_terms_effect": ("kd_feature_only", "kd_unlabelled"),
    "site8_gain": ("kd_unlabelled", "site8"),
    "site8_synth_gain": ("kd_unlabelled", "site8_synth"),
    "site8_synth_vs_site8": ("site8", "site8_synth"),
    "live_teacher_effect": ("kd_site", "kd_site_live"),
    "onnx_teacher_effect": ("kd_site", "kd_site_onnx_teacher"),
}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std; the std of a single value is None (no spread measured), never 0."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def derived_config(cfg: Config, run_dir: Path, seed: int, changes: dict, what: str) -> Config:
    """``cfg`` with ``changes`` (dotted keys) applied, training into ``run_dir`` on ``seed``, sharing the demo's data,
    teacher and feature teacher (absolute paths, so the derived run reads what the demo made)."""
    from edgeseg.distill.config import config_to_dict, parse_config
    from edgeseg.distill.teachers import feature_teacher_model

    raw = config_to_dict(cfg)
    raw.update(seed=seed, run_dir=str(run_dir))
    raw["data"]["root"] = str(cfg.data_root.resolve())
    raw["teacher"]["checkpoint"] = str(cfg.teacher_checkpoint.resolve())
    if cfg.feature_teacher.enabled:
        raw["feature_teacher"]["onnx"] = str(feature_teacher_model(cfg).resolve())
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return parse_config(raw, type(cfg), source=what)


def _placeholders(cfg: Config, changes: dict) -> dict:
    """The arm's folders and files, made once: {site8}, {site8_synth}, {teacher_onnx}."""
    wanted = "".join(str(v) for v in changes.values())
    out = site_folders(cfg) if "{site8" in wanted else {}
    if "{teacher_onnx}" in wanted:
        from edgeseg.export.onnx_model import export_teacher_onnx

        out["teacher_onnx"] = str(export_teacher_onnx(cfg, cfg.stage_dir("seeds") / "teacher.onnx").resolve())
    return out


def arm_config(cfg: Config, arm: str, seed: int) -> tuple[Config, str]:
    """The config and training role of ``arm`` on ``seed``: the demo's own runs for its seed, else a run of its
    own under <run_dir>/seeds, sharing the data, the teacher and the feature teacher."""
    role, changes, _ = ARMS[arm]
    if seed == cfg.seed and arm in ("gt_only", "kd_site"):
        return cfg, role  # make distill trained these two
    folders = _placeholders(cfg, changes)
    changes = {k: v.format(**folders) if isinstance(v, str) else v for k, v in changes.items()}
    return derived_config(cfg, cfg.stage_dir("seeds") / f"seed{seed}-{arm}", seed, changes, f"study arm {arm}"), role


def site_folders(cfg: Config, count: int | None = None) -> dict[str, str]:
    """``{site8}`` (the 8 frames) and ``{site8_synth}`` (the frames + SITE_SYNTH_COUNT synthetic site images), made once.

    The synthetic images come from the shipped generator steered by the 8 frames (calibration.target), as
    ``make calibrate-target`` makes them, guided by the teacher: the teacher, itself hurt by the shift, does
    not filter them on confidence. Arm h reads the folder as unlabelled, so the teacher labels every image.
    """
    import dataclasses
    import shutil

    from edgeseg.calibration.synth import Synthesizer

    frames = cfg.data_root / "target_images"
    synth = cfg.stage_dir("seeds") / "site_synth"
    if not (synth / "manifest.json").is_file():
        cal = cfg.calibration
        # the teacher guides, whatever guides the demo's calibration set: the arm needs no student of its own
        run = dataclasses.replace(cfg, calibration=dataclasses.replace(
            cal, filter=dataclasses.replace(cal.filter, max_uncertain_fraction=1.0),
            guidance=dataclasses.replace(cal.guidance, model="teacher")))
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
    # absolute: data.unlabelled is read under the data root otherwise
    return {"site8": str(frames.resolve()), "site8_synth": str(both.resolve())}


def _runnable(cfg: Config, arm: str) -> bool:
    """Whether the config has what the arm needs (a label budget with a pool; site frames)."""
    if arm == "full_labels":
        return cfg.data.labelled_count > 0  # without a budget it is arm a
    if arm in ("kd_unlabelled", "kd_no_feature", "kd_feature_only"):
        return cfg.data.labelled_count > 0 and cfg.train.unlabelled_share > 0
    if arm in ("kd_site", "kd_site_live", "kd_site_onnx_teacher"):
        return bool(cfg.data.unlabelled) and cfg.train.unlabelled_share > 0
    if arm in SITE_ARMS:
        return (cfg.data_root / "target_images").is_dir() and cfg.train.unlabelled_share > 0
    return True


def _train_seconds(run_dir: Path) -> float:
    from edgeseg.distill.shipped import training_curve

    return float(sum(r.get("epoch_time_s", 0.0) for r in training_curve(run_dir)))


def _paired(per_seed: list[dict], split: str, a: str, b: str) -> list[float]:
    """b - a on ``split`` for every seed where both arms ran."""
    return [r[split][b] - r[split][a] for r in per_seed if a in r[split] and b in r[split]]


def plan(cfg: Config, seeds: tuple[int, ...], arms: tuple[str, ...] | None = None,
         more_seeds: bool = False) -> list[tuple[int, str]]:
    """(seed, arm) in training order: a, c, d on every seed; the rest on the first; ``more_seeds``: the rest again."""
    unknown = set(arms or ()) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arm(s) {sorted(unknown)}; choose from {', '.join(ARMS)}")
    wanted = [a for a in ARMS if (arms is None or a in arms) and _runnable(cfg, a)]
    out = [(s, a) for s in seeds for a in EVERY_SEED if a in wanted] + \
          [(seeds[0], a) for a in FIRST_SEED if a in wanted]
    if more_seeds:
        out += [(s, a) for a in MORE_SEEDS if a in wanted for s in seeds[1:]]
    return out


def _schedule(cfg: Config) -> dict:
    return {"epochs": cfg.train.epochs, "lr": cfg.train.lr, "warmup_steps": cfg.train.warmup_steps,
            "temperature": cfg.loss.temperature.schedule, "batch_size": cfg.train.batch_size}


def recorded_arms(previous: dict | None, cfg: Config, splits: list[str]) -> dict[tuple[int, str], dict]:
    """The (seed, arm) scores an earlier study wrote (``previous``: distill.json), if it ran the same schedule,
    label budget, unlabelled share and splits: {(seed, arm): {split: miou, "agreement": {split: a}, "seconds": s}}."""
    if not previous or not previous.get("per_seed"):
        return {}
    same = (previous.get("schedule") == _schedule(cfg) and previous.get("splits") == splits
            and previous.get("label_budget") == cfg.data.labelled_count
            and previous.get("unlabelled_share") == cfg.train.unlabelled_share)
    if not same:
        log.info("distill.json's study ran another schedule or data set-up: none of its arms is reused")
        return {}
    out = {}
    for row in previous["per_seed"]:
        for arm in row[splits[0]]:
            if arm in ARMS and all(arm in row[s] for s in splits):
                seed = row["seed"]
                seconds = previous.get("arm_seed_seconds", {}).get(f"{arm}@{seed}",
                                                                   previous.get("arm_train_seconds", {}).get(arm, 0.0))
                out[seed, arm] = {**{s: row[s][arm] for s in splits},
                                  "agreement": {s: row[s]["agreement"].get(arm) for s in splits},
                                  "seconds": float(seconds)}
    return out


def seed_study(cfg: Config, seeds: tuple[int, ...] = (0, 1, 2), arms: tuple[str, ...] | None = None,
               more_seeds: bool = False, previous: dict | None = None) -> dict:
    """Train every (seed, arm) of :func:`plan` (reusing finished ones), score them on test and test_shift, pair gains.

    ``previous`` (the distill.json an earlier study wrote): a (seed, arm) with no run here keeps its recorded scores.
    """
    from edgeseg.calibration.hard_examples import hard_example_generator
    from edgeseg.distill.data import has_split
    from edgeseg.distill.device import resolve_device
    from edgeseg.distill.evaluation import score_split
    from edgeseg.distill.job import job_for
    from edgeseg.distill.models import load_model, load_teacher
    from edgeseg.distill.trainer import Trainer

    splits = [s for s in ("test", "test_shift") if has_split(cfg, s)] or ["val"]
    device = resolve_device(cfg.device)
    order = plan(cfg, seeds, arms, more_seeds)
    recorded = recorded_arms(previous, cfg, splits)
    trained: dict[tuple[int, str], Path] = {}
    took: dict[tuple[int, str], float] = {}  # training seconds per (seed, arm), run here or recorded
    for n, (seed, arm) in enumerate(order, 1):
        run, role = arm_config(cfg, arm, seed)
        job = job_for(run, role)
        if (seed, arm) in recorded and not (job.out_dir / "last.pt").is_file():
            log.info("study %d/%d: seed %d, arm %s kept as distill.json recorded it (its run is not here)",
                     n, len(order), seed, arm)
            continue
        log.info("study %d/%d: seed %d, arm %s (%s) -> %s", n, len(order), seed, arm, ARMS[arm][2], job.out_dir)
        Trainer(run, job, generators={"hard_examples": hard_example_generator(run)}).run()
        trained[seed, arm] = job.out_dir / "best.pt"
        took[seed, arm] = _train_seconds(job.out_dir)
    # what an earlier study recorded and this one did not train stays (asked for or not): the results accumulate
    kept = {k: rec for k, rec in recorded.items() if k not in trained}
    took.update({k: rec["seconds"] for k, rec in kept.items()})
    arm_seeds = {a: sorted(s for s, b in took if b == a) for a in ARMS if any(b == a for _, b in took)}
    seeds = tuple(sorted(set(seeds) | {s for s, _ in kept}))
    # every seed's students scored in one pass per split beside one pass of the teacher (seed-independent)
    models = {"teacher": load_teacher(cfg, device)}
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
            for (s, arm), rec in kept.items():
                if s == seed:
                    row[split][arm] = rec[split]
                    row[split]["agreement"][arm] = rec["agreement"][split]
        per_seed.append(row)
    out: dict = {"seeds": list(seeds), "splits": splits, "per_seed": per_seed,
                 "seeds_completed": [r["seed"] for r in per_seed if all(a in r[splits[0]] for a in EVERY_SEED)],
                 "arms": {a: ARMS[a][2] for a in arm_seeds}, "arm_seeds": arm_seeds,
                 "arm_train_seconds": {a: float(np.mean([took[s, a] for s in ss])) for a, ss in arm_seeds.items()},
                 "arm_seed_seconds": {f"{a}@{s}": t for (s, a), t in took.items()},
                 "arms_kept_as_recorded": sorted(f"{a}@{s}" for s, a in kept),
                 "study_train_seconds": float(sum(took.values())),
                 "label_budget": cfg.data.labelled_count, "unlabelled_share": cfg.train.unlabelled_share,
                 "schedule": _schedule(cfg)}
    for split in splits:
        for arm in ["teacher", *arm_seeds]:
            vals = [r[split][arm] for r in per_seed if arm in r[split]]
            out[f"{arm}_{split}_miou_mean"], out[f"{arm}_{split}_miou_std"] = _mean_std(vals)
    for key, (a, b) in GAINS.items():
        for split in splits:
            vals = _paired(per_seed, split, a, b)
            if vals:
                headline = "test_shift" if key in SITE_HEADLINE and "test_shift" in splits else "test"
                name = key if split == headline else f"{key}_{split}"
                out[f"{name}_mean"], out[f"{name}_std"] = _mean_std(vals)
                out[f"{name}_n"] = len(vals)
    _derived(out, per_seed, splits, cfg)
    return out


def _derived(out: dict, per_seed: list[dict], splits: list[str], cfg: Config) -> None:
    """The figures the targets read, computed from the arms' scores."""
    if "test_shift" in splits and "gt_only_test_miou_mean" in out:
        # what the shift costs the ground-truth-only student, paired by seed: what site frames should win back
        out["shift_loss_mean"], out["shift_loss_std"] = _mean_std(
            [r["test"]["gt_only"] - r["test_shift"]["gt_only"] for r in per_seed if "gt_only" in r["test"]])
        if "gain_site_vs_source_test_shift_mean" in out and out["shift_loss_mean"] > 0:
            out["site_recovered_shift_share"] = out["gain_site_vs_source_test_shift_mean"] / out["shift_loss_mean"]
    for split in splits:
        if f"gt_only_{split}_miou_mean" in out:  # what the teacher knows beyond the labels: the most distillation hands on
            out[f"teacher_minus_gt_only_{split}"] = out[f"teacher_{split}_miou_mean"] - out[f"gt_only_{split}_miou_mean"]
        if f"kd_site_{split}_miou_mean" in out:
            out[f"kd_site_vs_teacher_{split}"] = out[f"kd_site_{split}_miou_mean"] / out[f"teacher_{split}_miou_mean"]
    if "test_shift" in splits and "site8_synth" in out["arm_seeds"]:
        own = _paired(per_seed, "test_shift", "kd_unlabelled", "site8_synth")
        full = _paired(per_seed, "test_shift", "kd_unlabelled", "kd_site")
        if own and full and np.mean(full) > 0:
            out["site8_synth_recovered_share_of_site"] = float(np.mean(own) / np.mean(full))
        synth = site_folders(cfg)["site8_synth"]
        out["site8_synth_images"] = {"frames": len(list(Path(synth).glob("frame_*.png"))),
                                     "synthetic": len(list(Path(synth).glob("synth_*.png")))}
    row0 = per_seed[0][splits[0]]
    if "kd_site_onnx_teacher" in row0 and "kd_site" in row0:  # the same seed, the teacher as torch or as ONNX
        out["onnx_teacher_test_miou"], out["torch_teacher_test_miou"] = row0["kd_site_onnx_teacher"], row0["kd_site"]
    if "gain_kd_unlabelled_vs_gt_only_mean" in out:
        gain, std = out["gain_kd_unlabelled_vs_gt_only_mean"], out["gain_kd_unlabelled_vs_gt_only_std"]
        out["gain_kd_unlabelled_verdict"] = (
            f"gain {gain * 100:+.2f} points over 1 seed: no spread measured" if std is None else
            f"gain {gain * 100:+.2f} points, std {std * 100:.2f} over {out['gain_kd_unlabelled_vs_gt_only_n']} seeds: "
            + ("beyond 2 std" if gain > 2 * std else "within noise (under 2 std)"))


def is_study_key(key: str) -> bool:
    """Whether a key of distill.json is the study's (``make bench`` leaves those as the study wrote them)."""
    return key.startswith(STALE_PREFIXES)


def write_study(result: dict, path: Path = RESULTS / "distill.json") -> Path:
    """Replace the study's keys of ``path`` with ``result`` (the speed keys, ``make bench``'s, stay)."""
    from edgeseg.runtime.files import write_json_atomic

    old = json.loads(path.read_text()) if path.is_file() else {}
    kept = {k: v for k, v in old.items() if not is_study_key(k)}
    return write_json_atomic(path, {**kept, **result})


@click.command()
@click.option("--config", "config_path", default="configs/demo.yaml", show_default=True, help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Training seeds.")
@click.option("--arms", default=None, help="Comma-separated arms (default: every arm of ARMS).")
@click.option("--more-seeds", is_flag=True, help="Then train the single-seed arms on the other seeds too.")
@click.option("--rescore", is_flag=True, help="Train every arm whose run is not here, ignoring the scores distill.json holds.")
@click.option("-v", "--verbose", count=True, help="-v info (the default here), -vv debug.")
def main(config_path, overrides, seeds, arms, more_seeds, rescore, verbose):
    """Train and score the study's arms (resuming finished ones) and write their keys into distill.json."""
    from edgeseg.distill.cli import load, use_schema
    from edgeseg.runtime.errors import EdgesegError

    use_schema(Config)
    seed_list = tuple(int(x) for x in seeds.split(",") if x.strip()) if all(
        x.strip().isdigit() for x in seeds.split(",") if x.strip()) else ()
    if not seed_list:
        raise click.BadParameter(f"{seeds!r}: give one or more seeds, e.g. 0,1,2", param_hint="--seeds")
    arm_list = tuple(a.strip() for a in arms.split(",") if a.strip()) if arms else None
    if arm_list and set(arm_list) - set(ARMS):
        raise click.BadParameter(f"unknown arm(s) {sorted(set(arm_list) - set(ARMS))}; choose from {', '.join(ARMS)}",
                                 param_hint="--arms")
    try:
        cfg = load(config_path, overrides, max(verbose, 1))
        t0 = time.perf_counter()
        path = RESULTS / "distill.json"
        previous = json.loads(path.read_text()) if path.is_file() and not rescore else None
        result = seed_study(cfg, seed_list, arm_list, more_seeds, previous)
    except EdgesegError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # study_train_seconds (in the result): every arm's training, across resumes; this: the invocation's wall time
    result.update(study_measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), study_wall_seconds=time.perf_counter() - t0,
                  study_config=config_path)
    write_study(result, path)
    print(json.dumps({"results": str(path), "arm_seeds": result["arm_seeds"],
                      "study_train_seconds": result["study_train_seconds"]}))


if __name__ == "__main__":
    main()
