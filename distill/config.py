"""distill's part of the config file: the run's settings (run folder, seed, device), the data, the
teacher, the student, the feature teacher, the loss and the training schedules.

One YAML file drives every stage, and each stage owns its sections: distill's are here
(``DistillConfig``), calibration's in ``calibration/config.py`` (``CalibratedConfig`` extends this
one with them), export's and deploy's in ``export/config.py`` (``Config``, the whole file). Every
default lives in its dataclass, once, with its unit or meaning. Range checks raise ConfigError from
``__post_init__``. Stage outputs are derived from ``run_dir`` (``<run_dir>/teacher``,
``<run_dir>/distill``, ...) so a config never repeats a path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgeseg.distill.config_loader import ConfigError, config_to_dict, load_config, parse_config, require

__all__ = [
    "DistillConfig", "DataConfig", "DemoDataConfig", "AugmentConfig", "ModelConfig", "TeacherConfig",
    "OnnxTeacherConfig", "StudentConfig",
    "FeatureTeacherConfig", "LossConfig", "TemperatureConfig", "TrainConfig", "HardExamplesConfig",
    "ConfigError", "load_config", "parse_config", "config_to_dict",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DemoDataConfig:
    """The embedded, procedurally generated person data set."""

    train_count: int = 800  # images in the training split
    val_count: int = 200  # images in the validation split (selection: best checkpoint, budget, thresholds)
    test_count: int = 400  # held-out test split: every reported quality figure
    test_shift_count: int = 400  # the same scenes under a deployment-domain shift (held-out backgrounds, light)
    target_count: int = 8  # unlabelled deployment-domain images in <data>/target_images (seed disjoint from test_shift)
    # The teacher's own corpus (<data>/teacher): images the student never sees, as a public teacher's
    # are. 0 = none (the teacher trains on the student's train split, the old demo world).
    teacher_count: int = 0
    # share of the teacher corpus drawn under the world's lighting (low light, backlight, colour casts)
    # on the source backgrounds: a teacher robust to the conditions, not to test_shift's backgrounds
    teacher_conditions: float = 0.0
    site_count: int = 0  # unlabelled frames of the deployment site (test_shift's domain, own seed) in <data>/site
    clip_frames: int = 0  # frames of the demo clip (<data>/clip: a video with its masks, at the site); 0 = none
    seed: int = 0  # one seed fixes every image and mask
    max_people: int = 3  # people per image, 0..max_people
    empty_fraction: float = 0.1  # share of images with nobody in them

    def __post_init__(self):
        require(self.train_count >= 1 and self.val_count >= 1, "train_count/val_count", "must be >= 1")
        require(self.test_count >= 0 and self.test_shift_count >= 0, "test_count/test_shift_count", "must be >= 0")
        require(0.0 <= self.empty_fraction < 1.0, "empty_fraction", f"must be in [0, 1), got {self.empty_fraction}")
        require(self.max_people >= 1, "max_people", f"must be >= 1, got {self.max_people}")
        require(self.teacher_count >= 0 and self.site_count >= 0 and self.clip_frames >= 0,
                "teacher_count/site_count/clip_frames", "must be >= 0")
        require(0 <= self.teacher_conditions <= 1, "teacher_conditions", f"must be in [0, 1], got {self.teacher_conditions}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (validation images are only resized)."""

    enabled: bool = True  # master switch
    hflip: bool = True  # random horizontal flip
    scale: tuple[float, float] = (0.8, 1.25)  # random zoom range before the crop back to image_size
    color_jitter: float = 0.2  # max relative change of brightness, contrast and saturation

    def __post_init__(self):
        lo, hi = self.scale
        require(0 < lo <= hi, "scale", f"must be (min, max) with 0 < min <= max, got {self.scale}")
        require(0 <= self.color_jitter < 1, "color_jitter", f"must be in [0, 1), got {self.color_jitter}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images and masks come from, and the size the models see."""

    source: Literal["demo", "folder", "coco"] = "demo"  # demo is generated into <run_dir>/data
    root: str = ""  # folder: <root>/<train>/{images,masks}; coco: JSON files under <root>
    train: str = "train"  # split folder (folder) or annotation JSON (coco), relative to root
    val: str = "val"  # validation split folder (folder) or annotation JSON (coco), relative to root: selection only
    test: str = "test"  # optional held-out split (folder or COCO JSON); reports fall back to val without it
    test_shift: str = "test_shift"  # optional deployment-domain split, reported beside test
    train_images: str = ""  # coco only: image folder of the train split, relative to root
    val_images: str = ""  # coco only: image folder of the val split
    test_images: str = ""  # coco only: image folder of the test split
    test_shift_images: str = ""  # coco only: image folder of the test_shift split
    # The split the teacher trains on (`make teacher`); empty = train. The demo's is its own corpus.
    teacher_split: str = ""
    # Label budget: a seeded subset of this many train images keeps its masks (0 = every one).
    # The rest of train is the unlabelled source pool (only the teacher terms apply to it).
    labelled_count: int = 0
    labelled_seed: int = 0  # which subset: fixed apart from the training seed, so arms compare like for like
    # A folder of further unlabelled images (frames from the deployment site, say), relative to root or
    # absolute: <folder>/images/*, or images directly in it. Joins the pool as a second source.
    unlabelled: str = ""
    image_size: tuple[int, int] = (128, 128)  # (height, width) in pixels, multiples of 32
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB normalisation of the UNets' input
    std: tuple[float, float, float] = IMAGENET_STD  # RGB standard deviations of the normalisation
    workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        h, w = self.image_size
        require(h % 32 == 0 and w % 32 == 0 and h > 0 and w > 0, "image_size",
                f"must be positive multiples of 32 (the encoder's stride), got {self.image_size}; "
                "resize or pad your images to e.g. (128, 128) or (640, 640)")
        require(all(s > 0 for s in self.std), "std", f"must be positive, got {self.std}")
        require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        require(self.labelled_count >= 0, "labelled_count", f"must be >= 0 (0 = all labelled), got {self.labelled_count}")
        require(self.source == "demo" or bool(self.root), "root",
                f"must name your data folder when source is '{self.source}' (e.g. --set data.root=/data/people)")


@dataclass(frozen=True)
class ModelConfig:
    """A UNet from segmentation-models-pytorch (encoder + decoder + 1-channel head)."""

    encoder: str = "tu-efficientnet_b3"  # smp encoder name (tu-* = timm models wrapped by smp)
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)  # 5 blocks = full-res output; 4 = half-res + x2 upsample
    encoder_weights: str = "none"  # imagenet | none | path to an encoder state_dict
    # trained weights (a checkpoint, a state_dict or .safetensors); for the teacher, empty = <run_dir>/teacher/best.pt
    # (what `distill train-teacher` writes) and `demo` = the shipped demo teacher (distill/assets, SHA-256 checked)
    checkpoint: str = ""
    # Encoder activation. silu is EfficientNet's own (and its ImageNet weights'); relu folds into
    # the INT8 convolutions (ONNX Runtime CPU runs SiLU as a table Sigmoid plus an INT8 Mul, a
    # large share of INT8 latency), the EfficientNet-Lite trade; the measured cost per thread count
    # is benchmarks/results/export.json `activation_sweep`. tu-* encoders only.
    activation: Literal["silu", "relu", "relu6"] = "silu"

    def __post_init__(self):
        require(self.activation in ("silu", "relu", "relu6"), "activation",
                f"must be silu, relu or relu6, got {self.activation!r}")
        require(self.activation == "silu" or self.encoder.startswith("tu-"), "activation",
                f"{self.activation} needs a tu-* (timm) encoder, got {self.encoder!r}; e.g. tu-efficientnet_b0")
        require(len(self.decoder_channels) in (3, 4, 5), "decoder_channels",
                f"must have 3, 4 or 5 entries (output stride 4, 2 or 1), got {list(self.decoder_channels)}")
        require(all(c > 0 for c in self.decoder_channels), "decoder_channels", "must be positive")


