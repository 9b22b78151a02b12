"""The ONNX feature teacher: expose-by-name, pruning, caching, IOBinding."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeseg.distill.feature_onnx import cached_path, expose_tensor, probe_output_shape
from edgeseg.distill.onnx_teacher import OnnxFeatureTeacher
from edgeseg.runtime.errors import InputError
from tests.conftest import run_cli

WANTED = "segmentation_model_34_Concat_output_0"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _conv(name, inp, out, cin, cout, stride, rng):
    w = numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.3, f"{name}_w")
    node = helper.make_node("Conv", [inp, f"{name}_w"], [out], name=name, pads=[1, 1, 1, 1], strides=[stride, stride])
    return node, w


def _detector_model(input_hw=("H", "W")):
    """A YOLO-like graph: two stride-8 branches concatenated, a head after it, and an unrelated branch.

    ``input_hw``: symbolic (any size) or a fixed (H, W), as exported feature teachers often are.
    """
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(*args):
        n, w = _conv(*args, rng)
        nodes.append(n)
        inits.append(w)

    conv("a1", "images", "a1", 3, 4, 2)
    conv("a2", "a1", "a2", 4, 4, 2)
    conv("a3", "a2", "a3", 4, 6, 2)
    conv("b1", "a2", "b1", 4, 5, 2)
    nodes.append(helper.make_node("Relu", ["a3"], ["a3r"], name="relu"))
    nodes.append(helper.make_node("Concat", ["a3r", "b1"], [WANTED], name="concat", axis=1))
    conv("head", WANTED, "det", 11, 2, 1)
    conv("aux", "images", "aux", 3, 2, 1)
    graph = helper.make_graph(
        nodes, "detector", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, *input_hw])],
        [helper.make_tensor_value_info("det", TensorProto.FLOAT, ["N", 2, "h", "w"]),
         helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 2, *input_hw])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "yolo_featext.onnx"
    onnx.save(_detector_model(), path)
    return path


def test_a_static_size_feature_teacher_gets_the_batch_resized_on_the_device(tmp_path, caplog):
    """A third-party teacher fixed at 96x96 serves a 64x64 training batch: expose-feature reads its size,
    the batch is resized once into the bound buffer, and the features equal session.run on the resized batch."""
    import logging

    import torch.nn.functional as F

    src = tmp_path / "yolo_Nx3x96x96_featext.onnx"
    onnx.save(_detector_model((96, 96)), src)
    r = run_cli("distill", "expose-feature", str(src), "--layer", WANTED, "--out", str(tmp_path / "cut.onnx"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["input_size"] == [96, 96] and info["shape"] == [1, 11, 12, 12]
    r = run_cli("distill", "expose-feature", str(src), "--layer", WANTED, "--out", str(tmp_path / "cut.onnx"),
                "--input-size", "64", "64")
    assert r.returncode != 0 and "fixed at 96x96" in r.stderr and "Traceback" not in r.stderr
    teacher = OnnxFeatureTeacher(tmp_path / "cut.onnx", "cpu", MEAN, STD)
    assert teacher.input_hw == (96, 96) and teacher.feature_shape((64, 64)) == (11, 12, 12)
    images = torch.randn(2, 3, 64, 64)
    with caplog.at_level(logging.INFO, logger="edgeseg.distill.onnx_teacher"):
        out = teacher(images).clone()
        teacher(images)
    assert sum("resizing each 64x64 batch" in r.message for r in caplog.records) == 1  # said once
    rgb = F.interpolate(images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1),
                        size=(96, 96), mode="bilinear", align_corners=False)
    sess = ort.InferenceSession(str(tmp_path / "cut.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"images": rgb.numpy()})[0]
    assert out.shape == (2, 11, 12, 12)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, teacher.run_with_copies(images))


def test_distill_trains_at_its_own_size_with_a_static_size_feature_teacher(tiny_run, tmp_path):
    """The case a user met: a teacher fixed at 96x96, training at 64x64 (it refused before)."""
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer
    from tests.test_trainer import _config

    src = tmp_path / "yolo_Nx3x96x96_featext.onnx"
    onnx.save(_detector_model((96, 96)), src)
    _, cfg = _config(tiny_run, tmp_path / "run", train={"epochs": 1}, feature_teacher={"tensor": WANTED})
    cfg = __import__("dataclasses").replace(cfg, feature_teacher=__import__("dataclasses").replace(
        cfg.feature_teacher, onnx=str(src), tensor=WANTED))
    trainer = Trainer(cfg, job_for(cfg, "student"))
    metrics = trainer.run()
    assert trainer.feature_teacher.input_hw == (96, 96) and trainer.feature_teacher.output_buffer.shape[-2:] == (12, 12)
    assert np.isfinite(metrics["loss_feature"]) and metrics["loss_feature"] > 0


def test_expose_prunes_and_exposes(detector):
    out = expose_tensor(detector, WANTED)
    assert out == cached_path(detector, WANTED)
    m = onnx.load(out)
    assert [o.name for o in m.graph.output] == [WANTED]
    assert sorted(n.name for n in m.graph.node) == ["a1", "a2", "a3", "b1", "concat", "relu"]  # head and aux pruned
    assert probe_output_shape(out, (64, 64))[1] == (1, 11, 8, 8)
    assert probe_output_shape(out, (640, 640), batch=2)[1] == (2, 11, 80, 80)


def test_expose_reuses_its_cache_and_rebuilds_when_the_source_changes(detector, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(detector.read_bytes())
    out = expose_tensor(src, WANTED)
    stamp = out.stat().st_mtime_ns
    assert expose_tensor(src, WANTED).stat().st_mtime_ns == stamp
    m = onnx.load(src)
    m.producer_name = "changed"
    onnx.save(m, src)
    assert expose_tensor(src, WANTED).stat().st_mtime_ns != stamp


def test_unknown_tensor_lists_close_names(detector):
    with pytest.raises(InputError, match=r"no tensor named 'segmentation_model_34_Concat_outptu_0'.*Closest names: "
                                         r"segmentation_model_34_Concat_output_0"):
        expose_tensor(detector, "segmentation_model_34_Concat_outptu_0")


def test_corrupt_onnx_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(InputError, match=r"bad.onnx: not a valid ONNX model"):
        expose_tensor(bad, WANTED)


def test_cli_prints_the_shape_and_fails_in_one_line(detector, tmp_path):
    r = run_cli("distill", "expose-feature", str(detector), "--layer", WANTED, "--out", str(tmp_path / "f.onnx"),
                "--input-size", "640", "640")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shape"] == [1, 11, 80, 80]
    r = run_cli("distill", "expose-feature", str(detector), "--layer", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_iobinding_equals_session_run_and_reuses_its_buffer(detector):
    path = expose_tensor(detector, WANTED)
    teacher = OnnxFeatureTeacher(path, "cpu", MEAN, STD)
    images = torch.randn(3, 3, 64, 64)
    out = teacher(images)
    plain = (images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"images": plain})[0]
    assert out.shape == (3, 11, 8, 8)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)  # input rounding differs (fma vs mul+add)
    torch.testing.assert_close(teacher.run_with_copies(images), out, rtol=0, atol=0)
    # the output is the preallocated tensor itself, reused while the batch shape holds
    ptr = out.data_ptr()
    again = teacher(torch.randn(3, 3, 64, 64))
    assert again.data_ptr() == ptr and again is teacher.output_buffer
    assert teacher(torch.randn(2, 3, 64, 64)).shape == (2, 11, 8, 8)
    assert teacher.feature_shape((640, 640)) == (11, 80, 80)


def test_feature_teacher_needs_one_output(detector):
    with pytest.raises(InputError, match=r"needs one input and one output, it has 1 and 2"):
        OnnxFeatureTeacher(detector, "cpu", MEAN, STD)


def test_cuda_without_onnxruntime_gpu_says_what_to_install(detector):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    from edgeseg.runtime.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"pip install edgeseg\[gpu\]"):
        OnnxFeatureTeacher(expose_tensor(detector, WANTED), "cuda:0", MEAN, STD)
