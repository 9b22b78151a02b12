"""The site check's INT8 verdict: from a predicted INT8 loss on FP32's confident pixels, never from saturation alone."""
from __future__ import annotations

import numpy as np

from edgeseg.runtime.check import CONFIDENT_LOGIT, Margins, _ConfidentAgreement, verdict
from edgeseg.runtime.preprocess import place


def _logits(rng, shape=(2, 1, 32, 32), scale=4.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_flips_of_confident_pixels_are_predicted_as_int8_loss():
    rng = np.random.default_rng(0)
    fp32 = _logits(rng)
    int8 = fp32.copy()
    sure = np.abs(fp32) >= CONFIDENT_LOGIT
    flip = sure & (rng.random(fp32.shape) < 0.1)
    int8[flip] = -int8[flip]
    placements = [place((32, 32), (32, 32))] * 2
    acc = _ConfidentAgreement()
    acc.update(fp32, int8, placements, cut=0.0)
    a, b = fp32[sure] > 0, int8[sure] > 0
    ious = [((a == k) & (b == k)).sum() / ((a == k) | (b == k)).sum() for k in (False, True)]
    assert acc.loss == np.float64(1 - np.mean(ious)) and 0.05 < acc.loss < 0.25
    assert acc.pixels == int(sure.sum())


def test_disagreement_where_fp32_is_unsure_is_no_predicted_loss():
    """A dark frame: both models near the cut, INT8 flips many of those pixels; FP32's sure pixels it keeps."""
    rng = np.random.default_rng(1)
    fp32 = _logits(rng)
    int8 = fp32.copy()
    unsure = np.abs(fp32) < CONFIDENT_LOGIT
    int8[unsure] = -int8[unsure]  # every unsure pixel flipped
    acc = _ConfidentAgreement()
    acc.update(fp32, int8, [place((32, 32), (32, 32))] * 2, cut=0.0)
    assert acc.loss == 0.0 and unsure.mean() > 0.2


def test_only_each_images_own_area_counts():
    fp32 = np.full((1, 1, 32, 32), 5.0, np.float32)
    int8 = fp32.copy()
    int8[:, :, :8] = -5.0  # the letterbox's padding rows: not the image
    p = place((16, 32), (32, 32))  # a 16x32 image letterboxed into 32x32: rows 8..23
    acc = _ConfidentAgreement()
    acc.update(fp32, int8, [p], cut=0.0)
    assert (p.top, p.height) == (8, 16) and acc.loss == 0.0 and acc.pixels == 16 * 32


def _result(saturation, int8_agreement, predicted, teacher=0.9):
    return {"range_fit": {"int8": {"saturation": saturation}}, "int8_agreement_miou": int8_agreement,
            "predicted_int8_loss": predicted, "teacher_agreement_miou": teacher}


REFERENCE = _result(0.007, 0.98, 0.002, 0.83)


def test_saturation_alone_does_not_say_recalibrate():
    findings = verdict(_result(0.036, 0.95, 0.004, 0.83), REFERENCE)  # the old false alarm: saturated, INT8 not worse
    assert findings == []


def test_a_predicted_loss_says_recalibrate_with_its_reasons():
    findings = verdict(_result(0.036, 0.95, 0.002 + Margins().predicted_int8_loss + 0.001, 0.83), REFERENCE)
    assert [f["finding"] for f in findings] == ["recalibrate on these frames"]
    why = findings[0]["why"]
    assert "predicted to lose 0.80 mIoU points" in why and "3.60% of int8 activations" in why and "0.9500" in why
    assert "edgeseg export all --calibration" in findings[0]["command"]


def test_a_low_teacher_agreement_says_adapt():
    findings = verdict(_result(0.007, 0.98, 0.002, 0.70), REFERENCE)
    assert [f["finding"] for f in findings] == ["adapt the student (distill on these frames)"]


def test_the_validation_counts_hits_false_alarms_and_misses():
    from benchmarks.bench_site_check import verdict_scores

    recal, adapt = "recalibrate on these frames", "adapt the student (distill on these frames)"
    groups = {"test": {"verdict": ["fine"], "int8_loss_points": 0.1, "true_miou_drop_points": 0.0},
              "low_light": {"verdict": [recal, adapt], "int8_loss_points": 0.05, "true_miou_drop_points": 8.0},
              "cast": {"verdict": [adapt], "int8_loss_points": 0.9, "true_miou_drop_points": 10.0},
              "backlight": {"verdict": ["fine"], "int8_loss_points": 0.0, "true_miou_drop_points": 2.0}}
    out = verdict_scores(groups, {})
    assert out["recalibrate_verdict"]["false_alarms"] == ["low_light"] and out["recalibrate_verdict"]["misses"] == ["cast"]
    assert (out["recalibrate_hits"], out["recalibrate_false_alarms"], out["recalibrate_misses"]) == (0, 1, 1)
    assert out["adapt_verdict"]["hits"] == ["cast", "low_light"] and out["adapt_verdict"]["correct_passes"] == ["backlight", "test"]


def test_an_empty_scene_with_one_flipped_pixel_is_no_lost_class():
    fp32 = np.full((1, 1, 32, 32), -6.0, np.float32)  # nobody, and FP32 is sure of it
    int8 = fp32.copy()
    int8[0, 0, 5, 5] = 1.0  # INT8 paints one person pixel
    acc = _ConfidentAgreement()
    acc.update(fp32, int8, [place((32, 32), (32, 32))], cut=0.0)
    assert acc.loss == 1 - 1023 / 1024  # background's IoU alone: the person class is not FP32's


def test_a_mask_output_model_falls_back_to_the_proxies():
    result = {**_result(0.036, 0.95, None, 0.83)}
    findings = verdict(result, REFERENCE)
    assert [f["finding"] for f in findings] == ["recalibrate on these frames"]
    assert "predicted" not in findings[0]["why"] and "3.60% of int8 activations" in findings[0]["why"]
