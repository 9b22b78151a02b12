"""The student's schedule, set on val before the study: length, learning rate and warm-up, temperature, unlabelled share.

One seed (the config's), the demo's student (distillation with the unlabelled pool and the site
frames), teachers cached. The sweep is a coordinate search with a rule fixed before it ran:

1. length: the shortest of :data:`LENGTHS` whose best val mIoU is within :data:`MARGIN` of the best
   length's (the val curve flattens there);
2. at that length, each other knob in turn (:data:`KNOBS`): a candidate replaces the current value
   only if its best val mIoU beats the current settings' by more than :data:`MARGIN` (one seed's
   noise: smaller differences do not select).

Every run's val curve is written to ``benchmarks/results/schedule.json`` with the choice it made.
Runs live under ``<run_dir>/schedule/<name>`` and resume; a finished run is reused.
"""
from __future__ import annotations

import logging
from pathlib import Path

from benchmarks.study import derived_config
from edgeseg.export.config import Config

log = logging.getLogger(__name__)

LENGTHS = (10, 20, 30)  # epochs of 50 steps (800 samples per epoch at batch 16)
# knob -> candidate values (dotted config keys -> value); tried in this order against the current settings
KNOBS: dict[str, list[dict]] = {
    "lr": [{"train.lr": 1e-3}, {"train.lr": 4e-3}],
    "warmup": [{"train.warmup_steps": 100}],
    "temperature": [{"loss.temperature.schedule": "constant", "loss.temperature.t0": 1.0}],
    "unlabelled_share": [{"train.unlabelled_share": 0.25}, {"train.unlabelled_share": 0.75}],
}
MARGIN = 0.003  # val mIoU: a change must win by more than this to be chosen (one seed)


def _name(changes: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}-{v}" for k, v in sorted(changes.items())) or "reference"


def _curve(run_dir: Path) -> list[dict]:
    from edgeseg.distill.shipped import training_curve

    return training_curve(run_dir)


def _run(cfg: Config, changes: dict) -> dict:
    """Train (or reuse) the student with ``changes``; its val curve and best val mIoU."""
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer

    name = _name(changes)
    run = derived_config(cfg, cfg.stage_dir("schedule") / name, cfg.seed, changes, f"schedule sweep {name}")
    job = job_for(run, "student")
    log.info("schedule sweep: %s -> %s", name, job.out_dir)
    Trainer(run, job).run()
    curve = _curve(job.out_dir)
    best = max(curve, key=lambda r: r.get("val_miou", -1.0))
    return {"changes": changes, "curve": curve, "best_val_miou": best["val_miou"], "best_epoch": best["epoch"],
            "train_seconds": round(sum(r["epoch_time_s"] for r in curve), 1)}


def schedule_sweep(cfg: Config) -> dict:
    """Run the sweep (resuming finished runs) and return what it chose, with every run's val curve."""
    runs: dict[str, dict] = {}
    for epochs in LENGTHS:
        runs[f"epochs-{epochs}"] = _run(cfg, {"train.epochs": epochs})
    best = max(r["best_val_miou"] for k, r in runs.items() if k.startswith("epochs-"))
    length = min(e for e in LENGTHS if runs[f"epochs-{e}"]["best_val_miou"] >= best - MARGIN)
    chosen: dict = {"train.epochs": length}
    current = runs[f"epochs-{length}"]["best_val_miou"]
    decisions = [{"knob": "length", "chose": length, "val_miou": current,
                  "why": f"shortest of {list(LENGTHS)} within {MARGIN} of the best length's {best:.4f}"}]
    for knob, candidates in KNOBS.items():
        winner, winner_miou, tried = None, current, {}
        for change in candidates:
            name = _name({**chosen, **change})
            runs[name] = _run(cfg, {**chosen, **change})
            tried[name] = runs[name]["best_val_miou"]
            if runs[name]["best_val_miou"] > winner_miou + MARGIN:
                winner, winner_miou = change, runs[name]["best_val_miou"]
        if winner:
            chosen.update(winner)
            current = winner_miou
        decisions.append({"knob": knob, "chose": winner or "current", "val_miou": current, "candidates": tried})
    return {"split": "val", "seed": cfg.seed, "rule": __doc__.split("\n\n")[1].strip(), "margin": MARGIN,
            "chosen": chosen, "decisions": decisions, "runs": runs,
            "base": {"epochs": cfg.train.epochs, "lr": cfg.train.lr, "warmup_steps": cfg.train.warmup_steps,
                     "temperature": {"schedule": cfg.loss.temperature.schedule, "t0": cfg.loss.temperature.t0,
                                     "t1": cfg.loss.temperature.t1},
                     "unlabelled_share": cfg.train.unlabelled_share, "batch_size": cfg.train.batch_size}}


def plot_curves(result: dict, path: Path) -> Path:
    """The val curve of every run of the sweep (one panel per knob), the chosen settings marked: the picture
    of what chose the schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeseg.runtime.files import atomic_path

    runs = result["runs"]
    groups = {"length": [n for n in runs if n.startswith("epochs-")]}
    for d in result["decisions"][1:]:
        groups[d["knob"]] = list(d.get("candidates", {}))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), sharey=True)
    reference = f"epochs-{result['chosen'].get('train.epochs')}"
    for ax, (knob, names) in zip(axes, groups.items()):
        shown = names if knob == "length" else [reference, *names]
        for name in dict.fromkeys(shown):
            curve = runs[name]["curve"]
            ax.plot([r["epoch"] for r in curve], [r["val_miou"] for r in curve], label=name,
                    lw=2.2 if name == reference else 1.2)
        ax.set_title(knob, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val mIoU")
    fig.suptitle("the student's schedule, set on val: " + ", ".join(f"{k} {v}" for k, v in result["chosen"].items()),
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
