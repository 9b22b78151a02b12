"""Bad input at every stage's CLI: one clear line naming the file and the fix, exit status 2, no traceback."""
from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import run_cli, write_config


def _assert_one_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for n in needles:
        assert n in last, (n, last)


@pytest.fixture()
def cfg_path(tiny_run, tmp_path):
    _, base = tiny_run
    return write_config(tmp_path, data={"root": str(base.data_root)},
                        teacher={"checkpoint": str(base.teacher_checkpoint)},
                        feature_teacher={"onnx": str(base.feature_teacher_onnx)})


def test_distill_corrupt_feature_teacher(tiny_run, tmp_path):
    _, base = tiny_run
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x0a\x03not onnx at all")
    path = write_config(tmp_path, data={"root": str(base.data_root)}, teacher={"checkpoint": str(base.teacher_checkpoint)},
                        feature_teacher={"onnx": str(bad)})
    _assert_one_line(run_cli("distill", "train", "--config", str(path), "--max-steps", "1"),
                     "broken.onnx: not a valid ONNX model")


def test_distill_missing_teacher_checkpoint(cfg_path, tmp_path):
    _assert_one_line(run_cli("distill", "train", "--config", str(cfg_path), "--set", f"teacher.checkpoint={tmp_path}/t.pt"),
                     "t.pt: checkpoint does not exist")


def test_distill_wrong_size_mask_and_empty_folder(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split / "images").mkdir(parents=True)
        (data / split / "masks").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(data / "train" / "images" / "a.png")
    Image.new("L", (32, 30)).save(data / "train" / "masks" / "a.png")
    path = write_config(tmp_path, data={"source": "folder", "root": str(data)})
    _assert_one_line(run_cli("distill", "train", "--config", str(path)), "a.png: mask is 32x30 but its image a.png is 32x32")
    (data / "train" / "images" / "a.png").unlink()
    _assert_one_line(run_cli("distill", "train", "--config", str(path)), "images: no images found")


def test_calibration_needs_a_student_and_refuses_a_full_folder(cfg_path, tmp_path):
    _assert_one_line(run_cli("calibration", "synth", "--config", str(cfg_path), "--guidance", "confidence",
                             "--student", str(tmp_path / "none.pt")), "guidance 'confidence' needs a student checkpoint")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.png").write_bytes(b"x")
    _assert_one_line(run_cli("calibration", "synth", "--config", str(cfg_path), "--out", str(full)),
                     "exists and is not empty; pass --overwrite")
    (tmp_path / "empty").mkdir()
    _assert_one_line(run_cli("calibration", "report", "--config", str(cfg_path), "--calibration", str(tmp_path / "empty")),
                     "calibration folder has no images")


def test_export_without_a_student_or_a_calibration_folder(cfg_path, tiny_run, tmp_path):
    _, base = tiny_run
    _assert_one_line(run_cli("export", "onnx", "--config", str(cfg_path), "--checkpoint", str(base.teacher_checkpoint)),
                     "has no 'student' weights")
    _assert_one_line(run_cli("export", "quantize", "--config", str(cfg_path)), "model.onnx: missing; run `edgeseg export onnx`")
    _assert_one_line(run_cli("export", "bundle", "--config", str(cfg_path)), "accuracy.json: missing; run `make export`")


def test_runtime_refuses_a_tampered_bundle(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"onnx")
    (bundle / "manifest.json").write_text(
        '{"format": "edgeseg-bundle/1", "spec": {"image_size": [64, 64]}, '
        '"files": {"model.onnx": {"sha256": "00", "role": "fp32"}}}')
    _assert_one_line(run_cli("runtime", "profile", "--bundle", str(bundle)),
                     "model.onnx: SHA-256 does not match the bundle manifest")
