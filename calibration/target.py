"""Steering synthesis towards a deployment domain seen in a few unlabelled images (one-shot adaptation).

From each target image only statistics are read: per-channel mean and standard deviation (at
the generator's resolution, in its [-1, 1] range) and the sensor-noise level (Immerkaer's
estimator on the grey image at the model's size, in 8-bit units). Pool image ``i`` is steered to
target image ``i mod n``, so a mixed domain (dark, backlit, colour-cast) stays mixed.

Two steps, both inside generation:
- during sampling, each step's predicted clean image x0 moves a fraction ``weight`` of the way
  to its per-channel moments matched to the target's; the sampler continues from the moved x0,
  so the model re-renders the scene consistently at that exposure and colour;
- after upsampling to the model's size, Gaussian noise brings the image's estimated noise level
  up to the target's (a 64 px generator cannot render 128 px sensor grain itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeseg.calibration.pixels import uint8_to_signed
from edgeseg.runtime.images import read_rgb, require_images

_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_sigma(image: np.ndarray) -> float:
    """Immerkaer (1996) fast noise-variance estimate of an (H, W, 3) uint8 image, as a std in 8-bit units."""
    import cv2

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) if image.ndim == 3 else image.astype(np.float32)
    h, w = grey.shape
    conv = cv2.filter2D(grey, -1, _LAPLACE, borderType=cv2.BORDER_REFLECT)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(conv).sum() / (6 * (w - 2) * (h - 2)))


def check_target_folder(folder: str | Path) -> list[Path]:
    """The images of a target-image folder; one clear error for a missing or empty one."""
    folder = Path(folder)
    return require_images(folder,
                          f"{folder}: target-image folder does not exist; point calibration.target.images "
                          "(or calibration synth --images) at a folder of a few unlabelled deployment images",
                          f"{folder}: target-image folder has no images (.png/.jpg); put a handful (e.g. 8) of "
                          "unlabelled deployment-domain images in it")


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3) mean and std over the pixels of (B, 3, h, w) images."""
    flat = x.flatten(2)
    return flat.mean(dim=2), flat.std(dim=2)


@dataclass
class TargetDomain:
    """Statistics of the target images; pool image ``i`` follows target ``i mod len``."""

    folder: str
    names: list[str]
    mean: torch.Tensor  # (n, 3) in [-1, 1] units
    std: torch.Tensor  # (n, 3)
    noise: np.ndarray  # (n,) sensor-noise std, 8-bit units, at the model's size
    images: np.ndarray  # (n, H, W, 3) uint8 at the model's size: only to check nothing copies them

    @classmethod
    def from_folder(cls, folder: str | Path, model_hw: tuple[int, int], generator_side: int) -> "TargetDomain":
        """Read the target images; one clear error for a missing or empty folder or an unreadable file."""
        from edgeseg.runtime.preprocess import fit_image

        paths = check_target_folder(folder)
        images = np.stack([fit_image(read_rgb(p), model_hw, "stretch")[0] for p in paths])  # read_rgb names a bad file
        x = uint8_to_signed(images)
        mean, std = channel_moments(F.interpolate(x, size=(generator_side, generator_side), mode="area"))
        return cls(str(Path(folder)), [p.name for p in paths], mean, std, np.array([noise_sigma(i) for i in images]), images)

    def __len__(self) -> int:
        return len(self.names)

    def of(self, index: torch.Tensor) -> torch.Tensor:
        return index % len(self)

    def steer(self, x0: torch.Tensor, index: torch.Tensor, weight: float) -> torch.Tensor:
        """x0 moved ``weight`` of the way to itself with each channel's moments set to its target's."""
        k = self.of(index)
        mu, sd = channel_moments(x0)
        t_mu, t_sd = self.mean[k].to(x0), self.std[k].to(x0)
        matched = (x0 - mu[..., None, None]) / sd.clamp_min(1e-3)[..., None, None] * t_sd[..., None, None] + t_mu[..., None, None]
        return x0 + weight * (matched.clamp(-1, 1) - x0)

    def add_noise(self, images: np.ndarray, index: torch.Tensor, seeds: list[int]) -> np.ndarray:
        """(B, H, W, 3) uint8 with Gaussian noise topping each image's noise level up to its target's."""
        out = np.empty_like(images)
        for j, (img, k, seed) in enumerate(zip(images, self.of(index).tolist(), seeds)):
            extra = float(np.sqrt(max(self.noise[k] ** 2 - noise_sigma(img) ** 2, 0.0)))
            rng = np.random.default_rng([int(seed), 0x6E6F6973])
            out[j] = np.clip(img + rng.normal(0, extra, img.shape), 0, 255).round().astype(np.uint8) if extra else img
        return out

    def info(self) -> dict:
        return {"folder": self.folder, "images": self.names, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "noise_sigma": self.noise.tolist()}
