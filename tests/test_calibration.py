"""Calibration: filters, guidance maths, the sampler, the DDPM and pipeline generators, synth and report."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeseg.calibration.filters import Confidence, SetFilter, dhash, hamming, teacher_confidence
from edgeseg.calibration.guidance import ConfidenceGuide, ModeGuide, TaskGuide, TeacherView, binary_entropy, kmeans, medoids
from edgeseg.calibration.sampler import guidance_scale, guided_eps, normalise_gradient, predicted_x0, sample
from edgeseg.calibration.synth import Synthesizer, check_request, load_calibration_images
from edgeseg.calibration.config import DDPMConfig, FilterConfig, GuidanceConfig, SamplerConfig
from edgeseg.distill.config import load_config
from edgeseg.export.config import Config
from edgeseg.distill.models import UnetSegmenter
from edgeseg.runtime.errors import InputError
from tests.conftest import run_cli, write_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- filters -------------------------------------------------------------------------------------

def test_dhash_is_stable_and_hamming_counts_bits():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert dhash(img) == dhash(img.copy())
    assert hamming(0b1011, np.array([0b0001, 0b1011])).tolist() == [2, 0]
    assert hamming(dhash(img), dhash(255 - img))[0] > 32  # inverted gradients flip most bits


def test_set_filter_drops_by_reason():
    good = Confidence(person_fraction=0.2, uncertain_fraction=0.01, confidence=0.9)
    rng = np.random.default_rng(1)
    a, b, val = (rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3))
    flt = SetFilter(FilterConfig(min_person_fraction=0.05, max_uncertain_fraction=0.1, dedup_bits=4, leak_bits=6),
                    [dhash(val)])
    assert flt.check(a, Confidence(0.01, 0.0, 0.99))[0] == "empty_mask"
    assert flt.check(a, Confidence(0.3, 0.5, 0.6))[0] == "uncertain_mask"
    assert flt.check(val, good)[0] == "validation_leak"
    assert flt.check(a, good)[0] is None
    assert flt.check(a.copy(), good)[0] == "near_duplicate"
    assert flt.check(b, good, condition_iou=0.49)[0] == "condition_mismatch"  # min_condition_iou 0.5
    assert flt.check(b, good, condition_iou=0.5)[0] is None
    assert flt.dropped == {"empty_mask": 1, "uncertain_mask": 1, "condition_mismatch": 1, "near_duplicate": 1,
                           "validation_leak": 1, "train_copy": 0}


def test_teacher_confidence_by_hand():
    p = np.array([[[0.9, 0.1], [0.5, 0.6]]])
    c = teacher_confidence(p)[0]
    assert c.person_fraction == pytest.approx(0.5)  # 0.9, 0.6
    assert c.uncertain_fraction == pytest.approx(0.5)  # 0.5, 0.6
    assert c.confidence == pytest.approx((0.9 + 0.9 + 0.5 + 0.6) / 4)


# --- guidance maths ------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, t, expected", [
    ("constant", 0.7, 0.4), ("linear", 0.9, 0.4), ("linear", 0.7, 0.2), ("linear", 0.5, 0.0),
    ("cosine", 0.7, 0.2), ("constant", 0.95, 0.0), ("constant", 0.3, 0.0),
])
def test_guidance_scale_schedule(schedule, t, expected):
    g = GuidanceConfig(scale=0.4, schedule=schedule, t_start=0.9, t_stop=0.5)
    assert guidance_scale(g, t) == pytest.approx(expected, abs=1e-9)


def test_normalise_gradient_unit_rms_then_clip():
    g = torch.tensor([[3.0, 4.0, 0.0, 0.0]]).view(1, 1, 2, 2) * 100
    n = normalise_gradient(g, clip=10.0)
    assert n.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-6)
    assert normalise_gradient(g, clip=1.0).abs().max().item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_teacher():
    torch.manual_seed(0)
    return TeacherView(UnetSegmenter("tu-test_efficientnet", (16, 8, 8, 8)).eval(), (32, 32), MEAN, STD)


def test_guided_noise_moves_x0_down_the_task_loss(tiny_teacher):
    torch.manual_seed(0)
    x, eps = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    a = torch.tensor(0.5)
    guide = TaskGuide(tiny_teacher)
    idx = torch.arange(2)
    eps_hat = guided_eps(x, eps, a, guide, idx, GuidanceConfig(diversity=0.0, grad_clip=10.0), scale=0.05)
    with torch.no_grad():
        before = guide(predicted_x0(x, eps, a), idx)[0]
        after = guide(predicted_x0(x, eps_hat, a), idx)[0]
    assert (after < before).all()


def test_confidence_objective_by_hand():
    class Const(torch.nn.Module):
        def __init__(self, logit):
            super().__init__()
            self.logit = logit

        def __call__(self, x):
            return torch.full((x.shape[0], 1, 4, 4), self.logit), torch.zeros(x.shape[0], 2)

    guide = ConfidenceGuide(Const(20.0), Const(0.0), gamma=2.0)  # teacher sure, student at 0.5
    loss, _ = guide(torch.zeros(1, 3, 4, 4), torch.arange(1))
    assert loss.item() == pytest.approx(-(1.0 ** 2 + 0.5 ** 2), abs=1e-6)


def test_mode_guide_is_zero_at_its_prototype_and_entropy_by_hand():
    class Emb(torch.nn.Module):
        def __call__(self, x):
            return None, x.flatten(1)[:, :2]

    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    guide = ModeGuide(Emb(), protos, torch.tensor([1, 0]))
    x = torch.zeros(2, 3, 1, 1)
    x[0, 1] = 2.0  # embedding (0, 2): mode 1
    x[1, 0] = 3.0  # embedding (3, 0): mode 0
    loss, _ = guide(x, torch.arange(2))
    assert loss.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert binary_entropy(torch.tensor(0.5)).item() == pytest.approx(np.log(2), abs=1e-6)


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))])
    centres, labels = kmeans(x, 2, seed=0)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] != labels[20]
    m = medoids(x, centres, labels)
    assert sorted(labels[m].tolist()) == [0, 1]


# --- the sampler and the DDPM --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ddpm(tiny_run, tmp_path_factory):
    from edgeseg.calibration.ddpm import train_or_load
    from edgeseg.distill.data import split_samples

    _, cfg = tiny_run
    folder = tmp_path_factory.mktemp("ddpm") / "ddpm"
    ddpm = DDPMConfig(image_size=16, block_out_channels=(8, 16), train_steps=3, batch_size=4)
    unet, sched = train_or_load(ddpm, split_samples(cfg, "train"), folder)
    return unet, sched, folder, ddpm


def test_ddpm_is_cached(tiny_run, tiny_ddpm):
    from edgeseg.calibration.ddpm import train_or_load
    from edgeseg.distill.data import split_samples

    _, cfg = tiny_run
    unet, _, folder, ddpm = tiny_ddpm
    stamp = (folder / "ddpm.json").stat().st_mtime_ns
    again, _ = train_or_load(ddpm, split_samples(cfg, "train"), folder)
    assert (folder / "ddpm.json").stat().st_mtime_ns == stamp
    for a, b in zip(unet.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_ddpm_cache_key_follows_image_contents(tiny_run, tmp_path):
    import shutil

    from edgeseg.calibration.ddpm import _images_fingerprint
    from edgeseg.distill.data import split_samples

    _, cfg = tiny_run
    samples = split_samples(cfg, "train")[:3]
    copies = []
    for s in samples:
        dst = tmp_path / s.image.name
        shutil.copyfile(s.image, dst)
        copies.append(type(s)(**{**s.__dict__, "image": dst}))
    before = _images_fingerprint(copies)
    data = bytearray(copies[1].image.read_bytes())
    data[-20] ^= 0xFF  # same name, same size, other content
    copies[1].image.write_bytes(bytes(data))
    assert copies[1].image.stat().st_size == samples[1].image.stat().st_size
    assert _images_fingerprint(copies) != before


def test_sampling_is_per_image_deterministic(tiny_ddpm):
    unet, sched, _, _ = tiny_ddpm
    cfg, g = SamplerConfig(steps=5), GuidanceConfig(mode="none")
    a = sample(unet, sched, [7, 8], cfg, g)
    b = sample(unet, sched, [8], cfg, g)
    assert a.shape == (2, 3, 16, 16) and a.abs().max() <= 1
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)  # seed 8 alone = seed 8 in a batch
    init = torch.zeros(2, 3, 16, 16)
    stats = {}
    sample(unet, sched, [1, 2], cfg, g, init=init, strength=0.6, stats=stats)
    assert stats["steps"] == 3  # img2img skips the noisiest 40% of the steps


# --- synth ---------------------------------------------------------------------------------------

def _cal_config(tiny_run, run_dir, **calibration):
    _, base = tiny_run
    cal = {"generator": "ddpm", "count": 6, "pool_factor": 1.5, "img2img_strength": 0.6,
           "ddpm": {"image_size": 16, "block_out_channels": [8, 16], "train_steps": 3, "batch_size": 4},
           "sampler": {"steps": 6, "batch_size": 4},
           "guidance": {"mode": "task", "t_start": 0.6, "t_stop": 0.3, "resolution": 32},
           "filter": {"min_person_fraction": 0.0, "max_uncertain_fraction": 1.0, "dedup_bits": 0}}
    cal.update(calibration)
    path = write_config(run_dir, calibration=cal, data={"root": str(base.data_root)},
                        teacher={"checkpoint": str(base.teacher_checkpoint)})
    return path, load_config(path, Config)


def test_synth_writes_a_reproducible_set_with_manifest(tiny_run, tmp_path):
    from edgeseg.runtime.files import sha256_file
    from edgeseg.runtime.images import read_rgb

    path, cfg = _cal_config(tiny_run, tmp_path)
    m1 = Synthesizer(cfg).run(tmp_path / "a")
    m2 = Synthesizer(cfg).run(tmp_path / "b")
    files = sorted((tmp_path / "a" / "images").glob("*.png"))
    assert len(files) == 6 and m1["counts"]["written"] == 6 and m1["counts"]["generated"] == 9
    for f in files:  # same config and seeds -> the same bytes
        assert f.read_bytes() == (tmp_path / "b" / "images" / f.name).read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    # the manifest says what made the set: the teacher's and the generator's weights, by hash ...
    assert manifest["teacher_sha256"] == sha256_file(cfg.teacher_checkpoint)
    weights = next((cfg.stage_dir("calibration") / "ddpm" / "unet").glob("*.safetensors"))
    assert manifest["generator"]["checkpoint_sha256"] == sha256_file(weights) and manifest["generator"]["kind"] == "ddpm"
    assert manifest["guidance"]["mode"] == "task" and manifest["seed"] == cfg.calibration.seed
    # ... each image's file, seed (base seed + pool index) and perceptual hash, read back from the file ...
    assert [i["file"] for i in manifest["images"]] == [f"images/{k:05d}.png" for k in range(6)]
    assert all(i["seed"] == cfg.calibration.seed + i["pool_index"] for i in manifest["images"])
    assert all(i["dhash"] == f"{dhash(read_rgb(tmp_path / 'a' / i['file'])):016x}" for i in manifest["images"])
    # ... and the measured counts: every generated image kept (passed every filter) or dropped for a reason
    c = manifest["counts"]
    assert c["kept"] + sum(c["dropped"].values()) == c["generated"] and len(manifest["dropped"]) == sum(c["dropped"].values())
    assert c["surplus"] == c["kept"] - c["written"] == len(manifest["surplus"])
    assert not (tmp_path / "a" / "pool").exists()  # unlabelled (ddpm) sets keep no pool: nothing to judge
    imgs = load_calibration_images(tmp_path / "a", (64, 64))
    assert imgs.shape == (6, 64, 64, 3)
    assert m1["counts"] == m2["counts"]


def test_synth_teacher_masks_make_a_training_split(tiny_run, tmp_path):
    from edgeseg.distill.data import folder_samples

    _, cfg = _cal_config(tiny_run, tmp_path, count=3)
    Synthesizer(cfg, guidance="mode").run(tmp_path / "hard", teacher_masks=True)
    assert len(folder_samples(tmp_path / "hard")) == 3


def test_synth_refuses_bad_requests(tiny_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_bytes(b"x")
    with pytest.raises(InputError, match=r"full: exists and is not empty; pass --overwrite"):
        check_request(tmp_path / "full", 4, "task", False, None)
    with pytest.raises(InputError, match=r"--count must be >= 1, got 0"):
        check_request(tmp_path / "new", 0, "task", False, None)
    with pytest.raises(InputError, match=r"guidance 'confidence' needs a student checkpoint"):
        check_request(tmp_path / "new", 4, "confidence", False, tmp_path / "missing.pt")


def test_calibration_folder_errors(tmp_path):
    from PIL import Image

    with pytest.raises(InputError, match=r"calibration folder does not exist"):
        load_calibration_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"calibration folder has no images"):
        load_calibration_images(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "odd" / "a.png")
    with pytest.raises(InputError, match=r"a.png: calibration image is 64x48 but the model takes 64x64"):
        load_calibration_images(tmp_path / "odd", (64, 64))


def test_cli_bad_inputs_are_one_line(tiny_run, tmp_path):
    path, _ = _cal_config(tiny_run, tmp_path, generator="pipeline", model=str(tmp_path))
    r = run_cli("calibration", "synth", "--config", str(path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not a diffusers pipeline (no model_index.json)" in r.stderr.strip().splitlines()[-1]
    r = run_cli("calibration", "synth", "--config", str(path), "--count", "0")
    assert r.returncode == 2 and "--count must be >= 1" in r.stderr
    r = run_cli("calibration", "report", "--config", str(path), "--calibration", str(tmp_path / "none"))
    assert r.returncode == 2 and "calibration folder does not exist" in r.stderr


def test_report_compares_synthetic_real_and_noise(tiny_run, tmp_path):
    from PIL import Image

    from edgeseg.calibration.report import build_report
    from edgeseg.distill.models import build_model

    path, cfg = _cal_config(tiny_run, tmp_path, report_images=4)
    Synthesizer(cfg).run(tmp_path / "calibration" / "synthetic")
    (tmp_path / "distill").mkdir()
    torch.save({"student": build_model(cfg.student).state_dict()}, tmp_path / "distill" / "best.pt")
    r = build_report(cfg, tmp_path / "calibration" / "synthetic")
    assert r["counts"]["written"] == 6 and r["tensors"] > 10
    assert (tmp_path / "calibration" / "report.json").is_file()
    assert (tmp_path / "calibration" / "contact_sheet.png").is_file()

    # coverage by its definition, on every tensor small enough that the report reads all its values:
    # the share of held-out activations inside the [min, max] that set calibrates
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import _TENSOR_SAVE_POSTFIX, modify_model_output_intermediate_tensors

    from edgeseg.calibration.quantize import batches_of
    from edgeseg.calibration.report import noise_images, real_images
    from edgeseg.distill.data import split_samples
    from edgeseg.distill.models import load_model
    from edgeseg.distill.onnx_export import export_module
    from edgeseg.runtime.preprocess import normalise_batch

    student = load_model(cfg.student, tmp_path / "distill" / "best.pt", keys=("student",))
    export_module(student, tmp_path / "s.onnx", torch.zeros(1, 3, 64, 64), ["images"], ["mask_logits"])
    modify_model_output_intermediate_tensors(str(tmp_path / "s.onnx"), str(tmp_path / "s.aug.onnx"))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "s.aug.onnx"), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.name.endswith(_TENSOR_SAVE_POSTFIX)]

    def activations(images):  # tensor -> every value over the images (one batch: at most 16 here)
        (batch,) = batches_of(images, lambda b: normalise_batch(b, cfg.data.mean, cfg.data.std))
        return {n[: -len(_TENSOR_SAVE_POSTFIX)]: v for n, v in zip(names, session.run(names, {"images": batch}))}

    train = [s.image for s in split_samples(cfg, "train")]
    sets = {"synthetic": load_calibration_images(tmp_path / "calibration" / "synthetic", (64, 64)),
            "real": real_images(train, 6, (64, 64)), "noise": noise_images(6, (64, 64), cfg.calibration.seed)}
    held = activations(real_images([s.image for s in split_samples(cfg, "test")], 4, (64, 64)))
    acts = {k: activations(v) for k, v in sets.items()}
    checked = 0
    for row in r["per_tensor"]:
        v = held[row["tensor"]]
        if v.size >= 2 * 65536:  # the report samples larger tensors
            continue
        for k, a in acts.items():
            inside = (v >= a[row["tensor"]].min()) & (v <= a[row["tensor"]].max())
            assert row[f"coverage_{k}"] == pytest.approx(inside.mean(), abs=1e-12), (row["tensor"], k)
        checked += 1
    assert checked >= 10
    for k in sets:  # the report's figure is the mean over tensors; SQNR the median
        assert r[f"coverage_{k}"] == pytest.approx(np.mean([row[f"coverage_{k}"] for row in r["per_tensor"]]))
        assert r[f"sqnr_db_{k}"] == pytest.approx(np.median([row[f"sqnr_db_{k}"] for row in r["per_tensor"]
                                                             if row[f"sqnr_db_{k}"] is not None]))

    # A set of one flat grey image: its calibrated ranges are narrow, so held-out activations are clipped
    # (coverage below the real set's), its INT8 model's SQNR on them far below, its histograms far off
    flat = tmp_path / "flat_set" / "images"
    flat.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(flat / f"{i:05d}.png")
    r = build_report(cfg, flat.parent, out_dir=tmp_path / "report_flat")
    assert r["coverage_synthetic"] < r["coverage_real"] - 0.1  # measured: 0.81 vs 1.00
    assert r["sqnr_db_synthetic"] < r["sqnr_db_real"] - 10  # 3.1 vs 22.9 dB
    assert r["hist_kl_synthetic"] > 5 * r["hist_kl_real"]  # 1.9 vs 0.10

    # A set made of the held-out images themselves: its ranges are the held-out ranges, so nothing
    # is clipped (coverage exactly 1) and its histograms are the held-out ones (KL 0). That fixes
    # the ordering against the real and noise sets, whatever the model.
    held_out = real_images([s.image for s in split_samples(cfg, "test")], cfg.calibration.report_images,
                           cfg.data.image_size)
    same = tmp_path / "held_out_set" / "images"
    same.mkdir(parents=True)
    for i, img in enumerate(held_out):
        Image.fromarray(img).save(same / f"{i:05d}.png")
    r = build_report(cfg, same.parent, out_dir=tmp_path / "report2")
    assert r["coverage_synthetic"] == 1.0
    assert r["hist_kl_synthetic"] == pytest.approx(0.0, abs=1e-12)
    assert r["coverage_synthetic"] >= max(r["coverage_real"], r["coverage_noise"])
    assert r["hist_kl_synthetic"] < min(r["hist_kl_real"], r["hist_kl_noise"])


# --- the diffusers pipeline generator --------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte-to-character table (to write a tiny offline CLIP vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion pipeline built from config (random weights) and saved locally."""
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("sd")
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2, projection_dim=16)),
        tokenizer=CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77),
        unet=UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                  norm_num_groups=4, attention_head_dim=2),
        scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


