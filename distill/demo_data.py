"""The embedded demo data set: procedurally drawn people over photographic backgrounds.

Each image is drawn at twice its size and box-filtered down, so edges are anti-aliased and the
mask (coverage > 0.5) is exact for the pixels drawn. A figure is a skeleton (pelvis, spine,
neck, head, two arms and two legs with random joint angles) rendered as capsules and polygons
in clothing colours and textures (plain, stripes, checks, noise) with skin-coloured head and
hands. Backgrounds are random crops, flips, colour shifts and blends of the photographs and
textures bundled with scikit-image (no people among them), with distractor shapes in clothing
colours, foreground occluders that cut people's masks, lighting gradients, blur and noise.
Everything is a function of (seed, split, index), so the set is identical on every machine.

Splits: ``train`` and ``val`` (selection), ``test`` (the same kind of scenes, reported on) and
``test_shift``, a deployment-domain shift that training never sees: backgrounds from source
photographs held out of the other splits, under low light with sensor noise, strong backlight
or colour casts (see :func:`_deployment_shift`).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

# scikit-image photographs and textures that load offline and contain no people.
_BACKGROUND_SOURCES = (
    "brick", "grass", "gravel", "chelsea", "hubble_deep_field", "retina",
    "coins", "moon", "page", "text", "immunohistochemistry", "cell",
)
# Held out of train/val/test: only the shifted test split draws on these.
# (stereo_motorcycle, once among them, left: scikit-image states no licence for it; docs/design.md#provenance)
_SHIFT_BACKGROUND_SOURCES = ("coffee", "rocket", "clock", "colorwheel")
# the order fixes each split's RNG stream: new splits are appended, so older splits keep their pixels
SPLITS = ("train", "val", "test", "test_shift", "teacher", "site")
_SKIN_TONES = np.array([[255, 219, 172], [241, 194, 125], [224, 172, 105], [198, 134, 66],
                        [141, 85, 36], [92, 56, 30]], np.float32)
_FORMAT_VERSION = 3


def _load_backgrounds(names: tuple[str, ...] = _BACKGROUND_SOURCES) -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in names:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo pairs
            img = img[0]
        img = np.asarray(img)
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(img[:, :, :3].astype(np.uint8)))
    return out


@dataclass
class _Canvas:
    rng: np.random.Generator
    size: int  # drawing size (2x the output)
    backgrounds: list[np.ndarray]


def _background_crop(c: _Canvas) -> np.ndarray:
    """A random crop of one source photo, resized to the canvas, flipped and colour-shifted."""
    src = c.backgrounds[c.rng.integers(len(c.backgrounds))]
    h, w = src.shape[:2]
    side = int(c.rng.uniform(0.3, 1.0) * min(h, w))
    y, x = c.rng.integers(0, h - side + 1), c.rng.integers(0, w - side + 1)
    crop = Image.fromarray(src[y:y + side, x:x + side]).resize((c.size, c.size), Image.BILINEAR)
    a = np.asarray(crop, np.float32)
    if c.rng.random() < 0.5:
        a = a[:, ::-1]
    if c.rng.random() < 0.5:
        a = a[::-1]
    # per-channel gain and offset: a colour cast, as under different lights
    a = a * c.rng.uniform(0.6, 1.3, size=3) + c.rng.uniform(-30, 30, size=3)
    return a


def _background(c: _Canvas) -> np.ndarray:
    a = _background_crop(c)
    if c.rng.random() < 0.6:  # blend a second source: clutter
        b = _background_crop(c)
        alpha = _smooth_field(c, scale=c.rng.uniform(2, 6))
        a = a * alpha[:, :, None] + b * (1 - alpha[:, :, None])
    return a


def _smooth_field(c: _Canvas, scale: float) -> np.ndarray:
    """A smooth random field in [0, 1], from upsampled low-resolution noise."""
    n = max(2, int(scale))
    low = c.rng.random((n, n)).astype(np.float32)
    return np.asarray(Image.fromarray(low).resize((c.size, c.size), Image.BICUBIC)).clip(0, 1)


def _texture(c: _Canvas, base: np.ndarray) -> np.ndarray:
    """A clothing texture: plain, stripes, checks or mottled noise around a base colour."""
    s = c.size
    kind = c.rng.integers(4)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    if kind == 0:
        pattern = np.zeros((s, s), np.float32)
    elif kind == 1:
        period = c.rng.uniform(6, 24)
        angle = c.rng.uniform(0, math.pi)
        pattern = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0).astype(np.float32) - 0.5
    elif kind == 2:
        period = c.rng.uniform(8, 28)
        pattern = (((xx // period) + (yy // period)) % 2).astype(np.float32) - 0.5
    else:
        pattern = _smooth_field(c, scale=c.rng.uniform(8, 24)) - 0.5
    second = c.rng.uniform(0, 255, size=3).astype(np.float32)
    amount = c.rng.uniform(0.2, 0.8)
    tex = base[None, None, :] + pattern[:, :, None] * amount * (second - base)[None, None, :] * 2
    return tex


def _capsule(draw: ImageDraw.ImageDraw, p0, p1, width: float) -> None:
    draw.line([tuple(p0), tuple(p1)], fill=255, width=max(1, int(width)))
    r = width / 2
    for p in (p0, p1):
        draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=255)


def _limb(origin, length1, length2, angle1, angle2):
    """Two-segment limb from ``origin``; angles in radians from straight down."""
    o = np.asarray(origin, np.float32)
    j = o + length1 * np.array([math.sin(angle1), math.cos(angle1)], np.float32)
    e = j + length2 * np.array([math.sin(angle1 + angle2), math.cos(angle1 + angle2)], np.float32)
    return o, j, e


def _draw_person(c: _Canvas, image: np.ndarray, mask: np.ndarray) -> None:
    """Draw one figure into ``image`` (float HxWx3) and ``mask`` (bool HxW), in place."""
    rng, s = c.rng, c.size
    height = s * rng.uniform(0.3, 0.95)
    cx = rng.uniform(0.05, 0.95) * s
    feet_y = rng.uniform(0.45, 1.15) * s
    pelvis = np.array([cx, feet_y - 0.5 * height], np.float32)
    lean = rng.normal(0, 0.12)
    neck = pelvis + 0.32 * height * np.array([math.sin(lean), -math.cos(lean)], np.float32)
    head_r = 0.065 * height * rng.uniform(0.9, 1.15)
    head = neck + (head_r * 1.1) * np.array([math.sin(lean), -math.cos(lean)], np.float32)
    shoulder_w = 0.11 * height * rng.uniform(0.8, 1.2)
    hip_w = 0.07 * height * rng.uniform(0.8, 1.2)
    side = np.array([math.cos(lean), math.sin(lean)], np.float32)
    sh_l, sh_r = neck - side * shoulder_w, neck + side * shoulder_w
    hip_l, hip_r = pelvis - side * hip_w, pelvis + side * hip_w
    limb_w = 0.055 * height * rng.uniform(0.8, 1.3)
    leg_w = 0.075 * height * rng.uniform(0.8, 1.3)

    layers = {name: Image.new("L", (s, s), 0) for name in ("shirt", "pants", "skin")}
    d = {k: ImageDraw.Draw(v) for k, v in layers.items()}
    # torso: a quadrilateral from shoulders to hips
    d["shirt"].polygon([tuple(sh_l), tuple(sh_r), tuple(hip_r + side * 0.01 * height), tuple(hip_l - side * 0.01 * height)], fill=255)
    # legs
    for hip, sgn in ((hip_l, -1), (hip_r, 1)):
        a1 = sgn * abs(rng.normal(0.12, 0.2)) + rng.normal(0, 0.25)
        a2 = -abs(rng.normal(0, 0.35)) * np.sign(a1 + 1e-3)
        o, j, e = _limb(hip, 0.25 * height, 0.24 * height, a1, a2)
        _capsule(d["pants"], o, j, leg_w)
        _capsule(d["pants"], j, e, leg_w * 0.85)
    # arms (sleeves in shirt colour, forearms short- or long-sleeved)
    long_sleeves = rng.random() < 0.5
    for shoulder, sgn in ((sh_l, -1), (sh_r, 1)):
        a1 = sgn * abs(rng.normal(0.3, 0.6)) + lean
        a2 = sgn * rng.normal(0.3, 0.7)
        o, j, e = _limb(shoulder, 0.17 * height, 0.16 * height, a1, a2)
        _capsule(d["shirt"], o, j, limb_w)
        _capsule(d["shirt" if long_sleeves else "skin"], j, e, limb_w * 0.85)
        r = limb_w * 0.6
        d["skin"].ellipse([e[0] - r, e[1] - r, e[0] + r, e[1] + r], fill=255)
    # head and neck
    d["skin"].ellipse([head[0] - head_r, head[1] - head_r * 1.15, head[0] + head_r, head[1] + head_r * 1.15], fill=255)
    _capsule(d["skin"], neck, head, head_r * 0.8)
    if rng.random() < 0.5:  # hair or a hat on top
        hair = Image.new("L", (s, s), 0)
        ImageDraw.Draw(hair).pieslice([head[0] - head_r * 1.05, head[1] - head_r * 1.25, head[0] + head_r * 1.05, head[1] + head_r * 0.9], 180, 360, fill=255)
        layers["hair"] = hair

    shirt = rng.uniform(0, 255, size=3).astype(np.float32)
    pants = rng.uniform(0, 200, size=3).astype(np.float32)
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.85, 1.1)
    hair_col = rng.uniform(0, 120, size=3).astype(np.float32)
    # lighting on the figure: a gradient along the body
    shade = (1.0 + rng.uniform(-0.35, 0.35) * (np.linspace(-1, 1, s, dtype=np.float32)[:, None])).astype(np.float32)
    for name, fill in (("pants", _texture(c, pants)), ("shirt", _texture(c, shirt)),
                       ("skin", skin[None, None, :]), ("hair", hair_col[None, None, :])):
        if name not in layers:
            continue
        m = np.asarray(layers[name]) > 127
        if not m.any():
            continue
        fill = np.broadcast_to(fill, image.shape)
        image[m] = (fill[m] * shade[np.nonzero(m)[0]]).clip(0, 255)
        mask |= m


def _draw_shape(c: _Canvas, image: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """A random ellipse, rectangle, polygon or pole; returns its boolean footprint."""
    rng, s = c.rng, c.size
    layer = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(layer)
    kind = rng.integers(4)
    x, y = rng.uniform(-0.1, 1.0, size=2) * s
    w, h = rng.uniform(0.08, 0.45, size=2) * s
    if kind == 0:
        d.ellipse([x, y, x + w, y + h], fill=255)
    elif kind == 1:
        d.rectangle([x, y, x + w, y + h], fill=255)
    elif kind == 2:
        pts = [(x + rng.uniform(0, w), y + rng.uniform(0, h)) for _ in range(rng.integers(3, 7))]
        d.polygon(pts, fill=255)
    else:  # a pole or a lamp post: thin and tall, like a limb
        d.line([(x, y), (x + rng.uniform(-0.1, 0.1) * s, y + h * 2)], fill=255, width=int(rng.uniform(0.02, 0.06) * s))
    m = np.asarray(layer) > 127
    image[m] = fill[m] if fill.ndim == 3 else fill
    return m


def render_sample(seed: int, split: str, index: int, size: tuple[int, int], max_people: int,
                  empty_fraction: float, backgrounds: list[np.ndarray],
                  conditions: float = 0.0, info: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its mask (``info``, if given, gets the image's ``condition``: one of
    :data:`CONDITIONS`, or ``none``).

    ``test_shift`` and ``site`` images are always under a deployment condition (and drawn on the
    held-out backgrounds the caller passes); any other split's image is with probability
    ``conditions`` (the teacher corpus: the world's lighting on the source backgrounds).

    Returns:
        ((H, W, 3) uint8 RGB image, (H, W) uint8 mask with 1 = person).
    """
    split_id = SPLITS.index(split)
    rng = np.random.default_rng([seed, split_id, index])
    side = 2 * max(size)
    c = _Canvas(rng=rng, size=side, backgrounds=backgrounds)
    image = _background(c)
    mask = np.zeros((side, side), bool)

    # distractors behind the people: shapes in clothing-like colours and textures
    for _ in range(rng.integers(1, 5)):
        fill = _texture(c, rng.uniform(0, 255, size=3).astype(np.float32))
        _draw_shape(c, image, fill)
    people = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_people + 1))
    for _ in range(people):
        _draw_person(c, image, mask)
    # occluders in front: cut people's masks (a mask is what is visible)
    for _ in range(rng.integers(0, 3)):
        if rng.random() < 0.5:
            fill = _background_crop(c)
        else:
            fill = _texture(c, rng.uniform(0, 255, size=3).astype(np.float32))
        m = _draw_shape(c, image, fill)
        mask &= ~m

    # global lighting gradient, blur and sensor noise
    gy, gx = rng.uniform(-0.4, 0.4, size=2)
    yy, xx = np.mgrid[-1:1:complex(side), -1:1:complex(side)].astype(np.float32)
    image = image * (1 + gy * yy + gx * xx)[:, :, None] * rng.uniform(0.7, 1.2)
    img = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    h, w = size
    img = img.resize((w, h), Image.BOX)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    out = np.asarray(img, np.float32)
    condition = "none"
    if split in ("test_shift", "site") or (conditions > 0 and rng.random() < conditions):
        out, condition = _deployment_shift(out, rng)
    if info is not None:
        info["condition"] = condition
    out = out + rng.normal(0, rng.uniform(1, 6), size=(h, w, 3))
    mask_small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BOX)) > 127
    return out.clip(0, 255).astype(np.uint8), mask_small.astype(np.uint8)


