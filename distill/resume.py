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


def teacher_identity(cfg) -> dict:
    """What the segmentation teacher is: its weights' SHA-256 (an ONNX teacher: the file's, and its I/O)."""
    from edgeseg.runtime.files import sha256_file

    if cfg.teacher.is_onnx:
        from edgeseg.distill.teachers import teacher_io

        return {"onnx_sha256": sha256_file(cfg.teacher.onnx.path), "io": teacher_io(cfg).to_dict()}
    return {"sha256": sha256_file(cfg.teacher_checkpoint)}


def run_identity(cfg: DistillConfig, job: TrainJob, world: int, targets: str | None = None,
                 teacher: dict | None = None) -> dict:
    """The settings a checkpoint must share with this run to be resumed by it.

    ``targets``: how the teachers' outputs reach the step (``cached`` / ``live``, resolved); ``teacher``:
    what the segmentation teacher is (:func:`teacher_identity`), so a changed teacher never resumes silently.
    """
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
    # the resolved mode stands for the setting (auto is cached or live by size); without teachers it means nothing
    train.pop("cache_limit_mb", None)
    train.pop("teacher_targets", None)
    if targets is not None:
        train["teacher_targets"] = targets
    # added later, left out at its default: the memory layout changes float rounding, not what is trained
    if train.get("channels_last") is True:
        train.pop("channels_last")
    if not (model.get("onnx") or {}).get("path"):
        model.pop("onnx", None)
    model.pop("checkpoint", None)  # where trained weights are read from, not what this run trains
    out = {"role": job.role, "model": model, "train": train, **({"teacher": teacher} if teacher else {}),
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
    saved = _as_today(ckpt["identity"], identity)
    if saved != identity:
        diff = differences(saved, identity)
        raise InputError(f"{last}: was trained with different settings ({'; '.join(diff[:4])}); "
                         "pass --fresh to start over, or point run_dir elsewhere")


def _as_today(saved: dict, identity: dict) -> dict:
    """A checkpoint's identity read as this version writes it (keys it predates take their meaning then)."""
    saved = {**saved, "model": {k: v for k, v in saved.get("model", {}).items() if k != "checkpoint"}}
    if "teacher" in identity and "teacher" not in saved:  # written before the teacher was recorded
        saved["teacher"] = identity["teacher"]
    train = identity.get("train", {})
    if "teacher_targets" in train and "teacher_targets" not in saved.get("train", {}):
        # written before the mode was recorded (its training may have run either way): taken as this run's
        saved["train"] = {**saved["train"], "teacher_targets": train["teacher_targets"]}
    return saved


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys where ``a`` (the checkpoint's) and ``b`` (this run's) differ, with both values."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


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