def test_pipeline_folder_is_checked(tmp_path):
    from edgeseg.calibration.pipeline import check_pipeline_folder

    with pytest.raises(InputError, match=r"diffusers pipeline folder does not exist"):
        check_pipeline_folder(tmp_path / "nope")
    with pytest.raises(InputError, match=r"not a diffusers pipeline \(no model_index.json\)"):
        check_pipeline_folder(tmp_path)


def test_pipeline_generates_per_seed_and_guides(tiny_sd, tiny_teacher):
    from edgeseg.calibration.pipeline import generate, load_pipeline

    pipe = load_pipeline(tiny_sd, torch.device("cpu"))
    a = generate(pipe, ["a person walking", "a crowd at night"], [1, 2], (32, 32), steps=3)
    b = generate(pipe, ["a person walking", "a crowd at night"], [1, 2], (32, 32), steps=3)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    guided = generate(pipe, ["a person walking", "a crowd at night"], [1, 2], (32, 32), steps=3,
                      guide=TaskGuide(tiny_teacher), guidance=GuidanceConfig(t_start=1.0, t_stop=0.0, scale=1.0))
    assert not np.array_equal(guided, a)  # the callback nudged the latents
    with pytest.raises(ValueError, match=r"1 prompts for 2 seeds"):
        generate(pipe, ["x"], [1, 2], (32, 32), steps=2)