@dataclass(frozen=True)
class OnnxTeacherConfig:
    """An ONNX person segmenter (a model-zoo file) as the segmentation teacher, instead of a torch checkpoint.

    ``auto`` (and empty) values are read from the model: the input's layout and size from its shape, the
    output's kind from the op that makes it (Sigmoid: probabilities, Softmax: softmax), edgeseg's own
    exports from their metadata. Declare what the graph cannot say (channel order, range, mean/std, a
    matte); a declaration the graph contradicts is refused. `edgeseg distill inspect-teacher` checks them.
    """

    path: str = ""  # the .onnx file; empty = the torch teacher (teacher.checkpoint)
    input: str = ""  # input tensor; empty = the model's only image-like input
    output: str = ""  # the mask output; empty = the only output (name it when there are several)
    layout: Literal["auto", "nchw", "nhwc"] = "auto"  # input layout
    channels: Literal["auto", "rgb", "bgr"] = "auto"  # input channel order (auto: metadata, else rgb)
    range: Literal["auto", "unit", "byte"] = "auto"  # pixels in [0, 1] (unit) or [0, 255] (byte) before mean/std
    mean: tuple[float, ...] = ()  # per channel, RGB order, in the range's units; empty = 0 (or the metadata's)
    std: tuple[float, ...] = ()  # per channel, RGB order, in the range's units; empty = 1 (or the metadata's)
    size: tuple[int, ...] = ()  # (H, W) to run a dynamic-size model at; empty = the training size
    kind: Literal["auto", "logits", "probabilities", "softmax", "matte"] = "auto"  # what the output holds
    output_layout: Literal["auto", "nchw", "nhwc", "nhw"] = "auto"  # output layout (nhw: one map, no channel axis)
    person_channel: int = -1  # the person's channel of a multi-channel output; -1 = auto (1 of 2, 0 of 1)
    clamp: float = 1e-4  # probabilities / mattes: p clamped to [clamp, 1 - clamp] before the logit (+-9.21)

    def __post_init__(self):
        require(len(self.mean) in (0, 3) and len(self.std) in (0, 3), "mean/std",
                f"need 3 values each (or none), got {list(self.mean)}, {list(self.std)}")
        require(all(s > 0 for s in self.std), "std", f"must be positive, got {list(self.std)}")
        require(len(self.size) in (0, 2) and all(v > 0 for v in self.size), "size", f"must be [H, W], got {list(self.size)}")
        require(0 < self.clamp < 0.5, "clamp", f"must be in (0, 0.5), got {self.clamp}")

    def declared(self) -> dict:
        """What the user declared (for ``edgeseg.runtime.teacher_io.resolve_io``): every non-auto value."""
        d = {k: getattr(self, k) for k in ("input", "output", "layout", "channels", "range", "mean", "std", "size",
                                           "kind", "output_layout", "clamp")}
        if self.person_channel >= 0:
            d["person_channel"] = self.person_channel
        return {k: v for k, v in d.items() if v not in ("", "auto", ())}


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """The segmentation teacher: a UNet checkpoint (the model fields), or an ONNX file (``onnx``)."""

    onnx: OnnxTeacherConfig = field(default_factory=OnnxTeacherConfig)

    @property
    def is_onnx(self) -> bool:
        return bool(self.onnx.path)


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """The student UNet, and which of its features the feature teacher supervises."""

    encoder: str = "tu-efficientnet_b0"
    # Chosen by the decoder sweep in benchmarks/bench_distill.py: half-resolution output with a slim
    # decoder is what makes B0 much faster than the B3 teacher, the encoder swap alone much less; the
    # ratio depends on the thread count: benchmarks/results/distill.json `sweep`, `threads_1.sweep`.
    decoder_channels: tuple[int, ...] = (64, 32, 16, 16)
    freeze_encoder: bool = False  # true: train decoder (+ projection) only; needs pretrained encoder weights
    feature_stride: int = 8  # encoder stride whose feature the projection head reads (40 channels for B0)

    def __post_init__(self):
        super().__post_init__()
        require(self.feature_stride in (4, 8, 16, 32), "feature_stride", f"must be 4, 8, 16 or 32, got {self.feature_stride}")
        require(not (self.freeze_encoder and self.activation != "silu"), "activation",
                f"{self.activation} with freeze_encoder: true would freeze weights trained for SiLU under another "
                "activation; set freeze_encoder: false or activation: silu")


