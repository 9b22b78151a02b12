"""Per-epoch visualisation: image | ground truth | teacher | student | disagreement."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgeseg.runtime.files import atomic_path


def _mask_rgb(mask: np.ndarray, colour=(255, 255, 255)) -> np.ndarray:
    out = np.zeros((*mask.shape, 3), np.uint8)
    out[mask.astype(bool)] = colour
    return out


def comparison_grid(images: np.ndarray, gt: np.ndarray, predictions: dict[str, np.ndarray],
                    disagreement: tuple[str, str] | None = None) -> np.ndarray:
    """Rows of image | GT | each prediction | disagreement (red where the two named masks differ).

    Args:
        images: (N, H, W, 3) uint8.
        gt: (N, H, W) {0, 1}.
        predictions: name -> (N, H, W) {0, 1}, in column order.
        disagreement: the two prediction names to compare in the last column.
    """
    titles = ["image", "ground truth", *predictions]
    rows = []
    for i in range(len(images)):
        cols = [images[i], _mask_rgb(gt[i])] + [_mask_rgb(p[i]) for p in predictions.values()]
        if disagreement:
            a, b = (predictions[k][i].astype(bool) for k in disagreement)
            cols.append(_mask_rgb(a != b, (255, 40, 40)))
        rows.append(np.concatenate(cols, axis=1))
    if disagreement:
        titles.append(f"{disagreement[0]} != {disagreement[1]}")
    grid = np.concatenate(rows, axis=0)
    header = Image.new("RGB", (grid.shape[1], 14), (30, 30, 30))
    w = images.shape[2]
    draw = ImageDraw.Draw(header)
    for j, t in enumerate(titles):
        draw.text((j * w + 3, 1), t, fill=(230, 230, 230))
    return np.concatenate([np.asarray(header), grid], axis=0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)
    return Path(path)
