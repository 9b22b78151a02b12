"""The benchmarks' own logic on tiny models: the seed study's pairing, ratio spreads, the user's ORT baseline."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.timing import interleaved, ratio, ratio_spread, with_spread
from tests.test_runtime import _images, tiny_onnx  # noqa: F401  (the fixture)
from tests.test_trainer import _config


def test_seed_study_pairs_gains_by_seed(tiny_run, tmp_path):
    from benchmarks.bench_distill import seed_study

    _, cfg = _config(tiny_run, tmp_path, train={"epochs": 1})
    out = seed_study(cfg, seeds=(0, 1))
    assert out["seeds"] == [0, 1] and out["splits"] == ["test", "test_shift"]
    rows = out["per_seed"]
    assert rows[0]["test"]["student_miou"] != rows[1]["test"]["student_miou"]  # seeds train different students
    gains = [r["test"]["distill_gain"] for r in rows]
    assert out["distill_gain_mean"] == pytest.approx(np.mean(gains))
    assert out["distill_gain_std"] == pytest.approx(np.std(gains, ddof=1))
    assert out["student_test_miou_mean"] - out["nodistill_test_miou_mean"] == pytest.approx(out["distill_gain_mean"])
    shift = [r["test"]["student_miou"] - r["test_shift"]["student_miou"] for r in rows]
    assert out["shift_loss_mean"] == pytest.approx(np.mean(shift))
    assert "distill_gain_test_shift_mean" in out
    assert ("within noise" in out["distill_gain_verdict"]) != ("beyond 2 std" in out["distill_gain_verdict"])
    assert (tmp_path / "seeds" / "seed1" / "distill" / "best.pt").is_file()  # seed 0 is the run's own
    assert not (tmp_path / "seeds" / "seed0").exists()


def test_ratio_spread_is_per_round():
    res = {"slow": {"median_ms": 2.0, "samples_ms": [2.0, 4.0, 2.0, 2.0]},
           "fast": {"median_ms": 1.0, "samples_ms": [1.0, 1.0, 2.0, 1.0]}}
    assert ratio(res, "slow", "fast") == 2.0
    spread = ratio_spread(res, "slow", "fast")
    assert spread["median"] == 2.0 and spread["p10"] <= 1.0 + 1e-9 and spread["p90"] >= 3.0
    out = {}
    with_spread(out, "x", interleaved({"a": lambda: sum(range(2000)), "b": lambda: sum(range(1000))}, rounds=12), "a", "b")
    assert out["x_p10"] <= out["x"] * 1.5 and out["x_p90"] >= out["x_p10"]


def test_the_users_ort_baseline_segments_like_the_runtime(tiny_onnx):  # noqa: F811
    from benchmarks.bench_runtime import user_ort_fp32
    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx
    images = _images([(48, 64), (64, 64), (90, 40)])
    user = user_ort_fp32(path, threads=1)(images)
    with Segmenter(path, backend="onnxruntime-cpu", threads=1) as seg:
        ours = seg.predict(images)
    for a, b in zip(user, ours):
        assert a.shape == b.shape and (a == b).mean() > 0.98
