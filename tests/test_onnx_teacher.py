"""ONNX person segmenters as the teacher: each zoo form read right, the same KD targets as torch, bad files refused."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.distill.onnx_teacher import OnnxFeatureTeacher, OnnxSegmentationTeacher
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.teacher_io import resolve_io

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Reference(nn.Module):
    """A fixed little segmenter on normalised RGB: what every form below wraps. (B, 3, H, W) -> (B, 1, H, W) logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))
        with torch.no_grad():  # a decisive map: strong logits, both signs
            self.net[2].weight.mul_(6.0)

    def forward(self, x):
        return self.net(x)


def _normalise(rgb01: torch.Tensor) -> torch.Tensor:
    return (rgb01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


class Form(nn.Module):
    """The reference behind one zoo form's input and output conventions."""

    def __init__(self, ref, layout="nchw", bgr=False, byte=False, normalise=True, out="logits", out_layout="nchw",
                 out_scale=1.0):
        super().__init__()
        self.ref, self.layout, self.bgr, self.byte, self.normalise = ref, layout, bgr, byte, normalise
        self.out, self.out_layout, self.out_scale = out, out_layout, out_scale

    def forward(self, x):
        if self.layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        if self.bgr:
            x = x.flip(1)
        if self.byte:
            x = x / 255.0
        z = self.ref(_normalise(x) if self.normalise else x)
        if self.out_scale != 1.0:
            z = F.interpolate(z, scale_factor=self.out_scale, mode="bilinear", align_corners=False)
        if self.out == "probabilities":
            y = torch.sigmoid(z)
        elif self.out == "softmax":
            y = torch.softmax(torch.cat([torch.zeros_like(z), z], dim=1), dim=1)
        elif self.out == "logits3":  # three classes, the person's is 2: logit z against two others at 0
            y = torch.cat([torch.zeros_like(z), torch.zeros_like(z), z], dim=1)
        else:
            y = z
        return y.permute(0, 2, 3, 1) if self.out_layout == "nhwc" else y[:, 0] if self.out_layout == "nhw" else y


def _export(module, path, shape, dynamic_hw=False, dynamic_batch=True, outputs=("out",)):
    axes = {}
    if dynamic_batch:
        axes = {"x": {0: "n"}, **{o: {0: "n"} for o in outputs}}
    if dynamic_hw:
        axes["x"] = {**axes.get("x", {}), 2: "h", 3: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.rand(*shape),), str(path), input_names=["x"], output_names=list(outputs),
                          dynamic_axes=axes or None, opset_version=17, dynamo=False)
    return path


