"""The real-user generator: a diffusers text-to-image pipeline loaded from a local folder.

Stable Diffusion, SD-Turbo and SDXL-Turbo folders in diffusers format (``model_index.json``
plus component folders). Prompts describe people in deployment scenes; with
``img2img_strength > 0`` generation starts from real images (the mode medoids under mode
guidance). Teacher guidance works on the latents from ``callback_on_step_end``: the latents
are decoded by the pipeline's VAE, the guide's loss is differentiated back to them, and they
move down its normalised gradient while the step is inside the guided range.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgeseg.calibration.sampler import Guide, guidance_scale, normalise_gradient
from edgeseg.distill.config import GuidanceConfig
from edgeseg.runtime.errors import BackendUnavailableError, InputError

log = logging.getLogger(__name__)


def check_pipeline_folder(path: str | Path) -> Path:
    """The folder, if it is a diffusers pipeline; else a one-line error saying what is there."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: diffusers pipeline folder does not exist; set calibration.model to a local folder "
                         "saved with save_pretrained (e.g. stabilityai/sd-turbo downloaded beforehand)")
    index = path / "model_index.json"
    if not index.is_file():
        raise InputError(f"{path}: not a diffusers pipeline (no model_index.json); pass a folder saved with "
                         "DiffusionPipeline.save_pretrained, or leave calibration.model empty for the embedded DDPM")
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{index}: not valid JSON ({e})") from None
    if "_class_name" not in meta:
        raise InputError(f"{index}: has no _class_name; not a diffusers pipeline index")
    return path


def load_pipeline(path: str | Path, device: torch.device, img2img: bool = False):
    """Load a text-to-image (or image-to-image) pipeline from a local folder, offline."""
    path = check_pipeline_folder(path)
    try:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image
    except ImportError as e:  # transformers missing: diffusers imports it lazily
        raise BackendUnavailableError(f"text-to-image pipelines need transformers: pip install 'edgeseg[sd]' ({e})") from None
    cls = AutoPipelineForImage2Image if img2img else AutoPipelineForText2Image
    kwargs = {"torch_dtype": torch.float16} if device.type == "cuda" else {}  # float32 is the default on the CPU
    try:
        pipe = cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: diffusers could not load this pipeline ({str(e).splitlines()[0][:160]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], size: tuple[int, int], steps: int,
             cfg_scale: float = 0.0, init_images: Sequence[np.ndarray] | None = None, strength: float = 0.0,
             guide: Guide | None = None, guidance: GuidanceConfig | None = None) -> np.ndarray:
    """One batch: (B, H, W, 3) uint8 images for ``prompts`` with per-image ``seeds``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    h, w = size
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=cfg_scale, generator=gens,
                  output_type="np")
    if init_images is not None:
        from PIL import Image

        kwargs["image"] = [Image.fromarray(i).resize((w, h), Image.BICUBIC) for i in init_images]
        kwargs["strength"] = strength
    else:
        kwargs.update(height=h, width=w)
    if guide is not None and guidance is not None:
        kwargs["callback_on_step_end"] = _latent_guidance(pipe, guide, guidance, len(seeds))
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    images = pipe(**kwargs).images
    return (np.clip(np.asarray(images), 0, 1) * 255 + 0.5).astype(np.uint8)


def _latent_guidance(pipe, guide: Guide, guidance: GuidanceConfig, batch: int):
    T = pipe.scheduler.config.num_train_timesteps
    index = torch.arange(batch)

    def callback(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        s = guidance_scale(guidance, float(timestep) / T)
        if s == 0:
            return callback_kwargs
        latents = callback_kwargs["latents"].detach().requires_grad_(True)
        with torch.enable_grad():
            vae = pipeline.vae
            decoded = vae.decode(latents / vae.config.scaling_factor).sample.float()
            loss, _ = guide(decoded, index.to(latents.device))
            (grad,) = torch.autograd.grad(loss.sum(), latents)
        callback_kwargs["latents"] = (latents - s * normalise_gradient(grad, guidance.grad_clip)).detach()
        return callback_kwargs

    return callback