@dataclass(frozen=True)
class FeatureTeacherConfig:
    """The frozen ONNX feature teacher (e.g. YOLOv9 whole-body) and the projection head."""

    enabled: bool = True  # false: no feature loss, no ONNX teacher
    # full ONNX model; `demo` = the shipped demo detector (exported to <run_dir>/feature_teacher/shipped.onnx on
    # first use); empty = the detector `distill train-feature-teacher` trains (<run_dir>/feature_teacher/featext.onnx)
    onnx: str = ""
    tensor: str = "segmentation_model_34_Concat_output_0"  # intermediate tensor to expose and match
    hidden_channels: int = 768  # projection head: Conv(C_s, hidden) -> BN -> ReLU -> Conv(hidden, C_t)
    channel_norm: bool = False  # normalise both features per channel (over H, W) before the MSE
    demo_epochs: int = 40  # demo only: ceiling of the demo detector's epochs on the teacher corpus (make teacher)
    demo_patience: int = 4  # ... which stops once its val loss has not improved for this many epochs

    def __post_init__(self):
        require(self.demo_epochs >= 1, "demo_epochs", f"must be >= 1, got {self.demo_epochs}")
        require(self.demo_patience >= 0, "demo_patience", f"must be >= 0, got {self.demo_patience}")
        require(self.hidden_channels >= 1, "hidden_channels", f"must be >= 1, got {self.hidden_channels}")
        require(bool(self.tensor), "tensor", "must name the ONNX tensor to match")