CONDITIONS = ("low_light", "backlight", "colour_cast")  # the world's deployment conditions, by _deployment_shift's kind


def _deployment_shift(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One deployment-domain condition that training never shows, applied to a (H, W, 3) float image.

    - low light: exposure x0.15-0.4 with a gamma lift, then shot and read noise (a dark, grainy camera);
    - backlight: a bright source on one side (up to +220) that washes the scene out, people darker;
    - colour cast: strong per-channel gains (sodium, LED or tungsten light) and lowered contrast.
    """
    h, w = image.shape[:2]
    kind = rng.integers(3)
    if kind == 0:
        lit = 255 * (np.clip(image, 0, 255) / 255 * rng.uniform(0.15, 0.4)) ** rng.uniform(0.8, 1.0)
        shot = rng.normal(0, 1, image.shape) * np.sqrt(np.maximum(lit, 0) * rng.uniform(0.5, 2.0))
        return lit + shot + rng.normal(0, rng.uniform(4, 10), image.shape), CONDITIONS[kind]
    if kind == 1:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        cy, cx = rng.uniform(-0.2, 1.2) * h, (rng.choice([-0.3, 1.3]) + rng.uniform(-0.2, 0.2)) * w
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / max(h, w)
        glow = rng.uniform(150, 220) * np.exp(-(d / rng.uniform(0.4, 0.8)) ** 2)
        return image * rng.uniform(0.45, 0.7) + glow[:, :, None] * np.array([1.0, 0.97, 0.9]), CONDITIONS[kind]
    gains = rng.choice([[1.35, 0.95, 0.45], [0.6, 0.9, 1.4], [1.3, 0.75, 1.2], [0.8, 1.3, 0.7]])
    mean = image.mean()
    return (mean + (image - mean) * rng.uniform(0.5, 0.8)) * np.asarray(gains) * rng.uniform(0.8, 1.1), CONDITIONS[kind]


TARGET_IMAGES = "target_images"
TARGET_SEED_OFFSET = 1_000_003  # the target images' seed: disjoint from test_shift's


def generate_target_images(root: str | Path, image_size: tuple[int, int], count: int = 8, seed: int = 0,
                           max_people: int = 3, empty_fraction: float = 0.1) -> Path:
    """``root/target_images/NNNNN.png``: a few unlabelled images of the deployment domain.

    Drawn by the test_shift generator (held-out backgrounds, the same lighting conditions) with a
    seed disjoint from test_shift's, so no target image is a test_shift image; no masks are written.
    """
    from edgeseg.runtime.files import recover_dir, replace_dir, staging_dir

    folder = recover_dir(Path(root) / TARGET_IMAGES)
    params = {"version": _FORMAT_VERSION, "image_size": list(image_size), "count": count, "seed": seed + TARGET_SEED_OFFSET,
              "max_people": max_people, "empty_fraction": empty_fraction}
    stamp = folder / "target.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return folder
    tmp = staging_dir(folder)  # the whole folder at once: no stale or half-written images
    backgrounds = _load_backgrounds(_SHIFT_BACKGROUND_SOURCES)
    for i in range(count):
        img, _ = render_sample(seed + TARGET_SEED_OFFSET, "test_shift", i, tuple(image_size), max_people,
                               empty_fraction, backgrounds)
        Image.fromarray(img).save(tmp / f"{i:05d}.png")
    (tmp / "target.json").write_text(json.dumps(params, indent=1))
    replace_dir(tmp, folder)
    log.info("wrote %d unlabelled target-domain images to %s", count, folder)
    return folder


def generate_demo_dataset(root: str | Path, image_size: tuple[int, int], train_count: int, val_count: int,
                          seed: int = 0, max_people: int = 3, empty_fraction: float = 0.1, test_count: int = 0,
                          test_shift_count: int = 0, teacher_count: int = 0, teacher_conditions: float = 0.0,
                          site_count: int = 0) -> Path:
    """Write ``root/{train,val,test,test_shift,teacher}/{images,masks}/NNNNN.png`` and ``root/site/images``
    unless an identical set is there.

    ``teacher`` is the teacher's corpus (the student never sees it); ``site`` holds unlabelled frames of
    test_shift's deployment site (held-out backgrounds, the same conditions, other images: no masks).
    The set's parameters are stored in ``root/demo.json``; a matching file means the set is
    complete (it is written last), so an interrupted generation is redone, never half-used.
    """
    root = Path(root)
    params = {"version": _FORMAT_VERSION, "image_size": list(image_size), "train_count": train_count,
              "val_count": val_count, "test_count": test_count, "test_shift_count": test_shift_count, "seed": seed,
              "max_people": max_people, "empty_fraction": empty_fraction}
    if teacher_count or site_count:  # absent from older stamps: an old set stays valid for an old config
        params.update(teacher_count=teacher_count, teacher_conditions=teacher_conditions, site_count=site_count)
    stamp = root / "demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        log.info("demo data set in %s is up to date", root)
        return root
    stamp.unlink(missing_ok=True)
    counts = {"train": train_count, "val": val_count, "test": test_count, "test_shift": test_shift_count,
              "teacher": teacher_count, "site": site_count}
    jobs = []  # (split, first, stop): chunks of 100 images, drawn in parallel (each image is its own seed's)
    for split, count in counts.items():
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        if split != "site":  # the site's frames come without labels, as a camera's do
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for stale in (root / split / "images").glob("*.png"):
            if int(stale.stem) >= count:
                stale.unlink()
                (root / split / "masks" / stale.name).unlink(missing_ok=True)
        jobs += [(split, first, min(first + 100, count)) for first in range(0, count, 100)]
    args = (str(root), seed, tuple(image_size), max_people, empty_fraction, teacher_conditions)
    _draw_chunks(jobs, args)
    stamp.write_text(json.dumps(params, indent=1))
    log.info("wrote the demo data set (%s at %s) to %s", ", ".join(f"{n} {s}" for s, n in counts.items()),
             image_size, root)
    return root



_WORKER_BACKGROUNDS: dict = {}  # a drawing process's photographs, loaded once


def _draw_chunk(job: tuple, args: tuple) -> int:
    """Render and write images ``first .. stop - 1`` of ``split`` (a worker process's unit of work)."""
    split, first, stop = job
    root, seed, image_size, max_people, empty_fraction, teacher_conditions = args
    if not _WORKER_BACKGROUNDS:
        _WORKER_BACKGROUNDS.update(source=_load_backgrounds(), shift=_load_backgrounds(_SHIFT_BACKGROUND_SOURCES))
    backgrounds = _WORKER_BACKGROUNDS
    root = Path(root)
    shifted = split in ("test_shift", "site")
    for i in range(first, stop):
        img, mask = render_sample(seed, split, i, image_size, max_people, empty_fraction,
                                  backgrounds["shift" if shifted else "source"],
                                  conditions=teacher_conditions if split == "teacher" else 0.0)
        Image.fromarray(img).save(root / split / "images" / f"{i:05d}.png")
        if split != "site":
            Image.fromarray(mask * 255).save(root / split / "masks" / f"{i:05d}.png")
    return stop - first


def _draw_chunks(jobs: list[tuple], args: tuple) -> None:
    """Every chunk, across the cores this process may use (the images are the same however they are split)."""
    from concurrent.futures import ProcessPoolExecutor

    from edgeseg.runtime.pipeline import usable_cores
    from edgeseg.runtime.progress import LoggedProgress

    total = sum(stop - first for _, first, stop in jobs)
    bar = LoggedProgress(total=total, desc="demo data", logger=log)
    workers = min(usable_cores(), len(jobs))
    if workers <= 1:
        for job in jobs:
            bar.update(_draw_chunk(job, args))
    else:
        with ProcessPoolExecutor(workers) as pool:
            for done in pool.map(_draw_chunk, jobs, [args] * len(jobs)):
                bar.update(done)
    bar.close()


def render_split(root: str | Path, split: str, indices, info: list | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) of ``split``'s images at ``indices``, drawn from the set's parameters in ``root/demo.json``.

    Indices past the split's count draw further images of the same distribution that no split holds
    (held-out images for a benchmark). ``info``, if given, gets each image's ``condition``.
    """
    params = json.loads((Path(root) / "demo.json").read_text())
    backgrounds = _load_backgrounds(_SHIFT_BACKGROUND_SOURCES if split in ("test_shift", "site") else _BACKGROUND_SOURCES)
    out = []
    for i in indices:
        d: dict = {}
        out.append(render_sample(params["seed"], split, i, tuple(params["image_size"]), params["max_people"],
                                 params["empty_fraction"], backgrounds,
                                 conditions=params.get("teacher_conditions", 0.0) if split == "teacher" else 0.0, info=d))
        if info is not None:
            info.append(d["condition"])
    return out


def image_conditions(root: str | Path, split: str) -> list[str]:
    """Each image's deployment condition in a demo set's ``split`` (one of :data:`CONDITIONS`, or ``none``).

    Not stored with the images (a camera does not label its frames either); re-drawn from the set's
    parameters, so it is exactly the condition each image was rendered under.
    """
    count = json.loads((Path(root) / "demo.json").read_text()).get(f"{split}_count", 0)
    conditions: list[str] = []
    render_split(root, split, range(count), conditions)
    return conditions
