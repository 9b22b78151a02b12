"""Runtime benchmarks: Segmenter vs torch eager, pre/post share, student vs teacher through the runtime.

All variants serve the same batch of images end to end: letterbox in, model, masks out at the
original size. Two image sets: the demo's own validation images (the headline figures: what
the demo bundle serves) and camera-sized VGA frames (480x640, where resizing costs more). The
torch reference (here only: the runtime never imports torch) runs the same student FP32
eagerly in ``channels_last`` with the same threads, through the same pre- and post-processing.
The user's obvious alternative is ONNX Runtime ``session.run`` on the FP32 ONNX with their own
OpenCV letterbox, normalisation and mask resize (``user_ort_fp32``), same threads.

Headline keys are at the machine's default thread count; ``threads_1`` holds the same at 1 thread.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import interleaved, strip_samples, with_spread
from edgeseg.distill.config import Config


HEADLINE = ("runtime_vs_torch_speedup", "runtime_vs_ort_fp32_speedup", "runtime_fp32_vs_torch_fp32_speedup",
            "student_vs_teacher_speedup", "model_only_int8_vs_torch_speedup", "pre_post_share")


def run(cfg: Config, rounds: int = 20, batch: int = 8) -> dict:
    from edgeseg.distill.data import load_sample, split_samples
    from edgeseg.runtime.profiler import sample_images

    demo = [load_sample(s)[0] for s in split_samples(cfg, "val")[:batch]]
    vga_frames = sample_images(batch, (480, 640))
    out: dict = {"default_threads": os.cpu_count(), "batch": batch,
                 "input_images": f"demo validation images {demo[0].shape[1]}x{demo[0].shape[0]}"}
    for threads in (0, 1):  # 0: ONNX Runtime's and torch's default (every core)
        small = measure(cfg, demo, rounds, threads)
        vga = measure(cfg, vga_frames, rounds, threads)
        block = {k: small[k] for k in small if k.startswith(HEADLINE)}
        block["pre_post_share_vga"] = vga["pre_post_share"]
        block["pre_post_share_128"] = small["pre_post_share"]
        block["stages_ms_batch8"] = small["stages_ms_batch8"]
        block["throughput_ips"] = small["throughput_ips"]
        block["timings"] = small["timings"]
        block["vga_480x640"] = {k: vga[k] for k in vga if k.startswith(HEADLINE) or k in ("stages_ms_batch8",
                                                                                     "throughput_ips")}
        if threads == 0:
            out.update(block)
        else:
            out["threads_1"] = block
    out["vga_480x640"]["queue"] = queue_vs_predict(Path(cfg.run_dir) / "bundle", sample_images(64, (480, 640)),
                                                   rounds, 0)
    from benchmarks.memory import serving_memory

    out["memory"] = serving_memory(Path(cfg.run_dir) / "bundle", batch)
    return out

