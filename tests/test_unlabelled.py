"""Distillation with a label budget and unlabelled images: masked ground-truth terms, exact shares,
exact resume of a mixed run, the demo's teacher corpus and site frames, and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from edgeseg.distill.checkpoint import load_checkpoint
from edgeseg.distill.config import LossConfig
from edgeseg.distill.losses import DistillationLoss
from edgeseg.distill.job import job_for
from edgeseg.distill.sampler import EpochSampler
from edgeseg.distill.trainer import Trainer
from edgeseg.runtime.errors import InputError
from test_trainer import _config, _records


def _frames(tiny_run, folder, n=6):
    """``n`` unlabelled frames (images only) copied from the tiny run's val split."""
    _, base = tiny_run
    (folder / "images").mkdir(parents=True)
    for src in sorted((base.data_root / "val" / "images").glob("*.png"))[:n]:
        shutil.copy(src, folder / "images" / src.name)
    return folder


def test_a_sample_without_a_mask_changes_no_ground_truth_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 8, 8, requires_grad=True)
    teacher = torch.randn(4, 1, 8, 8)
    mask = (torch.rand(4, 1, 8, 8) > 0.5).float()
    labelled = torch.tensor([True, False, True, False])

    def grad(weights, m):
        loss, terms = DistillationLoss(weights)(logits, m, 2.0, teacher, labelled=labelled)
        (g,) = torch.autograd.grad(loss, logits)
        return g, terms

    gt_only = LossConfig(kl=0, mse=0, feature=0)
    g, terms = grad(gt_only, mask)
    assert torch.count_nonzero(g[~labelled]) == 0 and torch.count_nonzero(g[labelled]) > 0
    flipped = mask.clone()
    flipped[~labelled] = 1 - flipped[~labelled]  # whatever the placeholder mask of an unlabelled sample holds
    assert torch.equal(grad(gt_only, flipped)[0], g)
    # the ground-truth terms are those of the labelled samples alone
    ref, _ = grad(gt_only, mask)
    sub = torch.zeros_like(logits)
    loss, _ = DistillationLoss(gt_only)(logits[labelled], mask[labelled])
    sub[labelled] = torch.autograd.grad(loss, logits)[0][labelled]
    torch.testing.assert_close(ref, sub)
    # the teacher terms reach every sample, and come per group (each the group's mean)
    g, terms = grad(LossConfig(), mask)
    assert torch.count_nonzero(g[~labelled]) > 0
    assert {"kl_labelled", "kl_unlabelled", "mse_labelled", "mse_unlabelled"} <= set(terms)
    torch.testing.assert_close((terms["kl_labelled"] + terms["kl_unlabelled"]) / 2, terms["kl"])
    # a batch with no labelled sample has no ground-truth term at all (not one against an empty mask)
    _, terms = DistillationLoss(LossConfig())(logits, mask, 2.0, teacher, labelled=torch.zeros(4, dtype=torch.bool))
    assert "bce" not in terms and "dice" not in terms and "kl" in terms
    # ... and with no teacher term either the loss is a zero tensor (the finite check reads it), not the int 0
    total, _ = DistillationLoss(gt_only)(logits, mask, labelled=torch.zeros(4, dtype=torch.bool))
    assert isinstance(total, torch.Tensor) and float(total) == 0.0


def test_epoch_records_average_each_term_over_what_carried_it():
    """Ground-truth terms over the steps that had a labelled sample; a group's term per sample of the group."""
    sums = {"loss": 4.0, "bce": 1.0, "n_gt_steps": 2.0, "kl": 2.0, "kl_unlabelled": 3.0, "kl_labelled": 1.0,
            "n_unlabelled": 6.0, "n_labelled": 2.0}
    out = Trainer._epoch_terms(None, sums, 4)
    assert out == {"loss": 1.0, "loss_bce": 0.5, "loss_kl": 0.5, "loss_kl_unlabelled": 0.5, "loss_kl_labelled": 0.5,
                   "unlabelled_fraction": 0.75}


