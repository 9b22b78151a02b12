"""The distillation study (make study) and the schedule sweep on tiny models: arms, pairing, resume, the keys it writes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_trainer import _config


def _study_config(tiny_run, tmp_path, **extra):
    from tests.test_unlabelled import _frames

    site = _frames(tiny_run, tmp_path / "site")
    _, cfg = _config(tiny_run, tmp_path / "run", train={"epochs": 1, "unlabelled_share": 0.5},
                     data={"labelled_count": 8, "unlabelled": str(site)}, **extra)
    return cfg


def test_the_study_runs_its_arms_pairs_gains_by_seed_and_resumes(tiny_run, tmp_path):
    from benchmarks.study import ARMS, EVERY_SEED, SITE_ARMS, plan, seed_study, write_study
    from edgeseg.distill.checkpoint import load_checkpoint

    arms = tuple(a for a in ARMS if a not in SITE_ARMS and a != "kd_site_onnx_teacher")  # those: the next tests
    cfg = _study_config(tiny_run, tmp_path)
    with pytest.raises(ValueError, match="unknown arm"):
        plan(cfg, (0,), ("kd_everything",))
    order = plan(cfg, (0, 1), arms)
    assert order[:6] == [(0, "gt_only"), (0, "kd_unlabelled"), (0, "kd_site"), (1, "gt_only"), (1, "kd_unlabelled"),
                         (1, "kd_site")]  # a, c, d on every seed first
    assert plan(cfg, (0, 1), ("site8", "gt_only"), more_seeds=True)[-1] == (1, "site8")
    out = seed_study(cfg, seeds=(0, 1), arms=arms)
    assert out["seeds"] == [0, 1] and out["seeds_completed"] == [0, 1] and out["splits"] == ["test", "test_shift"]
    assert out["arm_seeds"] == {a: ([0, 1] if a in EVERY_SEED else [0]) for a in arms}
    rows = out["per_seed"]
    assert rows[0]["test"]["kd_unlabelled"] != rows[1]["test"]["kd_unlabelled"]  # seeds train different students
    gains = [r["test"]["kd_unlabelled"] - r["test"]["gt_only"] for r in rows]
    assert out["gain_kd_unlabelled_vs_gt_only_mean"] == pytest.approx(np.mean(gains))
    assert out["gain_kd_unlabelled_vs_gt_only_std"] == pytest.approx(np.std(gains, ddof=1))
    site_gain = [r["test_shift"]["kd_site"] - r["test_shift"]["kd_unlabelled"] for r in rows]
    assert out["gain_site_vs_source_test_shift_mean"] == pytest.approx(np.mean(site_gain))
    assert out["feature_term_effect_mean"] == pytest.approx(rows[0]["test"]["kd_unlabelled"] - rows[0]["test"]["kd_no_feature"])
    assert out["feature_term_effect_n"] == 1 and out["logit_terms_effect_std"] is None  # one seed: no spread
    live = rows[0]["test"]["kd_site_live"] - rows[0]["test"]["kd_site"]
    assert out["live_teacher_effect_mean"] == pytest.approx(live)
    shift = [r["test"]["gt_only"] - r["test_shift"]["gt_only"] for r in rows]
    assert out["shift_loss_mean"] == pytest.approx(np.mean(shift))
    teacher = rows[0]["test"]["teacher"]
    assert out["teacher_minus_gt_only_test"] == pytest.approx(teacher - np.mean([r["test"]["gt_only"] for r in rows]))
    assert out["kd_site_vs_teacher_test"] == pytest.approx(np.mean([r["test"]["kd_site"] for r in rows]) / teacher)
    std = np.std(gains, ddof=1)
    assert out["gain_kd_unlabelled_verdict"].endswith("beyond 2 std" if np.mean(gains) > 2 * std else "within noise (under 2 std)")
    assert out["study_train_seconds"] == pytest.approx(sum(out["arm_train_seconds"][a] * len(s)
                                                           for a, s in out["arm_seeds"].items()))
    # seed 0's ground-truth-only and site students are the run's own; every other arm has its own folder
    assert (tmp_path / "run" / "distill" / "best.pt").is_file() and (tmp_path / "run" / "distill-baseline" / "best.pt").is_file()
    assert not (tmp_path / "run" / "seeds" / "seed0-kd_site").exists()
    ident = lambda arm, role="distill", seed=1: load_checkpoint(
        tmp_path / "run" / "seeds" / f"seed{seed}-{arm}" / role / "last.pt")["identity"]
    assert ident("kd_unlabelled")["data"]["unlabelled"] == ""
    assert ident("gt_only", "distill-baseline")["loss"]["kl"] == 0
    assert ident("full_labels", "distill-baseline", 0)["data"]["labelled_count"] == 0  # b: all labels, no teacher
    assert ident("kd_site_live", seed=0)["train"]["teacher_targets"] == "live"
    feature_only = ident("kd_feature_only", seed=0)
    assert feature_only["loss"]["kl"] == feature_only["loss"]["mse"] == 0 and feature_only["loss"]["feature"] > 0
    # resumes: a second study trains nothing (every arm's last.pt is complete) and scores the same
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("last.pt")}
    again = seed_study(cfg, seeds=(0, 1), arms=arms)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("last.pt")} == stamps
    assert again["per_seed"] == out["per_seed"]
    # a new clone: no runs here, the committed scores: nothing trains and the recorded scores stand
    from benchmarks.study import recorded_arms
    fresh = _study_config(tiny_run, tmp_path / "fresh")
    kept = seed_study(fresh, seeds=(0, 1), arms=("gt_only", "kd_unlabelled"), previous=out)
    assert not list((tmp_path / "fresh" / "run").rglob("last.pt"))
    assert kept["arms_kept_as_recorded"] == sorted(f"{a}@{s}" for a, ss in out["arm_seeds"].items() for s in ss)
    assert kept["arm_seeds"] == out["arm_seeds"]  # what was not asked for stays too: the results accumulate
    assert [r["test_shift"]["kd_unlabelled"] for r in kept["per_seed"]] == \
        [r["test_shift"]["kd_unlabelled"] for r in out["per_seed"]]
    assert kept["gain_kd_unlabelled_vs_gt_only_mean"] == pytest.approx(out["gain_kd_unlabelled_vs_gt_only_mean"])
    assert kept["study_train_seconds"] == pytest.approx(out["study_train_seconds"])
    # another schedule: nothing recorded is reused
    assert recorded_arms({**out, "schedule": {**out["schedule"], "epochs": 99}}, fresh, out["splits"]) == {}
    # written beside make bench's speed keys, which stay; an earlier study's keys go
    path = tmp_path / "distill.json"
    path.write_text(json.dumps({"student_vs_teacher_speedup": 3.1, "site8_old_key": 1, "kd_labelled_test_miou_mean": 0.5}))
    written = json.loads(write_study(out, path).read_text())
    assert written["student_vs_teacher_speedup"] == 3.1 and "site8_old_key" not in written
    assert "kd_labelled_test_miou_mean" not in written and written["gain_site_vs_source_mean"] == out["gain_site_vs_source_mean"]


def test_site_arms_train_on_the_8_frames_and_synthetic_site_images(tiny_run, tmp_path):
    """g: the 8 target frames as the site source; h: those frames and N synthetic site images steered by them."""
    from benchmarks.study import seed_study, site_folders
    from edgeseg.distill.checkpoint import load_checkpoint
    from tests.test_synthesis import TINY_DDPM

    cfg = _study_config(tiny_run, tmp_path, calibration={
        "ddpm": TINY_DDPM, "sampler": {"steps": 3, "batch_size": 4}, "count": 4, "guidance": {"mode": "none"},
        "filter": {"min_person_fraction": 0.0, "min_condition_iou": 0.0, "dedup_bits": 0}})
    folders = site_folders(cfg, count=3)
    names = sorted(p.name for p in Path(folders["site8_synth"]).glob("*.png"))
    assert len([n for n in names if n.startswith("frame_")]) == 8 and len([n for n in names if n.startswith("synth_")]) == 3
    out = seed_study(cfg, seeds=(0, 1), arms=("gt_only", "kd_unlabelled", "kd_site", "site8", "site8_synth"),
                     more_seeds=True)
    assert out["arm_seeds"]["site8"] == [0, 1] and out["arm_seeds"]["site8_synth"] == [0, 1]
    ident = lambda arm, seed=0: load_checkpoint(tmp_path / "run" / "seeds" / f"seed{seed}-{arm}" / "distill" / "last.pt")["identity"]
    assert ident("site8")["data"]["unlabelled"] == str((cfg.data_root / "target_images").resolve())
    assert ident("site8_synth", 1)["data"]["unlabelled"] == folders["site8_synth"]
    rows = out["per_seed"]
    h_g = [r["test_shift"]["site8_synth"] - r["test_shift"]["site8"] for r in rows]
    assert out["site8_synth_vs_site8_mean"] == pytest.approx(np.mean(h_g))  # a site question: test_shift's
    assert out["site8_synth_vs_site8_std"] == pytest.approx(np.std(h_g, ddof=1))
    h_g_test = [r["test"]["site8_synth"] - r["test"]["site8"] for r in rows]
    assert out["site8_synth_vs_site8_test_mean"] == pytest.approx(np.mean(h_g_test))
    h_c = [r["test_shift"]["site8_synth"] - r["test_shift"]["kd_unlabelled"] for r in rows]
    assert out["site8_synth_gain_test_shift_mean"] == pytest.approx(np.mean(h_c))  # beside gain_site_vs_source
    # the recovered share is h's gain over c as a share of d's; defined only where d gains over c at all
    d_c = np.mean([r["test_shift"]["kd_site"] - r["test_shift"]["kd_unlabelled"] for r in rows])
    if d_c > 0:
        assert out["site8_synth_recovered_share_of_site"] == pytest.approx(np.mean(h_c) / d_c)
    else:
        assert "site8_synth_recovered_share_of_site" not in out, out["site8_synth_recovered_share_of_site"]
    assert out["site8_synth_images"] == {"frames": 8, "synthetic": 3}


def test_the_onnx_teacher_arm_reports_both_teachers_on_one_seed(tiny_run, tmp_path):
    from benchmarks.study import seed_study
    from edgeseg.distill.checkpoint import load_checkpoint

    cfg = _study_config(tiny_run, tmp_path)
    out = seed_study(cfg, seeds=(0,), arms=("gt_only", "kd_site", "kd_site_onnx_teacher"))
    row = out["per_seed"][0]["test"]
    assert out["onnx_teacher_test_miou"] == row["kd_site_onnx_teacher"] and out["torch_teacher_test_miou"] == row["kd_site"]
    ident = load_checkpoint(tmp_path / "run" / "seeds" / "seed0-kd_site_onnx_teacher" / "distill" / "last.pt")["config"]
    assert ident["teacher"]["onnx"]["path"].endswith("teacher.onnx")
    # the same seed, the same targets (the ONNX teacher is the torch one exported): within float noise
    assert abs(out["onnx_teacher_test_miou"] - out["torch_teacher_test_miou"]) < 0.02


def test_the_training_step_bench_times_every_variant_on_one_batch(tiny_run, tmp_path):
    from benchmarks.bench_distill import STEP_VARIANTS, bench_training_step

    cfg = _study_config(tiny_run, tmp_path)
    out = bench_training_step(cfg, rounds=3, threads=1)
    timings = out["step_timings"]
    assert set(timings) == set(STEP_VARIANTS) and all(t["n"] == 3 for t in timings.values())
    assert out["onnx_teacher_step_ratio"] == pytest.approx(timings["onnx_teacher_live"]["median_ms"]
                                                           / timings["live"]["median_ms"])
    assert out["cached_step_speedup"] == pytest.approx(timings["live"]["median_ms"] / timings["cached"]["median_ms"])
    assert out["onnx_teacher_step_ratio_p10"] <= out["onnx_teacher_step_ratio_p90"]


def test_the_demo_record_reads_its_stage_times(tmp_path):
    from benchmarks.bench_demo import read_demo_times

    tsv = tmp_path / "demo_times.tsv"
    tsv.write_text("stage\tseconds\nprepare\t90\ndistill\t600\ntotal\t700\n")
    assert read_demo_times(tsv) == {"prepare": 90.0, "distill": 600.0, "total": 700.0}
    import pytest as _pytest

    with _pytest.raises(FileNotFoundError, match="run `make demo`"):
        read_demo_times(tmp_path / "missing.tsv")
