"""The shipped generator against today's: KID to held-out real images on the teacher's encoder.

``python -m benchmarks.run --only generator`` updates these keys of ``calibration.json`` (the rest
of the file stays as measured):

- ``generator_kid``: the pretrained, shipped generator (calibration.model: demo) vs held-out real A;
- ``generator_kid_baseline``: the generator the demo trained at run time before (600 steps,
  ``<run_dir>/calibration/cddpm``) vs the same real A;
- ``generator_kid_floor``: held-out real B vs real A (two samples of the world itself);
- ``generator_kid_excess_ratio``: (kid - floor) / (baseline - floor); the target is at most 0.5;
- ``*_native``: the same at full resolution (see ``calibration/quality.py``);
- ``*_standardised``: at the generator's resolution, every feature standardised by real A's mean and std;
- ``generator_samples.png``: real, today's and the shipped generator's images, one row each.

Held-out real images are the teacher corpus's distribution (its lighting mix, its backgrounds),
drawn at indices past the corpus (never any split's image, never test or test_shift).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

COUNT = 256  # images per set: KID over 50 subsets of 100


def heldout_real(cfg, start: int, count: int) -> np.ndarray:
    """Teacher-corpus-like images past the corpus's end (indices start .. start + count - 1)."""
    from edgeseg.distill.demo_data import render_split

    root = cfg.data_root
    return np.stack([img for img, _ in render_split(root, "teacher", range(start, start + count))])


def run(cfg, baseline: str | Path | None = None, sheet: Path | None = None) -> dict:
    import torch

    from edgeseg.calibration.ddpm import load_training_masks
    from edgeseg.calibration.generator import load_pretrained, resolve
    from edgeseg.calibration.masks import MaskSource
    from edgeseg.calibration.quality import at_generator_resolution, encoder_features, kid, unguided_samples
    from edgeseg.calibration.synth import GENERATOR_SPLIT
    from edgeseg.distill.data import split_samples
    from edgeseg.distill.models import load_teacher
    from diffusers import UNet2DModel

    t0 = time.perf_counter()
    cal = cfg.calibration
    size = tuple(cfg.data.image_size)
    shipped = resolve(cal.model or "demo")
    unet, sched = load_pretrained(shipped)
    baseline = Path(baseline or cfg.stage_dir("calibration") / "cddpm")
    base_unet = UNet2DModel.from_pretrained(baseline / "unet", low_cpu_mem_usage=False).eval()
    base_sched = json.loads((baseline / "ddpm.json").read_text())["scheduler"]
    train = split_samples(cfg, GENERATOR_SPLIT)
    masks = MaskSource(load_training_masks(train, cal.ddpm.image_size), cal.masks)
    n_teacher = len(train)
    real_a, real_b = heldout_real(cfg, n_teacher, COUNT), heldout_real(cfg, n_teacher + COUNT, COUNT)
    torch.manual_seed(0)
    gen = unguided_samples(unet, sched, masks, cal.sampler, COUNT, size, seed=10_000)
    base = unguided_samples(base_unet, base_sched, masks, cal.sampler, COUNT, size, seed=10_000)
    teacher = load_teacher(cfg)
    feats = lambda x: encoder_features(teacher, x, cfg.data.mean, cfg.data.std)
    res = unet.config.sample_size
    f_gen, f_base = feats(gen), feats(base)
    f_a, f_b = feats(at_generator_resolution(real_a, res)), feats(at_generator_resolution(real_b, res))
    f_a_native, f_b_native = feats(real_a), feats(real_b)
    out = {}
    # the same features standardised by real A's per-feature mean and std (added after the first run showed
    # a subset spread several times the means: a few large features dominate the cubic kernel)
    mu, sd = f_a.mean(0), f_a.std(0) + 1e-6
    z = lambda f: (f - mu) / sd
    variants = {"": (f_gen, f_base, f_a, f_b), "_native": (f_gen, f_base, f_a_native, f_b_native),
                "_standardised": (z(f_gen), z(f_base), z(f_a), z(f_b))}
    for suffix, (gen_f, base_f, a, b) in variants.items():
        out[f"generator_kid{suffix}"], out[f"generator_kid{suffix}_std"] = kid(gen_f, a)
        out[f"generator_kid_baseline{suffix}"], out[f"generator_kid_baseline{suffix}_std"] = kid(base_f, a)
        out[f"generator_kid_floor{suffix}"], out[f"generator_kid_floor{suffix}_std"] = kid(b, a)
        floor = out[f"generator_kid_floor{suffix}"]
        out[f"generator_kid_excess_ratio{suffix}"] = (out[f"generator_kid{suffix}"] - floor) / max(
            out[f"generator_kid_baseline{suffix}"] - floor, 1e-12)
    meta = json.loads((shipped / "ddpm.json").read_text())
    out.update(generator_kid_images=COUNT, generator_kid_resolution=res,
               generator_shipped={"folder": str(shipped), "sha256": meta["sha256"], "command": meta["command"],
                                  "train_steps": meta["key"]["config"]["train_steps"], "train_seconds": meta["train_seconds"],
                                  "images": meta["key"]["images"]},
               generator_baseline={"folder": str(baseline),
                                   "train_steps": json.loads((baseline / "ddpm.json").read_text())["key"]["config"]["train_steps"]},
               generator_kid_seconds=round(time.perf_counter() - t0, 1))
    if sheet is not None:
        contact_sheet([real_a[:8], base[:8], gen[:8]], ["held-out real", "today's (600 steps)",
                                                       f"shipped ({out['generator_shipped']['train_steps']} steps)"], sheet)
    log.info("generator KID %.4f (baseline %.4f, floor %.4f): excess ratio %.2f", out["generator_kid"],
             out["generator_kid_baseline"], out["generator_kid_floor"], out["generator_kid_excess_ratio"])
    return out


def contact_sheet(rows: list[np.ndarray], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(len(rows[0]) * 1.4, len(rows) * 1.55))
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c, img in enumerate(row):
            axes[r, c].imshow(img)
            axes[r, c].axis("off")
        axes[r, 0].set_title(label, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
