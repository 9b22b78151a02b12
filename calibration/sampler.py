"""Guided reverse diffusion with diffusers' schedulers (DDIM or DDPM).

At each step the UNet predicts the noise ``eps``; inside the guided range of normalised time
``t/T in [t_stop, t_start]`` the predicted clean image ``x0 = (x_t - sqrt(1-a) eps) / sqrt(a)``
goes through the guide, whose loss gradient with respect to ``x0`` is normalised to unit RMS
per sample, clipped, scaled by ``s(t)`` and added to ``eps`` (so ``x0`` moves down the loss).
Every image has its own seed: its starting noise and any per-step noise come from its own
generator, so a (seed, batch) pair regenerates the same image.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from edgeseg.calibration.config import GuidanceConfig, SamplerConfig

Guide = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Steer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(cfg: SamplerConfig, scheduler_config: dict):
    """A fresh DDIM or DDPM scheduler from the trained model's scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if cfg.scheduler == "ddim" else DDPMScheduler
    # the sampler hands the scheduler a noise prediction whatever the model predicts (see ``sample``)
    sched = cls.from_config({**scheduler_config, "prediction_type": "epsilon"})
    sched.set_timesteps(cfg.steps)
    return sched


def guidance_scale(cfg: GuidanceConfig, t_norm: float) -> float:
    """s(t): 0 outside [t_stop, t_start]; inside, constant or decaying towards t_stop."""
    if not (cfg.t_stop <= t_norm <= cfg.t_start) or cfg.scale == 0:
        return 0.0
    span = max(cfg.t_start - cfg.t_stop, 1e-8)
    u = (cfg.t_start - t_norm) / span  # 0 at t_start, 1 at t_stop
    if cfg.schedule == "constant":
        return cfg.scale
    if cfg.schedule == "linear":
        return cfg.scale * (1 - u)
    return cfg.scale * 0.5 * (1 + math.cos(math.pi * u))  # cosine


def normalise_gradient(grad: torch.Tensor, clip: float) -> torch.Tensor:
    """Per sample: unit RMS, then elementwise clip to [-clip, clip]."""
    rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))
    return (grad / rms).clamp(-clip, clip)


def sample(unet, scheduler_config: dict, seeds: Sequence[int], sampler: SamplerConfig, guidance: GuidanceConfig,
           guide: Guide | None = None, index: torch.Tensor | None = None, size: int | None = None,
           init: torch.Tensor | None = None, strength: float = 0.0, stats: dict | None = None,
           steer: Steer | None = None, steer_t_stop: float = 0.0, channels_last: bool = True) -> torch.Tensor:
    """Generate one batch.

    Args:
        unet: a ``UNet2DModel`` predicting the noise, or the clean image if the scheduler config's
            ``prediction_type`` is "sample" (converted to the noise it implies).
        scheduler_config: its training scheduler's config.
        seeds: one seed per image (B of them).
        guide: per-sample loss on x0 (see ``calibration.guidance``), or None for unguided.
        index: (B,) position of each image in the pool (mode guidance uses it).
        init: (B, 3, size, size) images in [-1, 1] to start from (SDEdit-style img2img) ...
        strength: ... noised to this fraction of the schedule (0 < strength < 1); the first
            ``(1 - strength) * steps`` steps are skipped.
        stats: if given, receives ``guided_steps`` and ``steps``.
        steer: maps (x0, index) to where the predicted clean image should go (target-domain
            statistics); applied at every step with t/T >= ``steer_t_stop``, the noise prediction
            recomputed so the step continues from the moved x0.
        channels_last: run the UNet in NHWC (the default; False: NCHW, for the benchmark's comparison).

    Returns:
        (B, 3, size, size) images in [-1, 1].
    """
    size = size or unet.config.sample_size
    sched = make_scheduler(sampler, scheduler_config)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    # NHWC through the UNet: oneDNN's convolutions run it 2.5x faster on the CPU than NCHW
    # (benchmarks/results/calibration.json `channels_last_sampling_speedup`)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    unet.to(memory_format=layout)
    x = torch.stack([torch.randn(3, size, size, generator=g) for g in gens]).contiguous(memory_format=layout)
    timesteps = sched.timesteps
    if init is not None and 0 < strength < 1:
        keep = max(1, int(round(len(timesteps) * strength)))
        timesteps = timesteps[len(timesteps) - keep:]
        x = sched.add_noise(init, x, timesteps[:1].repeat(len(seeds)))
    index = index if index is not None else torch.arange(len(seeds))
    alphas = sched.alphas_cumprod
    T = sched.config.num_train_timesteps
    guided = 0
    predicts_x0 = scheduler_config.get("prediction_type") == "sample"
    for t in timesteps:
        with torch.no_grad():
            eps = unet(x, t).sample
            if predicts_x0:  # a clean-image model: the noise its prediction implies
                a = alphas[int(t)]
                eps = (x - a.sqrt() * eps) / (1 - a).sqrt().clamp_min(1e-8)
        s = guidance_scale(guidance, float(t) / T) if guide is not None else 0.0
        if s > 0:
            eps = guided_eps(x, eps, alphas[int(t)], guide, index, guidance, s)
            guided += 1
        if steer is not None and float(t) / T >= steer_t_stop:
            eps = steered_eps(x, eps, alphas[int(t)], steer, index)
        kwargs = {"eta": sampler.eta} if sampler.scheduler == "ddim" else {}
        with torch.no_grad():
            x = sched.step(eps, t, x, generator=gens if _needs_noise(sampler) else None, **kwargs).prev_sample
    if stats is not None:
        stats.update(guided_steps=guided, steps=len(timesteps))
    return x.clamp(-1, 1)


def predicted_x0(x: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The clean image the noise prediction implies: (x_t - sqrt(1 - a) eps) / sqrt(a)."""
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def guided_eps(x: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, guide: Guide, index: torch.Tensor,
               guidance: GuidanceConfig, scale: float) -> torch.Tensor:
    """eps + s * g, g the normalised, clipped gradient of the guide's loss w.r.t. the predicted x0.

    Since x0 = (x - sqrt(1 - a) eps) / sqrt(a), adding to eps moves x0 against g: down the loss.
    """
    from edgeseg.calibration.guidance import diversity_loss

    x0 = predicted_x0(x, eps, alpha_bar).detach().requires_grad_(True)
    with torch.enable_grad():
        loss, emb = guide(x0, index)
        if guidance.diversity > 0:
            loss = loss + guidance.diversity * diversity_loss(emb)
        (grad,) = torch.autograd.grad(loss.sum(), x0)
    return eps + scale * normalise_gradient(grad, guidance.grad_clip)


def steered_eps(x: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, steer: Steer,
                index: torch.Tensor) -> torch.Tensor:
    """The noise prediction whose implied clean image is ``steer(x0)``: (x_t - sqrt(a) x0') / sqrt(1 - a)."""
    with torch.no_grad():
        x0 = steer(predicted_x0(x, eps, alpha_bar), index)
        return (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt().clamp_min(1e-8)


def _needs_noise(sampler: SamplerConfig) -> bool:
    return sampler.scheduler == "ddpm" or sampler.eta > 0
