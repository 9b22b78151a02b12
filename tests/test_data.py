"""Data sources: folders, COCO, the demo set, image conversions and their errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgeseg.distill.config import DataConfig
from edgeseg.distill.data import SegmentationDataset, coco_samples, folder_samples, load_sample, read_mask
from edgeseg.distill.demo_data import generate_demo_dataset, render_sample, _load_backgrounds
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.images import read_rgb


def _write_pair(root, stem, size=(20, 30), mask_size=None, mode="RGB"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    h, w = size
    img = (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)
    Image.fromarray(img).convert(mode).save(root / "images" / f"{stem}.png")
    mh, mw = mask_size or size
    m = np.zeros((mh, mw), np.uint8)
    m[2:6, 3:9] = 255
    Image.fromarray(m).save(root / "masks" / f"{stem}.png")


def test_folder_pairs_and_mask_values(tmp_path):
    _write_pair(tmp_path, "a")
    _write_pair(tmp_path, "b")
    samples = folder_samples(tmp_path)
    assert [s.image.stem for s in samples] == ["a", "b"]
    image, mask = load_sample(samples[0])
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1} and mask.sum() == 4 * 6


@pytest.mark.parametrize("setup, match", [
    (lambda r: _write_pair(r, "a", mask_size=(21, 30)), r"a.png: mask is 30x21 but its image a.png is 30x20"),
    (lambda r: (_write_pair(r, "a"), (r / "masks" / "a.png").unlink()), r"a.png: no mask with the same name"),
    (lambda r: ((r / "images").mkdir(), (r / "masks").mkdir()), r"images: no images found"),
    (lambda r: None, r"images: folder does not exist"),
    (lambda r: (_write_pair(r, "a"), (r / "images" / "a.png").write_bytes(b"not a png")), r"a.png: not a readable image"),
])
def test_folder_errors_name_the_file(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(InputError, match=match):
        folder_samples(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA"])
def test_image_modes_are_converted_to_rgb_uint8(tmp_path, mode):
    base = np.zeros((8, 8, 3), np.uint8)
    base[:, :4] = 200
    if mode == "I;16":
        arr = np.zeros((8, 8), np.uint16)
        arr[:, :4] = 51400  # 200 * 257
        im = Image.fromarray(arr)
    elif mode == "P":
        im = Image.fromarray(base).convert("P", palette=Image.ADAPTIVE, colors=4)
    else:
        im = Image.fromarray(base).convert(mode)
    im.save(tmp_path / "x.png")
    rgb = read_rgb(tmp_path / "x.png")
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert abs(int(rgb[0, 0, 0]) - 200) <= 1 and rgb[0, 7, 0] == 0


def test_rgb_mask_any_channel_counts(tmp_path):
    m = np.zeros((4, 4, 3), np.uint8)
    m[0, 0, 2] = 10
    Image.fromarray(m).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").sum() == 1


def test_coco_union_of_person_masks(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "img" / "1.png")
    ann = {
        "images": [{"id": 1, "file_name": "1.png", "height": 10, "width": 12}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2],
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4, "bbox": [6, 6, 2, 2],
             "segmentation": [[6, 6, 10, 6, 10, 9, 6, 9]]},
            {"id": 3, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 4, "bbox": [0, 6, 2, 2],
             "segmentation": [[0, 6, 3, 6, 3, 9, 0, 9]]},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    samples = coco_samples(tmp_path / "ann.json", tmp_path / "img")
    image, mask = load_sample(samples[0])
    assert mask.shape == (10, 12)
    assert mask[1, 1] == 1 and mask[7, 8] == 1  # both people
    assert mask[7, 1] == 0  # the dog is not a person


def test_demo_set_is_deterministic_and_varied(tmp_path):
    bgs = _load_backgrounds()
    a_img, a_mask = render_sample(0, "train", 3, (64, 64), 3, 0.1, bgs)
    b_img, b_mask = render_sample(0, "train", 3, (64, 64), 3, 0.1, bgs)
    c_img, _ = render_sample(1, "train", 3, (64, 64), 3, 0.1, bgs)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)
    masks = [render_sample(0, "val", i, (64, 64), 3, 0.2, bgs)[1] for i in range(30)]
    fractions = np.array([m.mean() for m in masks])
    assert (fractions == 0).any(), "some images must have nobody in them"
    assert (fractions > 0.02).sum() >= 15, "most images must have people"
    root = generate_demo_dataset(tmp_path / "d", (64, 64), train_count=4, val_count=2, seed=0)
    assert len(list((root / "train" / "images").glob("*.png"))) == 4
    mtime = (root / "train" / "images" / "00000.png").stat().st_mtime_ns
    generate_demo_dataset(tmp_path / "d", (64, 64), train_count=4, val_count=2, seed=0)  # cached
    assert (root / "train" / "images" / "00000.png").stat().st_mtime_ns == mtime


def test_the_8_target_images_are_seed_disjoint_from_test_shift(tmp_path):
    """The demo's unlabelled site frames (<data>/target_images) come from test_shift's generator (its held-out
    backgrounds and conditions) under a seed of their own: none is a test_shift image or a near-copy of one."""
    from edgeseg.distill.demo_data import _SHIFT_BACKGROUND_SOURCES, generate_target_images, image_conditions

    root = generate_demo_dataset(tmp_path, (64, 64), 2, 2, test_shift_count=16)
    folder = generate_target_images(root, (64, 64), count=8, seed=0)
    demo_seed = json.loads((root / "demo.json").read_text())["seed"]
    assert json.loads((folder / "target.json").read_text())["seed"] != demo_seed  # their own seed
    read = lambda p: np.asarray(Image.open(p), np.int16)
    targets = [read(p) for p in sorted(folder.glob("*.png"))]
    shift = [read(p) for p in sorted((root / "test_shift" / "images").glob("*.png"))]
    assert len(targets) == 8 and len(shift) == 16
    # the comparison can tell: test_shift's own seed redraws its images exactly, index for index
    backgrounds = _load_backgrounds(_SHIFT_BACKGROUND_SOURCES)
    again, _ = render_sample(demo_seed, "test_shift", 3, (64, 64), 3, 0.1, backgrounds)
    assert np.array_equal(again, shift[3])
    # every target image differs from every test_shift image (the same indices 0-7 included) by far more than noise
    gaps = np.array([[np.abs(t - s).mean() for s in shift] for t in targets])
    assert gaps.min() > 10, gaps.min()
    assert set(image_conditions(root, "test_shift")) <= {"low_light", "backlight", "colour_cast"}  # the site's


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    for s in "abcd":
        _write_pair(tmp_path, s, size=(40, 50))
    data = DataConfig(source="folder", root=str(tmp_path), image_size=(32, 32))
    ds = SegmentationDataset(folder_samples(tmp_path), data, train=True, seed=7)
    ds.set_epoch(3)
    x1, m1, _ = ds[2]
    ds.set_epoch(4)
    x2, _, _ = ds[2]
    ds.set_epoch(3)
    x3, m3, _ = ds[2]
    assert x1.shape == (3, 32, 32) and m1.shape == (1, 32, 32)
    assert np.array_equal(x1.numpy(), x3.numpy()) and np.array_equal(m1.numpy(), m3.numpy())
    assert not np.array_equal(x1.numpy(), x2.numpy())
