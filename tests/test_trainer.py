"""The training loop: exact resume, frozen encoder, outputs, baseline, DDP."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from edgeseg.distill.checkpoint import load_checkpoint
from edgeseg.distill.config import load_config
from edgeseg.export.config import Config
from edgeseg.distill.models import load_model
from edgeseg.distill.job import job_for
from edgeseg.distill.trainer import Trainer
from tests.conftest import ROOT, write_config


def _config(tiny_run, run_dir, **sections):
    _, base = tiny_run
    sections.setdefault("teacher", {})
    sections["teacher"] = {**sections["teacher"], "checkpoint": str(base.teacher_checkpoint)}
    sections["feature_teacher"] = {**sections.get("feature_teacher", {}), "onnx": str(base.feature_teacher_onnx)}
    sections["data"] = {**sections.get("data", {}), "root": str(base.data_root)}
    path = write_config(run_dir, **sections)
    return path, load_config(path, Config)


def _weights(path, key="student"):
    return load_checkpoint(path)[key]


def test_resume_after_max_steps_equals_an_uninterrupted_run(tiny_run, tmp_path):
    _, straight = _config(tiny_run, tmp_path / "a")
    Trainer(straight, job_for(straight, "student")).run()

    _, resumed = _config(tiny_run, tmp_path / "b")
    Trainer(resumed, job_for(resumed, "student"), max_steps=3).run()  # stops mid-epoch 1
    ckpt = load_checkpoint(tmp_path / "b" / "distill" / "last.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"], ckpt["complete"]) == (0, 3, 3, False)
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    Trainer(resumed, job_for(resumed, "student")).run()

    a = load_checkpoint(tmp_path / "a" / "distill" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "distill" / "last.pt")
    assert a["step"] == b["step"] == 8 and a["complete"] and b["complete"]
    for key in ("student", "projection"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    # The JSONL equals the uninterrupted run's, value for value (epoch 1's losses were summed over a
    # resumed epoch: before the sums were checkpointed they came out 5/8 of the true mean).
    lines = _records(tmp_path / "b"), _records(tmp_path / "a")
    assert [l["epoch"] for l in lines[0]] == [1, 2]
    assert lines[0] == lines[1]
    # each record's loss is the weighted sum of its terms (the loss is linear in them, so epoch means add up),
    # and the temperature follows the schedule at the epoch's last step: cosine from 3 to 1 over 8 steps,
    # T = 1 + (3 - 1) * (1 + cos(pi * step / 8)) / 2, by hand: 2.0 after step 4, 1.0 after step 8
    w = straight.loss
    assert (w.temperature.schedule, w.temperature.t0, w.temperature.t1) == ("cosine", 3.0, 1.0)
    for rec in lines[0]:
        total = sum(getattr(w, k) * rec[f"loss_{k}"] for k in ("kl", "mse", "bce", "dice", "feature"))
        assert rec["loss"] == pytest.approx(total, rel=1e-5)
    assert [(rec["step"], rec["temperature"]) for rec in lines[0]] == [(4, pytest.approx(2.0)), (8, pytest.approx(1.0))]
    assert (tmp_path / "b" / "distill" / "vis" / "epoch_002.png").is_file()


def _records(run_dir):
    """metrics.jsonl without the wall-clock and memory fields (they depend on the machine, not the run)."""
    out = []
    for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record.pop("epoch_time_s") > 0 and record.pop("peak_rss_mb") > 0
        assert "peak_cuda_mb" not in record  # the device's peak is recorded on CUDA only (tests/test_gpu.py)
        out.append(record)
    return out


def test_a_crash_before_best_pt_is_copied_is_repaired_on_resume(tiny_run, tmp_path, monkeypatch):
    import edgeseg.distill.trainer as trainer_module

    _, cfg = _config(tiny_run, tmp_path, train={"epochs": 1})

    def crash(src, dst):
        raise KeyboardInterrupt("killed between last.pt and best.pt")

    monkeypatch.setattr(trainer_module.shutil, "copyfile", crash)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, job_for(cfg, "student")).run()
    last, best = tmp_path / "distill" / "last.pt", tmp_path / "distill" / "best.pt"
    assert load_checkpoint(last)["complete"] and not best.exists()
    monkeypatch.undo()
    Trainer(cfg, job_for(cfg, "student")).run()  # nothing left to train; the resume repairs best.pt
    a, b = load_checkpoint(last), load_checkpoint(best)
    assert b["best_miou"] == a["best_miou"] and b["epoch"] == a["best_epoch"] == 1
    assert best.read_bytes() == last.read_bytes()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_every_rank_runs_the_same_number_of_steps(world, batch):
    from edgeseg.distill.sampler import EpochSampler, steps_per_epoch

    for size in range(batch * world, 41):
        for skip_steps in (0, 1):
            lengths = [len(EpochSampler(size, 0, 3, rank, world, skip=skip_steps * batch, batch_size=batch))
                       for rank in range(world)]
            steps = steps_per_epoch(size, batch, world)
            assert lengths == [(steps - skip_steps) * batch] * world, (size, world, batch, lengths)
        shards = [EpochSampler(size, 0, 3, rank, world, batch_size=batch).indices for rank in range(world)]
        flat = [i for s in shards for i in s]
        assert len(set(flat)) == len(flat)  # disjoint shards


def test_a_cpu_checkpoint_resumes_with_an_enabled_amp_scaler(tiny_run, tmp_path):
    # On CUDA with AMP the trainer's scaler is enabled; a checkpoint written on CPU holds the empty
    # state of a disabled scaler, which GradScaler.load_state_dict refuses.
    _, cfg = _config(tiny_run, tmp_path)
    Trainer(cfg, job_for(cfg, "student"), max_steps=1).run()
    assert load_checkpoint(tmp_path / "distill" / "last.pt")["scaler"] == {}
    trainer = Trainer(cfg, job_for(cfg, "student"))
    trainer._setup()
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)  # what AMP on a GPU gives
    with pytest.raises(RuntimeError, match="empty"):
        trainer.scaler.load_state_dict({})  # the library's rule this guards against
    assert trainer._resume() is False and trainer.step == 1
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 65536.0


def test_checkpoint_student_loads_strictly_without_the_projection(tiny_run, tmp_path):
    _, cfg = _config(tiny_run, tmp_path)
    Trainer(cfg, job_for(cfg, "student"), max_steps=1).run()
    ckpt = load_checkpoint(tmp_path / "distill" / "last.pt")
    assert ckpt["projection"] is not None and not any(k.startswith("projection") for k in ckpt["student"])
    model = load_model(cfg.student, tmp_path / "distill" / "last.pt", keys=("student",))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_frozen_encoder_trains_only_decoder_head_and_projection(tiny_run, tmp_path):
    _, cfg = _config(tiny_run, tmp_path, student={"freeze_encoder": True, "activation": "silu"}, train={"epochs": 1})
    trainer = Trainer(cfg, job_for(cfg, "student"), max_steps=2)
    trainer.run()
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in trainer.model.student.encoder.parameters())
    assert all(id(p) in optimised for p in trainer.model.student.decoder.parameters())
    assert all(id(p) in optimised for p in trainer.model.projection.parameters())
    torch.manual_seed(cfg.seed)
    from edgeseg.distill.models import build_model

    initial = build_model(cfg.student).encoder.state_dict()
    trained = {k.removeprefix("encoder."): v for k, v in _weights(tmp_path / "distill" / "last.pt").items()
               if k.startswith("encoder.")}
    for name, value in initial.items():
        assert torch.equal(value, trained[name]), name  # weights and BN statistics untouched


def test_baseline_uses_no_teacher(tiny_run, tmp_path):
    _, cfg = _config(tiny_run, tmp_path, train={"epochs": 1})
    trainer = Trainer(cfg, job_for(cfg, "baseline"))
    trainer.run()
    assert trainer.teacher is None and trainer.feature_teacher is None
    line = json.loads((tmp_path / "distill-baseline" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_kl" not in line and "loss_feature" not in line and "loss_bce" in line


def test_changed_settings_refuse_to_resume(tiny_run, tmp_path):
    from edgeseg.runtime.errors import InputError

    _, cfg = _config(tiny_run, tmp_path)
    Trainer(cfg, job_for(cfg, "student"), max_steps=1).run()
    _, changed = _config(tiny_run, tmp_path, train={"lr": 5e-4})
    with pytest.raises(InputError, match=r"last.pt: was trained with different settings \(train\.lr: 0\.001 -> 0\.0005\); pass --fresh"):
        Trainer(changed, job_for(changed, "student")).run()


def test_ddp_two_processes_gloo(tiny_run, tmp_path):
    import subprocess

    # 16 images, 2 ranks, batch 2: 4 steps an epoch; 6 steps cross the epoch boundary (validation,
    # JSONL and checkpoint on rank 0 while rank 1 waits at the barrier) and stop mid-epoch 2.
    path, _ = _config(tiny_run, tmp_path, train={"epochs": 2, "batch_size": 2})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "edgeseg", "distill", "train", "--config", str(path), "--max-steps", "6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-3000:]}"
    ckpt = load_checkpoint(tmp_path / "distill" / "last.pt")
    assert ckpt["identity"]["world"] == 2 and (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (1, 2, 6)
    assert [json.loads(l)["epoch"] for l in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_evaluation_reports_test_with_the_shift_and_names_the_split(tiny_run, tmp_path):
    from edgeseg.distill.cli import _evaluate

    _, cfg = _config(tiny_run, tmp_path, train={"epochs": 1})
    Trainer(cfg, job_for(cfg, "student")).run()
    report = _evaluate(cfg, tmp_path / "distill" / "best.pt", None, latency_repeats=1)
    assert report["split"] == "test" and report["selection_split"] == "val" and "held-out test" in report["note"]
    assert report["images"] == 8 and report["test_shift"]["images"] == 8
    # the student's mIoU and agreement, recomputed here by hand from its own predictions at each image's size
    import numpy as np

    from edgeseg.distill.data import load_sample, split_samples
    from edgeseg.distill.models import load_model
    from edgeseg.runtime.preprocess import fit_image

    student = load_model(cfg.student, tmp_path / "distill" / "best.pt", cfg.student.feature_stride, keys=("student",)).eval()
    teacher = load_model(cfg.teacher, cfg.teacher_checkpoint).eval()
    mean, std = np.asarray(cfg.data.mean) * 255, np.asarray(cfg.data.std) * 255
    for split, block in (("test", report), ("test_shift", report["test_shift"])):
        inter, union, same, pixels = np.zeros(2), np.zeros(2), 0, 0  # mIoU at data-set level, as the reports define it
        for sample in split_samples(cfg, split):
            image, gt = load_sample(sample)
            fitted, pl = fit_image(image, tuple(cfg.data.image_size), "letterbox", tuple(int(round(v)) for v in mean))
            x = torch.from_numpy(((fitted - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
            with torch.no_grad():
                s_logit, t_logit = student(x)[0, 0], teacher(x)[0, 0]
            h, w = image.shape[:2]
            crop = lambda m: torch.nn.functional.interpolate(
                m[pl.top:pl.top + pl.height, pl.left:pl.left + pl.width][None, None], size=(h, w), mode="bilinear",
                align_corners=False)[0, 0].numpy() > 0
            pred, ref, gt = crop(s_logit), crop(t_logit), gt > 0
            for c in (0, 1):
                inter[c] += ((pred == c) & (gt == c)).sum()
                union[c] += ((pred == c) | (gt == c)).sum()
            same, pixels = same + (pred == ref).sum(), pixels + pred.size
        assert block["student_miou"] == pytest.approx(float(np.mean(inter / np.maximum(union, 1))), abs=0.01), split
        assert block["agreement"] == pytest.approx(same / pixels, abs=0.01), split


def test_report_splits_fall_back_to_val_and_say_so(tmp_path):
    import numpy as np
    from PIL import Image

    from edgeseg.distill.data import has_split, report_splits, split_samples

    for split in ("train", "val"):
        for d in ("images", "masks"):
            (tmp_path / "data" / split / d).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "data" / split / "images" / "a.png")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "data" / split / "masks" / "a.png")
    path = write_config(tmp_path, data={"source": "folder", "root": str(tmp_path / "data")})
    cfg = load_config(path, Config)
    splits, note = report_splits(cfg)
    assert splits == ["val"] and "no test split" in note and "optimistic" in note
    (tmp_path / "data" / "test" / "images").mkdir(parents=True)
    (tmp_path / "data" / "test" / "masks").mkdir(parents=True)
    assert has_split(cfg, "test") and not has_split(cfg, "test_shift")
    assert report_splits(cfg)[0] == ["test"]
    with pytest.raises(Exception, match="unknown split 'holdout'"):
        split_samples(cfg, "holdout")


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    import subprocess

    script = tmp_path / "nan_rank.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from edgeseg.distill.distributed import all_finite\n"
        "dist.init_process_group('gloo')\n"
        "world = dist.get_world_size()\n"
        "rank = dist.get_rank()\n"
        "result = (all_finite(torch.tensor(1.0), world), all_finite(torch.tensor(float('nan') if rank == 1 else 2.0), world))\n"
        f"open(r'{tmp_path}' + f'/rank{{rank}}.txt', 'w').write(repr(result))\n"
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # rank 0's own loss was finite: it stops too (each rank writes its own file: no interleaved stdout)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["(True, False)", "(True, False)"]


def test_patience_stops_a_flat_run_and_the_stop_is_final(tiny_run, tmp_path):
    # min_delta 1.0: no validation can improve by a whole mIoU point of 1, so the run stops after `patience`
    _, cfg = _config(tiny_run, tmp_path / "p", train={"epochs": 5, "patience": 1, "min_delta": 1.0})
    Trainer(cfg, job_for(cfg, "student")).run()
    ckpt = load_checkpoint(tmp_path / "p" / "distill" / "last.pt")
    assert (ckpt["epoch"], ckpt["complete"], ckpt["stopped_early"]) == (2, True, True)
    records = [json.loads(l) for l in (tmp_path / "p" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["stopped_early"] and "stopped_early" not in records[0]
    Trainer(cfg, job_for(cfg, "student")).run()  # a rerun finds it complete and trains nothing
    assert load_checkpoint(tmp_path / "p" / "distill" / "last.pt")["step"] == ckpt["step"]


def test_cached_teacher_targets_train_like_live_teachers_when_nothing_moves(tiny_run, tmp_path):
    # without augmentation every item's theta is the identity: the cache holds what the teachers say (float16)
    runs = {}
    for mode in ("cached", "live"):
        _, cfg = _config(tiny_run, tmp_path / mode, data={"augment": {"enabled": False}},
                         train={"epochs": 1, "teacher_targets": mode})
        trainer = Trainer(cfg, job_for(cfg, "student"))
        trainer.run()
        assert (trainer.targets is not None) == (mode == "cached")
        runs[mode] = _records(tmp_path / mode)[0]
    for key in ("loss_kl", "loss_mse", "loss_feature", "loss_bce"):
        assert runs["cached"][key] == pytest.approx(runs["live"][key], rel=2e-2), key


def test_auto_runs_the_teachers_live_when_the_cache_would_not_fit(tiny_run, tmp_path):
    _, cfg = _config(tiny_run, tmp_path / "small", train={"epochs": 1, "cache_limit_mb": 0})
    trainer = Trainer(cfg, job_for(cfg, "student"), max_steps=1)
    trainer.run()
    assert trainer.targets is None
