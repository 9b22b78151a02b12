"""calibration's part of the config file: the ``calibration`` section (generator, sampler, guidance,
filters, conditioning masks, target-domain steering).

``CalibratedConfig`` is distill's ``DistillConfig`` with this section added; export extends it again
(``export/config.py``: the whole file). Every default lives in its dataclass, once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edgeseg.distill.config import DistillConfig
from edgeseg.distill.config_loader import require

__all__ = ["CalibratedConfig", "CalibrationConfig", "DDPMConfig", "SamplerConfig", "GuidanceConfig", "FilterConfig",
           "MaskSourceConfig", "TargetConfig"]


@dataclass(frozen=True)
class DDPMConfig:
    """The embedded pixel-space DDPM trained on the training images when no model is given."""

    image_size: int = 64  # side of the square images it generates (upsampled to data.image_size)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # UNet2DModel widths per resolution level
    train_steps: int = 1500  # optimizer steps
    batch_size: int = 16  # images per optimizer step
    lr: float = 1e-3  # AdamW peak learning rate
    timesteps: int = 1000  # DDPM noise levels
    max_t: float = 1.0  # train on noise levels t < max_t * timesteps only (img2img never goes higher)
    warmup_steps: int = 100  # linear learning-rate warm-up (at most a tenth of train_steps), then cosine decay
    grad_clip: float = 1.0  # gradient-norm clip per step
    ema_decay: float = 0.999  # the EMA weights the generator samples with (diffusers EMAModel, with warm-up)
    # what the UNet predicts: the noise (epsilon), or the clean image (sample: smoother, but on the demo
    # the teacher found a person in its blurry images far less often when it was tried: a lower
    # condition_iou_median in calibration/report.json; benchmarks/results/calibration.json has the default's)
    prediction: Literal["epsilon", "sample"] = "epsilon"

    def __post_init__(self):
        require(self.image_size % 8 == 0 and self.image_size >= 16, "image_size", f"must be a multiple of 8 and >= 16, got {self.image_size}")
        require(self.train_steps >= 1, "train_steps", f"must be >= 1, got {self.train_steps}")
        require(0 < self.max_t <= 1, "max_t", f"must be in (0, 1], got {self.max_t}")


@dataclass(frozen=True)
class SamplerConfig:
    """The reverse diffusion process."""

    scheduler: Literal["ddim", "ddpm"] = "ddim"  # diffusers scheduler of the reverse process
    steps: int = 25  # denoising steps
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic)
    batch_size: int = 32  # images denoised together

    def __post_init__(self):
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class GuidanceConfig:
    """Teacher guidance of the sampler: eps_hat = eps - s(t) * g, g = normalised grad of the task loss."""

    # mask: the mask-conditioned generator's teacher should find people where the conditioning mask has them
    mode: Literal["none", "task", "confidence", "mode", "mask"] = "task"
    scale: float = 0.4  # s at the strongest point of the schedule
    schedule: Literal["constant", "linear", "cosine"] = "linear"  # how s(t) moves over the guided range
    t_start: float = 0.9  # guide from this normalised time (1 = pure noise) ...
    t_stop: float = 0.5  # ... down to this one; the last, detailed half is left alone
    grad_clip: float = 1.0  # per-sample clip of the normalised gradient
    resolution: int = 0  # side the teacher sees x0 at while guiding; 0 = the model's input size
    diversity: float = 0.1  # weight of the push away from the batch's other samples
    gamma: float = 2.0  # confidence guidance exponent g in t^g + (1 - f)^g
    modes: int = 8  # k-means clusters of teacher-encoder embeddings (mode guidance)
    hard_fraction: float = 0.1  # confidence mode: this share is confidence-guided (hard), the rest task-guided;
    # hard samples inflate min/max ranges, so a calibration set keeps them a minority (1.0: a pure hard-example set)
    # The torch model whose gradient guides sampling: the teacher, the trained student (<run_dir>/distill/best.pt),
    # or a path to a UNet checkpoint shaped like the teacher section. auto: the teacher when it is a torch model,
    # else the student (an ONNX teacher has no gradient; it still labels and filters). Reports say which guided.
    model: str = "auto"

    def __post_init__(self):
        require(0 <= self.t_stop <= self.t_start <= 1, "t_start/t_stop", f"need 0 <= t_stop <= t_start <= 1, got {self.t_start}, {self.t_stop}")
        require(self.scale >= 0, "scale", f"must be >= 0, got {self.scale}")
        require(self.modes >= 1, "modes", f"must be >= 1, got {self.modes}")
        require(0 <= self.hard_fraction <= 1, "hard_fraction", f"must be in [0, 1], got {self.hard_fraction}")


@dataclass(frozen=True)
class FilterConfig:
    """What a synthetic image must pass to enter the calibration set."""

    min_person_fraction: float = 0.02  # teacher mask must cover at least this share of pixels
    max_uncertain_fraction: float = 0.15  # share of pixels with teacher p in (0.3, 0.7) allowed
    dedup_bits: int = 4  # drop an image whose 64-bit perceptual hash is within this Hamming distance of a kept one
    leak_bits: int = 6  # drop an image this close (hash bits) to any validation image
    # drop a near-copy of a training image (SSIM to the nearest one, grey, model size; calibration/similarity.py).
    # Set well above what generated images reach, re-renders of a training image included, so it drops
    # copies, not re-renders: the figures are in calibration/report.json (train_ssim_quantiles, with held-out
    # test images' held_out_train_ssim_quantiles beside them) and benchmarks/results/calibration.json
    # `quality.train_ssim_median`.
    max_train_ssim: float = 0.8
    # mask-conditioned generator: drop a pair whose teacher mask overlaps its conditioning mask
    # less than this (IoU at the model's size); the label is the conditioning mask, so it must show
    min_condition_iou: float = 0.5

    def __post_init__(self):
        require(0 <= self.min_person_fraction < 1, "min_person_fraction", f"must be in [0, 1), got {self.min_person_fraction}")
        require(0 < self.max_uncertain_fraction <= 1, "max_uncertain_fraction", f"must be in (0, 1], got {self.max_uncertain_fraction}")
        require(0 <= self.dedup_bits <= 64 and 0 <= self.leak_bits <= 64, "dedup_bits/leak_bits", "must be in [0, 64]")
        require(0 < self.max_train_ssim <= 1, "max_train_ssim", f"must be in (0, 1], got {self.max_train_ssim}")
        require(0 <= self.min_condition_iou <= 1, "min_condition_iou", f"must be in [0, 1], got {self.min_condition_iou}")


@dataclass(frozen=True)
class MaskSourceConfig:
    """Conditioning masks for the mask-conditioned generator: training masks, transformed and mixed."""

    scale: tuple[float, float] = (0.75, 1.25)  # random zoom about the centre
    shift: float = 0.2  # random translation, as a fraction of the side
    rotate: float = 12.0  # random rotation in degrees, +-
    hflip: bool = True  # random horizontal flip
    combine: float = 0.3  # probability of adding a second transformed mask (recombination)

    def __post_init__(self):
        require(0 < self.scale[0] <= self.scale[1], "scale", f"must be 0 < lo <= hi, got {self.scale}")
        require(0 <= self.combine <= 1, "combine", f"must be in [0, 1], got {self.combine}")


@dataclass(frozen=True)
class TargetConfig:
    """Steering synthesis towards a deployment domain seen only in a few unlabelled images.

    Only statistics are read from the images (per-channel mean and standard deviation, and the
    sensor-noise level); the images themselves never enter any set.
    """

    images: str = ""  # folder of a handful (e.g. 8) of unlabelled target-domain images; empty = off
    weight: float = 0.5  # per denoising step, how far the predicted clean image moves to the target's statistics
    t_stop: float = 0.0  # steer from pure noise down to this normalised time
    noise: bool = True  # add sensor noise up to the target's estimated level (the generator's pixels are 2x coarser)

    def __post_init__(self):
        require(0 <= self.weight <= 1, "weight", f"must be in [0, 1], got {self.weight}")
        require(0 <= self.t_stop < 1, "t_stop", f"must be in [0, 1), got {self.t_stop}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Diffusion-synthesised INT8 calibration sets (``edgeseg calibration``)."""

    # conditional: the embedded mask-conditioned DDPM (labelled pairs from noise, no source image);
    # ddpm: the embedded unconditional DDPM (with img2img_strength: re-renders of training images);
    # pipeline: a diffusers pipeline folder (calibration.model)
    generator: Literal["conditional", "ddpm", "pipeline"] = "conditional"
    model: str = ""  # local diffusers folder; empty = train (or reuse) <run_dir>/calibration/ddpm (or cddpm)
    count: int = 256  # images to keep
    pool_factor: float = 2.0  # generate up to pool_factor * count, keep the best that pass
    max_extra_rounds: int = 4  # if too few pass, generate more (sized by the pass rate) at most this often
    seed: int = 1234  # base seed; image i uses seed + i
    prompts: tuple[str, ...] = (
        "a photo of a person walking in a city street",
        "a photo of people standing in an office, backlit",
        "a photo of a crowd at night under street lights",
        "a photo of a person sitting in a park",
    )  # text prompts for a pipeline generator
    img2img_strength: float = 0.0  # 0: generate from pure noise; (0, 1): start from real training images noised to this level
    report_images: int = 64  # held-out real images for the quality report
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    masks: MaskSourceConfig = field(default_factory=MaskSourceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)

    def __post_init__(self):
        require(self.generator != "conditional" or self.img2img_strength == 0, "img2img_strength",
                "the mask-conditioned generator starts from pure noise: set img2img_strength to 0")
        require(self.guidance.mode != "mask" or self.generator == "conditional", "guidance.mode",
                "mask guidance needs conditioning masks: set calibration.generator: conditional")
        require(self.generator != "conditional" or self.ddpm.max_t == 1, "ddpm.max_t",
                "the mask-conditioned generator samples from pure noise: train it on every noise level (max_t: 1.0)")
        require(self.count >= 1, "count", f"must be >= 1, got {self.count}")
        require(self.generator != "ddpm" or self.img2img_strength == 0 and self.ddpm.max_t == 1
                or 0 < self.img2img_strength <= self.ddpm.max_t, "img2img_strength",
                f"({self.img2img_strength}) needs a DDPM trained up to that noise level: set ddpm.max_t >= it "
                f"(now {self.ddpm.max_t}), or 1.0 for generation from pure noise")
        require(self.pool_factor >= 1, "pool_factor", f"must be >= 1, got {self.pool_factor}")
        require(self.max_extra_rounds >= 0, "max_extra_rounds", f"must be >= 0, got {self.max_extra_rounds}")
        require(0 <= self.img2img_strength < 1, "img2img_strength", f"must be in [0, 1), got {self.img2img_strength}")


@dataclass(frozen=True)
class CalibratedConfig(DistillConfig):
    """Distill's settings and the ``calibration`` section: what calibration's code reads."""

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        super().__post_init__()
        # hard examples come from the mask-conditioned generator, sampled from pure noise: fail now, not at epoch `start`
        require(self.train.hard_examples.share == 0 or self.calibration.ddpm.max_t == 1, "calibration.ddpm.max_t",
                "train.hard_examples needs a generator trained on every noise level: set calibration.ddpm.max_t: 1.0")