def test_synth_with_a_pipeline_from_a_local_folder(tiny_run, tiny_sd, tmp_path):
    _, cfg = _cal_config(tiny_run, tmp_path, generator="pipeline", model=str(tiny_sd), img2img_strength=0.0,
                         count=2, pool_factor=1.0, guidance={"mode": "none"})
    manifest = Synthesizer(cfg).run(tmp_path / "sd")
    assert manifest["generator"]["kind"] == "pipeline" and manifest["counts"]["written"] == 2
    assert [i["mode"] for i in manifest["images"]] == list(cfg.calibration.prompts[:2])


def test_confidence_guidance_keeps_hard_images_a_minority(tiny_run, tmp_path):
    from edgeseg.distill.models import build_model

    _, cfg = _cal_config(tiny_run, tmp_path, count=4, pool_factor=2.0,
                         guidance={"mode": "confidence", "t_start": 0.6, "t_stop": 0.3, "resolution": 32,
                                   "hard_fraction": 0.25})
    student = tmp_path / "student.pt"
    torch.save({"student": build_model(cfg.student).state_dict()}, student)
    manifest = Synthesizer(cfg, student=student).run(tmp_path / "hard")
    assert manifest["guidance"]["mode"] == "confidence"
    assert manifest["guidance"]["hard_images"] == 2  # pool of 8, every 4th image is hard
    assert len(manifest["guidance"]["student_sha256"]) == 64


