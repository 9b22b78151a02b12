"""Segmentation data: image/mask folders, COCO person masks, the demo set, and the torch Dataset.

A *sample source* is a list of :class:`Sample` (an image path and how to get its mask). Errors
about the files (a missing mask, a mask whose size differs from its image, an unreadable file,
an empty folder) are raised when the list is built, naming the file, so a training run never
dies an hour in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from edgeseg.distill.config import DistillConfig, DataConfig
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.images import IMAGE_SUFFIXES, list_images, open_image, read_rgb, require_images
from edgeseg.runtime.preprocess import fit_image, fit_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image and the way to read its binary person mask (neither: an unlabelled image)."""

    image: Path
    mask: Path | None = None  # a mask file (value > 0 is person) ...
    coco_masks: Callable[[], np.ndarray] | None = None  # ... or a COCO union-of-person-masks loader

    @property
    def labelled(self) -> bool:
        return self.mask is not None or self.coco_masks is not None

    def unlabelled(self) -> "Sample":
        """The same image with its label dropped."""
        return Sample(image=self.image)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as (H, W) uint8 with 1 = person (any value > 0, any channel)."""
    a = np.asarray(open_image(path, noun="mask", what="mask image", fix=""))
    if a.ndim == 3:
        a = a[:, :, :3].max(axis=2)  # an RGB(A) mask: any colour channel > 0 is person
    return (a > 0).astype(np.uint8)


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except OSError as e:
        raise InputError(f"{path}: not a readable image ({e}); re-save it as PNG or JPEG") from None
    return h, w


def folder_samples(split_dir: str | Path) -> list[Sample]:
    """Pairs ``<split_dir>/images/X.*`` with ``<split_dir>/masks/X.*`` (same stem)."""
    split_dir = Path(split_dir)
    img_dir, mask_dir = split_dir / "images", split_dir / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise InputError(f"{d}: folder does not exist; a data split needs images/ and masks/ with matching file names")
    images = list_images(img_dir)
    if not images:
        raise InputError(f"{img_dir}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    masks = {p.stem: p for p in list_images(mask_dir)}
    samples = []
    for img in images:
        mask = masks.get(img.stem)
        if mask is None:
            raise InputError(f"{img}: no mask with the same name in {mask_dir}; add {img.stem}.png (person > 0)")
        ih, iw = _image_size(img)
        mh, mw = _image_size(mask)
        if (ih, iw) != (mh, mw):
            raise InputError(f"{mask}: mask is {mw}x{mh} but its image {img.name} is {iw}x{ih}; masks must match their image's size")
        samples.append(Sample(image=img, mask=mask))
    return samples


def image_samples(folder: str | Path) -> list[Sample]:
    """Unlabelled samples: every image in ``folder/images`` (or in ``folder`` itself), headers checked."""
    folder = Path(folder)
    img_dir = folder / "images" if (folder / "images").is_dir() else folder
    images = require_images(img_dir,
                            f"{folder}: folder of unlabelled images does not exist; point data.unlabelled "
                            "(--images DIR) at a folder of frames",
                            f"{img_dir}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}); "
                            "an unlabelled source needs at least one readable frame")
    for img in images:
        _image_size(img)  # an unreadable frame fails now, by name, not an hour into training
    return [Sample(image=img) for img in images]


def coco_samples(annotation_json: str | Path, image_dir: str | Path) -> list[Sample]:
    """Every image of a COCO file, with the union of its ``person`` instance masks."""
    from pycocotools.coco import COCO

    annotation_json, image_dir = Path(annotation_json), Path(image_dir)
    if not annotation_json.is_file():
        raise InputError(f"{annotation_json}: COCO annotation file does not exist")
    if not image_dir.is_dir():
        raise InputError(f"{image_dir}: COCO image folder does not exist")
    try:
        coco = COCO(str(annotation_json))
    except Exception as e:  # pycocotools raises assorted errors on bad JSON
        raise InputError(f"{annotation_json}: not a readable COCO annotation file ({type(e).__name__}: {e})") from None
    person_ids = coco.getCatIds(catNms=["person"])
    if not person_ids:
        raise InputError(f"{annotation_json}: no 'person' category; edgeseg segments people")
    samples = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        path = image_dir / info["file_name"]
        if not path.is_file():
            raise InputError(f"{path}: listed in {annotation_json.name} but missing from {image_dir}")
        ann_ids = coco.getAnnIds(imgIds=img_id, catIds=person_ids, iscrowd=None)

        def union(ann_ids=ann_ids, h=info["height"], w=info["width"]):
            m = np.zeros((h, w), np.uint8)
            for ann in coco.loadAnns(ann_ids):
                m |= coco.annToMask(ann).astype(np.uint8)
            return m

        samples.append(Sample(image=path, coco_masks=union))
    if not samples:
        raise InputError(f"{annotation_json}: lists no images")
    return samples


SPLITS = ("train", "val", "test", "test_shift", "teacher")  # teacher: data.teacher_split, or train
OPTIONAL_SPLITS = ("test", "test_shift")


def _ensure_demo(cfg: DistillConfig) -> None:
    d: DataConfig = cfg.data
    if d.source == "demo":
        from edgeseg.distill.demo_data import generate_demo_dataset, generate_target_images

        generate_demo_dataset(cfg.data_root, d.image_size, d.demo.train_count, d.demo.val_count, d.demo.seed,
                              d.demo.max_people, d.demo.empty_fraction, d.demo.test_count, d.demo.test_shift_count,
                              d.demo.teacher_count, d.demo.teacher_conditions, d.demo.site_count)
        if d.demo.target_count:
            generate_target_images(cfg.data_root, d.image_size, d.demo.target_count, d.demo.seed, d.demo.max_people,
                                   d.demo.empty_fraction)
        if d.demo.clip_frames:
            from edgeseg.distill.demo_video import generate_demo_clip

            generate_demo_clip(cfg.data_root, d.image_size, d.demo.seed, frames=d.demo.clip_frames)


def has_split(cfg: DistillConfig, split: str) -> bool:
    """Whether the data set has ``split`` (train and val always; test and test_shift are optional)."""
    if split not in OPTIONAL_SPLITS:
        return True
    d: DataConfig = cfg.data
    if d.source == "demo":
        return (d.demo.test_count if split == "test" else d.demo.test_shift_count) > 0
    rel = cfg.data_root / getattr(d, split)
    if d.source == "coco":
        return rel.is_file() and bool(getattr(d, f"{split}_images"))
    return (rel / "images").is_dir()


def split_samples(cfg: DistillConfig, split: str) -> list[Sample]:
    """The samples of ``split`` (train, val, test or test_shift) for the configured source.

    The demo source generates its set under ``<run_dir>/data`` first (once; cached).
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    d: DataConfig = cfg.data
    _ensure_demo(cfg)
    if split == "teacher":
        if not d.teacher_split:  # the labels the user has: never the masks of the unlabelled pool
            train = split_samples(cfg, "train")
            return student_data(cfg, train).labelled if d.labelled_count else train
        if d.source == "coco":
            raise InputError("data.teacher_split is for folder data; with COCO, train the teacher on the train split")
        return folder_samples(cfg.data_root / d.teacher_split)
    rel = getattr(d, split)
    if d.source == "coco":
        images = getattr(d, f"{split}_images")
        if not images:
            raise InputError(f"data.{split}_images must name the COCO image folder of the {split} split")
        return coco_samples(cfg.data_root / rel, cfg.data_root / images)
    return folder_samples(cfg.data_root / rel)


