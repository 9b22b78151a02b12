"""Scoring: SegmentationMeter and boundary IoU by hand, and one scoring path for non-square images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgeseg.distill.config import DataConfig
from edgeseg.distill.data import SegmentationDataset, folder_samples
from edgeseg.distill.evaluation import load_eval_set, logits_to_masks, make_loader, predict_logits, score
from edgeseg.export.accuracy import TorchRunner, predict_masks, score_masks as export_score
from edgeseg.runtime.metrics import SegmentationMeter, boundary, score_masks
from edgeseg.runtime.spec import ModelSpec

FULL = np.ones((6, 6), np.uint8)
LEFT = np.zeros((6, 6), np.uint8)
LEFT[:, :3] = 1
EMPTY = np.zeros((6, 6), np.uint8)


def test_boundary_band_counts_the_image_border_as_contour():
    # Cheng et al. 2021 pad with background: a mask filling the image has a 1-pixel ring at d = 1.
    ring = np.ones((6, 6), bool)
    ring[1:-1, 1:-1] = False
    assert np.array_equal(boundary(FULL.astype(bool), 1), ring)
    # The left half: everything but rows 1-4 of its middle column (col 0 touches the border,
    # col 2 touches the background), 14 of its 18 pixels.
    band = boundary(LEFT.astype(bool), 1)
    assert band.sum() == 14 and not band[1:5, 1].any() and band[:, [0, 2]].all()
    assert boundary(FULL.astype(bool), 3).all()  # a 6-pixel image is all band at d = 3
    assert not boundary(EMPTY.astype(bool), 2).any()


def test_meter_against_hand_computed_figures():
    m = SegmentationMeter(boundary_px=1)
    m.update(LEFT, FULL)  # tp 18, fn 18
    m.update(EMPTY, EMPTY)  # tn 36
    assert (m.tp, m.fp, m.fn, m.tn) == (18, 0, 18, 36)
    assert m.person_iou == pytest.approx(18 / 36)
    assert m.background_iou == pytest.approx(36 / 54)
    assert m.miou == pytest.approx((0.5 + 2 / 3) / 2)
    assert m.agreement == pytest.approx(54 / 72)
    # bands: GT ring 20, prediction 14, shared 10 (row 0, row 5 and column 0 of the left half)
    assert m.boundary_iou == pytest.approx(10 / 24)
    assert m.per_image_iou == pytest.approx([0.5, 1.0])

    s = score_masks([LEFT, EMPTY], [FULL, EMPTY], reference=[LEFT, FULL], boundary_px=1)
    assert s["miou"] == pytest.approx(7 / 12) and s["boundary_iou"] == pytest.approx(10 / 24)
    assert s["agreement"] == pytest.approx(36 / 72)  # image 1 agrees fully, image 2 not at all
    with pytest.raises(ValueError, match="2 predictions for 1 ground-truth"):
        score_masks([LEFT, EMPTY], [FULL])


class Background(torch.nn.Module):
    """Predicts background everywhere, the case where counting padding flatters a model most."""

    def forward(self, x):
        return torch.full((x.shape[0], 1, *x.shape[2:]), -3.0)


@pytest.fixture
def non_square(tmp_path):
    """Six 40x64 images with masks: letterboxed to 64x64, 24 of every 64 rows are padding."""
    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        m = np.zeros((40, 64), np.uint8)
        m[5 + i:35, 10 + 3 * i:40 + 2 * i] = 255
        Image.fromarray(m).save(tmp_path / "masks" / f"{i}.png")
    data = DataConfig(source="folder", root=str(tmp_path), image_size=(64, 64))
    return SegmentationDataset(folder_samples(tmp_path), data, train=False)


def _both_paths(model, dataset):
    ev = load_eval_set(dataset)
    logits = predict_logits(model, make_loader(dataset, 4), torch.device("cpu"))
    distill = score(logits_to_masks(logits, ev.placements), ev.gt)
    spec = ModelSpec(image_size=(64, 64), pad_value=dataset.pad, max_batch=4)
    images = [np.asarray(Image.open(s.image).convert("RGB")) for s in dataset.samples]
    export = export_score("m", predict_masks(TorchRunner(model, spec), images), ev.gt)
    letterboxed = score_masks(list((logits > 0).astype(np.uint8)), list(ev.gt_fitted))
    return ev, distill, export, letterboxed


def test_evaluation_crops_the_letterbox_like_the_export_report(non_square):
    ev, distill, export, letterboxed = _both_paths(Background(), non_square)
    assert [g.shape for g in ev.gt] == [(40, 64)] * 6
    assert distill["miou"] == export.miou
    # GT person pixels / all: background IoU = 1 - share; scoring padding as background inflates it.
    person = sum(int(g.sum()) for g in ev.gt)
    assert distill["miou"] == pytest.approx(0.5 * (1 - person / (6 * 40 * 64)))
    assert letterboxed["miou"] == pytest.approx(0.5 * (1 - person / (6 * 64 * 64)), abs=2e-3)
    assert letterboxed["miou"] - distill["miou"] > 0.02


def test_a_real_model_scores_the_same_on_both_paths(non_square):
    from edgeseg.distill.config import ModelConfig
    from edgeseg.distill.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8),
                                    activation="relu")).eval()
    with torch.no_grad():
        model.segmentation_head[0].bias.fill_(0.0)
    _, distill, export, _ = _both_paths(model, non_square)
    assert distill["miou"] == pytest.approx(export.miou, abs=2e-3)  # float rounding of two normalisations
