"""How close an image is to the training data: SSIM and perceptual-hash distance to its nearest training image.

The search is approximate: a cheap embedding (the 16x16 grey thumbnail, zero-mean, unit-norm)
shortlists the ``k`` (8) most correlated training images, and SSIM (scikit-image, grey, at the
model's input size) picks the nearest among them. :meth:`TrainIndex.exact_nearest` scores every
training image instead; the calibration report runs both on a sample and records how often the
shortlist misses the exact nearest (``nearest_search`` in ``report.json``). The report applies the
same search to held-out real test images, the yardstick for the synthetic images' figures.
"""
from __future__ import annotations

import cv2
import numpy as np

from edgeseg.calibration.filters import dhash, hamming

# scikit-image's structural_similarity defaults (grey, data_range 255): 7x7 uniform window,
# sample covariance, K1 0.01, K2 0.03, the window's radius cropped from the border
_WIN = 7
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
_COV_NORM = _WIN ** 2 / (_WIN ** 2 - 1)


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _embed(grey: np.ndarray) -> np.ndarray:
    e = cv2.resize(grey, (16, 16), interpolation=cv2.INTER_AREA).ravel()
    e = e - e.mean()
    return e / (np.linalg.norm(e) + 1e-6)


def _box(x: np.ndarray) -> np.ndarray:
    """scikit-image's uniform window (``scipy.ndimage.uniform_filter``, reflect border) on each (H, W)
    of (N, H, W), as OpenCV's box filter (the same border; sums in another order, within 1e-6)."""
    out = np.empty_like(x)
    for i in range(len(x)):
        cv2.blur(x[i], (_WIN, _WIN), dst=out[i], borderType=cv2.BORDER_REFLECT)
    return out


def _window_stats(greys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image window terms of (N, H, W) grey images that do not depend on the other image:
    the mean ``ux``, ``ux^2 + C1`` and the variance ``vx + C2``."""
    ux = _box(greys)
    return ux, ux * ux + _C1, _COV_NORM * (_box(greys * greys) - ux * ux) + _C2


def ssim_many(image_grey: np.ndarray, greys: np.ndarray, stats: tuple | None = None) -> np.ndarray:
    """SSIM of one grey (H, W) image against each of (N, H, W), as ``structural_similarity(a, b,
    data_range=255)`` computes it (within 1e-6, tested), in one vectorised pass.

    ``stats``: :func:`_window_stats` of ``greys``, when the caller keeps them.
    """
    greys = greys.astype(np.float32, copy=False)
    y = image_grey[None].astype(np.float32)
    ux, ux2c1, vxc2 = stats if stats is not None else _window_stats(greys)
    uy, uy2c1, vyc2 = _window_stats(y)
    uxuy = ux * uy
    num = _box(greys * y)
    num -= uxuy
    num *= 2 * _COV_NORM
    num += _C2  # 2 vxy + C2
    num *= 2 * uxuy + _C1  # A1 A2
    den = ux2c1 + (uy2c1 - _C1)  # B1
    den *= vxc2 + (vyc2 - _C2)  # B1 B2
    num /= den
    pad = (_WIN - 1) // 2
    return num[:, pad:-pad, pad:-pad].mean(axis=(1, 2), dtype=np.float64)


class TrainIndex:
    """Nearest training image of a generated one. ``images``: (N, H, W, 3) uint8 at the model's size."""

    _CHUNK = 64  # training images per vectorised SSIM pass of the exact search
    _CACHE_BYTES = 768 * 2 ** 20  # keep the exact search's window statistics when they fit in this

    def __init__(self, images: np.ndarray, shortlist: int = 8):
        self.grey = np.stack([_grey(i) for i in images])
        self.embeddings = np.stack([_embed(g) for g in self.grey])
        self.hashes = np.asarray([dhash(i) for i in images], dtype=np.uint64)
        self.shortlist = shortlist
        self._stats: list | None = None

    def ssim(self, image: np.ndarray, index: int) -> float:
        from skimage.metrics import structural_similarity

        return float(structural_similarity(_grey(image), self.grey[index], data_range=255))

    def nearest(self, image: np.ndarray) -> dict:
        """``train_nearest`` (index), ``train_ssim`` and ``train_hash_bits`` (Hamming distance of dHashes):
        the best SSIM among the ``shortlist`` thumbnail-nearest training images (approximate)."""
        candidates = np.argsort(-(self.embeddings @ _embed(_grey(image))))[: self.shortlist]
        scores = [self.ssim(image, int(c)) for c in candidates]
        best = int(np.argmax(scores))
        return {"train_nearest": int(candidates[best]), "train_ssim": float(scores[best]),
                "train_hash_bits": int(hamming(dhash(image), self.hashes).min())}

    def exact_nearest(self, image: np.ndarray) -> tuple[int, float]:
        """(index, SSIM) of the training image with the highest SSIM, every one scored."""
        y = _grey(image)
        chunks = range(0, len(self.grey), self._CHUNK)
        if self._stats is None and 3 * self.grey.nbytes <= self._CACHE_BYTES:
            self._stats = [_window_stats(self.grey[i:i + self._CHUNK]) for i in chunks]
        scores = np.concatenate([ssim_many(y, self.grey[i:i + self._CHUNK], self._stats[k] if self._stats else None)
                                 for k, i in enumerate(chunks)])
        best = int(np.argmax(scores))
        return best, float(scores[best])
