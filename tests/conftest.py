"""Shared fixtures: a tiny config, tiny real models and a tiny ONNX feature teacher, made once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tiny but real: timm's test EfficientNet (82k parameters) wrapped by smp, 64x64 images.
TINY = {
    "run_dir": "RUN_DIR",
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "data": {"source": "demo", "image_size": [64, 64], "demo": {"train_count": 16, "val_count": 8, "test_count": 8, "test_shift_count": 8}},
    "teacher": {"encoder": "tu-test_efficientnet", "decoder_channels": [32, 16, 16, 8, 8]},
    "student": {"encoder": "tu-test_efficientnet", "decoder_channels": [16, 8, 8, 8], "activation": "relu"},
    "feature_teacher": {"tensor": "neck_Concat_output_0", "hidden_channels": 16},
    "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "vis_images": 2},
    "teacher_train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "vis_images": 2},
}


def write_config(run_dir: Path, **sections) -> Path:
    """A tiny config file under ``run_dir`` with ``sections`` merged over TINY."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["run_dir"] = str(run_dir)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m edgeseg <args>`` (the ``edgeseg`` command) in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.run([sys.executable, "-m", "edgeseg", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with demo data, a random tiny teacher checkpoint and its ONNX feature teacher.

    Returns (config path, Config).
    """
    import torch

    from edgeseg.distill.config import load_config

    from edgeseg.export.config import Config
    from edgeseg.distill.data import split_samples
    from edgeseg.distill.demo_feature_teacher import DemoDetector, export_demo_feature_teacher
    from edgeseg.distill.models import build_model

    run_dir = tmp_path_factory.mktemp("tiny_run")
    path = write_config(run_dir)
    cfg = load_config(path, Config)
    split_samples(cfg, "train")  # generates the demo set
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher).eval()
    cfg.teacher_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": teacher.state_dict()}, cfg.teacher_checkpoint)
    export_demo_feature_teacher(DemoDetector(), cfg.feature_teacher_onnx, cfg.data.image_size)
    return path, cfg
