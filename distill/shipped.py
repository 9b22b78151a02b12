"""The demo's teachers, trained once to convergence and shipped with the repository (fp16, SHA-256 checked).

A user starts from a teacher someone else trained on a large corpus; the demo starts from teachers
the project trained on its own world's teacher corpus (``make teacher``), as the calibration
generator is shipped (``make generator``). Each asset is two files under ``distill/assets/demo_teachers``:

    <name>.safetensors   the weights in float16 (half the size; loading upcasts to float32)
    <name>.json          {"sha256": the weights', "command": what rebuilds them, "config": the settings,
                          "val_curve": the selection curve that stopped training, ...}

The folder is a repository asset, not package data: the wheel an edge device installs stays small.
A config names a shipped asset with ``demo`` (``teacher.checkpoint: demo``, ``feature_teacher.onnx:
demo``); loading it checks the hash and refuses a changed file with one line saying how to restore it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets" / "demo_teachers"
SHIPPED = "demo"  # the config value that names a shipped asset
TEACHER = "teacher"  # the B3 segmentation teacher
DETECTOR = "detector"  # the feature teacher: the demo's person detector


def weights_path(name: str, folder: Path = ASSETS) -> Path:
    return folder / f"{name}.safetensors"


def meta_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def ship(state: dict[str, torch.Tensor], name: str, meta: dict, folder: Path = ASSETS) -> dict:
    """Write ``state`` as float16 ``<name>.safetensors`` and ``<name>.json`` (with the weights' SHA-256); both atomic.

    Returns the metadata as written.
    """
    from safetensors.torch import save_file

    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    path = weights_path(name, folder)
    with atomic_path(path) as tmp:
        save_file(half, str(tmp), metadata={"format": "pt", "edgeseg_asset": name})
        tmp.chmod(0o644)  # a repository file, readable by all (the temporary file is private)
    meta = {**meta, "sha256": sha256_file(path), "bytes": path.stat().st_size, "dtype": "float16"}
    write_json_atomic(meta_path(path), meta)
    log.info("shipped %s: %s (%.1f MB, sha256 %s)", name, path, meta["bytes"] / 2**20, meta["sha256"][:12])
    return meta


def read_meta(weights: str | Path) -> dict:
    """The asset's JSON sidecar (its hash, command and settings)."""
    meta = meta_path(weights)
    if not meta.is_file():
        raise InputError(f"{meta}: the shipped asset's record is missing; restore it (git checkout {meta}) "
                         "or rebuild the demo teachers with `make teacher`")
    return json.loads(meta.read_text())


def load_checked(weights: str | Path) -> dict[str, torch.Tensor]:
    """The float32 state_dict of a safetensors file, after checking its SHA-256 against its JSON sidecar when it has one.

    A user's own ``.safetensors`` without a sidecar loads unchecked; a shipped one must match, else one
    line names the file and the fix.
    """
    from safetensors.torch import load_file

    weights = Path(weights)
    if not weights.is_file():
        raise InputError(f"{weights}: weights file does not exist; restore it (git checkout {weights}) or rebuild "
                         "the demo teachers with `make teacher`" if weights.parent == ASSETS else
                         f"{weights}: weights file does not exist; fix the path")
    if meta_path(weights).is_file():
        expected = read_meta(weights)["sha256"]
        digest = sha256_file(weights)
        if digest != expected:
            raise InputError(f"{weights}: SHA-256 {digest[:12]}... does not match {meta_path(weights).name}'s "
                             f"{expected[:12]}...; the file is damaged or was replaced: restore it (git checkout "
                             f"{weights}) or rebuild it with `make teacher`")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise InputError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {str(e)[:120]})") from None
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def resolve(value: str, name: str) -> Path | None:
    """The shipped asset's weights if ``value`` names it (``demo``), else None."""
    return weights_path(name) if value == SHIPPED else None