class _RecordingGuide:
    """A guide (our interface) that records what the generator hands it and pulls nothing."""

    def __init__(self):
        self.indices, self.inputs = [], []

    def __call__(self, x0, index):
        self.indices.append(index.tolist())
        self.inputs.append(x0.detach().clone())
        return (x0 * 0).flatten(1).sum(1), torch.zeros(len(x0), 2)


def test_pipeline_guidance_sees_pool_indices_and_the_predicted_clean_image(tiny_sd):
    from edgeseg.calibration.pipeline import _PredictedX0, generate, guidance_vae, load_pipeline

    pipe = load_pipeline(tiny_sd, torch.device("cpu"))
    g = GuidanceConfig(t_start=1.0, t_stop=0.0, scale=1.0)
    rec = _RecordingGuide()
    generate(pipe, ["a", "b"], [5, 6], (32, 32), steps=3, guide=rec, guidance=g, index=torch.tensor([34, 35]))
    assert rec.indices and all(i == [34, 35] for i in rec.indices)  # the pool's indices, not 0..B-1
    assert "step" not in vars(pipe.scheduler)  # the capture is undone after the call
    # the guide's input is the decoded predicted clean latents of the step (DDIM's pred_original_sample)
    capture = _PredictedX0(pipe.scheduler)
    latents = torch.randn(1, 4, 4, 4)
    pipe.scheduler.set_timesteps(3)
    t = pipe.scheduler.timesteps[0]
    prev, x0 = capture(torch.randn(1, 4, 4, 4), t, latents, return_dict=False)
    assert capture.x0 is not None and torch.equal(capture.x0, x0) and not torch.equal(x0, prev)
    # SDXL-style VAE: fp16 with force_upcast decodes guidance in float32, the pipeline's VAE untouched
    assert guidance_vae(pipe) is pipe.vae
    pipe.vae.register_to_config(force_upcast=True)
    pipe.vae.to(torch.float16)
    try:
        upcast = guidance_vae(pipe)
        assert upcast is not pipe.vae and upcast.dtype == torch.float32 and pipe.vae.dtype == torch.float16
        assert guidance_vae(pipe) is upcast  # made once
    finally:
        pipe.vae.to(torch.float32)
    with pytest.raises(ValueError, match="1 pool indices for 2 seeds"):
        generate(pipe, ["a", "b"], [5, 6], (32, 32), steps=2, index=torch.tensor([3]))