def test_a_label_budget_keeps_the_epoch_length_and_every_share_exactly():
    # 150 labelled images repeat to fill an 800-sample epoch; two unlabelled sources take a quarter each
    s = EpochSampler(150, seed=0, epoch=2, batch_size=16, mix=((650, 0.25), (400, 0.25)), length=800)
    idx = np.asarray(s.indices)
    assert len(idx) == 800
    assert (idx < 150).sum() == 400 and ((idx >= 150) & (idx < 800)).sum() == 200 and (idx >= 800).sum() == 200
    seen = np.bincount(idx[idx < 150], minlength=150)
    assert idx.max() < 1200 and seen.min() >= 2 and seen.max() <= 3  # every labelled image, equally often (+-1)
    # no budget: the order the sampler had before the option existed, (seed, epoch)'s permutation
    assert EpochSampler(100, 0, 3, batch_size=4).indices == torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    # two ranks: disjoint shards of one mixed order
    r = [EpochSampler(150, 0, 2, rank=k, world=2, batch_size=8, mix=((650, 0.25),), length=800).indices for k in (0, 1)]
    assert sorted(r[0] + r[1]) == sorted(EpochSampler(150, 0, 2, batch_size=16, mix=((650, 0.25),), length=800).indices)


def test_the_labelled_subset_pool_and_site_frames(tiny_run, tmp_path):
    from edgeseg.distill.data import student_data

    site = _frames(tiny_run, tmp_path / "site")
    _, cfg = _config(tiny_run, tmp_path / "run", data={"labelled_count": 5, "unlabelled": str(site)},
                     train={"unlabelled_share": 0.5})
    d = student_data(cfg)
    assert len(d.labelled) == 5 and d.epoch_length == 16 and all(s.labelled for s in d.labelled)
    assert set(d.unlabelled) == {"pool", "site"} and len(d.unlabelled["pool"]) == 11 and len(d.unlabelled["site"]) == 6
    assert not any(s.labelled for items in d.unlabelled.values() for s in items)
    assert {s.image for s in d.labelled}.isdisjoint(s.image for s in d.unlabelled["pool"])
    assert [s.image for s in student_data(cfg).labelled] == [s.image for s in d.labelled]  # seeded
    # without a teacher corpus of its own the teacher learns from the labels there are, not the pool's masks
    from edgeseg.distill.data import split_samples

    assert [s.image for s in split_samples(cfg, "teacher")] == [s.image for s in d.labelled]
    # a folder called pool is another source, not a replacement of the train pool
    pool_dir = shutil.copytree(site, tmp_path / "x" / "pool")
    _, named = _config(tiny_run, tmp_path / "run2", data={"labelled_count": 5, "unlabelled": str(pool_dir)},
                       train={"unlabelled_share": 0.5})
    assert set(student_data(named).unlabelled) == {"pool", "unlabelled_pool"}
    baseline = Trainer(cfg, job_for(cfg, "baseline"))
    baseline._setup()
    assert baseline.data_summary()["labelled"] == 5 and baseline.sources == [] and baseline.data.epoch_length == 16
    student = Trainer(cfg, job_for(cfg, "student"))
    student._setup()
    assert {s.name: s.share for s in student.sources} == {"pool": 0.25, "site": 0.25}
    assert all(not s.labelled for s in student.sources)


def test_a_mixed_run_resumed_equals_an_uninterrupted_one(tiny_run, tmp_path):
    site = _frames(tiny_run, tmp_path / "site")
    sections = {"data": {"labelled_count": 8, "unlabelled": str(site)}, "train": {"unlabelled_share": 0.5}}
    _, straight = _config(tiny_run, tmp_path / "a", **sections)
    Trainer(straight, job_for(straight, "student")).run()
    _, resumed = _config(tiny_run, tmp_path / "b", **sections)
    Trainer(resumed, job_for(resumed, "student"), max_steps=3).run()
    torch.manual_seed(99)
    Trainer(resumed, job_for(resumed, "student")).run()
    a, b = load_checkpoint(tmp_path / "a" / "distill" / "last.pt"), load_checkpoint(tmp_path / "b" / "distill" / "last.pt")
    assert a["step"] == b["step"] == 8 and b["complete"]
    for name in a["student"]:
        assert torch.equal(a["student"][name], b["student"][name]), name
    lines = _records(tmp_path / "b")
    assert lines == _records(tmp_path / "a")
    last = lines[-1]
    for key in ("loss_kl_labelled", "loss_kl_unlabelled", "loss_feature_unlabelled", "loss_bce", "unlabelled_fraction"):
        assert key in last and np.isfinite(last[key]), key
    assert last["unlabelled_fraction"] == 0.5  # the share, exactly (8 of 16 slots an epoch)
    # a different label budget is another run: it does not silently resume this one
    _, other = _config(tiny_run, tmp_path / "b", data={"labelled_count": 4, "unlabelled": str(site)},
                       train={"unlabelled_share": 0.5})
    with pytest.raises(InputError, match="different settings .*data"):
        Trainer(other, job_for(other, "student")).run()


