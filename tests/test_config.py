"""Typed config: defaults, overrides, and one clear error per bad field."""
from __future__ import annotations

import pytest

from edgeseg.distill.config import load_config

from edgeseg.export.config import Config
from edgeseg.runtime.errors import ConfigError
from tests.conftest import ROOT, run_cli


def test_demo_and_reference_configs_load():
    demo = load_config(ROOT / "configs/demo.yaml", Config)
    ref = load_config(ROOT / "configs/yolov9_b0_from_b3.yaml", Config)
    assert demo.data.image_size == (128, 128)
    assert ref.data.image_size == (640, 640)
    assert ref.feature_teacher.tensor == "segmentation_model_34_Concat_output_0"
    assert ref.feature_teacher.hidden_channels == 768
    assert (ref.train.lr, ref.train.batch_size, ref.train.epochs) == (1e-4, 4, 50)
    assert ref.student.freeze_encoder is True


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {epochs: 5}\n")
    cfg = load_config(p, Config, ["train.epochs=3", "loss.temperature.schedule=linear", "data.image_size=[64, 96]"])
    assert cfg.train.epochs == 3
    assert cfg.loss.temperature.schedule == "linear"
    assert cfg.data.image_size == (64, 96)


@pytest.mark.parametrize("text, overrides, match", [
    ("trian: {epochs: 3}\n", [], r"unknown config key 'trian'.*did you mean 'train'"),
    ("train: {epochs: three}\n", [], r"'train.epochs' must be an integer, got 'three'"),
    ("train: {epochs: 0}\n", [], r"config train.epochs must be >= 1, got 0"),
    ("data: {image_size: [100, 100]}\n", [], r"data.image_size must be positive multiples of 32"),
    ("loss: {temperature: {schedule: cosin}}\n", [], r"must be one of .*did you mean 'cosine'"),
    ("", ["train.epohcs=3"], r"unknown config key 'train.epohcs'.*did you mean 'epochs'"),
    ("", ["train.epochs"], r"override 'train.epochs' must look like section.key=value"),
    ("train: [1, 2]\n", [], r"config section 'train' .* must be a mapping"),
    ("train: {epochs: 3\n", [], r"not valid YAML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, overrides, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p, Config, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; pass --config"):
        load_config(tmp_path / "nope.yaml", Config)


def test_cli_reports_a_wrong_type_in_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {batch_size: big}\n")
    r = run_cli("distill", "train", "--config", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: config field 'train.batch_size' must be an integer, got 'big'"
