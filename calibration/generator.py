"""The generator a calibration run starts from: pretrained and shipped, or trained at run time.

Users start from a generator pretrained on a large corpus (Stable Diffusion). The demo gets the
same footing: a mask-conditioned DDPM pretrained by the project on the demo world's labelled
corpus (the teacher's split, all of its conditions; never val, test or test_shift images),
shipped in fp16 under ``calibration/assets/demo_generator`` and rebuilt by ``make generator``::

    <folder>/unet/config.json, diffusion_pytorch_model.safetensors   fp16 weights
    <folder>/ddpm.json   {"pretrained": true, "key": what it was trained on, "sha256": the weights',
                          "command": the exact command that rebuilds it, "scheduler": ..., "train_seconds": ...}

``calibration.model: demo`` names the shipped folder. Pretraining checkpoints every
``checkpoint_every`` steps into ``<folder>.partial/state.pt`` (written atomically) and resumes from
there, so a stopped ``make generator`` loses at most one slice of steps.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from edgeseg.calibration.ddpm import _META, DDPMTraining, _images_fingerprint
from edgeseg.calibration.config import DDPMConfig
from edgeseg.distill.config import config_to_dict
from edgeseg.distill.data import Sample
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path, replace_dir, sha256_file, staging_dir

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent / "assets" / "demo_generator"
NAMES = {"demo": SHIPPED}  # calibration.model values that name a shipped generator
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def resolve(model: str) -> Path:
    """``calibration.model`` as a folder: a shipped generator's name, or a path."""
    return NAMES.get(model, Path(model))


def is_pretrained(folder: str | Path) -> bool:
    meta = Path(folder) / _META
    return meta.is_file() and bool(json.loads(meta.read_text()).get("pretrained"))


def load_pretrained(folder: str | Path):
    """The pretrained UNet (float32, eval) and its scheduler config, after checking the weights' SHA-256."""
    from diffusers import UNet2DModel

    folder = Path(folder)
    meta = json.loads((folder / _META).read_text())
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise InputError(f"{weights}: the pretrained generator's weights are missing; rebuild them with `make generator`")
    digest = sha256_file(weights)
    if digest != meta["sha256"]:
        raise InputError(f"{weights}: SHA-256 {digest[:12]}... does not match ddpm.json's {meta['sha256'][:12]}...; "
                         "the file is damaged or was replaced: restore it (git checkout) or rebuild with `make generator`")
    unet = UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).float().eval()
    log.info("loaded the pretrained generator %s (%d steps on %d images, sha256 %s)", folder,
             meta["key"]["config"]["train_steps"], meta["key"]["images"], digest[:12])
    return unet, meta["scheduler"]


def pretrain(cfg: DDPMConfig, samples: list[Sample], out: str | Path, seed: int, command: str,
             checkpoint_every: int = 250) -> dict:
    """Train the conditional DDPM for ``cfg.train_steps`` (resuming a checkpoint) and ship it fp16 to ``out``.

    Returns ddpm.json's content.
    """
    from edgeseg.runtime.progress import LoggedProgress

    if not samples:
        raise InputError("no training images for the generator: the teacher's corpus is empty (data.teacher_split)")
    out = Path(out)
    key = {"config": config_to_dict(cfg), "data": _images_fingerprint(samples), "images": len(samples), "seed": seed,
           "conditional": True}
    partial = out.parent / f"{out.name}.partial"
    ckpt = partial / "state.pt"
    run = DDPMTraining(cfg, samples, seed, conditional=True)
    spent = 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["key"] == key:
            run.load_state_dict(state["training"])
            spent = state["seconds"]
            log.info("resuming generator pretraining at step %d of %d from %s", run.step, cfg.train_steps, ckpt)
        else:
            log.info("%s was made with other settings or images: starting over", ckpt)
    t0 = time.perf_counter() - spent

    def save_checkpoint() -> None:
        partial.mkdir(parents=True, exist_ok=True)
        with atomic_path(ckpt) as tmp:
            torch.save({"key": key, "training": run.state_dict(), "seconds": time.perf_counter() - t0}, tmp)

    bar = LoggedProgress(range(run.step, cfg.train_steps), desc="pretraining the generator", logger=log,
                         total=cfg.train_steps, initial=run.step)
    loss = float("nan")
    for start in range(run.step, cfg.train_steps, checkpoint_every):
        loss = run.train(range(start, min(start + checkpoint_every, cfg.train_steps)),
                         on_step=lambda step, value: bar.update(1))
        save_checkpoint()
    bar.close()

    unet = run.finished().to(torch.float16)  # fp16 halves the file; sampling upcasts to float32
    tmp = staging_dir(out)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    meta = {"pretrained": True, "key": key, "sha256": sha256_file(tmp / WEIGHTS), "command": command,
            "scheduler": dict(run.scheduler.config), "train_seconds": round(time.perf_counter() - t0, 1),
            "final_loss": loss, "torch_threads": torch.get_num_threads()}
    (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n")
    replace_dir(tmp, out)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("pretrained the generator: %d steps in %.0f s, final loss %.4f -> %s (%.1f MB)", cfg.train_steps,
             meta["train_seconds"], loss, out, (out / WEIGHTS).stat().st_size / 2**20)
    return meta