def test_bad_unlabelled_input_is_one_clear_line(tiny_run, tmp_path):
    path, _ = _config(tiny_run, tmp_path)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "frame.png").write_bytes(b"not a png")
    cases = ((("--unlabelled-share", "0.3"), "needs unlabelled images: set data.unlabelled"),
             (("--images", str(tmp_path / "empty"), "--unlabelled-share", "0.3"), "empty/images: no images found"),
             (("--images", str(bad), "--unlabelled-share", "0.3"), "frame.png: not a readable image"),
             (("--images", str(tmp_path / "nope"), "--unlabelled-share", "0.3"), "nope: folder of unlabelled images does not exist"),
             # the old spelling, kept hidden for one release: same value, one warning
             (("--unlabelled-share", "1.2", "--unlabelled", str(bad)), "train.unlabelled_share must be in [0, 1)"))
    for args, message in cases:
        r = run_cli("distill", "train", "--config", str(path), *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-800:])
        lines = r.stderr.strip().splitlines()  # info-level progress may come first; one error line, last
        assert [l for l in lines if l.startswith("error")] == lines[-1:], r.stderr
        assert ("warning: `--unlabelled` is renamed `--images`" in r.stderr) == ("--unlabelled" in args), r.stderr
    r = run_cli("distill", "train", "--config", str(path), "--set", "data.labelled_count=99")
    assert r.returncode != 0 and "labelled_count is 99 but the train split has 16 images" in r.stderr
    from edgeseg.distill.config import ConfigError, load_config
    from edgeseg.export.config import Config

    with pytest.raises(ConfigError, match="needs a teacher term"):
        load_config(path, Config, ["train.unlabelled_share=0.3", "data.labelled_count=8", "loss.kl=0", "loss.mse=0",
                                   "loss.feature=0"])


def test_demo_teacher_corpus_and_site_frames_are_their_own_images(tmp_path):
    from edgeseg.distill.demo_data import generate_demo_dataset

    root = generate_demo_dataset(tmp_path, (64, 64), 4, 2, test_count=2, test_shift_count=3, teacher_count=6,
                                 teacher_conditions=0.5, site_count=3)
    assert len(list((root / "teacher" / "masks").glob("*.png"))) == 6
    assert not (root / "site" / "masks").exists() and len(list((root / "site" / "images").glob("*.png"))) == 3
    read = lambda split, i: (root / split / "images" / f"{i:05d}.png").read_bytes()
    files = lambda split: {p.read_bytes() for p in (root / split / "images").glob("*.png")}
    assert files("site").isdisjoint(files("test_shift"))  # the same site, other frames
    assert files("teacher").isdisjoint(files("train") | files("val") | files("test"))  # the student never sees them
    # an old set (no teacher corpus, no site) keeps its stamp and its pixels
    old = generate_demo_dataset(tmp_path / "old", (64, 64), 4, 2)
    assert "teacher_count" not in json.loads((old / "demo.json").read_text())
    assert (old / "train" / "images" / "00000.png").read_bytes() == read("train", 0)


def test_the_demo_feature_teacher_is_a_detector_with_its_own_task(tiny_run, tmp_path):
    import onnx

    from edgeseg.distill.data import split_samples
    from edgeseg.distill.demo_feature_teacher import (DEMO_TENSOR, detection_targets, export_demo_feature_teacher,
                                                      train_demo_detector)
    from edgeseg.distill.feature_onnx import expose_tensor
    from edgeseg.distill.onnx_teacher import OnnxFeatureTeacher

    mask = np.zeros((64, 64), np.uint8)
    mask[4:36, 12:28] = 1  # one person: 32 high, 16 wide, centred at (20, 20): cell (2, 2)'s centre
    t = detection_targets(mask, (8, 8))
    assert np.unravel_index(t[0].argmax(), t[0].shape) == (2, 2) and t[0].max() > 0.9
    assert t[1, 2, 2] == pytest.approx(0.5) and t[2, 2, 2] == pytest.approx(0.25) and np.count_nonzero(t[1]) == 1
    _, cfg = tiny_run
    detector, summary = train_demo_detector(split_samples(cfg, "train"), (64, 64), epochs=3, batch_size=4)
    assert summary["steps"] == 12 and summary["final_loss"]["heatmap"] < 0.8 * summary["first_loss"]["heatmap"]
    out = export_demo_feature_teacher(detector, tmp_path / "det.onnx", (64, 64), summary)
    model = onnx.load(out)
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 64, 64] and isinstance(dims[0], str)  # fixed size, dynamic batch, as YOLOv9's export
    teacher = OnnxFeatureTeacher(expose_tensor(out, DEMO_TENSOR), "cpu", cfg.data.mean, cfg.data.std)
    assert teacher.feature_shape((64, 64)) == (96, 8, 8)