def training_curve(out_dir: str | Path) -> list[dict]:
    """The per-epoch validation records of a training run (its ``metrics.jsonl``): what chose when to stop."""
    path = Path(out_dir) / "metrics.jsonl"
    keep = ("epoch", "val_miou", "val_person_iou", "epoch_time_s", "lr", "temperature", "loss", "best", "stopped_early")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, path.read_text().splitlines())] if path.is_file() else []


def _finished_run(cfg, out_dir: Path, role: str, key: str, model, train_command: str) -> tuple[dict, dict]:
    """The state to ship from a finished training in ``out_dir`` and the record of how it was trained.

    ``key``: the checkpoint's state_dict key; ``model``: a network of the trained shape, to score the fp16 weights.
    Refused unless training has finished (its ``last.pt`` says complete). The record: best and trained epochs,
    val mIoU of the checkpoint and of its fp16 weights scored again (rounding can move a figure), the val curve
    that stopped training, its seconds and threads.
    """
    from edgeseg.distill.device import use_device
    from edgeseg.distill.evaluation import score_split

    if not (out_dir / "last.pt").is_file():
        raise InputError(f"{out_dir}: no {role} training to ship; run `{train_command}` first")
    last = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=False)
    if not last.get("complete"):
        raise InputError(f"{out_dir / 'last.pt'}: the {role}'s training has not finished (epoch {last['epoch']}); "
                         "run the same command again to resume it, then ship")
    ckpt = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=False)
    state = ckpt[key]
    device = use_device(cfg.device, cfg.threads)
    model.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in state.items()})
    val = score_split(cfg, {role: model.to(device)}, "val", device, reference=None)[role]
    curve = training_curve(out_dir)
    return state, {"best_epoch": ckpt.get("best_epoch"), "epochs_trained": last["epoch"],
                   "stopped_early": bool(last.get("stopped_early")), "val_miou_fp32": ckpt.get("best_miou"),
                   "val_miou_fp16": val["miou"], "val_curve": curve,
                   "train_seconds": round(sum(r.get("epoch_time_s", 0.0) for r in curve), 1),
                   "torch_threads": torch.get_num_threads()}


def ship_teacher(cfg, out_dir: str | Path, command: str, folder: Path = ASSETS) -> dict:
    """Ship the teacher ``distill train-teacher`` trained into ``out_dir`` (its ``best.pt``) as the demo teacher.

    The fp16 weights are scored on val again (rounding can move a figure), and the record keeps the
    settings, the val curve that stopped training and the command that rebuilds it.
    """
    from edgeseg.distill.config import config_to_dict
    from edgeseg.distill.data import split_samples
    from edgeseg.distill.models import build_model

    state, trained = _finished_run(cfg, Path(out_dir), "teacher", "model", build_model(cfg.teacher),
                                   "edgeseg distill train-teacher")
    meta = {"what": "the demo's B3 segmentation teacher, trained to convergence on the teacher corpus",
            "command": command, "model": config_to_dict(cfg.teacher) | {"checkpoint": ""},
            "train": config_to_dict(cfg.teacher_train), "data": {"teacher_split": cfg.data.teacher_split or "train",
                                                                 "images": len(split_samples(cfg, "teacher")),
                                                                 "image_size": list(cfg.data.image_size),
                                                                 "demo": config_to_dict(cfg.data.demo)},
            "seed": cfg.seed, **trained}
    return ship(state, TEACHER, meta, folder)


# --- the demo's ground-truth-only student (the baseline its reports compare against) ----------------------------

BASELINE = "baseline"


def baseline_identity(cfg) -> dict:
    """What the demo's ground-truth-only student depends on: its run identity (network, schedule, loss, labelled
    images, seed) and the demo world it learnt from. A shipped baseline stands in only where these match."""
    from edgeseg.distill.config import config_to_dict
    from edgeseg.distill.job import job_for
    from edgeseg.distill.resume import run_identity

    identity = run_identity(cfg, job_for(cfg, "baseline"), world=1)
    identity.get("data", {}).pop("unlabelled", None)  # the baseline learns from the labelled images alone
    identity["demo_world"] = config_to_dict(cfg.data.demo) if cfg.data.source == "demo" else None
    return identity