def test_synth_hands_the_pipeline_each_batchs_pool_indices(tiny_run, tiny_sd, tmp_path, monkeypatch):
    import edgeseg.calibration.pipeline as pipeline_module

    _, cfg = _cal_config(tiny_run, tmp_path, generator="pipeline", model=str(tiny_sd), img2img_strength=0.0,
                         sampler={"steps": 2, "batch_size": 2})
    seen = []
    real = pipeline_module.generate

    def counting(*args, index=None, **kwargs):  # counts calls; the real generate runs
        seen.append(index.tolist())
        return real(*args, index=index, **kwargs)

    monkeypatch.setattr(pipeline_module, "generate", counting)
    Synthesizer(cfg).generate_pool(6, progress=False)
    assert seen == [[0, 1], [2, 3], [4, 5]]


def test_the_count_asked_for_is_the_count_delivered(tiny_run, tmp_path):
    from edgeseg.runtime.errors import InputError

    _, probe_cfg = _cal_config(tiny_run, tmp_path / "probe")
    # the first round of a 6-image request with pool_factor 1 (same batches, same seeds)
    from edgeseg.calibration.filters import dhash

    hashes = [dhash(c.image) for c in Synthesizer(probe_cfg).generate_pool(6, progress=False)]
    distances = sorted(bin(a ^ b).count("1") for i, a in enumerate(hashes) for b in hashes[i + 1:])
    # near-duplicate threshold at a low pairwise distance: part of each round is dropped as near copies
    flt = {"min_person_fraction": 0.0, "max_uncertain_fraction": 1.0, "dedup_bits": distances[1]}
    _, cfg = _cal_config(tiny_run, tmp_path / "a", pool_factor=1.0, filter=flt)
    m = Synthesizer(cfg).run(tmp_path / "a" / "set")
    assert m["counts"]["written"] == 6 and len(list((tmp_path / "a" / "set" / "images").glob("*.png"))) == 6
    assert m["counts"]["kept"] + sum(m["counts"]["dropped"].values()) == m["counts"]["generated"]
    assert m["counts"]["extra_rounds"] >= 1 and m["counts"]["generated"] > 6
    assert m["counts"]["dropped"]["near_duplicate"] > 0
    again = Synthesizer(cfg).run(tmp_path / "a" / "again")
    assert again["counts"] == m["counts"]  # extra rounds continue the seeds: still reproducible

    _, impossible = _cal_config(tiny_run, tmp_path / "b", pool_factor=1.0, max_extra_rounds=1,
                                filter={**flt, "min_person_fraction": 0.99})
    with pytest.raises(InputError, match=r"asked for 6 calibration images but only \d+ of \d+ generated passed the "
                                         r"filters after 1 extra round\(s\) \(dropped: empty_mask \d+"):
        Synthesizer(impossible).run(tmp_path / "b" / "set")
    assert not (tmp_path / "b" / "set").exists()  # nothing half-written


