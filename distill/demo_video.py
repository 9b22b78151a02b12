"""The demo world's video: figures walking across a site background under the site's lighting.

A short clip with exact ground truth, drawn with the demo data set's own pieces
(:mod:`edgeseg.distill.demo_data`): a background from the photographs held out for the
deployment site (test_shift's), static distractors, figures drawn once and moved across it
frame by frame (each on its own path and speed, with a slight walking bob), an optional
occluder in front, one lighting gradient, and the site's deployment condition (low light,
backlight or colour cast: ``_deployment_shift``, its parameters fixed for the clip). Every
frame gets its own sensor noise, as a camera's do: the noise that makes per-frame masks flicker.
Frames are drawn at twice their size and box-filtered down, so the masks (coverage > 0.5) are
exact. The clip is written as a video (MPEG-4 in MP4; Motion-JPEG in AVI where MP4 cannot be
written), the masks as PNGs; everything is a function of the seed.

    <root>/clip/clip.mp4, <root>/clip/masks/NNNNN.png, <root>/clip/clip.json

It measures what the runtime does to video: mIoU against the ground truth and the flicker
figure (``edgeseg runtime infer --images clip.mp4 --truth masks/``), with and without smoothing.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFilter

from edgeseg.distill.demo_data import (_FORMAT_VERSION, _SHIFT_BACKGROUND_SOURCES, CONDITIONS, _background,
                                       _Canvas, _deployment_shift, _draw_person, _draw_shape, _load_backgrounds,
                                       _texture)

log = logging.getLogger(__name__)

CLIP = "clip"
# The clip's seeds: seed + this offset, drawn as two- and three-element seed sequences, where every split draws
# [seed, split, index] and the target images [seed + 1_000_003, split, index]: no image of any split is a frame.
CLIP_SEED_OFFSET = 2_000_029


@dataclass
class _Figure:
    """One person drawn once at the canvas size, cropped to its box, and moved along a straight path."""

    image: np.ndarray  # (h, w, 3) float32 pixels of the figure's box
    mask: np.ndarray  # (h, w) bool: the figure's own pixels
    top: float  # canvas row of the box's top at frame 0
    left: float  # canvas column of the box's left at frame 0
    speed: float  # canvas columns per frame (the sign is the direction)
    bob: float  # walking bob amplitude in canvas rows
    phase: float  # bob phase


def _figure(c: _Canvas, frames: int) -> _Figure | None:
    image = np.zeros((c.size, c.size, 3), np.float32)
    mask = np.zeros((c.size, c.size), bool)
    _draw_person(c, image, mask)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    w = x1 - x0
    rng = c.rng
    # cross a good part of the frame in the clip: from wherever it starts, at 0.4-0.9 frame widths per clip
    direction = 1.0 if rng.random() < 0.5 else -1.0
    speed = direction * rng.uniform(0.4, 0.9) * c.size / frames
    centre = rng.uniform(0.0, 0.5) if direction > 0 else rng.uniform(0.5, 1.0)  # walking into the frame
    start = centre * c.size - 0.5 * w
    return _Figure(image[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy(), float(y0), float(start), float(speed),
                   float(rng.uniform(0.003, 0.012) * c.size), float(rng.uniform(0, 2 * math.pi)))


def _paste(fig: _Figure, t: int, image: np.ndarray, mask: np.ndarray) -> None:
    """Draw ``fig`` at frame ``t`` into the canvas ``image`` and ``mask`` (clipped at the borders)."""
    side = image.shape[0]
    top = int(round(fig.top + fig.bob * math.sin(fig.phase + 0.5 * t)))
    left = int(round(fig.left + fig.speed * t))
    h, w = fig.mask.shape
    ya, yb, xa, xb = max(top, 0), min(top + h, side), max(left, 0), min(left + w, side)
    if ya >= yb or xa >= xb:
        return
    m = fig.mask[ya - top:yb - top, xa - left:xb - left]
    image[ya:yb, xa:xb][m] = fig.image[ya - top:yb - top, xa - left:xb - left][m]
    mask[ya:yb, xa:xb] |= m


def _shift_stream(seed: int, condition: str | None) -> list[int]:
    """The seed sequence whose ``_deployment_shift`` draw is ``condition`` (the clip's own draw when None)."""
    if condition is None:
        return [seed + CLIP_SEED_OFFSET, 1, 0]
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)} or None, got {condition!r}")
    want = CONDITIONS.index(condition)
    j = next(j for j in range(1000) if np.random.default_rng([seed + CLIP_SEED_OFFSET, 1, j]).integers(3) == want)
    return [seed + CLIP_SEED_OFFSET, 1, j]


