"""The shipped demo teachers: fp16 with their SHA-256, checked on load; make teacher resumes and ships."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import run_cli, write_config
from edgeseg.distill.shipped import ASSETS, DETECTOR, TEACHER, load_checked, meta_path, read_meta, ship, weights_path
from edgeseg.runtime.errors import InputError


@pytest.mark.parametrize("name", [TEACHER, DETECTOR])
def test_the_shipped_teachers_match_their_recorded_hashes(name):
    meta = read_meta(weights_path(name))
    state = load_checked(weights_path(name))  # raises on a mismatch
    assert meta["dtype"] == "float16" and meta["bytes"] == weights_path(name).stat().st_size
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())  # upcast on load
    assert meta["command"].startswith("edgeseg distill train-") and "--ship" in meta["command"]
    assert meta["stopped_early"] is True or meta["best_epoch"] < meta.get("epochs_trained", meta.get("epochs"))
    curve = meta.get("val_curve") or meta.get("curve")
    assert len(curve) >= 2  # the curve that decided when to stop ships with the weights


def test_the_shipped_files_stay_out_of_the_runtime_wheel():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    data = json.dumps(project["tool"]["setuptools"].get("package-data", {}))
    assert "demo_teachers" not in data and "safetensors" not in data.replace("demo_generator/unet/*", "")


def test_a_tampered_teacher_is_refused_in_one_line(tiny_run, tmp_path):
    folder = tmp_path / "assets"
    folder.mkdir()
    for f in (weights_path(TEACHER), meta_path(weights_path(TEACHER))):
        shutil.copyfile(f, folder / f.name)
    weights = folder / weights_path(TEACHER).name
    load_checked(weights)  # an intact copy loads
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one byte of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"SHA-256 .* does not match teacher.json's .*restore it \(git checkout"):
        load_checked(weights)
    _, base = tiny_run
    cfg = write_config(tmp_path / "run", data={"root": str(base.data_root), "image_size": [64, 64]},
                       teacher={"checkpoint": str(weights), "encoder": "tu-efficientnet_b3",
                                "decoder_channels": [256, 128, 64, 32, 16]})
    r = run_cli("distill", "prepare", "--config", str(cfg))
    assert r.returncode == 2 and "does not match" in r.stderr and "Traceback" not in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith("error:")]) == 1


def test_make_teacher_resumes_and_ships_what_it_trained(tiny_run, tmp_path):
    from edgeseg.distill.checkpoint import load_checkpoint
    from edgeseg.distill.config import load_config
    from edgeseg.distill.job import job_for
    from edgeseg.distill.shipped import ship_teacher
    from edgeseg.distill.trainer import Trainer
    from edgeseg.export.config import Config

    _, base = tiny_run
    runs = {}
    for name in ("straight", "resumed"):
        path = write_config(tmp_path / name, data={"root": str(base.data_root)},
                            teacher_train={"epochs": 2, "batch_size": 4, "lr": 1e-3, "patience": 3})
        runs[name] = load_config(path, Config)
    Trainer(runs["straight"], job_for(runs["straight"], "teacher")).run()
    with pytest.raises(InputError, match="has not finished"):  # shipping a stopped training is refused
        Trainer(runs["resumed"], job_for(runs["resumed"], "teacher"), max_steps=3).run()
        ship_teacher(runs["resumed"], tmp_path / "resumed" / "teacher", "make teacher", folder=tmp_path / "a")
    Trainer(runs["resumed"], job_for(runs["resumed"], "teacher")).run()  # the same command again: resumes
    a = load_checkpoint(tmp_path / "straight" / "teacher" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "teacher" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = ship_teacher(runs["resumed"], tmp_path / "resumed" / "teacher", "make teacher", folder=tmp_path / "assets")
    shipped = load_checked(tmp_path / "assets" / "teacher.safetensors")
    assert all(torch.equal(shipped[k], b[k].half().float()) for k in b if b[k].is_floating_point())
    assert meta["epochs_trained"] == 2 and len(meta["val_curve"]) == 2 and meta["command"] == "make teacher"
    assert meta["val_miou_fp16"] == pytest.approx(meta["val_miou_fp32"], abs=2e-3)  # fp16 weights: the same masks


def test_the_detector_resumes_after_a_stop(tiny_run, tmp_path, monkeypatch):
    import edgeseg.distill.demo_feature_teacher as det
    from edgeseg.distill.data import split_samples

    _, cfg = tiny_run
    train, val = split_samples(cfg, "train"), split_samples(cfg, "val")
    straight, _ = det.train_demo_detector(train, (64, 64), epochs=3, batch_size=4, val_samples=val, patience=0)
    real, calls = det.detection_val_loss, []

    def stop_after_two(*a, **k):  # the process dies after epoch 2's checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(det, "detection_val_loss", stop_after_two)
    state = tmp_path / "det.partial.pt"
    with pytest.raises(KeyboardInterrupt):
        det.train_demo_detector(train, (64, 64), epochs=3, batch_size=4, val_samples=val, patience=0, state_file=state)
    assert torch.load(state, weights_only=False)["state"]["epoch"] == 2
    monkeypatch.setattr(det, "detection_val_loss", real)
    resumed, summary = det.train_demo_detector(train, (64, 64), epochs=3, batch_size=4, val_samples=val, patience=0,
                                               state_file=state)
    assert summary["epochs"] == 3 and len(summary["curve"]) == 3
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_the_demo_baseline_ships_installs_and_refuses_another_config(tiny_run, tmp_path):
    """make baseline ships the ground-truth-only student; make distill installs it where training would put it,
    only for the config that trained it, and the evaluation says where it came from."""
    from edgeseg.distill.checkpoint import load_checkpoint
    from edgeseg.distill.config import load_config
    from edgeseg.distill.job import job_for
    from edgeseg.distill.shipped import BASELINE, install_baseline, provenance, ship_baseline
    from edgeseg.distill.trainer import Trainer
    from edgeseg.export.config import Config

    _, base = tiny_run
    data = {"root": str(base.data_root), "labelled_count": 8}
    trained = load_config(write_config(tmp_path / "trained", data=data), Config)
    Trainer(trained, job_for(trained, "baseline")).run()
    assets = tmp_path / "assets"
    meta = ship_baseline(trained, tmp_path / "trained" / "distill-baseline", "make baseline", folder=assets)
    assert meta["command"] == "make baseline" and meta["dtype"] == "float16" and len(meta["val_curve"]) == 2

    path = write_config(tmp_path / "demo", data=data)
    best = install_baseline(load_config(path, Config), folder=assets)
    assert best == tmp_path / "demo" / "distill-baseline" / "best.pt"
    want = load_checkpoint(tmp_path / "trained" / "distill-baseline" / "best.pt")["student"]
    got = load_checkpoint(best)["student"]
    assert all(torch.equal(got[k], want[k].half().float()) for k in want if want[k].is_floating_point())
    assert provenance(best).startswith(f"shipped ({assets / 'baseline.safetensors'}")
    assert provenance(tmp_path / "trained" / "distill-baseline" / "best.pt") == "trained here"

    other = load_config(write_config(tmp_path / "other", data={**data, "labelled_count": 12}), Config)
    with pytest.raises(InputError, match=r"not this config's baseline: .*labelled_count: 8 -> 12.*BASELINE=1"):
        install_baseline(other, folder=assets)
    assert not (tmp_path / "other" / "distill-baseline" / "best.pt").exists()

    weights = assets / f"{BASELINE}.safetensors"
    data_bytes = bytearray(weights.read_bytes())
    data_bytes[-10] ^= 0xFF
    weights.write_bytes(bytes(data_bytes))
    (tmp_path / "demo" / "distill-baseline" / "best.pt").unlink()
    with pytest.raises(InputError, match="does not match baseline.json"):
        install_baseline(load_config(path, Config), folder=assets)


def test_make_distill_trains_the_baseline_where_the_shipped_one_does_not_fit(tiny_run, tmp_path):
    _, base = tiny_run
    cfg = write_config(tmp_path / "run", data={"root": str(base.data_root)})
    refused = run_cli("distill", "install-baseline", "--config", str(cfg))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    error = [l for l in refused.stderr.splitlines() if l.startswith("error:")]
    assert len(error) == 1 and "not this config's baseline" in error[0] and "BASELINE=1" in error[0]
    r = run_cli("distill", "install-baseline", "--or-train", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["source"] == "trained here"
    assert "does not fit" in r.stderr and (tmp_path / "run" / "distill-baseline" / "last.pt").is_file()


def test_the_shipped_baseline_matches_its_hash_and_the_demo_config():
    from edgeseg.distill.config import load_config
    from edgeseg.distill.shipped import BASELINE, baseline_misfit
    from edgeseg.export.config import Config

    from conftest import ROOT

    load_checked(weights_path(BASELINE))  # raises on a mismatch
    meta = read_meta(weights_path(BASELINE))
    assert meta["command"].startswith("edgeseg distill train --baseline --ship") and len(meta["val_curve"]) >= 2
    # configs/demo.yaml trains exactly what was shipped: a changed schedule or data means `make baseline` again
    assert baseline_misfit(load_config(ROOT / "configs" / "demo.yaml", Config)) is None