@dataclass(frozen=True)
class TemperatureConfig:
    """Distillation temperature T, constant or decayed from t0 to t1 over training."""

    schedule: Literal["constant", "linear", "cosine", "exponential"] = "cosine"  # how T moves from t0 to t1 over training
    t0: float = 3.0  # temperature at the first step
    t1: float = 1.0  # temperature at the last step (ignored for constant)

    def __post_init__(self):
        require(self.t0 > 0 and self.t1 > 0, "t0/t1", f"must be > 0, got {self.t0}, {self.t1}")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the five loss terms (0 switches a term off)."""

    kl: float = 1.0  # binary KL(teacher || student) on sigmoid(logit / T), times T^2
    mse: float = 0.5  # MSE between teacher and student probabilities
    bce: float = 0.5  # BCE of student logits vs the ground-truth mask
    dice: float = 1.0  # soft Dice loss vs the ground-truth mask
    feature: float = 0.5  # MSE between projected student feature and the feature teacher's tensor
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)

    def __post_init__(self):
        for name in ("kl", "mse", "bce", "dice", "feature"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(self.kl + self.mse + self.bce + self.dice + self.feature > 0, "kl..feature", "cannot all be 0")

    @property
    def uses_teacher(self) -> bool:
        return self.kl > 0 or self.mse > 0


@dataclass(frozen=True)
class HardExamplesConfig:
    """Confidence-guided hard examples (ConfiG) mixed into distillation, regenerated against the student.

    Every ``every`` epochs from ``start``, the mask-conditioned generator samples ``count`` pairs
    guided to maximise t^g + (1 - s)^g (teacher sure, current student not; g is
    calibration.guidance.gamma); each is labelled by its conditioning mask.
    """

    share: float = 0.0  # share of each epoch's images drawn from the hard set, in [0, 1); 0 = off
    count: int = 64  # pairs per regeneration
    every: int = 3  # epochs between regenerations
    start: int = 2  # first epoch with hard examples (the student has trained this many epochs)
    scale: float = 0.4  # confidence-guidance strength ...
    t_start: float = 0.9  # ... over this range of normalised time (ConfiG guides the early, layout-forming steps)
    t_stop: float = 0.5  # ... down to this normalised time

    def __post_init__(self):
        require(0 <= self.share < 1, "share", f"must be in [0, 1), got {self.share}")
        require(self.count >= 1, "count", f"must be >= 1, got {self.count}")
        require(self.every >= 1 and self.start >= 0, "every/start", f"need every >= 1 and start >= 0, got {self.every}, {self.start}")
        require(self.scale >= 0 and 0 <= self.t_stop <= self.t_start <= 1, "scale/t_start/t_stop",
                f"need scale >= 0 and 0 <= t_stop <= t_start <= 1, got {self.scale}, {self.t_start}, {self.t_stop}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one training run (the student, or the teacher with ``make teacher``)."""

    epochs: int = 50  # passes over the training split
    batch_size: int = 4  # images per optimizer step (per process under DDP)
    lr: float = 1e-4  # AdamW peak learning rate
    min_lr: float = 0.0  # cosine schedule floor
    warmup_steps: int = 0  # linear warm-up before the cosine decay
    weight_decay: float = 1e-2  # AdamW decoupled weight decay
    grad_clip_norm: float = 1.0  # max global gradient norm; 0 disables clipping
    amp: bool = True  # mixed precision (float16 autocast + GradScaler); used on CUDA only
    # NHWC activations and weights: oneDNN's faster convolutions on the CPU (benchmarks/results/distill.json
    # `channels_last_step_speedup`) and cuDNN's tensor-core layout; the numbers trained are the same kind
    channels_last: bool = True
    vis_images: int = 4  # validation images in each epoch's visualisation PNG
    eval_every: int = 1  # epochs between validations (the last epoch always validates)
    # Stop once val mIoU has not improved by more than min_delta for this many validations in a row
    # (0 = train all epochs). `epochs` is then the budget's ceiling; the LR schedule still spans it.
    patience: int = 0
    min_delta: float = 0.001  # val mIoU gain (absolute) that counts as an improvement for `patience`
    # Extra labelled pairs mixed into training (e.g. target-domain pairs from `calibration synth
    # --images`): a folder with images/ and masks/. The budget stays the same: this share of
    # each epoch's images comes from the folder, the rest from the training split.
    extra_data: str = ""
    extra_share: float = 0.0  # in [0, 1); 0 = no extra data
    # Share of each epoch's samples from the unlabelled sources (the unlabelled rest of train when
    # data.labelled_count is set, and data.unlabelled), split equally between them; teacher terms only.
    unlabelled_share: float = 0.0
    hard_examples: HardExamplesConfig = field(default_factory=HardExamplesConfig)
    # The frozen teachers' outputs: `cached` computes them once per image and moves them with each sample's
    # flip, zoom and crop (distill/targets.py); `live` runs the teachers on every augmented batch; `auto`
    # caches when the cache fits cache_limit_mb. benchmarks/results/distill.json `kd_site_live` measures the difference.
    teacher_targets: Literal["auto", "cached", "live"] = "auto"
    cache_limit_mb: int = 4096  # memory the cached targets may take (float16), for teacher_targets: auto

    def __post_init__(self):
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr], got {self.min_lr}")
        require(self.grad_clip_norm >= 0, "grad_clip_norm", f"must be >= 0, got {self.grad_clip_norm}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        require(self.patience >= 0 and self.min_delta >= 0, "patience/min_delta",
                f"must be >= 0, got {self.patience}, {self.min_delta}")
        require(0 <= self.extra_share < 1, "extra_share", f"must be in [0, 1), got {self.extra_share}")
        require(self.extra_share == 0 or bool(self.extra_data), "extra_data",
                "extra_share > 0 needs a folder of pairs (train.extra_data or --extra-data DIR)")
        require(not self.extra_data or self.extra_share > 0, "extra_share",
                f"extra_data ({self.extra_data}) is used only with a share > 0: set train.extra_share (--extra-share)")
        require(0 <= self.unlabelled_share < 1, "unlabelled_share", f"must be in [0, 1), got {self.unlabelled_share}")
        require(self.teacher_targets in ("auto", "cached", "live"), "teacher_targets",
                f"must be auto, cached or live, got {self.teacher_targets!r}")
        require(self.cache_limit_mb >= 0, "cache_limit_mb", f"must be >= 0, got {self.cache_limit_mb}")
        total = self.extra_share + self.hard_examples.share + self.unlabelled_share
        require(total < 1, "extra_share + hard_examples.share + unlabelled_share",
                f"must stay below 1 (some labelled training images each epoch), got {total}")