def _images(n=4, hw=(64, 64), seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _normalise(torch.rand(n, 3, *hw, generator=g))  # what the trainer hands the teacher


def _teacher(path, declared=None, device="cpu") -> OnnxSegmentationTeacher:
    return OnnxSegmentationTeacher(path, resolve_io(path, declared or {}), device, MEAN, STD, threads=1)


def _reference_logits(images, hw=None):
    with torch.no_grad():
        x = images
        if hw is not None and tuple(hw) != tuple(images.shape[-2:]):
            rgb = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
            x = _normalise(F.interpolate(rgb, size=hw, mode="bilinear", align_corners=False, antialias=True))
        z = Reference()(x)
        return F.interpolate(z, size=images.shape[-2:], mode="bilinear", align_corners=False) if hw else z


def test_nchw_logits_with_a_dynamic_size_give_the_reference_logits(tmp_path):
    # the model takes normalised RGB, as torch-trained zoo models often do: the mean and std are declared
    path = _export(Form(Reference(), normalise=False), tmp_path / "nchw.onnx", (1, 3, 32, 32), dynamic_hw=True)
    io = resolve_io(path, {"mean": MEAN, "std": STD})
    assert (io.layout, io.size, io.kind, io.batch, io.output_layout) == ("nchw", None, "logits", None, "nchw")
    teacher = _teacher(path, {"mean": MEAN, "std": STD})
    images = _images(hw=(64, 96))  # any size: the dynamic model runs at the batch's own
    out = teacher(images)
    assert out.shape == (4, 1, 64, 96)
    assert torch.allclose(out, _reference_logits(images), atol=1e-4)
    assert teacher.raw_output(images).data_ptr() == teacher.raw_output(images).data_ptr()  # bound buffer reused


def test_nhwc_probabilities_at_a_fixed_256_are_read_back_as_logits(tmp_path):
    path = _export(Form(Reference(), layout="nhwc", out="probabilities", out_layout="nhwc"), tmp_path / "nhwc.onnx",
                   (1, 256, 256, 3))
    io = resolve_io(path)
    assert (io.layout, io.size, io.kind, io.output_layout) == ("nhwc", (256, 256), "probabilities", "nhwc")
    images = _images()
    out = _teacher(path)(images)  # resized to 256 on the device, read at 256, back to 64
    ref = _reference_logits(images, hw=(256, 256)).clamp(-io.logit_bound, io.logit_bound)
    assert out.shape == (4, 1, 64, 64)
    assert out.abs().max().item() <= io.logit_bound + 1e-3  # the clamp, stated
    assert torch.allclose(out, ref, atol=2e-2)


def test_a_two_class_softmax_gives_the_person_channel(tmp_path):
    path = _export(Form(Reference(), out="softmax"), tmp_path / "softmax.onnx", (1, 3, 64, 64))
    io = resolve_io(path)
    assert (io.kind, io.channels_out, io.person_channel) == ("softmax", 2, 1)
    images = _images()
    ref = _reference_logits(images).clamp(-io.logit_bound, io.logit_bound)
    assert torch.allclose(_teacher(path)(images), ref, atol=2e-2)
    # multi-class logits: the person's channel against the others' log-sum-exp
    path3 = _export(Form(Reference(), out="logits3"), tmp_path / "logits3.onnx", (1, 3, 64, 64))
    with pytest.raises(InputError, match="3 classes; set teacher.onnx.person_channel"):
        resolve_io(path3)
    z = _teacher(path3, {"person_channel": 2})(images)
    assert torch.allclose(z, _reference_logits(images) - np.log(2.0), atol=1e-4)


def test_bgr_0_255_input_is_fed_as_declared(tmp_path):
    path = _export(Form(Reference(), bgr=True, byte=True), tmp_path / "bgr.onnx", (1, 3, 64, 64))
    images = _images()
    right = _teacher(path, {"channels": "bgr", "range": "byte"})(images)
    assert torch.allclose(right, _reference_logits(images), atol=1e-3)
    wrong = _teacher(path)(images)  # read as the default RGB [0, 1]: not the reference
    assert not torch.allclose(wrong, _reference_logits(images), atol=0.5)


def test_an_alpha_matte_at_half_resolution_is_a_clamped_logit_at_the_batch_size(tmp_path):
    path = _export(Form(Reference(), out="probabilities", out_scale=0.5), tmp_path / "matte.onnx", (1, 3, 64, 64))
    io = resolve_io(path, {"kind": "matte"})
    assert io.kind == "matte"
    images = _images()
    out = _teacher(path, {"kind": "matte"})(images)
    assert out.shape == (4, 1, 64, 64)
    z = F.interpolate(_reference_logits(images), scale_factor=0.5, mode="bilinear", align_corners=False)
    ref = F.interpolate(z.clamp(-io.logit_bound, io.logit_bound), size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(out, ref, atol=2e-2)  # the matte's logit at its own resolution, resized to the batch's
    assert out.abs().max().item() <= io.logit_bound + 1e-3


def test_a_static_batch_of_one_runs_sample_by_sample(tmp_path, caplog):
    path = _export(Form(Reference(), normalise=False), tmp_path / "b1.onnx", (1, 3, 64, 64), dynamic_batch=False)
    assert resolve_io(path).batch == 1
    images = _images(n=4)
    with caplog.at_level("INFO"):
        out = _teacher(path, {"mean": MEAN, "std": STD})(images)
    assert torch.allclose(out, _reference_logits(images), atol=1e-4)
    assert "static batch of 1" in caplog.text and "dynamic batch axis" in caplog.text


def test_a_static_batch_of_one_feature_teacher_runs_sample_by_sample(tmp_path):
    from edgeseg.distill.demo_feature_teacher import DemoDetector
    from edgeseg.distill.feature_onnx import expose_tensor

    torch.manual_seed(0)
    det = _export(DemoDetector(), tmp_path / "det1.onnx", (1, 3, 64, 64), dynamic_batch=False)
    import onnx

    names = [o for n in onnx.load(str(det)).graph.node for o in n.output if "Concat" in o]
    feature = OnnxFeatureTeacher(expose_tensor(det, names[-1]), "cpu", MEAN, STD, threads=1)
    assert feature.batch == 1
    images = _images(n=4)
    assert torch.allclose(feature(images).clone(), feature.run_with_copies(images), atol=1e-5)


def test_bad_teacher_files_get_one_clear_line(tmp_path):
    class NotAnImage(nn.Module):
        def forward(self, x):
            return x * 2

    flat = _export(NotAnImage(), tmp_path / "flat.onnx", (1, 10), outputs=("y",))
    with pytest.raises(InputError, match="no image-like input"):
        resolve_io(flat)

    class TwoHeads(nn.Module):
        def forward(self, x):
            return x.mean(1, keepdim=True), x.amax(1, keepdim=True)

    two = _export(TwoHeads(), tmp_path / "two.onnx", (1, 3, 32, 32), outputs=("a", "b"))
    with pytest.raises(InputError, match=r"2 outputs \['a', 'b'\] and none named; set teacher.onnx.output"):
        resolve_io(two)
    assert resolve_io(two, {"output": "b"}).output == "b"
    with pytest.raises(InputError, match="person_channel is 3 but output a has 1 channel"):
        resolve_io(two, {"output": "a", "person_channel": 3})
    with pytest.raises(InputError, match="layout is nhwc but input x has shape"):
        resolve_io(two, {"output": "a", "layout": "nhwc"})
    fixed = _export(Form(Reference()), tmp_path / "fixed.onnx", (1, 3, 64, 64))
    with pytest.raises(InputError, match=r"size is \[32, 32\] but the model is fixed at \[64, 64\]"):
        resolve_io(fixed, {"size": (32, 32)})


def test_the_numpy_path_matches_the_torch_path(tmp_path):
    """The torch-free runtime reads a zoo teacher exactly as distillation does (bundle, runtime check)."""
    import onnxruntime as ort

    path = _export(Form(Reference(), layout="nhwc", bgr=True, byte=True, out="softmax", out_layout="nhwc"),
                   tmp_path / "zoo.onnx", (1, 64, 64, 3))
    declared = {"channels": "bgr", "range": "byte"}
    io = resolve_io(path, declared)
    images = _images()
    rgb = ((images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255).round()
    rgb_u8 = rgb.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    numpy_logits = io.person_logits(sess.run([io.output], {io.input: io.prepare(rgb_u8)})[0])
    torch_logits = _teacher(path, declared)(_normalise(torch.from_numpy(rgb_u8).permute(0, 3, 1, 2).float() / 255))
    assert np.allclose(numpy_logits, torch_logits[:, 0].numpy(), atol=1e-3)


# --- the teacher as ONNX in training ------------------------------------------------------------------------------


def _cfg(tiny_run, run_dir, **sections):
    """A tiny training config on the shared demo data; ``sections`` replace the teachers' defaults."""
    from edgeseg.distill.config import load_config
    from edgeseg.export.config import Config
    from tests.conftest import write_config

    _, base = tiny_run
    sections.setdefault("feature_teacher", {})
    sections["feature_teacher"] = {"onnx": str(base.feature_teacher_onnx), **sections["feature_teacher"]}
    sections["teacher"] = {"checkpoint": str(base.teacher_checkpoint), **sections.get("teacher", {})}
    sections["data"] = {**sections.get("data", {}), "root": str(base.data_root)}
    return load_config(write_config(run_dir, **sections), Config)


def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]


def test_the_demo_teacher_as_onnx_gives_the_torch_teachers_kd_targets(tiny_run, tmp_path):
    """Parity: the torch teacher exported to ONNX and given as teacher.onnx trains the same first epoch."""
    from edgeseg.distill.job import job_for
    from edgeseg.distill.models import load_teacher
    from edgeseg.distill.trainer import Trainer
    from edgeseg.export.onnx_model import export_teacher_onnx
    _, base = tiny_run
    onnx_path = export_teacher_onnx(base, tmp_path / "teacher.onnx")
    images = _images(n=3)
    torch_teacher = load_teacher(base).eval()
    cfg = _cfg(tiny_run, tmp_path / "onnx", teacher={"onnx": {"path": str(onnx_path)}}, train={"epochs": 1})
    onnx_teacher = load_teacher(cfg)
    assert isinstance(onnx_teacher, OnnxSegmentationTeacher)  # its edgeseg.io metadata gave the normalisation
    with torch.no_grad():
        assert torch.allclose(onnx_teacher(images), torch_teacher(images), atol=1e-4)
    runs = {}
    for name, extra in (("torch", {}), ("onnx", {"onnx": {"path": str(onnx_path)}})):
        cfg = _cfg(tiny_run, tmp_path / name, teacher=extra, train={"epochs": 1})
        Trainer(cfg, job_for(cfg, "student")).run()
        runs[name] = _records(tmp_path / name)[0]
    for key in ("loss", "loss_kl", "loss_mse", "loss_bce", "loss_dice", "loss_feature", "val_miou"):
        assert runs["onnx"][key] == pytest.approx(runs["torch"][key], rel=1e-3, abs=1e-4), key
    # the evaluation's teacher row: the ONNX file's own weights, the same masks
    from edgeseg.distill.cli import _evaluate
    from edgeseg.distill.models import count_parameters

    report = _evaluate(cfg, tmp_path / "onnx" / "distill" / "best.pt", None, latency_repeats=1)
    reference = _evaluate(base, tmp_path / "torch" / "distill" / "best.pt", None, latency_repeats=1)
    assert report["teacher_kind"] == "onnx"  # its weights counted from the file (BatchNorm folded into the convs)
    assert 0.95 * count_parameters(torch_teacher) < report["teacher_params"] <= count_parameters(torch_teacher)
    assert report["teacher_miou"] == pytest.approx(reference["teacher_miou"], abs=1e-3)


def test_static_batch_one_teachers_train_at_batch_4(tiny_run, tmp_path):
    from edgeseg.distill.demo_feature_teacher import DEMO_TENSOR, DemoDetector, export_demo_feature_teacher
    from edgeseg.distill.job import job_for
    from edgeseg.distill.models import load_teacher
    from edgeseg.distill.onnx_export import export_module
    from edgeseg.distill.trainer import Trainer

    _, base = tiny_run
    seg = export_module(load_teacher(base).eval(), tmp_path / "seg_1x3x64x64.onnx", torch.zeros(1, 3, 64, 64), ["images"],
                        ["logits"], dynamic_batch=False)
    torch.manual_seed(0)
    det = tmp_path / "det_1x3x64x64.onnx"
    export_demo_feature_teacher(DemoDetector(), det, (64, 64))
    import onnx  # the demo detector exports with a dynamic batch: pin it to 1 as a zoo file would be
    m = onnx.load(str(det))
    for v in [*m.graph.input, *m.graph.output]:
        v.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(m, str(det))
    cfg = _cfg(tiny_run, tmp_path / "run", train={"epochs": 1, "batch_size": 4, "teacher_targets": "live"},
                     teacher={"onnx": {"path": str(seg), "mean": list(MEAN), "std": list(STD)}},
                     feature_teacher={"onnx": str(det), "tensor": DEMO_TENSOR})
    trainer = Trainer(cfg, job_for(cfg, "student"))
    metrics = trainer.run()
    assert trainer.teacher.io.batch == 1 and trainer.feature_teacher.batch == 1
    # the same models at a dynamic batch train the same epoch: sample by sample changes nothing
    seg_n = export_module(load_teacher(base).eval(), tmp_path / "seg_nx3x64x64.onnx", torch.zeros(1, 3, 64, 64),
                          ["images"], ["logits"])
    det_n = tmp_path / "det_nx3x64x64.onnx"
    torch.manual_seed(0)
    export_demo_feature_teacher(DemoDetector(), det_n, (64, 64))
    cfg_n = _cfg(tiny_run, tmp_path / "run_n", train={"epochs": 1, "batch_size": 4, "teacher_targets": "live"},
                 teacher={"onnx": {"path": str(seg_n), "mean": list(MEAN), "std": list(STD)}},
                 feature_teacher={"onnx": str(det_n), "tensor": DEMO_TENSOR})
    dynamic = Trainer(cfg_n, job_for(cfg_n, "student")).run()
    for key in ("loss_kl", "loss_mse", "loss_feature", "loss"):
        assert metrics[key] == pytest.approx(dynamic[key], rel=1e-4), key


def test_one_file_as_both_teachers_runs_once_per_batch(tiny_run, tmp_path, monkeypatch):
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer

    class WithNeck(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Conv2d(3, 4, 3, stride=8, padding=1), nn.Conv2d(3, 4, 3, stride=8, padding=1)
            self.head = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            neck = torch.cat([self.a(x), self.b(x)], dim=1)  # the feature to match, an inner Concat
            return F.interpolate(self.head(neck), scale_factor=8.0, mode="bilinear", align_corners=False)

    path = _export(WithNeck(), tmp_path / "both.onnx", (1, 3, 64, 64))
    import onnx

    neck = next(o for n in onnx.load(str(path)).graph.node if n.op_type == "Concat" for o in n.output)
    cfg = _cfg(tiny_run, tmp_path / "run", train={"epochs": 1, "teacher_targets": "live"},
               teacher={"onnx": {"path": str(path)}}, feature_teacher={"onnx": str(path), "tensor": neck})
    trainer = Trainer(cfg, job_for(cfg, "student"), max_steps=2)
    calls = []
    import onnxruntime as ort

    real = ort.InferenceSession.run_with_iobinding
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    trainer.run()
    assert trainer.feature_teacher.teacher is trainer.teacher  # one session for both
    # the teacher's val masks (8 images, one batch) and two steps: one run each, mask and neck bound together
    assert len(calls) == 1 + 2


# --- a look before the long run -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    """16 demo images at the shipped teacher's 128x128, and the shipped teacher exported behind a zoo-style front end
    that wants BGR pixels in [0, 255] (what a user may get and mis-declare)."""
    from edgeseg.distill.config import DataConfig
    from edgeseg.distill.demo_data import generate_demo_dataset
    from edgeseg.distill.models import load_model
    from edgeseg.distill.config import TeacherConfig
    from edgeseg.distill.shipped import TEACHER, weights_path

    root = tmp_path_factory.mktemp("demo128")
    generate_demo_dataset(root / "data", (128, 128), 16, 16, seed=0, max_people=3, empty_fraction=0.1)
    teacher = load_model(TeacherConfig(encoder="tu-efficientnet_b3", decoder_channels=(256, 128, 64, 32, 16)),
                         weights_path(TEACHER)).eval()
    data = DataConfig(image_size=(128, 128))

    class ZooFront(nn.Module):  # BGR in [0, 255] -> the teacher's normalised RGB
        def __init__(self):
            super().__init__()
            self.teacher = teacher
            self.register_buffer("mean", torch.tensor(data.mean).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(data.std).view(1, 3, 1, 1) * 255)

        def forward(self, x):
            return self.teacher((x.flip(1) - self.mean) / self.std)

    path = _export(ZooFront(), root / "zoo_bgr_255.onnx", (1, 3, 128, 128))
    return root, path


def _inspect(demo_world, tmp_path, **declared):
    from edgeseg.distill.inspect import inspect_teacher
    from tests.conftest import write_config
    from edgeseg.distill.config import load_config
    from edgeseg.export.config import Config

    root, path = demo_world
    cfg = load_config(write_config(tmp_path, data={"source": "folder", "root": str(root / "data"), "image_size": [128, 128]},
                                   teacher={"onnx": {"path": str(path), **declared}}), Config)
    return inspect_teacher(cfg, root / "data" / "val", limit=16, out_dir=tmp_path / "inspect")


def test_inspect_teacher_passes_a_teacher_read_right(demo_world, tmp_path):
    report = _inspect(demo_world, tmp_path, channels="bgr", range="byte")
    assert report["flags"] == [] and report["miou"] > 0.6 and report["labelled"]
    assert 0.02 < report["person_fraction"] < 0.6 and report["uncertain_share"] < 0.2
    assert (tmp_path / "inspect" / "inspect.png").is_file() and (tmp_path / "inspect" / "inspect.json").is_file()


def test_inspect_teacher_flags_swapped_channels(demo_world, tmp_path):
    report = _inspect(demo_world, tmp_path, channels="rgb", range="byte")  # planted: the model wants BGR
    assert [f for f in report["flags"] if f.startswith("channels swapped")], report["flags"]
    assert "teacher.onnx.channels: bgr" in report["flags"][0]
    assert report["other_readings"]["channels swapped"]["miou"] > report["miou"] + 0.05


def test_inspect_teacher_flags_a_range_off_by_255(demo_world, tmp_path):
    report = _inspect(demo_world, tmp_path, channels="bgr", range="unit")  # planted: the model wants [0, 255]
    assert any(f.startswith("range off by 255") and "teacher.onnx.range: byte" in f for f in report["flags"]), report["flags"]


def test_inspect_teacher_flags_a_matte_read_as_logits_and_an_empty_output(tmp_path, tiny_run):
    from edgeseg.distill.config import load_config
    from edgeseg.distill.inspect import inspect_teacher
    from edgeseg.export.config import Config
    from tests.conftest import write_config

    class Matte(nn.Module):
        def forward(self, x):  # a matte in [0, 1] that the graph does not mark as a Sigmoid
            return torch.exp(-x.abs().mean(1, keepdim=True))

    class Nobody(nn.Module):
        def forward(self, x):  # logits far below the cut everywhere
            return x.mean(1, keepdim=True) * 0.01 - 10.0

    _, base = tiny_run
    reports = {}
    for name, module in (("matte", Matte()), ("nobody", Nobody())):
        path = _export(module, tmp_path / f"{name}.onnx", (1, 3, 64, 64), dynamic_hw=True)
        cfg = load_config(write_config(tmp_path / name, data={"root": str(base.data_root)},
                                       teacher={"onnx": {"path": str(path)}}), Config)
        reports[name] = inspect_teacher(cfg, limit=4)["flags"]
    assert any("lies in [0, 1] but is read as logits" in f and "kind: matte" in f for f in reports["matte"])
    assert not any("finds nobody" in f for f in reports["matte"])  # read as logits its people are everywhere
    assert any("finds nobody" in f for f in reports["nobody"]) and not any("[0, 1]" in f for f in reports["nobody"])
