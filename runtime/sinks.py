"""Where masks go: PNGs per image, or a mask video and an overlay video per clip (plus PNGs on request).

Masks are written 0/255; the overlay tints the person red over the frame. A video sink writes
through temporary files that ``close`` finalises and renames into place whatever ended the
run (a stream lost half-way included), so what was written is a complete, playable file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path
from edgeseg.runtime.sources import Frame

log = logging.getLogger(__name__)

TINT_RGB = (255, 40, 40)  # the overlay's colour; a person pixel becomes 0.45 * pixel + 0.55 * tint


def _tint_lut(tint: tuple[int, int, int]) -> np.ndarray:
    """(256, 1, 3) uint8: per channel, ``uint8(v * 0.45 + tint * 0.55)``, today's overlay formula value by value."""
    v = np.arange(256, dtype=np.float64)[:, None]
    return (v * 0.45 + np.asarray(tint, np.float64)[None, :] * 0.55).astype(np.uint8).reshape(256, 1, 3)


_LUT_RGB, _LUT_BGR = _tint_lut(TINT_RGB), _tint_lut(TINT_RGB[::-1])


def overlay(image: np.ndarray, mask: np.ndarray, bgr: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 image with the person (``mask`` (H, W) 0/1) tinted; ``bgr``: the image is BGR.

    A table lookup of the tinted value of each pixel in the mask's bounding box, copied where the
    mask is set: the same picture as ``pixel * 0.45 + tint * 0.55`` per person pixel, at a fraction
    of the time (a VGA frame's overlay is the writer thread's work, which must keep up with the model).
    """
    out = image.copy()
    x, y, w, h = cv2.boundingRect(mask)
    if w and h:
        box = (slice(y, y + h), slice(x, x + w))
        out[box] = cv2.copyTo(cv2.LUT(image[box], _LUT_BGR if bgr else _LUT_RGB), mask[box], out[box])
    return out


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)


class Sink:
    """Takes (frame, mask) pairs in order; ``close`` finishes every file (always called, error or not)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written = 0  # frames written

    def write(self, frame: Frame, mask: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def outputs(self) -> dict[str, str]:
        """What was written: {role: path}."""
        return {"folder": str(self.folder)}


class ImageSink(Sink):
    """``<name>.mask.png`` (0/255) and ``<name>.overlay.png`` per frame."""

    def write(self, frame: Frame, mask: np.ndarray) -> None:
        save_png(mask * 255, self.folder / f"{frame.name}.mask.png")
        save_png(overlay(frame.image, mask), self.folder / f"{frame.name}.overlay.png")
        self.written += 1


class VideoSink(Sink):
    """``mask.mp4`` and ``overlay.mp4`` at the source's frame size and rate; ``masks/NNNNN.png`` if asked.

    The videos are MPEG-4 Part 2 (FourCC ``mp4v``) in MP4, which OpenCV's FFmpeg backend writes
    without extra encoders and common players play; where that writer cannot open, Motion-JPEG
    in AVI. Both are lossy: a decoded mask video is near 0/255 at edges, the PNGs are exact.
    A frame whose size differs from the first (a stream that changed resolution) is resized to
    the first frame's size for the videos (said once); its PNG keeps its own size.
    """

    CODECS = ((".mp4", "mp4v"), (".avi", "MJPG"))

    def __init__(self, folder: Path, fps: float, save_masks: bool = False):
        super().__init__(folder)
        self.fps, self.save_masks = fps, save_masks
        self._writers: dict[str, cv2.VideoWriter] = {}
        self._paths: dict[str, tuple[Path, Path]] = {}  # role -> (temporary, final)
        self._size: tuple[int, int] | None = None  # (width, height) of the videos
        self._resized = 0

    def _open(self, size: tuple[int, int]) -> None:
        for suffix, fourcc in self.CODECS:
            writers, paths = {}, {}
            for role, colour in (("mask", False), ("overlay", True)):
                final = self.folder / f"{role}{suffix}"
                tmp = final.with_name(f".{role}.tmp{suffix}")
                # isColor=False writes single-channel masks (no BGR copy per frame); OpenCV VideoWriter,
                # FFmpeg backend: VIDEOWRITER_PROP_IS_COLOR as an open parameter.
                w = cv2.VideoWriter(str(tmp), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), self.fps, size,
                                    [cv2.VIDEOWRITER_PROP_IS_COLOR, int(colour)])
                if not w.isOpened():
                    break
                writers[role], paths[role] = w, (tmp, final)
            if len(writers) == 2:
                self._writers, self._paths, self._size = writers, paths, size
                return
            for role, w in writers.items():
                w.release()
                paths[role][0].unlink(missing_ok=True)
        raise InputError(f"{self.folder}: OpenCV cannot write video here (neither mp4v/MP4 nor MJPG/AVI opened); "
                         "check that the folder is writable and that OpenCV was built with FFmpeg")

    def write(self, frame: Frame, mask: np.ndarray) -> None:
        h, w = mask.shape
        if self._size is None:
            self._open((w, h))
        image, mask255 = frame.image, mask * np.uint8(255)
        if (w, h) != self._size:
            if not self._resized:
                log.warning("frame %d is %dx%d, the videos %dx%d: later frames of another size are resized for the "
                            "videos (their masks are computed at their own size)", frame.index, w, h, *self._size)
            self._resized += 1
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
            mask255 = cv2.resize(mask255, self._size, interpolation=cv2.INTER_NEAREST)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        self._writers["mask"].write(mask255)
        self._writers["overlay"].write(overlay(bgr, mask255, bgr=True))
        if self.save_masks:
            save_png(mask * 255, self.folder / "masks" / f"{frame.name}.png")
        self.written += 1

    def close(self) -> None:
        """Finalise the videos (their index written) and move them into place; idempotent."""
        for role, w in self._writers.items():
            w.release()
            tmp, final = self._paths[role]
            if tmp.is_file():
                os.replace(tmp, final)
        self._writers = {}

    def outputs(self) -> dict[str, str]:
        out = {role: str(final) for role, (_, final) in self._paths.items()}
        if self.save_masks:
            out["masks"] = str(self.folder / "masks")
        return out