@dataclass(frozen=True)
class DistillConfig:
    """The run's settings and distill's sections; the stages downstream extend it with theirs
    (calibration's ``CalibratedConfig``, export's ``Config``: the whole file)."""

    run_dir: str = "runs/demo"  # every stage writes under here
    seed: int = 0  # training seed (data order, augmentation, init)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    feature_teacher: FeatureTeacherConfig = field(default_factory=FeatureTeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3))

    def __post_init__(self):
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        require(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        require(self.teacher_train.hard_examples.share == 0 and self.teacher_train.extra_share == 0,
                "teacher_train.hard_examples/extra_share", "synthetic pairs are for the student; leave them off for the teacher")
        require(self.teacher_train.unlabelled_share == 0, "teacher_train.unlabelled_share",
                "the teacher learns from labels; unlabelled images are for the student")
        require(self.train.unlabelled_share == 0 or self.loss.kl > 0 or self.loss.mse > 0
                or (self.feature_teacher.enabled and self.loss.feature > 0), "train.unlabelled_share",
                "needs a teacher term (loss.kl, loss.mse or loss.feature > 0): unlabelled images teach nothing else")
        require(self.train.unlabelled_share == 0 or self.data.labelled_count > 0 or bool(self.data.unlabelled),
                "train.unlabelled_share", "needs unlabelled images: set data.unlabelled (a folder, --images DIR) "
                "or data.labelled_count (the rest of train becomes the unlabelled pool)")

    # Derived paths: one place that says where each stage writes.
    def stage_dir(self, stage: str) -> Path:
        return Path(self.run_dir) / stage

    @property
    def data_root(self) -> Path:
        return Path(self.data.root) if self.data.root else self.stage_dir("data")

    @property
    def teacher_checkpoint(self) -> Path:
        """The teacher's weights: the shipped demo teacher (``demo``), a path, or what ``make teacher`` trained."""
        from edgeseg.distill.shipped import TEACHER, resolve

        if shipped := resolve(self.teacher.checkpoint, TEACHER):
            return shipped
        return Path(self.teacher.checkpoint) if self.teacher.checkpoint else self.stage_dir("teacher") / "best.pt"

    @property
    def feature_teacher_onnx(self) -> Path:
        """The feature teacher's ONNX file (for ``demo``, where the shipped detector is exported: see
        ``edgeseg.distill.teachers.feature_teacher_model``)."""
        if self.feature_teacher.onnx == "demo":
            return self.stage_dir("feature_teacher") / "shipped.onnx"
        if self.feature_teacher.onnx:
            return Path(self.feature_teacher.onnx)
        return self.stage_dir("feature_teacher") / "featext.onnx"
