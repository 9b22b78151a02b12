"""The real-user generator: a diffusers text-to-image pipeline loaded from a local folder.

Stable Diffusion, SD-Turbo and SDXL-Turbo folders in diffusers format (``model_index.json``
plus component folders). Prompts describe people in deployment scenes; with
``img2img_strength > 0`` generation starts from real images (the mode medoids under mode
guidance). Teacher guidance works from ``callback_on_step_end``, on the *predicted clean image*
as the guides are documented: the scheduler's own ``pred_original_sample`` of the step that
just ran (captured from ``scheduler.step``; schedulers that do not return it fall back to the
latents) is decoded by the pipeline's VAE (in float32 when the VAE asks for it with
``force_upcast``, as SDXL's does), the guide's loss is differentiated back to it, and the
latents move down its normalised gradient while the step is inside the guided range. The guide
gets each image's *pool* index, so per-image roles (hard examples, assigned modes) follow the
image across batches.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgeseg.calibration.sampler import Guide, guidance_scale, normalise_gradient
from edgeseg.calibration.config import GuidanceConfig
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
             guide: Guide | None = None, guidance: GuidanceConfig | None = None,
             index: torch.Tensor | None = None) -> np.ndarray:
    """One batch: (B, H, W, 3) uint8 images for ``prompts`` with per-image ``seeds``.

    Args:
        index: each image's index in the pool (what per-image guides look up); default 0..B-1.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    index = torch.arange(len(seeds)) if index is None else torch.as_tensor(index)
    if len(index) != len(seeds):
        raise ValueError(f"{len(index)} pool indices for {len(seeds)} seeds")
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
    if guide is None or guidance is None:
        images = pipe(**kwargs).images
    else:
        capture = _PredictedX0(pipe.scheduler)
        kwargs["callback_on_step_end"] = _latent_guidance(pipe, guide, guidance, index, capture)
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        pipe.scheduler.step = capture
        try:
            images = pipe(**kwargs).images
        finally:
            del pipe.scheduler.step  # back to the class's own method
    return (np.clip(np.asarray(images), 0, 1) * 255 + 0.5).astype(np.uint8)


class _PredictedX0:
    """Wraps ``scheduler.step`` to keep the step's predicted clean latents (``pred_original_sample``)."""

    def __init__(self, scheduler):
        self.step = type(scheduler).step.__get__(scheduler)
        self.x0: torch.Tensor | None = None
        self.steps = 0

    def __call__(self, *args, **kwargs):
        out = self.step(*args, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None and isinstance(out, tuple) and len(out) > 1:
            x0 = out[1]  # return_dict=False: (prev_sample, pred_original_sample) where the scheduler has it
        self.x0 = x0.detach() if isinstance(x0, torch.Tensor) else None
        self.steps += 1
        return out


def guidance_vae(pipe):
    """The VAE guidance decodes with: float32 when it asks for it (``force_upcast``, SDXL) and runs in fp16.

    The float32 copy is made once and kept on the pipeline; the pipeline's own VAE stays as it is.
    """
    vae = pipe.vae
    if getattr(vae.config, "force_upcast", False) and vae.dtype == torch.float16:
        upcast = getattr(pipe, "_edgeseg_guidance_vae", None)
        if upcast is None:
            import copy

            upcast = copy.deepcopy(vae).to(torch.float32).requires_grad_(False)
            pipe._edgeseg_guidance_vae = upcast
        return upcast
    return vae


def _latent_guidance(pipe, guide: Guide, guidance: GuidanceConfig, index: torch.Tensor, capture: _PredictedX0):
    T = pipe.scheduler.config.num_train_timesteps

    def callback(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        s = guidance_scale(guidance, float(timestep) / T)
        if s == 0:
            return callback_kwargs
        latents = callback_kwargs["latents"]
        x0 = capture.x0 if capture.x0 is not None and capture.x0.shape == latents.shape else latents
        vae = guidance_vae(pipeline)
        x0 = x0.detach().to(vae.dtype).requires_grad_(True)
        with torch.enable_grad():
            decoded = vae.decode(x0 / vae.config.scaling_factor).sample.float()
            loss, _ = guide(decoded, index.to(latents.device))
            (grad,) = torch.autograd.grad(loss.sum(), x0)
        step_ = normalise_gradient(grad.float(), guidance.grad_clip).to(latents.dtype)
        callback_kwargs["latents"] = (latents - s * step_).detach()
        return callback_kwargs

    return callback
