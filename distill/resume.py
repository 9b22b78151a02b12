"""Checkpoint identity, resume checks and ``best.pt`` repair: which ``last.pt`` a run may continue.

A run resumes ``<out_dir>/last.pt`` only if it was written by a run with the same identity (the
settings that change what is trained: role, model, training and loss settings, image size, seed,
world size, the label budget). Options added later are left out while off, so checkpoints written
before them still resume.
"""
from __future__ import annotations

import filecmp
import logging
import shutil
from pathlib import Path

from edgeseg.distill.config import DistillConfig, config_to_dict
from edgeseg.distill.job import TrainJob
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edgeseg-train/1"


def run_identity(cfg: DistillConfig, job: TrainJob, world: int) -> dict:
    """The settings a checkpoint must share with this run to be resumed by it."""
    c = config_to_dict(cfg)
    model = config_to_dict(job.model)
    if model.get("activation") == "silu":  # the default, implicit in checkpoints written before the option
        del model["activation"]
    train = config_to_dict(job.train)
    if not train.get("extra_share"):  # off: implicit in checkpoints written before the options
        train.pop("extra_data", None), train.pop("extra_share", None)
    if not train.get("hard_examples", {}).get("share"):
        train.pop("hard_examples", None)
    if not train.get("unlabelled_share"):
        train.pop("unlabelled_share", None)
    if not train.get("patience"):
        train.pop("patience", None), train.pop("min_delta", None)
    # added later, left out at their defaults (a checkpoint written before them resumes): the target cache and
    # the memory layout change no weight a finished run holds, only how fast and in what order of float rounding
    for key, default in (("teacher_targets", "auto"), ("cache_limit_mb", 4096), ("channels_last", True)):
        if train.get(key) == default:
            train.pop(key, None)
    if not (model.get("onnx") or {}).get("path"):
        model.pop("onnx", None)
    model.pop("checkpoint", None)  # where trained weights are read from, not what this run trains
    out = {"role": job.role, "model": model, "train": train,
           "loss": config_to_dict(job.loss), "image_size": c["data"]["image_size"], "seed": c["seed"],
           "world": world}
    d = c["data"]
    if job.role == "teacher" and d.get("teacher_split"):
        out["data"] = {"teacher_split": d["teacher_split"]}
    elif job.role != "teacher" and (d.get("labelled_count") or d.get("unlabelled")):
        out["data"] = {k: d[k] for k in ("labelled_count", "labelled_seed", "unlabelled")}
    return out


def check_resumable(ckpt: dict, last: Path, identity: dict) -> None:
    """Raise InputError unless ``ckpt`` (read from ``last``) is a training checkpoint of this identity."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{last}: not an edgeseg training checkpoint; move it away or pass --fresh")
    saved = {**ckpt["identity"], "model": {k: v for k, v in ckpt["identity"].get("model", {}).items()
                                           if k != "checkpoint"}}  # written before run_identity left it out
    if saved != identity:
        diff = [k for k in saved if saved[k] != identity.get(k)]
        raise InputError(f"{last}: was trained with different settings ({', '.join(diff)}); "
                         "pass --fresh to start over, or point run_dir elsewhere")


def copy_best(out_dir: Path) -> None:
    """``best.pt`` := a byte copy of the ``last.pt`` just written (atomically)."""
    with atomic_path(out_dir / "best.pt") as tmp:
        shutil.copyfile(out_dir / "last.pt", tmp)


def repair_best(ckpt: dict, out_dir: Path) -> None:
    """Rewrite ``best.pt`` if a crash came between saving the best epoch's ``last.pt`` and copying it.

    ``best.pt`` is a byte copy of ``last.pt`` taken right after the best epoch's save, so the only
    window where it can lag is while ``last.pt`` still is that epoch's checkpoint.
    """
    best, last = out_dir / "best.pt", out_dir / "last.pt"
    best_epoch = ckpt.get("best_epoch", 0)
    at_best = best_epoch > 0 and ckpt["epoch"] == best_epoch and ckpt["batch_in_epoch"] == 0
    if at_best and not (best.is_file() and filecmp.cmp(best, last, shallow=False)):
        log.warning("%s is older than the best epoch (%d, val mIoU %.4f) recorded in %s; rewriting it",
                    best, best_epoch, ckpt["best_miou"], last)
        copy_best(out_dir)
