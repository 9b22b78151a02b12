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


def test_seed_study_pairs_the_synthetic_variants_with_the_plain_student(tiny_run, tmp_path, monkeypatch):
    """Target-domain pairs and ConfiG hard examples, each paired by seed with the plain distilled student."""
    import benchmarks.bench_distill as bench
    from edgeseg.calibration.synth import Synthesizer

    cal = {"generator": "conditional", "count": 4, "pool_factor": 1.5,
           "ddpm": {"image_size": 16, "block_out_channels": [8, 16], "train_steps": 3, "batch_size": 4},
           "sampler": {"steps": 4, "batch_size": 4}, "guidance": {"mode": "none", "resolution": 32},
           "filter": {"min_person_fraction": 0.0, "max_uncertain_fraction": 1.0, "dedup_bits": 0, "min_condition_iou": 0.0}}
    _, cfg = _config(tiny_run, tmp_path, train={"epochs": 2, "batch_size": 4, "lr": 1e-3}, calibration=cal)
    Synthesizer(cfg, target_images=cfg.data_root / "target_images").run(cfg.stage_dir("calibration") / "target")
    monkeypatch.setattr(bench, "HARD", {"share": 0.25, "count": 4, "every": 1, "start": 1})
    out = bench.seed_study(cfg, seeds=(0, 1))
    rows = out["per_seed"]
    for variant, name in (("target", "target_domain"), ("hard", "hard_examples")):
        gains = [r["test_shift"][f"{variant}_miou"] - r["test_shift"]["student_miou"] for r in rows]
        assert out[f"{name}_gain_test_shift_mean"] == pytest.approx(np.mean(gains))
        assert out[f"{name}_gain_test_shift_std"] == pytest.approx(np.std(gains, ddof=1))
        deltas = [r["test"][f"{variant}_miou"] - r["test"]["student_miou"] for r in rows]
        assert out[f"{name}_delta_test_mean"] == pytest.approx(np.mean(deltas))
    assert out["hard_examples_cost"]["generations"] == 1 and out["hard_examples_cost"]["generate_s"] > 0
    assert (tmp_path / "seeds" / "seed1-hard" / "distill" / "hard" / "epoch001" / "manifest.json").is_file()
    assert out["target_domain_share"] == bench.TARGET_SHARE