def render_clip(image_size: tuple[int, int], seed: int = 0, frames: int = 112, people: int = 2,
                condition: str | None = None, noise: float = 4.0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The clip's frames in order: ((H, W, 3) uint8 RGB, (H, W) uint8 mask with 1 = person).

    Args:
        image_size: (height, width) of the frames.
        seed: the demo set's seed (the clip draws from its own disjoint streams).
        frames: clip length.
        people: figures walking across.
        condition: the site's lighting (one of ``demo_data.CONDITIONS``), or None for the seed's own draw.
        noise: standard deviation of each frame's own sensor noise, in grey levels.
    """
    rng = np.random.default_rng([seed + CLIP_SEED_OFFSET, 0])
    h, w = image_size
    c = _Canvas(rng=rng, size=2 * max(h, w), backgrounds=_load_backgrounds(_SHIFT_BACKGROUND_SOURCES))
    background = _background(c)
    for _ in range(rng.integers(1, 4)):  # distractors behind the people
        _draw_shape(c, background, _texture(c, rng.uniform(0, 255, size=3).astype(np.float32)))
    figures = [f for f in (_figure(c, frames) for _ in range(people)) if f is not None]
    occluder = np.zeros((c.size, c.size, 3), np.float32)
    occluded = _draw_shape(c, occluder, _texture(c, rng.uniform(0, 255, size=3).astype(np.float32))) \
        if rng.random() < 0.5 else np.zeros((c.size, c.size), bool)
    gy, gx = rng.uniform(-0.4, 0.4, size=2)
    yy, xx = np.mgrid[-1:1:complex(c.size), -1:1:complex(c.size)].astype(np.float32)
    light = ((1 + gy * yy + gx * xx) * rng.uniform(0.7, 1.2))[:, :, None]
    blur = rng.uniform(0.3, 1.0) if rng.random() < 0.5 else 0.0
    shift = _shift_stream(seed, condition)
    for t in range(frames):
        image, mask = background.copy(), np.zeros((c.size, c.size), bool)
        for fig in figures:
            _paste(fig, t, image, mask)
        image[occluded] = occluder[occluded]
        mask &= ~occluded
        img = Image.fromarray((image * light).clip(0, 255).astype(np.uint8)).resize((w, h), Image.BOX)
        if blur:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        lit, _ = _deployment_shift(np.asarray(img, np.float32), np.random.default_rng(shift))  # fixed for the clip
        lit = lit + np.random.default_rng([seed + CLIP_SEED_OFFSET, 2, t]).normal(0, noise, size=lit.shape)
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BOX)) > 127
        yield lit.clip(0, 255).astype(np.uint8), small.astype(np.uint8)


def clip_condition(seed: int, condition: str | None = None) -> str:
    """The deployment condition the clip of ``seed`` is drawn under."""
    return CONDITIONS[int(np.random.default_rng(_shift_stream(seed, condition)).integers(3))]


def _writer(folder: Path, size: tuple[int, int], fps: float):
    """An open cv2.VideoWriter for the clip: MPEG-4 Part 2 (mp4v) in MP4, else Motion-JPEG in AVI."""
    import cv2

    for name, fourcc in (("clip.mp4", "mp4v"), ("clip.avi", "MJPG")):
        writer = cv2.VideoWriter(str(folder / name), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), fps, size)
        if writer.isOpened():
            return writer, name
        writer.release()
        (folder / name).unlink(missing_ok=True)
    raise RuntimeError("OpenCV cannot write MP4 (mp4v) or AVI (MJPG) video here: it needs its FFmpeg backend")


def generate_demo_clip(root: str | Path, image_size: tuple[int, int], seed: int = 0, frames: int = 112,
                       fps: float = 25.0, people: int = 2, condition: str | None = None) -> Path:
    """Write ``root/clip/`` (``clip.mp4`` or ``clip.avi``, ``masks/NNNNN.png``, ``clip.json``) unless an identical
    clip is there; returns the video's path.

    The folder is built aside and swapped in whole (``runtime.files.replace_dir``), so it is never half-written;
    ``clip.json`` holds the parameters, the condition and the video's file name.
    """
    import cv2

    from edgeseg.runtime.files import recover_dir, replace_dir, staging_dir
    from edgeseg.runtime.progress import LoggedProgress

    folder = recover_dir(Path(root) / CLIP)
    params = {"version": _FORMAT_VERSION, "image_size": list(image_size), "seed": seed, "frames": frames, "fps": fps,
              "people": people, "condition": clip_condition(seed, condition)}
    stamp = folder / "clip.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if {k: old.get(k) for k in params} == params and (folder / old.get("video", "")).is_file():
            return folder / old["video"]
    tmp = staging_dir(folder)
    (tmp / "masks").mkdir()
    writer, name = _writer(tmp, (image_size[1], image_size[0]), fps)
    try:
        clip = render_clip(tuple(image_size), seed, frames, people, params["condition"])
        for t, (image, mask) in enumerate(LoggedProgress(clip, total=frames, desc="demo clip", logger=log)):
            writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            Image.fromarray(mask * 255).save(tmp / "masks" / f"{t:05d}.png")
    finally:
        writer.release()
    (tmp / "clip.json").write_text(json.dumps({**params, "video": name}, indent=1))
    replace_dir(tmp, folder)
    log.info("wrote the demo clip (%d frames, %dx%d, %g fps, %s) to %s", frames, image_size[1], image_size[0], fps,
             params["condition"], folder / name)
    return folder / name


def frame_strip(video: str | Path, out: str | Path, count: int = 6) -> Path:
    """A PNG of ``count`` frames of ``video`` side by side, evenly spaced (a README picture of a clip)."""
    import cv2

    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr)
    cap.release()
    if not frames:
        raise ValueError(f"{video}: no readable frame")
    picks = [frames[round(i * (len(frames) - 1) / max(count - 1, 1))] for i in range(min(count, len(frames)))]
    strip = cv2.cvtColor(np.concatenate(picks, axis=1), cv2.COLOR_BGR2RGB)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(out)
    return Path(out)
