"""Reading images from disk as HxWx3 uint8 RGB, whatever their mode or bit depth."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeseg.runtime.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (other files are not listed)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def require_images(folder: Path, missing: str, empty: str) -> list[Path]:
    """The images directly in ``folder``; InputError ``missing`` if it is not a folder, ``empty`` if it has none.

    The two messages are the caller's: each names its setting and the fix.
    """
    if not folder.is_dir():
        raise InputError(missing)
    paths = list_images(folder)
    if not paths:
        raise InputError(empty)
    return paths


def to_rgb_uint8(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Convert a grayscale, RGB or RGBA array of uint8, uint16 or float to HxWx3 uint8.

    Alpha is dropped, 16-bit values are scaled by 1/257, floats are taken as [0, 1].
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise InputError(f"{name}: expected an HxW, HxWx3 or HxWx4 image, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"{name}: image has zero size {a.shape[:2]}")
    if a.dtype == np.uint16:
        a = (a.astype(np.uint32) * 255 + 32767) // 65535
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise InputError(f"{name}: image contains NaN or inf values")
        a = np.clip(a * 255.0 + 0.5, 0, 255)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise InputError(f"{name}: unsupported image dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")
    a = a.astype(np.uint8, copy=False)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def open_image(path: str | Path, noun: str = "image", what: str = "image", fix: str = "re-save it as PNG or JPEG"):
    """The PIL image at ``path`` with its pixels loaded (the file closed again). A missing file is one
    InputError "<path>: <noun> file does not exist", an unreadable one "<path>: not a readable <what>
    (<why>); <fix>": the one place that turns a user's bad image file into a clear line."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {noun} file does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable {what} ({e})" + (f"; {fix}" if fix else "")) from None


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (grayscale, palette, RGBA and 16-bit converted)."""
    im = open_image(path)
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.uint16)
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float32) / 255.0
    elif im.mode in ("L", "RGB", "RGBA", "LA"):
        arr = np.asarray(im)
        if im.mode == "LA":
            arr = arr[:, :, 0]
    else:
        arr = np.asarray(im.convert("RGB"))
    return to_rgb_uint8(arr, name=str(path))
