"""export's part of the config file (``export``, ``deploy``), and ``Config``: the whole file.

``Config`` is calibration's ``CalibratedConfig`` (itself distill's ``DistillConfig`` and the
``calibration`` section) with export's sections added: every stage's command parses the file
with it (the ``edgeseg`` command hands it to the shared loader), and every artifact saves it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edgeseg.calibration.config import CalibratedConfig
from edgeseg.distill.config_loader import require

__all__ = ["Config", "ExportConfig", "DeployConfig"]


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export, INT8 quantization and TensorRT engine build (``edgeseg export``)."""

    opset: int = 17  # ONNX opset
    fuse_preprocessing: bool = False  # true: input uint8 NHWC, normalisation inside the graph
    output: Literal["logits", "probabilities", "mask"] = "logits"  # mask_logits, mask_probs or a uint8 mask
    max_batch: int = 8  # optimization profile max (and parity check batch)
    opt_batch: int = 4  # optimization profile opt
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"  # how activation ranges are chosen
    percentile: float = 99.999  # for calibration_method percentile
    calibration_images: int = 256  # at most this many calibration images
    # The set the deployed INT8 models are calibrated on: synthetic (<run_dir>/calibration/synthetic), site
    # (the deployment site's few frames: calibration.target.images, the demo's <data>/target_images), real
    # (the training images), or a folder of images (any size: letterboxed to the model's input)
    calibration: str = "synthetic"
    max_miou_drop: float = 1.0  # accuracy budget in mIoU points (INT8 vs FP32); keeps nodes in float until it holds
    max_float_nodes: int = 24  # give up the budget search after this many float nodes
    threshold: float = 0.5  # probability above which a pixel is a person
    precision: Literal["int8", "fp16", "fp32"] = "int8"  # engine / deployed precision
    workspace_mib: int = 1024  # TensorRT builder workspace limit
    gallery_images: int = 6  # worst images per backend in the gallery PNG

    def __post_init__(self):
        require(1 <= self.opt_batch <= self.max_batch, "opt_batch/max_batch", f"need 1 <= opt_batch <= max_batch, got {self.opt_batch}, {self.max_batch}")
        require(11 <= self.opset <= 21, "opset", f"must be in [11, 21], got {self.opset}")
        require(90 < self.percentile < 100, "percentile", f"must be in (90, 100), got {self.percentile}")
        require(self.max_miou_drop >= 0, "max_miou_drop", f"must be >= 0 points, got {self.max_miou_drop}")
        require(0 < self.threshold < 1, "threshold", f"must be in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class DeployConfig:
    """The deploy bundle."""

    allow_over_budget: bool = False  # write a bundle even if the chosen precision misses the accuracy budget
    resize: Literal["letterbox", "stretch"] = "letterbox"  # how the runtime fits images of any size


@dataclass(frozen=True)
class Config(CalibratedConfig):
    """The whole file: every stage's sections."""

    export: ExportConfig = field(default_factory=ExportConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
