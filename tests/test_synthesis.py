"""Synthesis that earns its place: the mask-conditioned generator, target-domain steering,
ConfiG hard examples and the training mix (tiny real models, real files)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, write_config
from edgeseg.calibration.config import DDPMConfig, GuidanceConfig, MaskSourceConfig, SamplerConfig
from edgeseg.distill.config import load_config
from edgeseg.export.config import Config
from edgeseg.runtime.errors import ConfigError, InputError

TINY_DDPM = {"image_size": 16, "block_out_channels": [8, 16], "train_steps": 3, "batch_size": 4}


@pytest.fixture(scope="module")
def tiny_cddpm(tiny_run, tmp_path_factory):
    from edgeseg.calibration.ddpm import load_training_masks, train_or_load
    from edgeseg.distill.data import split_samples

    _, cfg = tiny_run
    folder = tmp_path_factory.mktemp("cddpm") / "cddpm"
    unet, sched = train_or_load(DDPMConfig(**TINY_DDPM, prediction="sample"), split_samples(cfg, "train"), folder,
                                conditional=True)
    return unet, sched, load_training_masks(split_samples(cfg, "train"), 16)


@pytest.fixture(scope="module")
def centred_teacher(tiny_run, tmp_path_factory):
    """The tiny teacher with its output bias moved to its median logit on the tiny generator's images:
    about half the pixels become people, so its masks and condition IoUs vary (the random teacher's
    are all empty, which no recomputed figure could tell from a wrong one)."""
    from edgeseg.calibration.guidance import TeacherView
    from edgeseg.calibration.synth import Synthesizer, teacher_probabilities
    from edgeseg.distill.models import load_teacher

    _, cfg = _synth_config(tiny_run, tmp_path_factory.mktemp("centring"))
    images = np.stack([c.image for c in Synthesizer(cfg).generate_pool(8, progress=False)])
    teacher = load_teacher(cfg)
    p = teacher_probabilities(TeacherView(teacher, (64, 64), cfg.data.mean, cfg.data.std), images)
    with torch.no_grad():
        teacher.segmentation_head[0].bias -= float(np.log(np.median(p) / (1 - np.median(p))))
    path = tmp_path_factory.mktemp("teacher") / "best.pt"
    torch.save({"model": teacher.state_dict()}, path)
    return path


def _synth_config(tiny_run, run_dir, train=None, teacher=None, **calibration):
    _, base = tiny_run
    cal = {"generator": "conditional", "count": 4, "pool_factor": 1.5,
           "ddpm": {**TINY_DDPM, "prediction": "sample"}, "sampler": {"steps": 5, "batch_size": 4},
           "guidance": {"mode": "none", "t_start": 0.9, "t_stop": 0.5, "resolution": 32},
           "filter": {"min_person_fraction": 0.0, "max_uncertain_fraction": 1.0, "dedup_bits": 0,
                      "min_condition_iou": 0.0}}
    cal.update(calibration)
    path = write_config(run_dir, calibration=cal, data={"root": str(base.data_root)},
                        teacher={"checkpoint": str(teacher or base.teacher_checkpoint)},
                        feature_teacher={"onnx": str(base.feature_teacher_onnx), "tensor": "neck_Concat_output_0",
                                         "hidden_channels": 16}, **({"train": train} if train else {}))
    return path, load_config(path, Config)


# --- the mask-conditioned generator ----------------------------------------------------------------

def test_conditioned_generator_shapes_determinism_and_the_mask_reaches_the_output(tiny_cddpm):
    from edgeseg.calibration.ddpm import ConditionedUNet
    from edgeseg.calibration.masks import MaskSource
    from edgeseg.calibration.sampler import sample

    unet, sched, masks = tiny_cddpm
    assert unet.config.in_channels == 4 and sched["prediction_type"] == "sample"
    source = MaskSource(masks, MaskSourceConfig())
    m = source([3, 4])
    assert m.shape == (2, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(source([4]), m[1:])  # a mask is a function of its seed alone
    cfg, g = SamplerConfig(steps=4), GuidanceConfig(mode="none")
    a = sample(ConditionedUNet(unet, m), sched, [3, 4], cfg, g)
    b = sample(ConditionedUNet(unet, m[1:]), sched, [4], cfg, g)
    assert a.shape == (2, 3, 16, 16) and a.abs().max() <= 1
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)  # per-image determinism, any batch
    other = sample(ConditionedUNet(unet, 1 - m[1:]), sched, [4], cfg, g)  # same seed, another mask
    assert (other - b).abs().mean() > 1e-3


def test_mask_source_transforms_training_masks():
    from edgeseg.calibration.masks import MaskSource

    masks = torch.zeros(2, 1, 32, 32)
    masks[0, 0, 8:24, 12:20] = 1  # a standing figure
    src = MaskSource(masks, MaskSourceConfig(scale=(1.0, 1.0), shift=0.0, rotate=0.0, hflip=False, combine=0.0))
    assert torch.equal(src([1])[0], masks[0])  # identity transforms; the empty mask is never chosen
    moved = MaskSource(masks, MaskSourceConfig(shift=0.25, combine=1.0))([1, 2, 3])
    assert not all(torch.equal(m, masks[0]) for m in moved) and all(m.sum() > 0 for m in moved)
    with pytest.raises(InputError, match="no training mask has a person"):
        MaskSource(torch.zeros(2, 1, 8, 8), MaskSourceConfig())


def test_a_conditioning_mask_of_the_wrong_size_is_refused(tiny_cddpm):
    from edgeseg.calibration.ddpm import ConditionedUNet

    unet, _, _ = tiny_cddpm
    with pytest.raises(InputError, match=r"shape \(1, 1, 32, 32\) but the generator takes \(B, 1, 16, 16\); resize"):
        ConditionedUNet(unet, torch.zeros(1, 1, 32, 32))
    with pytest.raises(InputError, match="values must be 0 or 1"):
        ConditionedUNet(unet, torch.full((1, 1, 16, 16), 0.5))


def test_synth_writes_labelled_pairs_with_condition_iou_and_filters_on_it(tiny_run, centred_teacher, tmp_path):
    from edgeseg.calibration.guidance import TeacherView
    from edgeseg.calibration.masks import mask_iou
    from edgeseg.calibration.similarity import TrainIndex
    from edgeseg.calibration.synth import Synthesizer, teacher_probabilities
    from edgeseg.distill.data import folder_samples, load_sample, split_samples
    from edgeseg.distill.models import load_teacher
    from edgeseg.runtime.images import read_rgb
    from edgeseg.runtime.preprocess import fit_image

    _, cfg = _synth_config(tiny_run, tmp_path, teacher=centred_teacher)
    m = Synthesizer(cfg).run(tmp_path / "set")
    assert m["generator"]["kind"] == "conditional" and m["labels"] == "condition"
    assert len({e["condition_iou"] for e in m["images"]}) > 1  # precondition: the teacher's masks vary
    pairs = folder_samples(tmp_path / "set")  # images/ + masks/: a training split
    assert len(pairs) == 4 == m["counts"]["written"]
    # what the manifest records, recomputed from the files on disk: the teacher's mask of the written
    # image against the written label, and the nearest training image
    teacher = TeacherView(load_teacher(cfg), (64, 64), cfg.data.mean, cfg.data.std)
    train_paths = [s.image for s in split_samples(cfg, "train")]
    index = TrainIndex(np.stack([fit_image(read_rgb(p), (64, 64), "letterbox")[0] for p in train_paths]))
    loaded = [load_sample(pair) for pair in pairs]
    probs = teacher_probabilities(teacher, np.stack([image for image, _ in loaded]))
    for entry, (image, label), p in zip(m["images"], loaded, probs):
        assert label.shape == image.shape[:2] and label.max() == 1  # the conditioning mask, someone in it
        assert entry["condition_iou"] == pytest.approx(mask_iou(p > 0.5, label), abs=1e-12)
        near = index.nearest(image)
        assert entry["train_ssim"] == near["train_ssim"] and entry["train_nearest"] == train_paths[near["train_nearest"]].name
        assert "source_ssim" not in entry  # drawn from noise: no source image
    # every generated pair is accounted for: kept (passed every filter) + dropped = generated, and the
    # pairs not written (dropped, or surplus) wait in pool/ with their labels, named by pool index
    counts = m["counts"]
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["generated"] >= 6
    assert counts["surplus"] == counts["kept"] - counts["written"] and m["pass_rate"] == counts["kept"] / counts["generated"]
    rest = m["dropped"] + m["surplus"]
    assert len(rest) == counts["generated"] - counts["written"] > 0
    assert sorted(e["file"] for e in rest) == sorted(f"pool/images/{e['pool_index']:05d}.png" for e in rest)
    pool = sorted(p.name for p in (tmp_path / "set" / "pool" / "images").iterdir())
    assert pool == sorted(e["file"].split("/")[-1] for e in rest)
    assert pool == sorted(p.name for p in (tmp_path / "set" / "pool" / "masks").iterdir())
    # a threshold no pair can pass: every drop is a condition mismatch, and the request fails cleanly
    _, strict = _synth_config(tiny_run, tmp_path / "strict", max_extra_rounds=0,
                              filter={"min_person_fraction": 0.0, "max_uncertain_fraction": 1.0,
                                      "min_condition_iou": 1.0})
    with pytest.raises(InputError, match=r"condition_mismatch \d+"):
        Synthesizer(strict).run(tmp_path / "strict" / "set")
    assert not (tmp_path / "strict" / "set").exists()


# --- target-domain steering ---------------------------------------------------------------------

def _dark_noisy_targets(folder, n=4, size=64):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.clip(np.full((size, size, 3), [30, 20, 60]) + rng.normal(0, 12, (size, size, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"t{i}.png")
    return folder


def test_noise_estimate_by_construction():
    from edgeseg.calibration.target import noise_sigma

    rng = np.random.default_rng(0)
    flat = np.full((128, 128, 3), 128.0)
    for sigma in (2.0, 8.0):
        noisy = np.clip(flat + rng.normal(0, sigma, flat.shape[:2])[:, :, None], 0, 255).astype(np.uint8)
        assert noise_sigma(noisy) == pytest.approx(sigma, rel=0.15)


def test_target_steering_moves_colour_and_noise_towards_the_target(tiny_run, tmp_path):
    from edgeseg.calibration.synth import Synthesizer
    from edgeseg.calibration.target import TargetDomain, noise_sigma

    targets = _dark_noisy_targets(tmp_path / "targets")
    domain = TargetDomain.from_folder(targets, (64, 64), 16)
    _, cfg = _synth_config(tiny_run, tmp_path / "run")
    plain = Synthesizer(cfg).generate_pool(4, progress=False)
    steered = Synthesizer(cfg, target_images=targets).generate_pool(4, progress=False)
    goal = domain.mean.mean(dim=0).numpy()  # [-1, 1] units
    to_unit = lambda c: c.image.reshape(-1, 3).mean(axis=0) / 127.5 - 1
    dist = lambda cands: np.mean([np.abs(to_unit(c) - goal).mean() for c in cands])
    assert dist(steered) < 0.5 * dist(plain)
    target_noise = float(domain.noise.mean())
    assert np.mean([abs(noise_sigma(c.image) - target_noise) for c in steered]) < \
        np.mean([abs(noise_sigma(c.image) - target_noise) for c in plain])
    # the manifest records the steering, and how close each image came to any target image (not copied)
    m = Synthesizer(cfg, target_images=targets).run(tmp_path / "set", count=2)
    assert m["target"]["images"] == sorted(p.name for p in targets.iterdir())
    assert all(i["target"] in range(4) and i["target_ssim"] < 0.9 for i in m["images"])


def test_bad_target_folders_are_one_clear_line(tiny_run, tmp_path):
    from edgeseg.calibration.target import TargetDomain

    with pytest.raises(InputError, match="does not exist; point calibration.target.images"):
        TargetDomain.from_folder(tmp_path / "missing", (64, 64), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no images"):
        TargetDomain.from_folder(tmp_path / "empty", (64, 64), 16)
    bad = _dark_noisy_targets(tmp_path / "bad", n=1)
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        TargetDomain.from_folder(bad, (64, 64), 16)
    path, _ = _synth_config(tiny_run, tmp_path / "cli")
    r = run_cli("calibration", "synth", "--config", str(path), "--target-images", str(tmp_path / "empty"),
                "--out", str(tmp_path / "cli" / "out"))
    assert r.returncode != 0 and "has no images" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cli" / "out").exists()


# --- ConfiG -------------------------------------------------------------------------------------

def test_config_objective_gradient_ascends(tiny_run):
    """A step against the guide's gradient raises t^g + (1 - s)^g: the sign the sampler relies on."""
    from edgeseg.calibration.guidance import ConfidenceGuide, TeacherView
    from edgeseg.distill.models import build_model, load_teacher

    _, cfg = tiny_run
    teacher = TeacherView(load_teacher(cfg), (64, 64), cfg.data.mean, cfg.data.std)
    torch.manual_seed(1)
    student = TeacherView(build_model(cfg.student), (64, 64), cfg.data.mean, cfg.data.std)
    guide = ConfidenceGuide(teacher, student, gamma=2.0)
    x0 = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    loss, _ = guide(x0, torch.arange(2))
    assert loss.shape == (2,) and (loss < 0).all() and (loss >= -2).all()  # -objective, objective in (0, 2]
    (grad,) = torch.autograd.grad(loss.sum(), x0)
    assert grad.abs().sum() > 0
    after, _ = guide((x0 - 0.5 * grad / grad.abs().max()).detach(), torch.arange(2))
    assert (after < loss.detach()).all()


