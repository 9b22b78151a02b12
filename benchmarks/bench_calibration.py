"""Calibration benchmarks: sampling speed with and without teacher guidance, filter pass rates, quality.

Unguided and task-guided sampling use the same (cached) DDPM and the same seeds, batch by batch
in turn, so the guidance overhead is a ratio measured under the same machine conditions.
"""
from __future__ import annotations

import json
import time

import numpy as np

from edgeseg.distill.config import load_config

from edgeseg.export.config import Config


def peak_memory(cfg: Config) -> dict:
    """``calibration_synth_peak_rss_mb``: the peak RSS of the process that wrote the calibration set (its manifest)."""
    import json

    manifest = cfg.stage_dir("calibration") / "synthetic" / "manifest.json"
    peak = json.loads(manifest.read_text()).get("peak_rss_mb") if manifest.is_file() else None
    return {"calibration_synth_peak_rss_mb": peak} if peak is not None else {}


def bench_layout(cfg: Config, rounds: int = 5, batch: int = 16) -> dict:
    """One sampling batch of the configured generator (unguided, the config's steps), its UNet in NCHW vs NHWC,
    interleaved: ``channels_last_sampling_speedup``."""
    from benchmarks.timing import interleaved, strip_samples, with_spread
    from edgeseg.calibration.sampler import sample
    from edgeseg.calibration.synth import Synthesizer

    synth = Synthesizer(cfg)
    synth.generate_pool(1, progress=False)  # loads the shipped generator
    unet = synth.unet
    if synth.conditional:
        from edgeseg.calibration.ddpm import ConditionedUNet

        unet = ConditionedUNet(synth.unet, synth.mask_source(list(range(batch))))
    g = cfg.calibration
    run = lambda cl: sample(unet, synth.scheduler_config, list(range(batch)), g.sampler, g.guidance,  # noqa: E731
                            channels_last=cl)
    res = interleaved({"nchw": lambda: run(False), "nhwc": lambda: run(True)}, rounds=rounds, warmup=1)
    out = {"layout_batch": batch, "layout_timings": strip_samples(res)}
    with_spread(out, "channels_last_sampling_speedup", res, "nchw", "nhwc")
    return out


def run(cfg: Config, config_path: str, overrides: tuple[str, ...] = (), images: int = 128) -> dict:
    """Headline speeds at torch's default thread count; ``threads_1`` repeats them at 1 thread."""
    import os

    import torch

    default = torch.get_num_threads()
    out = measure(cfg, config_path, overrides, images)
    out.update(bench_layout(cfg))
    out["default_threads"] = os.cpu_count()
    out.update(peak_memory(cfg))
    torch.set_num_threads(1)
    try:
        one = measure(cfg, config_path, overrides, images // 2)
    finally:
        torch.set_num_threads(default)
    out["threads_1"] = {k: v for k, v in one.items() if k.endswith(("_images_per_s", "overhead"))}
    return out


def measure(cfg: Config, config_path: str, overrides: tuple[str, ...], images: int) -> dict:
    from edgeseg.calibration.filters import SetFilter
    from edgeseg.calibration.synth import Synthesizer

    guided = cfg.calibration.guidance.mode if cfg.calibration.guidance.mode != "none" else "task"
    synths = {mode: Synthesizer(load_config(config_path, Config, [*overrides, f"calibration.guidance.mode={mode}"]))
              for mode in ("none", guided)}
    bs = cfg.calibration.sampler.batch_size
    pools: dict[str, list] = {m: [] for m in synths}
    seconds = {m: 0.0 for m in synths}
    for s in synths.values():  # load the teacher and the cached DDPM outside the timing
        s.generate_pool(1, progress=False)
    for start in range(0, images, bs):  # one batch of each in turn, same seeds
        n = min(bs, images - start)
        for mode, s in synths.items():
            t0 = time.perf_counter()
            pools[mode].extend(s.generate_pool(n, progress=False, start=start))
            seconds[mode] += time.perf_counter() - t0
    out = {"images_per_variant": images, "batch_size": bs, "generator": f"embedded ({cfg.calibration.generator})",
           "img2img_strength": cfg.calibration.img2img_strength, "guided_mode": guided}
    for mode, pool in pools.items():
        flt = SetFilter(cfg.calibration.filter, [])
        passed = sum(flt.check(c.image, c.conf, condition_iou=c.condition_iou)[0] is None for c in pool)
        out[f"{mode}_images_per_s"] = len(pool) / seconds[mode]
        out[f"{mode}_pass_rate"] = passed / len(pool)
        out[f"{mode}_dropped"] = dict(flt.dropped)
        out[f"{mode}_mean_confidence"] = float(np.mean([c.conf.confidence for c in pool]))
        ious = [c.condition_iou for c in pool if c.condition_iou is not None]
        if ious:  # label fidelity with and without guidance, same seeds and masks
            out[f"{mode}_condition_iou_median"] = float(np.median(ious))
    out["guidance_overhead"] = seconds[guided] / seconds["none"]
    out["guided_pass_rate_gain"] = out[f"{guided}_pass_rate"] - out["none_pass_rate"]
    report = cfg.stage_dir("calibration") / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        out["quality"] = {k: r[k] for k in r if k.startswith(("coverage_", "sqnr_db_", "hist_kl_", "max_over", "int8_miou_", "condition_iou",
                                                               "train_ssim_median"))}
        out["quality"]["source"] = str(report)
    return out
