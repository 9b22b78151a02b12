"""The benchmarks' own logic on tiny models: ratio spreads, the user's ORT baseline (the study: tests/test_study.py)."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.timing import interleaved, ratio, ratio_spread, with_spread
from tests.test_runtime import _images, tiny_onnx  # noqa: F401  (the fixture)


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


def test_the_fused_normalisation_lever_serves_the_same_masks(tiny_onnx, tmp_path):  # noqa: F811
    """The stage split's fused variant: uint8 NHWC in, the normalisation as graph nodes, the same model after it."""
    from benchmarks.bench_runtime import fuse_normalisation
    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx
    fused = fuse_normalisation(path, tmp_path / "fused.onnx")
    images = _images([(48, 64), (64, 64), (480, 640)])
    with Segmenter(path, backend="onnxruntime-cpu", threads=1) as plain, \
            Segmenter(fused, backend="onnxruntime-cpu", threads=1) as inside:
        assert inside.spec.fused and not plain.spec.fused
        for a, b in zip(plain.predict(images), inside.predict(images)):
            assert a.shape == b.shape and (a != b).mean() < 1e-3


def test_work_and_peak_for_the_share_of_the_hardware(tmp_path):
    """Multiply-adds counted from the graph by hand, the peak formula on a given cpuinfo, a real profiled session."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.hardware import cpu_peak, model_macs, op_time_split, share_of_peak

    rng = np.random.default_rng(0)
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["images", "w1"], ["a"], name="dense", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="dw", pads=[1, 1, 1, 1], group=4),
             helper.make_node("Conv", ["b", "w3"], ["mask_logits"], name="pw")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("mask_logits", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [w("w1", 4, 3, 3, 3), w("w2", 4, 1, 3, 3), w("w3", 2, 4, 1, 1)])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    work = model_macs(path, (8, 8))
    # dense: 4x8x8 outputs x 3 inputs x 3x3; depthwise: 4x8x8 x 1 x 3x3; pointwise: 2x8x8 x 4
    assert work["by_kind"] == {"dense": 6912, "depthwise": 2304, "pointwise": 512} and work["macs_per_image"] == 9728
    info = "cpu MHz\t\t: 2000.000\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_int8\n"
    peak = cpu_peak(cores=2, cpuinfo=info)
    assert peak["isa"] == "avx512_vnni" and peak["fp32_peak_gflops"] == pytest.approx(2 * 16 * 2 * 2.0 * 2)
    assert peak["int8_peak_gops"] == pytest.approx(2 * 64 * 2 * 2.0 * 2) and peak["amx_int8_peak_gops"] == 2 * 1024 * 2.0 * 2
    assert cpu_peak(cores=1, cpuinfo="cpu MHz : 1000\nflags : avx2\n")["int8_peak_gops"] == pytest.approx(2 * 16 * 2)
    assert share_of_peak(1000, 8, 1.0, 0.016) == pytest.approx(1.0)  # 2 x 8,000 ops in 1 ms = 0.016 GOP/s
    split = op_time_split(lambda so: ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]),
                          {"images": np.zeros((2, 3, 8, 8), np.float32)}, work["node_kind"], runs=3)
    assert set(split) <= {"dense", "depthwise", "pointwise", "layout", "other"} and sum(split.values()) == pytest.approx(1.0)
    assert "dense" in split and "depthwise" in split


def test_spearman_ranks_and_demo_conditions_are_the_rendered_ones(tiny_run):
    from benchmarks.bench_site_check import spearman
    from edgeseg.distill.demo_data import CONDITIONS, image_conditions, render_split
    from edgeseg.runtime.images import read_rgb

    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [2, 3, 1]) == pytest.approx(-0.5)
    _, cfg = tiny_run
    conditions = image_conditions(cfg.data_root, "test_shift")
    assert len(conditions) == 8 and set(conditions) <= set(CONDITIONS)  # every test_shift image is under one
    assert set(image_conditions(cfg.data_root, "test")) == {"none"}
    (img, _), = render_split(cfg.data_root, "test_shift", [3])
    assert (img == read_rgb(cfg.data_root / "test_shift" / "images" / "00003.png")).all()  # the very image


def test_the_site_check_bench_writes_ranks_agree_from_the_groups():
    """`ranks_agree` (site_check.json's headline) comes from the groups' figures: the teacher agreement's order
    of the conditions, worst first, against the true drop's."""
    from benchmarks.bench_site_check import rank_conditions

    def groups(teacher_agreement):
        out = {"test": {"true_int8_miou": 0.80, "int8_loss_points": 0.1, "teacher_agreement_miou": 0.9,
                        "int8_agreement_miou": 0.99, "saturation": {"int8-cpu": 0.01}}}
        for name, miou, agree in zip(("a", "b", "c"), (0.70, 0.75, 0.60), teacher_agreement):
            out[name] = {"true_int8_miou": miou, "int8_loss_points": 0.2, "teacher_agreement_miou": agree,
                         "int8_agreement_miou": 0.95, "saturation": {"int8-cpu": 0.02}}
        return out

    agreeing = groups((0.80, 0.85, 0.70))  # c worst, then a, then b: the true drops' order (20, 10, 5 points)
    r = rank_conditions(agreeing, ["a", "b", "c"], "int8-cpu")
    assert r["ranks_agree"] is True and r["ranking"]["true_drop_order"] == ["c", "a", "b"]
    assert r["ranking"]["teacher_disagreement_vs_true_drop_spearman"] == pytest.approx(1.0)
    assert agreeing["c"]["true_miou_drop_points"] == pytest.approx(20.0)
    r = rank_conditions(groups((0.85, 0.80, 0.70)), ["a", "b", "c"], "int8-cpu")  # a and b swapped
    assert r["ranks_agree"] is False
