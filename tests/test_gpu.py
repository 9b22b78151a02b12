"""The CUDA and TensorRT paths, on real hardware only (skipped, with the reason, elsewhere)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from tests.conftest import write_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not _ort_cuda(), reason="needs onnxruntime-gpu")
def test_cuda_iobinding_feature_teacher_equals_session_run(tiny_run):
    from edgeseg.distill.feature_onnx import expose_tensor
    from edgeseg.distill.onnx_teacher import OnnxFeatureTeacher

    _, cfg = tiny_run
    path = expose_tensor(cfg.feature_teacher_onnx, cfg.feature_teacher.tensor)
    teacher = OnnxFeatureTeacher(path, "cuda:0", cfg.data.mean, cfg.data.std)
    x = torch.randn(4, 3, 64, 64, device="cuda:0")
    out = teacher(x)
    assert out.device.type == "cuda" and out.data_ptr() == teacher(x).data_ptr()
    torch.testing.assert_close(out, teacher.run_with_copies(x), atol=1e-4, rtol=1e-4)
    # Ordering: the input is produced by a long queue of torch kernels on the default stream right
    # before each call; a run that read the bound input early would see the previous batch.
    for i in range(20):
        y = x * 0
        for _ in range(50):
            y = y + x / 50  # many small launches: the producer is still running when the call starts
        got = teacher(y * (i + 1)).clone()
        torch.testing.assert_close(got, teacher.run_with_copies(y * (i + 1)), atol=1e-3, rtol=1e-3)


@pytest.mark.tensorrt
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_build_and_tensorrt_runner_match_onnxruntime(tiny_run, tmp_path, precision):

    from edgeseg.distill.config import load_config
    from edgeseg.distill.models import build_model
    from edgeseg.export.config import Config
    from edgeseg.export.engine import build_engine, capabilities, plan_build, profile_shapes
    from edgeseg.export.int8 import input_transform
    from edgeseg.export.onnx_model import export_onnx
    from edgeseg.export.stage import write_fp16
    from edgeseg.calibration.quantize import batches_of, quantize_qdq
    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.spec import ModelSpec
    import tensorrt as trt

    cfg = load_config(write_config(tmp_path, export={"max_batch": 4, "opt_batch": 2}), Config)
    torch.manual_seed(0)
    export_onnx(cfg, build_model(cfg.student).eval(), tmp_path)
    spec = ModelSpec.from_onnx(tmp_path / "model.onnx")
    files = {"fp32": str(tmp_path / "model.onnx"), "fp16": write_fp16(tmp_path / "model.onnx", tmp_path / "model.fp16.onnx")}
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    files["int8"] = str(quantize_qdq(tmp_path / "model.onnx", tmp_path / "model.int8.onnx",
                                     batches_of(images, input_transform(spec))))
    caps = capabilities(trt.__version__)
    plan = plan_build(caps, precision, files)
    meta = build_engine(plan, caps, profile_shapes(spec.input_layout, spec.image_size, 4, 2), spec.to_dict(), tmp_path, 256)
    engine = tmp_path / f"model.{precision}.engine"
    assert engine.is_file() and meta["precision"] == precision
    frames = [images[i] for i in range(3)]
    with Segmenter(engine, backend="tensorrt") as trt_seg, Segmenter(tmp_path / "model.onnx", backend="onnxruntime-cpu") as ref:
        assert trt_seg.device.startswith("cuda")
        agree = np.mean([np.mean(a == b) for a, b in zip(trt_seg.predict(frames), ref.predict(frames))])
    assert agree > (0.999 if precision == "fp32" else 0.97)
    # CUDA graphs: one context and graph per batch size; alternating sizes replay the right graph, and a
    # second activation of the same runner works (everything was released and reset)
    from edgeseg.runtime.backends.tensorrt_engine import TensorRTRunner
    from edgeseg.runtime.pipeline import BatchBuffers, prepare

    runner = TensorRTRunner(engine, spec, cuda_graphs=True)
    with Segmenter(tmp_path / "model.onnx", backend="onnxruntime-cpu") as ref:
        for _ in range(2):
            with runner:
                for n in (3, 2, 3, 1, 3):
                    feed, _ = prepare(frames[:n], spec, BatchBuffers(spec))
                    want = ref.runner.infer(feed).copy()
                    got = runner.infer(feed)
                    assert np.mean((got > 0) == (want > 0)) > (0.999 if precision == "fp32" else 0.97), n


@pytest.mark.gpu
@needs_cuda
def test_trainer_on_cuda_with_amp_resumes_exactly(tiny_run, tmp_path):
    """A few AMP steps on the GPU: finite losses, and a run stopped and resumed equals an uninterrupted one."""
    from edgeseg.distill.checkpoint import load_checkpoint
    from edgeseg.distill.config import load_config
    from edgeseg.export.config import Config
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer

    _, base = tiny_run
    common = dict(device="cuda", data={"root": str(base.data_root)}, teacher={"checkpoint": str(base.teacher_checkpoint)},
                  train={"epochs": 1, "batch_size": 4, "amp": True})
    if _ort_cuda():
        common["feature_teacher"] = {"onnx": str(base.feature_teacher_onnx)}
    else:  # the feature teacher needs ORT's CUDA provider on a CUDA device
        common["loss"] = {"feature": 0.0}
    a = load_config(write_config(tmp_path / "a", **common), Config)
    Trainer(a, job_for(a, "student")).run()
    b = load_config(write_config(tmp_path / "b", **common), Config)
    Trainer(b, job_for(b, "student"), max_steps=2).run()
    Trainer(b, job_for(b, "student")).run()
    ca, cb = load_checkpoint(tmp_path / "a" / "distill" / "last.pt"), load_checkpoint(tmp_path / "b" / "distill" / "last.pt")
    assert ca["scaler"] and ca["scaler"]["scale"] > 0  # AMP really ran with a scaler
    for name, value in ca["student"].items():
        assert torch.equal(value, cb["student"][name]), name
    assert np.isfinite(ca["metrics"]["loss"])
    records = [json.loads(line) for line in (tmp_path / "a" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_cuda_mb"] > 0 for r in records)  # the device's peak beside the process's RSS


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not _ort_cuda(), reason="needs onnxruntime-gpu")
def test_runtime_cuda_provider_matches_the_cpu(tiny_run, tmp_path):
    from edgeseg.distill.config import load_config
    from edgeseg.export.config import Config
    from edgeseg.distill.models import build_model
    from edgeseg.export.onnx_model import export_onnx
    from edgeseg.runtime import Segmenter

    cfg = load_config(write_config(tmp_path, export={"max_batch": 4, "opt_batch": 2}), Config)
    torch.manual_seed(0)
    export_onnx(cfg, build_model(cfg.student).eval(), tmp_path)
    frames = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(12)]
    with Segmenter(tmp_path / "model.onnx", backend="onnxruntime-cuda") as gpu, \
            Segmenter(tmp_path / "model.onnx", backend="onnxruntime-cpu") as cpu:
        assert gpu.device == "cuda:0"
        # consecutive calls of one batch size with different images: a run that read its input before the
        # host-to-device copy finished would return the previous batch's masks
        agree = [np.mean([np.mean(a == b) for a, b in zip(gpu.predict(frames[i:i + 3]), cpu.predict(frames[i:i + 3]))])
                 for i in range(0, 12, 3)]
    assert min(agree) > 0.999, agree


@pytest.mark.gpu
@needs_cuda
def test_mask_conditioned_synthesis_with_the_teacher_on_cuda(tiny_run, tmp_path):
    """The conditional generator with mask guidance while the teacher sits on the GPU (device: auto):
    masks, images and guidance gradients must meet on one device, and give the CPU run's labels."""
    from edgeseg.calibration.synth import Synthesizer
    from edgeseg.distill.config import load_config
    from edgeseg.export.config import Config

    _, base = tiny_run
    cal = {"generator": "conditional", "count": 4, "pool_factor": 1.0,
           "ddpm": {"image_size": 16, "block_out_channels": [8, 16], "train_steps": 3, "batch_size": 4},
           "sampler": {"steps": 4, "batch_size": 4}, "guidance": {"mode": "mask", "resolution": 32, "diversity": 0.0},
           "filter": {"min_person_fraction": 0.0, "max_uncertain_fraction": 1.0, "dedup_bits": 0, "min_condition_iou": 0.0}}
    runs = {}
    for device in ("cpu", "cuda"):
        path = write_config(tmp_path / device, device=device, calibration=cal, data={"root": str(base.data_root)},
                            teacher={"checkpoint": str(base.teacher_checkpoint)})
        runs[device] = Synthesizer(load_config(path, Config)).run(tmp_path / device / "set")
    assert [i["seed"] for i in runs["cuda"]["images"]] == [i["seed"] for i in runs["cpu"]["images"]]
    for d in ("cpu", "cuda"):
        assert all(0 <= i["condition_iou"] <= 1 for i in runs[d]["images"])
    # the labels are the conditioning masks drawn from each pair's seed: the CUDA run writes the CPU run's, pixel for pixel
    from PIL import Image

    for i in runs["cpu"]["images"]:
        label = i["file"].replace("images/", "masks/")
        cpu_mask, cuda_mask = (np.asarray(Image.open(tmp_path / d / "set" / label)) for d in ("cpu", "cuda"))
        assert cpu_mask.any() and np.array_equal(cuda_mask, cpu_mask), label
