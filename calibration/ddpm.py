"""The embedded generators: small pixel-space DDPMs trained on the training split, cached.

Real diffusion (diffusers ``UNet2DModel`` + ``DDPMScheduler``, epsilon prediction, EMA
weights), small enough to train in a few minutes on two CPU cores. Two kinds:

- unconditional (``generator: ddpm``): images only; used for img2img re-renders;
- mask-conditioned (``generator: conditional``): the person mask, scaled to [-1, 1], is a fourth
  input channel beside the noisy image, so sampling from pure noise for a given mask yields an
  image of people where the mask says: a labelled pair with no source image. The trained model is saved
with ``save_pretrained`` under ``<run_dir>/calibration/ddpm`` beside ``ddpm.json``, which
records what it was trained on; a later run with the same settings and data reuses it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from edgeseg.calibration.pixels import uint8_to_signed
from edgeseg.calibration.config import DDPMConfig
from edgeseg.distill.config import config_to_dict
from edgeseg.distill.data import Sample
from edgeseg.runtime.files import recover_dir, replace_dir, sha256_file, staging_dir
from edgeseg.runtime.images import read_rgb

log = logging.getLogger(__name__)

_META = "ddpm.json"


def build_unet(cfg: DDPMConfig, conditional: bool = False):
    """A UNet2DModel without attention (convolutions only: fast on a CPU); 4 inputs if conditional."""
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=4 if conditional else 3, out_channels=3, layers_per_block=1,
        block_out_channels=tuple(cfg.block_out_channels), norm_num_groups=8,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n, add_attention=False,
    )


def _images_fingerprint(samples: list[Sample]) -> str:
    """A key for the training images: names and contents (an edited image retrains the DDPM)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.image.name}:{sha256_file(s.image)}\n".encode())
    return h.hexdigest()[:16]


