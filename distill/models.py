"""The teacher and student UNets, the projection head, and loading their weights.

Both UNets are segmentation-models-pytorch parts (encoder, ``UnetDecoder``, segmentation
head) under smp.Unet's attribute names, so an ``smp.Unet`` state_dict loads strictly into a
5-block :class:`UnetSegmenter`. A 4-block decoder stops at stride 2 and the head upsamples x2:
the slim, fast student layout chosen by the decoder sweep (docs/distill.md, "The student").
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn as nn

from edgeseg.distill.config import ModelConfig
from edgeseg.runtime.errors import InputError

log = logging.getLogger(__name__)


class UnetSegmenter(nn.Module):
    """UNet with one output channel (person logit).

    Args:
        encoder: smp encoder name, e.g. ``timm-efficientnet-b0``.
        decoder_channels: widths of the decoder blocks; 5 blocks predict at full resolution,
            4 at half resolution (then x2 bilinear), 3 at quarter resolution.
        encoder_weights: ``imagenet`` (downloaded by smp), ``none``, or a local state_dict path.
        feature_stride: stride of the encoder feature returned by :meth:`forward_features`.
        activation: the encoder's activation (``silu``, EfficientNet's own, or ``relu``/``relu6``
            for tu-* encoders: INT8-friendly, see ``ModelConfig.activation``).
    """

    def __init__(self, encoder: str, decoder_channels: tuple[int, ...], encoder_weights: str = "none",
                 feature_stride: int = 8, activation: str = "silu"):
        super().__init__()
        import segmentation_models_pytorch as smp
        from segmentation_models_pytorch.base import SegmentationHead
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

        weights = "imagenet" if encoder_weights == "imagenet" else None
        extra = {} if activation == "silu" else {"act_layer": activation}  # timm's create_model argument
        try:
            self.encoder = smp.encoders.get_encoder(encoder, in_channels=3, depth=5, weights=weights, **extra)
        except KeyError:
            names = [n for n in smp.encoders.get_encoder_names() if "efficientnet" in n]
            raise InputError(f"unknown encoder {encoder!r}; EfficientNet choices: {', '.join(names)}") from None
        except OSError as e:  # offline: the ImageNet download failed
            raise InputError(f"could not fetch ImageNet weights for {encoder} ({e}); set encoder_weights to "
                             "'none' or to a local encoder state_dict path") from None
        if encoder_weights not in ("imagenet", "none", ""):
            self.encoder.load_state_dict(load_state_dict(encoder_weights, keys=("encoder", "state_dict")))
        n = len(decoder_channels)
        self.decoder = UnetDecoder(encoder_channels=self.encoder.out_channels, decoder_channels=list(decoder_channels),
                                   n_blocks=n)
        self.segmentation_head = SegmentationHead(decoder_channels[-1], 1, kernel_size=3, upsampling=2 ** (5 - n))
        self.output_stride = 2 ** (5 - n)
        self.feature_index = int(math.log2(feature_stride))
        self.feature_channels = self.encoder.out_channels[self.feature_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1, H, W) person logits."""
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: logits (B, 1, H, W) and the encoder feature at ``feature_stride``.

        For B0 at stride 8 the feature is (B, 40, H/8, W/8).
        """
        features = self.encoder(x)
        logits = self.segmentation_head(self.decoder(features))
        return logits, features[self.feature_index]


def build_model(cfg: ModelConfig, feature_stride: int = 8) -> UnetSegmenter:
    """The UNet a model config describes (weights random or from ``encoder_weights``)."""
    return UnetSegmenter(cfg.encoder, tuple(cfg.decoder_channels), cfg.encoder_weights, feature_stride, cfg.activation)


def load_state_dict(path: str | Path, keys: tuple[str, ...] = ("model", "state_dict", "student"),
                    activation: str | None = None) -> dict:
    """A state_dict from a file holding either a plain state_dict or a checkpoint dict.

    A checkpoint dict is searched for the first of ``keys``; a ``module.`` prefix (from DDP) is
    removed. ``activation``: the activation the caller builds the model with; an edgeseg
    checkpoint trained with another is refused (the weights would load and compute nonsense).
    """
    path = Path(path)
    if path.suffix == ".safetensors":  # a plain state_dict; a shipped one is checked against its recorded SHA-256
        from edgeseg.distill.shipped import load_checked

        return {k.removeprefix("module."): v for k, v in load_checked(path).items()}
    if not path.is_file():
        raise InputError(f"{path}: checkpoint does not exist; train one first (make teacher / make distill) or fix the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise InputError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a state_dict or a checkpoint dict, got {type(obj).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        check_activation(obj, activation, path)
        for key in keys:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            raise InputError(f"{path}: checkpoint has none of the keys {list(keys)} (it has {sorted(obj)[:8]})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_activation(ckpt: dict, activation: str | None, path: str | Path) -> None:
    """Refuse an edgeseg checkpoint whose recorded encoder activation differs from ``activation``."""
    model = (ckpt.get("identity") or {}).get("model")
    if activation is None or not isinstance(model, dict):
        return
    trained = model.get("activation", "silu")
    if trained != activation:
        raise InputError(f"{path}: was trained with activation {trained}, the config builds {activation}; "
                         f"set activation: {trained} in the model section (or --set <model>.activation={trained})")


def load_model(cfg: ModelConfig, checkpoint: str | Path, feature_stride: int = 8,
               keys: tuple[str, ...] = ("model", "state_dict", "student")) -> UnetSegmenter:
    """Build the UNet of ``cfg`` and load ``checkpoint`` into it strictly."""
    model = build_model(cfg, feature_stride)
    state = load_state_dict(checkpoint, keys, activation=cfg.activation)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)[:200]]
        raise InputError(f"{checkpoint}: weights do not fit a UNet with encoder {cfg.encoder} and decoder "
                         f"{list(cfg.decoder_channels)} ({first[0].strip()[:200]}); check the model section of the config") from None
    return model


def load_teacher(cfg, device: torch.device | str | None = None) -> nn.Module:
    """The config's segmentation teacher on ``device`` (CPU if None): normalised images -> (B, 1, H, W) logits.

    A UNet loaded from ``cfg.teacher_checkpoint``, or, with ``teacher.onnx.path``, the ONNX model run
    through IOBinding (``edgeseg.distill.onnx_teacher.OnnxSegmentationTeacher``, a module without
    parameters). ``cfg``: the root config.
    """
    if getattr(cfg.teacher, "is_onnx", False):
        from edgeseg.distill.teachers import onnx_teacher

        return onnx_teacher(cfg, device)
    model = load_model(cfg.teacher, cfg.teacher_checkpoint)
    return model.to(device) if device is not None else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