# --- the training mix ---------------------------------------------------------------------------

def test_epoch_sampler_mixes_an_exact_share_at_the_same_length():
    from edgeseg.distill.sampler import EpochSampler

    plain = EpochSampler(100, seed=0, epoch=3, batch_size=4)
    mixed = EpochSampler(100, seed=0, epoch=3, batch_size=4, mix=((10, 0.25), (5, 0.1)))
    idx = np.asarray(mixed.indices)
    assert len(idx) == len(plain.indices) == 100
    assert ((idx >= 100) & (idx < 110)).sum() == 25 and (idx >= 110).sum() == 10 and idx.max() < 115
    assert mixed.indices == EpochSampler(100, seed=0, epoch=3, batch_size=4, mix=((10, 0.25), (5, 0.1))).indices
    # two ranks: disjoint shards of the same mixed order
    r0, r1 = (EpochSampler(100, 0, 3, rank=r, world=2, batch_size=2, mix=((10, 0.25),)).indices for r in (0, 1))
    assert sorted(r0 + r1) == sorted(EpochSampler(100, 0, 3, batch_size=4, mix=((10, 0.25),)).indices)


def test_distill_with_extra_pairs_and_hard_examples(tiny_run, tmp_path):
    from edgeseg.calibration.hard_examples import hard_example_generator
    from edgeseg.calibration.synth import Synthesizer
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer

    _, cfg = _synth_config(tiny_run, tmp_path / "gen")
    Synthesizer(cfg).run(tmp_path / "pairs", count=4)
    train = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "vis_images": 2, "extra_data": str(tmp_path / "pairs"),
             "extra_share": 0.25, "hard_examples": {"share": 0.25, "count": 4, "every": 1, "start": 1, "t_start": 0.9, "t_stop": 0.3}}
    _, cfg = _synth_config(tiny_run, tmp_path / "run", train=train)
    job = job_for(cfg, "student")
    generators = {"hard_examples": hard_example_generator(cfg)}
    metrics = Trainer(cfg, job, generators=generators).run()
    records = [json.loads(line) for line in (job.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and metrics == records[-1]  # both epochs ran to the end
    hard = job.out_dir / "hard" / "epoch001"
    manifest = json.loads((hard / "manifest.json").read_text())
    assert manifest["guidance"]["mode"] == "confidence" and manifest["labels"] == "condition"
    assert manifest["guidance"]["student"] == "in memory (training)" and len(manifest["images"]) == 4
    assert not (job.out_dir / "hard" / "epoch000").exists()  # start: 1
    # each regeneration samples with its own seed range, (seed * 1009 + due epoch) * 100003 (one per
    # epoch, far apart); the cached generator keeps calibration.seed
    assert manifest["seed"] == (cfg.seed * 1_009 + 1) * 100_003
    assert all(i["seed"] == manifest["seed"] + i["pool_index"] for i in manifest["images"])
    ddpm = json.loads((cfg.stage_dir("calibration") / "cddpm" / "ddpm.json").read_text())
    assert ddpm["key"]["seed"] == cfg.calibration.seed and ddpm["key"]["conditional"] is True
    # a resumed run reuses the set of its epoch (same bytes), it does not regenerate it
    before = {p.name: p.read_bytes() for p in (hard / "images").iterdir()}
    again = Trainer(cfg, job, generators=generators)
    again._setup()
    again.epoch = 1
    _, mix = again._epoch_data()
    assert {p.name: p.read_bytes() for p in (hard / "images").iterdir()} == before and mix[-1] == (4, 0.25)
    # without the generator wired in, hard examples are one clear error, not a silent skip
    with pytest.raises(InputError, match="needs calibration's generator"):
        Trainer(cfg, job)._setup()


def test_bad_shares_are_one_clear_line(tiny_run, tmp_path):
    path, _ = _synth_config(tiny_run, tmp_path)
    for args, message in ((("--hard-examples", "1.5"), "train.hard_examples.share must be in [0, 1), got 1.5"),
                          (("--extra-share", "-0.1", "--extra-data", str(tmp_path)), "train.extra_share must be in [0, 1)"),
                          (("--extra-share", "0.2"), "extra_share > 0 needs a folder of pairs")):
        r = run_cli("distill", "train", "--config", str(path), *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="extra_data .* is used only with a share > 0"):
        load_config(path, Config, [f"train.extra_data={tmp_path}"])
    r = run_cli("distill", "train", "--config", str(path), "--extra-data", str(tmp_path / "nope"), "--extra-share", "0.2")
    assert r.returncode != 0 and "nope/images: folder does not exist" in r.stderr and "Traceback" not in r.stderr


def test_report_judges_labels_on_the_set_and_the_pool_and_sets_similarity_beside_held_out_images(tiny_run, centred_teacher,
                                                                                                tmp_path):
    from skimage.metrics import structural_similarity

    from edgeseg.calibration.guidance import TeacherView
    from edgeseg.calibration.masks import mask_iou
    from edgeseg.calibration.report import build_report, real_images
    from edgeseg.calibration.similarity import TrainIndex, _grey
    from edgeseg.calibration.synth import Synthesizer, load_calibration_images, teacher_probabilities
    from edgeseg.distill.data import read_mask, split_samples
    from edgeseg.distill.models import build_model, load_model
    from edgeseg.runtime.images import read_rgb

    # a condition filter at the first round's median IoU: part of the pool is dropped, so pool != set
    _, probe = _synth_config(tiny_run, tmp_path / "probe", teacher=centred_teacher)
    ious = sorted(c.condition_iou for c in Synthesizer(probe).generate_pool(6, progress=False))
    flt = {"min_person_fraction": 0.0, "max_uncertain_fraction": 1.0, "dedup_bits": 0, "min_condition_iou": ious[3]}
    _, cfg = _synth_config(tiny_run, tmp_path, teacher=centred_teacher, report_images=4, filter=flt)
    calib = tmp_path / "calibration" / "synthetic"
    m = Synthesizer(cfg).run(calib)
    assert m["counts"]["dropped"]["condition_mismatch"] > 0
    torch.manual_seed(0)
    student = build_model(cfg.student).eval()
    # the judge, centred like the teacher (a random one finds nobody): about half the set's pixels are people
    p = teacher_probabilities(TeacherView(student, (64, 64), cfg.data.mean, cfg.data.std),
                              load_calibration_images(calib, (64, 64)))
    with torch.no_grad():
        student.segmentation_head[0].bias -= float(np.log(np.median(p) / (1 - np.median(p))))
    for stage in ("distill", "distill-baseline"):
        (tmp_path / stage).mkdir()
        torch.save({"student": student.state_dict()}, tmp_path / stage / "best.pt")
    r = build_report(cfg, calib)
    # INT8 mIoU is measured once, by the export on the models it ships: the report points there
    assert not [k for k in r if k.startswith("int8_miou_")] and r["int8_miou"]["see"].endswith("export/accuracy.json")
    assert r["counts"] == m["counts"] and r["pass_rate"] == m["counts"]["kept"] / m["counts"]["generated"]
    # the teacher's condition IoU on the set and on every generated pair (the manifest's figures)
    pool = m["images"] + m["dropped"] + m["surplus"]
    assert len(pool) == r["condition_pool_pairs"] == m["counts"]["generated"]
    assert r["condition_iou_median"] == pytest.approx(float(np.median([e["condition_iou"] for e in m["images"]])))
    assert r["condition_iou_pool_median"] == pytest.approx(float(np.median([e["condition_iou"] for e in pool])))
    # the ground-truth-only student judges again, from the files: the set, and the pool before any filter
    judge = TeacherView(load_model(cfg.student, tmp_path / "distill-baseline" / "best.pt", keys=("student",)), (64, 64),
                        cfg.data.mean, cfg.data.std)

    def judged(entries):
        probs = teacher_probabilities(judge, np.stack([read_rgb(calib / e["file"]) for e in entries]))
        return [mask_iou(p > 0.5, read_mask(calib / e["file"].replace("images/", "masks/"))) for p, e in zip(probs, entries)]

    on_set = judged(m["images"])
    assert len(set(on_set)) > 1  # precondition: the judge's masks vary
    assert r["condition_judge"] == str(tmp_path / "distill-baseline" / "best.pt")
    assert r["condition_iou_gt_only_student_set_median"] == pytest.approx(float(np.median(on_set)))
    assert r["condition_iou_gt_only_student_pool_median"] == pytest.approx(
        float(np.median(on_set + judged(m["dropped"] + m["surplus"]))))
    sheet = np.asarray(Image.open(r["pairs_sheet"]))
    assert sheet.shape[0] == 2 * 64 and sheet.shape[1] == 2 * (3 * 64 + 4 * 4)  # 4 pairs, two a row
    # held-out test images through the same nearest-training-image search as the synthetic ones
    train_paths = [s.image for s in split_samples(cfg, "train")]
    index = TrainIndex(real_images(train_paths, len(train_paths), (64, 64)))
    held_out = real_images([s.image for s in split_samples(cfg, "test")], 4, (64, 64))
    assert r["held_out_train_ssim_split"] == "test" and r["held_out_train_ssim_images"] == 4
    assert r["held_out_train_ssim_median"] == pytest.approx(float(np.median([index.nearest(i)["train_ssim"] for i in held_out])))
    # how often the thumbnail shortlist misses the exact nearest: brute force with scikit-image here
    exact = lambda img: max(structural_similarity(_grey(img), g, data_range=255) for g in index.grey)
    search = r["nearest_search"]
    assert search["training_images"] == len(train_paths) == 16 and "8 training images" in search["method"]
    for kind, images in (("synthetic", load_calibration_images(calib, (64, 64))), ("held_out", held_out)):
        best = [exact(i) for i in images]
        gaps = [b - index.nearest(i)["train_ssim"] for b, i in zip(best, images)]
        assert search["checked"][kind] == len(images) and search["missed"][kind] == sum(g > 1e-6 for g in gaps), kind
        assert search["exact_train_ssim_median"][kind] == pytest.approx(float(np.median(best)), abs=1e-6)
    assert search["miss_rate"] == sum(search["missed"].values()) / 8


def test_the_baseline_never_trains_on_synthetic_pairs_and_a_misnamed_target_folder_fails_at_export(tiny_run, tmp_path):
    from edgeseg.distill.job import job_for
    from edgeseg.export.int8 import target_sources

    train = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "extra_data": str(tmp_path), "extra_share": 0.3,
             "hard_examples": {"share": 0.2}}
    _, cfg = _synth_config(tiny_run, tmp_path, train=train)
    student, baseline = job_for(cfg, "student"), job_for(cfg, "baseline")
    assert student.train.extra_share == 0.3 and student.train.hard_examples.share == 0.2
    assert baseline.train.extra_share == 0 and baseline.train.hard_examples.share == 0  # ground truth alone
    assert "target_images" in target_sources(cfg)  # the demo's 8 images
    _, named = _synth_config(tiny_run, tmp_path / "named", target={"images": str(tmp_path / "typo")})
    with pytest.raises(InputError, match="typo: target-image folder does not exist"):
        target_sources(named)


def test_a_fresh_run_drops_hard_examples_made_for_another_student(tiny_run, tmp_path):
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer

    _, cfg = _synth_config(tiny_run, tmp_path, train={"epochs": 1, "batch_size": 4, "hard_examples": {"share": 0.2}})
    job = job_for(cfg, "student")
    (job.out_dir / "hard" / "epoch002").mkdir(parents=True)
    (job.out_dir / "hard" / "epoch002" / "manifest.json").write_text("{}")
    assert Trainer(cfg, job, fresh=True)._resume() is False
    assert not (job.out_dir / "hard").exists()


def test_hard_examples_need_a_from_noise_generator_checked_at_load(tiny_run, tmp_path):
    path, _ = _synth_config(tiny_run, tmp_path)
    with pytest.raises(ConfigError, match="calibration.ddpm.max_t.*hard_examples needs a generator"):
        load_config(path, Config, ["train.hard_examples.share=0.2", "calibration.generator=ddpm",
                                   "calibration.img2img_strength=0.4", "calibration.ddpm.max_t=0.5"])
    with pytest.raises(ConfigError, match="synthetic pairs are for the student"):
        load_config(path, Config, ["teacher_train.hard_examples.share=0.2"])


# --- the shipped, pretrained generator -------------------------------------------------------------

def test_pretrained_generator_resumes_exactly_ships_fp16_and_is_loaded_not_retrained(tiny_run, tmp_path):
    """make generator: a run stopped at a checkpoint and resumed ships the same weights as one that never
    stopped; the weights are fp16 with their SHA-256 checked on load; calibration.model loads it as is."""
    from safetensors.torch import load_file

    from edgeseg.calibration.generator import WEIGHTS, load_pretrained, pretrain
    from edgeseg.calibration.synth import Synthesizer
    from edgeseg.distill.data import split_samples

    _, cfg = tiny_run
    ddpm = DDPMConfig(**{**TINY_DDPM, "train_steps": 4})
    samples = split_samples(cfg, "train")
    whole = pretrain(ddpm, samples, tmp_path / "whole", seed=3, command="edgeseg calibration generator", checkpoint_every=2)
    assert not (tmp_path / "whole.partial").exists() and whole["pretrained"] and whole["key"]["images"] == len(samples)
    # the interrupted run: its checkpoint after two of the four steps, then `make generator` again
    from edgeseg.calibration.ddpm import DDPMTraining

    first = DDPMTraining(ddpm, samples, seed=3, conditional=True)
    first.train(range(0, 2))
    (tmp_path / "resumed.partial").mkdir()
    torch.save({"key": whole["key"], "training": first.state_dict(), "seconds": 1.0},
               tmp_path / "resumed.partial" / "state.pt")
    resumed = pretrain(ddpm, samples, tmp_path / "resumed", seed=3, command="c", checkpoint_every=2)
    assert resumed["sha256"] == whole["sha256"]  # bit-identical fp16 weights
    weights = load_file(str(tmp_path / "whole" / WEIGHTS))
    assert all(v.dtype == torch.float16 for v in weights.values())
    unet, sched = load_pretrained(tmp_path / "whole")
    assert next(unet.parameters()).dtype == torch.float32 and sched["num_train_timesteps"] == ddpm.timesteps

    # calibration.model points at it: the synthesizer loads it (no cddpm trained in the run folder)
    path, run = _synth_config(tiny_run, tmp_path / "run", model=str(tmp_path / "whole"), ddpm=TINY_DDPM)
    synth = Synthesizer(run)
    synth.generate_pool(2, progress=False)
    assert synth.generator_info["checkpoint_sha256"] == whole["sha256"]
    assert not (run.stage_dir("calibration") / "cddpm").exists()

    # a damaged file is one clear line naming it and the fix
    blob = bytearray((tmp_path / "whole" / WEIGHTS).read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "whole" / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(InputError, match=r"diffusion_pytorch_model.safetensors: SHA-256 .* `make generator`"):
        load_pretrained(tmp_path / "whole")


def test_shipped_demo_generator_is_complete_and_matches_its_record():
    """The checkpoint in the repository is the one ddpm.json describes (hash, command, training data size)."""
    from edgeseg.calibration.generator import SHIPPED, WEIGHTS, resolve
    from edgeseg.runtime.files import sha256_file

    meta = json.loads((SHIPPED / "ddpm.json").read_text())
    assert resolve("demo") == SHIPPED and meta["pretrained"] and meta["command"].startswith("edgeseg calibration generator")
    assert sha256_file(SHIPPED / WEIGHTS) == meta["sha256"]
    assert (SHIPPED / WEIGHTS).stat().st_size < 8 * 2**20  # small enough for git
    assert meta["key"]["config"]["train_steps"] >= 2000 and meta["key"]["conditional"]


def test_kid_is_near_zero_within_a_distribution_and_grows_with_a_shift():
    from edgeseg.calibration.quality import kid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same, _ = kid(a, b)
    small, _ = kid(a + 0.3, b)
    large, _ = kid(a + 1.0, b)
    assert abs(same) < 0.05 and 0 < small < large and large > 10 * abs(same)


def test_sampling_in_nhwc_draws_the_nchw_images_and_the_bench_compares_them(tiny_run, tmp_path, tiny_cddpm):
    from benchmarks.bench_calibration import bench_layout
    from edgeseg.calibration.ddpm import ConditionedUNet
    from edgeseg.calibration.sampler import sample

    from edgeseg.calibration.masks import MaskSource

    unet, sched, masks = tiny_cddpm
    cond = ConditionedUNet(unet, MaskSource(masks, MaskSourceConfig())([1, 2, 3]))
    kw = dict(sampler=SamplerConfig(steps=4, batch_size=3), guidance=GuidanceConfig(mode="none"))
    nchw = sample(cond, sched, [1, 2, 3], kw["sampler"], kw["guidance"], channels_last=False)
    nhwc = sample(cond, sched, [1, 2, 3], kw["sampler"], kw["guidance"])
    assert nhwc.is_contiguous(memory_format=torch.channels_last) or nhwc.shape[-1] == 1
    assert torch.allclose(nchw, nhwc, atol=1e-4)  # the layout moves no pixel beyond float rounding
    _, cfg = _synth_config(tiny_run, tmp_path)
    out = bench_layout(cfg, rounds=2, batch=2)
    t = out["layout_timings"]
    assert out["channels_last_sampling_speedup"] == pytest.approx(t["nchw"]["median_ms"] / t["nhwc"]["median_ms"])