def _square(a: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and box-resize to ``size``."""
    h, w = a.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return np.asarray(Image.fromarray(a[top:top + side, left:left + side]).resize((size, size), Image.BOX))


def load_training_images(samples: list[Sample], size: int) -> torch.Tensor:
    """(N, 3, size, size) float32 in [-1, 1]: each image centre-cropped to a square and resized."""
    out = np.stack([_square(read_rgb(s.image), size) for s in samples]) if samples else np.empty((0, size, size, 3), np.uint8)
    return uint8_to_signed(out)


def load_training_masks(samples: list[Sample], size: int) -> torch.Tensor:
    """(N, 1, size, size) float32 in {0, 1}: each mask cropped and resized like its image (box, then > 0.5)."""
    from edgeseg.distill.data import read_mask

    out = np.empty((len(samples), size, size), np.float32)
    for i, s in enumerate(samples):  # the mask alone: the images were read (and sizes checked) by the loaders
        mask = read_mask(s.mask) if s.mask is not None else s.coco_masks()
        out[i] = _square(mask.astype(np.uint8) * 255, size) > 127
    return torch.from_numpy(out)[:, None]


def condition_input(mask: torch.Tensor) -> torch.Tensor:
    """A {0, 1} mask as the generator's conditioning channel: [-1, 1] like the image."""
    return mask * 2 - 1


class ConditionedUNet(torch.nn.Module):
    """A 4-input UNet bound to a batch of masks: ``model(x, t)`` denoises x for those masks.

    The sampler calls every generator as ``unet(x, t).sample``; binding the masks keeps it that way.
    """

    def __init__(self, unet, mask: torch.Tensor):
        from edgeseg.calibration.masks import check_condition_masks

        super().__init__()
        check_condition_masks(mask, unet.config.sample_size)
        self.unet, self.cond = unet, condition_input(mask)
        self.config = unet.config

    def forward(self, x: torch.Tensor, t):
        inp = torch.cat([x, self.cond.to(x)], dim=1)
        if x.is_contiguous(memory_format=torch.channels_last):  # keep the sampler's NHWC through the concat
            inp = inp.contiguous(memory_format=torch.channels_last)
        return self.unet(inp, t)


class DDPMTraining:
    """One DDPM training run: model, EMA, optimiser and schedule, stepped in resumable slices.

    ``train`` runs steps ``[self.step, stop)``; ``state_dict``/``load_state_dict`` carry everything a
    resumed run needs (weights, EMA, optimiser, schedule, the batch generator's state), so a run
    stopped at a checkpoint and resumed draws the same batches as one that never stopped.
    """

    def __init__(self, cfg: DDPMConfig, samples: list[Sample], seed: int = 0, conditional: bool = False):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        torch.manual_seed(seed)
        self.cfg, self.step = cfg, 0
        self.data = load_training_images(samples, cfg.image_size)
        self.masks = load_training_masks(samples, cfg.image_size) if conditional else None
        self.unet = build_unet(cfg, conditional)
        self.scheduler = DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_schedule="squaredcos_cap_v2",
                                       prediction_type=cfg.prediction)
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=0.0)
        warmup = min(cfg.warmup_steps, cfg.train_steps // 10 + 1)
        lr_at = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / cfg.train_steps))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_at)
        self.g = torch.Generator().manual_seed(seed)

    def _loss(self) -> torch.Tensor:
        cfg, g = self.cfg, self.g
        idx = torch.randint(0, len(self.data), (cfg.batch_size,), generator=g)
        x0 = self.data[idx]
        flip = (torch.rand(cfg.batch_size, generator=g) < 0.5).view(-1, 1, 1, 1)
        x0 = torch.where(flip, x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, max(1, int(round(cfg.max_t * cfg.timesteps))), (cfg.batch_size,), generator=g)
        xt = self.scheduler.add_noise(x0, noise, t)
        if self.masks is not None:  # the mask flips with its image
            m = self.masks[idx]
            xt = torch.cat([xt, condition_input(torch.where(flip, m.flip(-1), m))], dim=1)
        return F.mse_loss(self.unet(xt, t).sample, x0 if cfg.prediction == "sample" else noise)

    def train(self, steps, on_step=None) -> float:
        """Run the optimiser steps in ``steps`` (an iterable of step numbers from ``self.step``); the last loss."""
        self.unet.train()
        loss = float("nan")
        for step in steps:
            value = self._loss()
            self.opt.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.grad_clip)
            self.opt.step()
            self.lr_schedule.step()
            self.ema.step(self.unet.parameters())
            self.step, loss = step + 1, value.item()
            if on_step is not None:
                on_step(self.step, loss)
            elif step % 50 == 0 and hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{loss:.4f}")
        return loss

    def finished(self):
        """The EMA weights in a copy of the UNet, in eval mode (training can go on from the live weights)."""
        import copy

        unet = copy.deepcopy(self.unet)
        self.ema.copy_to(unet.parameters())
        return unet.eval()

    def state_dict(self) -> dict:
        return {"step": self.step, "unet": self.unet.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "lr_schedule": self.lr_schedule.state_dict(), "g": self.g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.g.set_state(state["g"])


def train_or_load(cfg: DDPMConfig, samples: list[Sample], folder: str | Path, seed: int = 0, conditional: bool = False):
    """The DDPM UNet (eval mode) from ``folder`` if it matches, else trained on ``samples`` and saved.

    With ``cfg.max_t < 1`` it trains only on noise levels t < max_t * T: image-to-image
    sampling from real images at strength s <= max_t never sees higher ones, so the whole
    budget goes to the levels it uses. ``conditional`` trains on (image, mask) pairs, the mask
    as a fourth input channel (flipped together with its image).

    Returns:
        (UNet2DModel, its scheduler config dict).
    """
    from diffusers import UNet2DModel
    from edgeseg.runtime.progress import LoggedProgress

    folder = recover_dir(folder)
    meta = {"config": config_to_dict(cfg), "data": _images_fingerprint(samples), "images": len(samples), "seed": seed,
            **({"conditional": True} if conditional else {})}
    meta_path = folder / _META
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == meta:
        log.info("reusing the trained DDPM in %s", folder)
        return UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).eval(), json.loads(meta_path.read_text())["scheduler"]

    t0 = time.perf_counter()
    run = DDPMTraining(cfg, samples, seed, conditional)
    bar = LoggedProgress(range(cfg.train_steps), desc="training the DDPM", logger=log)
    loss = run.train(bar)
    unet, scheduler = run.finished(), run.scheduler

    # save atomically: a temporary folder renamed into place, the metadata last
    tmp = staging_dir(folder)
    unet.save_pretrained(tmp / "unet")
    (tmp / _META).write_text(json.dumps({"key": meta, "scheduler": dict(scheduler.config),
                                         "train_seconds": time.perf_counter() - t0, "final_loss": loss}, indent=1))
    replace_dir(tmp, folder)
    log.info("trained the DDPM (%d steps, %.0f s, final loss %.4f) -> %s", cfg.train_steps,
             time.perf_counter() - t0, loss, folder)
    return unet, dict(scheduler.config)