RESERVED_SOURCE_NAMES = ("pool", "extra", "hard")  # the trainer's own sample sources


@dataclass(frozen=True)
class StudentData:
    """What the student trains on: the labelled images and each unlabelled source, by name."""

    labelled: list[Sample]
    unlabelled: dict[str, list[Sample]]  # source name -> images without masks ("pool": the rest of train)
    epoch_length: int  # samples per epoch: the size of the train split, whatever share of it is labelled


def student_data(cfg: DistillConfig, train: list[Sample] | None = None) -> StudentData:
    """The train split cut to the label budget (``data.labelled_count``), and the unlabelled sources.

    The labelled subset is a seeded choice (``data.labelled_seed``); the rest of train becomes the
    unlabelled ``pool`` (its masks are dropped), and ``data.unlabelled`` adds a second source.
    """
    d: DataConfig = cfg.data
    train = split_samples(cfg, "train") if train is None else train
    labelled, unlabelled = train, {}
    if d.labelled_count:
        if d.labelled_count > len(train):
            raise InputError(f"data.labelled_count is {d.labelled_count} but the train split has {len(train)} images; "
                             "lower it (0 = every image labelled)")
        order = np.random.default_rng(d.labelled_seed).permutation(len(train))
        keep = set(order[:d.labelled_count].tolist())
        labelled = [s for i, s in enumerate(train) if i in keep]
        pool = [s.unlabelled() for i, s in enumerate(train) if i not in keep]
        if pool:
            unlabelled["pool"] = pool
    if d.unlabelled:
        folder = Path(d.unlabelled)
        name = folder.name or "unlabelled"
        if name in RESERVED_SOURCE_NAMES:  # a folder called pool must not replace the train pool
            name = f"unlabelled_{name}"
        unlabelled[name] = image_samples(folder if folder.is_absolute() else cfg.data_root / folder)
    return StudentData(labelled, unlabelled, len(train))