def test_near_copies_of_training_images_are_measured_and_dropped(tiny_run, tmp_path):
    from edgeseg.calibration.filters import Confidence, SetFilter
    from edgeseg.calibration.similarity import TrainIndex
    from edgeseg.calibration.config import FilterConfig
    from edgeseg.distill.data import split_samples
    from edgeseg.runtime.images import read_rgb
    from edgeseg.runtime.preprocess import fit_image

    _, cfg = tiny_run
    train = np.stack([fit_image(read_rgb(s.image), (64, 64), "letterbox")[0] for s in split_samples(cfg, "train")])
    index = TrainIndex(train)
    planted = np.clip(train[5].astype(int) + np.random.default_rng(0).integers(-3, 4, train[5].shape), 0, 255)
    near = index.nearest(planted.astype(np.uint8))
    assert near["train_nearest"] == 5 and near["train_ssim"] > 0.9 and near["train_hash_bits"] <= 4
    other = index.nearest(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert other["train_ssim"] < 0.3
    flt = SetFilter(FilterConfig(min_person_fraction=0.0, max_uncertain_fraction=1.0), [])
    conf = Confidence(0.5, 0.0, 0.9)
    assert flt.check(planted.astype(np.uint8), conf, near["train_ssim"])[0] == "train_copy"
    assert flt.dropped["train_copy"] == 1

    # the exact search scores every training image: it finds the planted copy, equals scikit-image's SSIM,
    # and is never below the shortlist's answer
    from skimage.metrics import structural_similarity

    from edgeseg.calibration.similarity import _grey, ssim_many

    assert index.exact_nearest(planted.astype(np.uint8))[0] == 5
    query = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    by_hand = [structural_similarity(_grey(query), g, data_range=255) for g in index.grey]
    np.testing.assert_allclose(ssim_many(_grey(query), index.grey), by_hand, rtol=0, atol=1e-6)
    best, ssim = index.exact_nearest(query)
    assert best == int(np.argmax(by_hand)) and ssim >= index.nearest(query)["train_ssim"] - 1e-6

    # every image of a synthesized set carries its similarity in the manifest: recomputed from the files
    _, cal = _cal_config(tiny_run, tmp_path)
    m = Synthesizer(cal).run(tmp_path / "set")
    names = [s.image.name for s in split_samples(cfg, "train")]
    for i in m["images"]:
        image = read_rgb(tmp_path / "set" / i["file"])
        near = index.nearest(image)
        assert i["train_ssim"] == near["train_ssim"] and i["train_nearest"] == names[near["train_nearest"]]
        assert i["train_hash_bits"] == near["train_hash_bits"]
        assert i["source_ssim"] == index.ssim(image, i["source"] % len(names))  # img2img: to its own source too