def ship_baseline(cfg, out_dir: str | Path, command: str, folder: Path = ASSETS) -> dict:
    """Ship the ground-truth-only student trained into ``out_dir`` (``distill train --baseline``) as the demo's.

    ``make demo`` then installs it instead of training it (:func:`install_baseline`): the same recipe, seed and
    data, so the same figures, without its share of the demo's time. The fp16 weights are scored on val again.
    """
    from edgeseg.distill.models import build_model

    if cfg.data.source != "demo":
        raise InputError(f"data.source is {cfg.data.source!r}: only the demo's baseline ships with the repository; "
                         "yours stays in its run folder")
    state, trained = _finished_run(cfg, Path(out_dir), "baseline", "student",
                                   build_model(cfg.student, cfg.student.feature_stride), "edgeseg distill train --baseline")
    meta = {"what": "the demo's ground-truth-only student (the 150 labelled images, the student's schedule)",
            "command": command, "identity": baseline_identity(cfg), **trained}
    return ship(state, BASELINE, meta, folder)


def baseline_misfit(cfg, folder: Path = ASSETS) -> str | None:
    """Why the shipped baseline cannot stand in for this config's ground-truth-only student (None: it can)."""
    from edgeseg.distill.resume import differences

    if cfg.data.source != "demo":
        return f"data.source is {cfg.data.source!r} and the shipped baseline learnt the demo's"
    meta = read_meta(weights_path(BASELINE, folder))
    diff = differences(meta.get("identity", {}), json.loads(json.dumps(baseline_identity(cfg))))
    return f"it was trained with other settings ({'; '.join(diff[:3])})" if diff else None


def install_baseline(cfg, folder: Path = ASSETS) -> Path:
    """Put the shipped baseline where a trained one goes (``<run_dir>/distill-baseline/best.pt``); returns that path.

    Refused, with the settings that differ, unless this config trains exactly what was shipped. A baseline
    trained here (its ``last.pt`` is there) is kept: it is the same recipe, and it is this run's.
    """
    from edgeseg.distill.checkpoint import save_atomic
    from edgeseg.distill.resume import CHECKPOINT_FORMAT

    out = cfg.stage_dir("distill-baseline")
    best = out / "best.pt"
    if (out / "last.pt").is_file() and best.is_file():
        log.info("%s: a baseline trained here; kept (remove the folder to use the shipped one)", out)
        return best
    weights = weights_path(BASELINE, folder)
    state = load_checked(weights)
    if (why := baseline_misfit(cfg, folder)) is not None:
        raise InputError(f"{weights}: not this config's baseline: {why}; train one with `make distill BASELINE=1`")
    meta = read_meta(weights)
    ckpt = {"format": CHECKPOINT_FORMAT, "role": "baseline", "student": state, "identity": meta["identity"],
            "best_miou": meta.get("val_miou_fp16"), "best_epoch": meta.get("best_epoch"), "complete": True,
            "shipped": {"weights": str(weights), "sha256": meta["sha256"], "command": meta.get("command")}}
    out.mkdir(parents=True, exist_ok=True)
    save_atomic(ckpt, best)
    log.info("baseline: the shipped one (%s, sha256 %s, val mIoU %.4f) -> %s", weights.name, meta["sha256"][:12],
             meta.get("val_miou_fp16") or float("nan"), best)
    return best


def provenance(checkpoint: str | Path) -> str:
    """Where a student checkpoint came from: ``shipped (<weights>)`` or ``trained here``."""
    try:
        shipped = torch.load(checkpoint, map_location="cpu", weights_only=True).get("shipped")
    except Exception:  # a plain state_dict or a foreign file: not ours to describe
        shipped = None
    return f"shipped ({shipped['weights']}, sha256 {shipped['sha256'][:12]})" if shipped else "trained here"