def report_splits(cfg: DistillConfig) -> tuple[list[str], str]:
    """The splits quality figures are reported on, and a note for the reports.

    ``test`` (with ``test_shift`` beside it when present); without a test split, ``val``, the
    split that also chose the checkpoint, which the note says plainly.
    """
    if has_split(cfg, "test"):
        names = ["test"] + (["test_shift"] if has_split(cfg, "test_shift") else [])
        return names, "figures on the held-out test split; val chose the checkpoint and the INT8 budget"
    return ["val"], ("this data has no test split: the figures are on val, the selection split that also chose "
                     "the checkpoint and the INT8 budget, so they are optimistic; add <root>/test to report held out")


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """((H, W, 3) uint8 RGB, (H, W) uint8 mask) of one sample, checked against each other.

    An unlabelled sample's mask is all zeros: a placeholder that moves with the augmentation and
    that no loss reads (the trainer masks the ground-truth terms by the sample's source).
    """
    image = read_rgb(sample.image)
    if not sample.labelled:
        return image, np.zeros(image.shape[:2], np.uint8)
    mask = read_mask(sample.mask) if sample.mask is not None else sample.coco_masks()
    if mask.shape != image.shape[:2]:
        raise InputError(f"{sample.mask or sample.image}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                         f"{image.shape[1]}x{image.shape[0]}; masks must match their image's size")
    return image, mask


def pad_colour(data: DataConfig) -> tuple[int, int, int]:
    """The letterbox's pad colour: the normalisation's mean in uint8 RGB (0 after normalising)."""
    return tuple(int(round(m * 255)) for m in data.mean)


class SegmentationDataset(torch.utils.data.Dataset):
    """Images letterboxed to ``image_size``, normalised, with optional augmentation.

    Augmentation is a pure function of (seed, epoch, index), so a resumed run and a run with
    any number of loader workers see exactly the same pixels. Call :meth:`set_epoch` each epoch.

    Returns per item: image (3, H, W) float32 normalised, mask (1, H, W) float32 in {0, 1}, and
    the raw (3, H, W) uint8 image (for visualisation and the feature teacher). With ``geometry``,
    a fourth item: the (2, 3) float32 affine ``theta`` of the item's flip, zoom and crop, as
    ``torch.nn.functional.affine_grid`` reads it (output to source, normalised coordinates,
    ``align_corners=False``), so anything computed on the un-augmented image (a cached teacher
    output, at any resolution) can be moved the same way (:func:`warp_like`).
    """

    def __init__(self, samples: list[Sample], data: DataConfig, train: bool, seed: int = 0, geometry: bool = False):
        if not samples:
            raise InputError("the data set is empty: no samples were found")
        self.samples = samples
        self.size = tuple(data.image_size)
        self.mean = np.asarray(data.mean, np.float32) * 255
        self.std = np.asarray(data.std, np.float32) * 255
        self.pad = pad_colour(data)
        self.augment = data.augment if (train and data.augment.enabled) else None
        self.seed = seed
        self.epoch = 0
        self.geometry = geometry

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, mask = load_sample(self.samples[index])
        image, placement = fit_image(image, self.size, "letterbox", self.pad)
        mask = fit_mask(mask, placement)
        theta = IDENTITY
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, mask, theta = self._augment(image, mask, rng)
        x = (image.astype(np.float32) - self.mean) / self.std
        item = (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
                torch.from_numpy(mask[None].astype(np.float32)),
                torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
        return (*item, torch.from_numpy(theta)) if self.geometry else item

    def _augment(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """The augmented image and mask, and the affine theta of the flip, zoom and crop (colour jitter is not geometry)."""
        a = self.augment
        h, w = self.size
        ax = ay = 1.0  # theta's scale and offset per axis, in normalised coordinates
        bx = by = 0.0
        flip = a.hflip and rng.random() < 0.5
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        scale = float(rng.uniform(*a.scale))
        if abs(scale - 1.0) > 1e-3:
            sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
            im = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((sw, sh), Image.BILINEAR))
            mk = np.asarray(Image.fromarray(np.ascontiguousarray(mask)).resize((sw, sh), Image.NEAREST))
            canvas = np.empty((max(h, sh), max(w, sw), 3), np.uint8)
            canvas[...] = self.pad
            mcanvas = np.zeros(canvas.shape[:2], np.uint8)
            oy, ox = rng.integers(0, canvas.shape[0] - sh + 1), rng.integers(0, canvas.shape[1] - sw + 1)
            canvas[oy:oy + sh, ox:ox + sw], mcanvas[oy:oy + sh, ox:ox + sw] = im, mk
            cy, cx = rng.integers(0, canvas.shape[0] - h + 1), rng.integers(0, canvas.shape[1] - w + 1)
            image, mask = canvas[cy:cy + h, cx:cx + w], mcanvas[cy:cy + h, cx:cx + w]
            # output pixel x -> resized pixel x + cx - ox -> source pixel (that + 0.5) * w / sw - 0.5 (PIL's centres)
            ax, bx = w / sw, (w + 2.0 * (cx - ox)) / sw - 1.0
            ay, by = h / sh, (h + 2.0 * (cy - oy)) / sh - 1.0
        if flip:  # the flip came first: the source's x is mirrored
            ax, bx = -ax, -bx
        if a.color_jitter > 0:
            j = a.color_jitter
            f = image.astype(np.float32)
            f = f * rng.uniform(1 - j, 1 + j)  # brightness
            mean = f.mean()
            f = (f - mean) * rng.uniform(1 - j, 1 + j) + mean  # contrast
            gray = f.mean(axis=2, keepdims=True)
            f = (f - gray) * rng.uniform(1 - j, 1 + j) + gray  # saturation
            image = f.clip(0, 255).astype(np.uint8)
        theta = np.array([[ax, 0.0, bx], [0.0, ay, by]], np.float32)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask), theta


IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)  # theta of an un-augmented item


def warp_like(maps: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Move (B, C, h, w) maps computed on un-augmented images the way each item's augmentation moved it.

    ``theta``: (B, 2, 3) from :class:`SegmentationDataset` (``geometry=True``). Bilinear; where the
    augmented view shows the letterbox pad (zoomed out), the map takes ``fill`` ((C,) or a scalar:
    what the model says about the pad colour). Any resolution: the coordinates are normalised.
    """
    import torch.nn.functional as F

    maps = maps.float()
    fill = torch.as_tensor(fill, dtype=maps.dtype, device=maps.device).reshape(1, -1, 1, 1)
    grid = F.affine_grid(theta.to(maps.device, torch.float32), list(maps.shape), align_corners=False)
    # sampling (maps - fill) with zeros outside, then adding fill back: the pad takes ``fill``, edges blend into it
    return F.grid_sample(maps - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
