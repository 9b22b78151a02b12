"""Runtime benchmarks: Segmenter vs torch eager, pre/post share, student vs teacher through the runtime.

All variants serve the same batch of images end to end: letterbox in, model, masks out at the
original size. Two image sets: the demo's own validation images (the headline figures: what
the demo bundle serves) and camera-sized VGA frames (480x640, where resizing costs more). The
torch reference (here only: the runtime never imports torch) runs the same student FP32
eagerly in ``channels_last`` with the same threads, through the same pre- and post-processing.
The user's obvious alternative is ONNX Runtime ``session.run`` on the FP32 ONNX with their own
OpenCV letterbox, normalisation and mask resize (``user_ort_fp32``), same threads.

Headline keys are at the machine's default thread count; ``threads_1`` holds the same at 1 thread.
``video`` holds the video pipeline's figures (``benchmarks.bench_video``; ``--only video`` reruns them alone).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import SETTLE_S, interleaved, strip_samples, with_spread
from edgeseg.export.config import Config


log = logging.getLogger(__name__)

HEADLINE = ("runtime_vs_torch_speedup", "runtime_vs_ort_fp32_speedup", "runtime_fp32_vs_torch_fp32_speedup",
            "student_vs_teacher_speedup", "model_only_int8_vs_torch_speedup", "pre_post_share")
BURST = 3  # calls per sample in the stage split: a serving loop's next call meets what the last one left


def run(cfg: Config, rounds: int = 20, batch: int = 8) -> dict:
    import tempfile

    from edgeseg.distill.data import load_sample, split_samples
    from edgeseg.runtime.profiler import sample_images

    demo = [load_sample(s)[0] for s in split_samples(cfg, "val")[:batch]]
    vga_frames = sample_images(batch, (480, 640))
    hd_frames = sample_images(batch, (1080, 1920))
    bundle = Path(cfg.run_dir) / "bundle"
    out: dict = {"default_threads": os.cpu_count(), "batch": batch,
                 "input_images": f"demo validation images {demo[0].shape[1]}x{demo[0].shape[0]}"}
    for threads in (0, 1):  # 0: ONNX Runtime's and torch's default (every core)
        log.info("runtime bench, %s threads: 128x128, VGA and 1080p batches (about a minute each), then the "
                 "VGA stage split", threads or "default")
        small = measure(cfg, demo, rounds, threads)
        vga = measure(cfg, vga_frames, rounds, threads)
        hd = measure(cfg, hd_frames, max(5, rounds // 2), threads)
        block = {k: small[k] for k in small if k.startswith(HEADLINE)}
        block["pre_post_share_vga"] = vga["pre_post_share"]
        block["pre_post_share_1080p"] = hd["pre_post_share"]
        block["pre_post_share_128"] = small["pre_post_share"]
        block["stages_ms_batch8"] = small["stages_ms_batch8"]
        block["throughput_ips"] = small["throughput_ips"]
        block["timings"] = small["timings"]
        for key, res in (("vga_480x640", vga), ("hd_1080x1920", hd)):
            block[key] = {k: res[k] for k in res if k.startswith(HEADLINE) or k in ("stages_ms_batch8", "throughput_ips")}
        with tempfile.TemporaryDirectory() as tmp:
            block["vga_480x640"]["stages"] = stage_split(bundle, vga_frames, rounds, threads, Path(tmp))
        if threads == 0:
            out.update(block)
        else:
            out["threads_1"] = block
    out["vga_480x640"]["queue"] = queue_vs_predict(bundle, sample_images(64, (480, 640)), rounds, 0)
    from benchmarks.memory import serving_memory

    out["memory"] = serving_memory(bundle, batch)
    out.update({k: out["memory"][k] for k in ("runtime_peak_rss_mb", "bare_session_peak_rss_mb", "runtime_vs_bare_peak_rss")})
    out["video"] = video_block(cfg, rounds)
    return out


def video_block(cfg: Config, rounds: int = 20, vga_frames: int = 96, model: Path | None = None,
                live_frames: int = 100) -> dict:
    """runtime.json's ``video`` key (``benchmarks.bench_video``): the bundle (or ``model``) on a VGA render of
    the demo world (cached under <run_dir>/bench/vga_clip) and, for smoothing, on the demo clip and its truth."""
    import json

    from benchmarks.bench_video import run as run_video
    from edgeseg.distill.demo_video import CLIP, generate_demo_clip

    model = model or Path(cfg.run_dir) / "bundle"
    if model.is_dir() and not (model / "manifest.json").is_file():
        raise FileNotFoundError(f"run `make deploy` first: {model} is missing")
    seed = cfg.data.demo.seed
    vga = generate_demo_clip(Path(cfg.run_dir) / "bench" / "vga_clip", (480, 640), seed, frames=vga_frames)
    stamp = cfg.data_root / CLIP / "clip.json"  # the demo's own clip, as its data stage made it; else the default one
    demo = (cfg.data_root / CLIP / json.loads(stamp.read_text())["video"] if stamp.is_file()
            else generate_demo_clip(cfg.data_root, cfg.data.image_size, seed))
    strip = Path(__file__).resolve().parent / "results" / "demo_clip_overlay.png" if model == Path(cfg.run_dir) / "bundle" else None
    out = run_video(model, vga, rounds, demo_clip=demo, truth=demo.parent / "masks", live_frames=live_frames, strip=strip)
    out["vga_clip"] = f"the demo world rendered at 480x640, {vga_frames} frames (distill.demo_video)"
    return out


def user_ort_fp32(model: Path, threads: int):
    """What a user writes without edgeseg: OpenCV letterbox + normalise, ``session.run``, resize the mask back."""
    import cv2

    from edgeseg.runtime.sessions import cpu_session
    from edgeseg.runtime.spec import ModelSpec

    spec = ModelSpec.from_onnx(model)
    session = cpu_session(model, threads)
    h, w = spec.image_size
    mean = np.asarray(spec.mean, np.float32) * 255
    std = np.asarray(spec.std, np.float32) * 255

    def predict(images: list[np.ndarray]) -> list[np.ndarray]:
        batch, boxes = [], []
        for img in images:
            scale = min(h / img.shape[0], w / img.shape[1])
            nh, nw = round(img.shape[0] * scale), round(img.shape[1] * scale)
            top, left = (h - nh) // 2, (w - nw) // 2
            canvas = np.full((h, w, 3), spec.pad_value, np.uint8)
            canvas[top:top + nh, left:left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
            batch.append(((canvas.astype(np.float32) - mean) / std).transpose(2, 0, 1))
            boxes.append((top, left, nh, nw))
        logits = session.run(None, {spec.input_name: np.stack(batch)})[0]
        masks = []
        for img, (top, left, nh, nw), out in zip(images, boxes, logits):
            crop = out[0, top:top + nh, left:left + nw]
            masks.append((cv2.resize(crop, (img.shape[1], img.shape[0])) > 0).astype(np.uint8))
        return masks

    return predict


def queue_vs_predict(bundle: Path, frames: list[np.ndarray], rounds: int, threads: int, callers: int = 4) -> dict:
    """Frames per second served by ``submit`` from ``callers`` threads vs ``predict`` in batches.

    ``submit`` letterboxes each frame in its caller's thread, so resizing overlaps the model;
    ``predict`` resizes and runs one batch after the other in one thread. Same model, same
    ORT threads.
    """
    from concurrent.futures import ThreadPoolExecutor, wait

    from edgeseg.runtime import Segmenter

    with Segmenter(bundle, backend="onnxruntime-cpu", threads=threads, max_wait_ms=2.0) as seg, \
            ThreadPoolExecutor(callers) as pool:
        def by_predict():
            for i in range(0, len(frames), seg.max_batch):
                seg.predict(frames[i:i + seg.max_batch])

        def by_queue():
            wait([f.result() for f in [pool.submit(seg.submit, frame) for frame in frames]])

        res = interleaved({"predict": by_predict, "queue": by_queue}, rounds=max(5, rounds // 2))
        mean_batch = seg.mean_batch_size
    out = {"frames": len(frames), "callers": callers, "max_batch": seg.max_batch, "queue_mean_batch": mean_batch,
           "threads": threads or "default", "fps": {k: len(frames) / (r["median_ms"] / 1000) for k, r in res.items()}}
    with_spread(out, "queue_vs_predict_throughput", res, "predict", "queue")
    return out


def measure(cfg: Config, images: list[np.ndarray], rounds: int, threads: int) -> dict:
    batch = len(images)
    from edgeseg.export.onnx_model import export_teacher_onnx
    from edgeseg.export.strip import load_student
    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.pipeline import BatchBuffers, finish, prepare

    bundle = Path(cfg.run_dir) / "bundle"
    if not (bundle / "manifest.json").is_file():
        raise FileNotFoundError(f"run `make deploy` first: {bundle} is missing")
    torch.set_num_threads(threads or os.cpu_count())
    student, _ = load_student(cfg, cfg.stage_dir("distill") / "best.pt")

    # FP32 student and teacher through the same runtime: the teacher's ONNX as the bundle carries it (cached)
    teacher_onnx = export_teacher_onnx(cfg, cfg.stage_dir("export") / "teacher.onnx")
    int8 = Segmenter(bundle, backend="onnxruntime-cpu", threads=threads)
    fp32 = Segmenter(cfg.stage_dir("export") / "model.onnx", backend="onnxruntime-cpu", threads=threads)
    fp32_teacher = Segmenter(teacher_onnx, backend="onnxruntime-cpu", threads=threads)
    user = user_ort_fp32(cfg.stage_dir("export") / "model.onnx", threads)

    spec = fp32.spec
    cl_student = student.to(memory_format=torch.channels_last)
    buffers = BatchBuffers(spec)

    @torch.no_grad()
    def torch_predict():
        feed, placements = prepare(images, spec, buffers)
        x = torch.from_numpy(feed).contiguous(memory_format=torch.channels_last)
        return finish(cl_student(x).numpy(), placements, spec)

    def model_only(seg):
        feed, _ = prepare(images, seg.spec, BatchBuffers(seg.spec))
        return lambda: seg.runner.infer(feed)

    x_torch = torch.from_numpy(prepare(images, spec, BatchBuffers(spec))[0].copy()).contiguous(
        memory_format=torch.channels_last)
    # Two interleaved groups, with a pause before every call. torch's OpenMP threads and ONNX
    # Runtime's own (the user's session, which keeps ORT's default) keep spinning for a while after
    # each call, so a call right after another variant's runs on contended cores (at 2 threads the
    # INT8 model measured 19 ms beside torch and 11 ms alone; two ORT sessions in turn took 3.3x one
    # alone). The pause (SETTLE_S) outlasts the spinning. The ONNX Runtime comparisons are timed
    # among themselves, as a deployed runtime (no torch in the process) would run; the torch
    # comparisons are timed against the same runtime calls in their own group.
    ort_group = interleaved({
        "runtime_int8_cpu": lambda: int8.predict(images),
        "runtime_fp32": lambda: fp32.predict(images),
        "runtime_teacher_fp32": lambda: fp32_teacher.predict(images),
        "user_ort_fp32": lambda: user(images),
        "model_only_int8_cpu": model_only(int8),
    }, rounds=rounds, settle_s=SETTLE_S)
    torch_group = interleaved({
        "runtime_int8_cpu": lambda: int8.predict(images),
        "runtime_fp32": lambda: fp32.predict(images),
        "torch_eager_channels_last": torch_predict,
        "model_only_int8_cpu": model_only(int8),
        "model_only_torch": lambda: torch.no_grad()(cl_student)(x_torch),
    }, rounds=rounds, settle_s=SETTLE_S)
    res = {**ort_group, **{k: v for k, v in torch_group.items() if "torch" in k}}
    log.info("  %dx%d, %s threads: INT8 runtime %.1f ms, torch %.1f ms per batch of %d", *images[0].shape[:2],
             threads or "default", res["runtime_int8_cpu"]["median_ms"], res["torch_eager_channels_last"]["median_ms"], batch)
    time.sleep(0.5)  # let torch's OpenMP threads stop spinning before the stage split is timed
    per_call = []  # the stage split: medians over calls (one call is one sample of a noisy machine)
    for _ in range(rounds):
        int8.predict(images)
        per_call.append(dict(int8.last_timings_ms))
    stages = {k: float(np.median([c[k] for c in per_call])) for k in per_call[0]}
    for s in (int8, fp32, fp32_teacher):
        s.close()
    pre_post = (stages["preprocess"] + stages["postprocess"]) / stages["total"]
    out = {"threads": threads or "default", "batch": batch, "model_input_size": list(spec.image_size),
           "int8_model": "bundle model.int8-cpu.onnx (u8s8)", "pre_post_share": pre_post, "stages_ms_batch8": stages,
           "throughput_ips": {k: batch / (r["median_ms"] / 1000) for k, r in res.items() if not k.startswith("model_only")},
           "timings": strip_samples(res), "timings_beside_torch": strip_samples(torch_group)}
    with_spread(out, "runtime_vs_torch_speedup", torch_group, "torch_eager_channels_last", "runtime_int8_cpu")
    with_spread(out, "runtime_vs_ort_fp32_speedup", ort_group, "user_ort_fp32", "runtime_int8_cpu")
    with_spread(out, "runtime_fp32_vs_torch_fp32_speedup", torch_group, "torch_eager_channels_last", "runtime_fp32")
    with_spread(out, "model_only_int8_vs_torch_speedup", torch_group, "model_only_torch", "model_only_int8_cpu")
    with_spread(out, "student_vs_teacher_speedup", ort_group, "runtime_teacher_fp32", "runtime_fp32")
    return out


def fuse_normalisation(model: Path, out: Path) -> Path:
    """``model`` with uint8 NHWC input and the normalisation as graph nodes (Cast, Transpose, Mul, Add).

    The graph the runtime would run if the CPU bundle's default were fused preprocessing: the
    lever weighed in :func:`stage_split` (the model's own nodes are untouched).
    """
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeseg.runtime.spec import ModelSpec

    spec = ModelSpec.from_onnx(model)
    m = onnx.load(str(model))
    g = m.graph
    name, inner = spec.input_name, spec.input_name + "_normalised"
    for node in g.node:
        node.input[:] = [inner if i == name else i for i in node.input]
    std = np.asarray(spec.std, np.float32)
    scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1).astype(np.float32)
    bias = (-np.asarray(spec.mean, np.float32) / std).reshape(1, 3, 1, 1).astype(np.float32)
    g.initializer.extend([numpy_helper.from_array(scale, "edgeseg_norm_scale"),
                          numpy_helper.from_array(bias, "edgeseg_norm_bias")])
    pre = [helper.make_node("Cast", [name], ["edgeseg_f32_nhwc"], to=TensorProto.FLOAT),
           helper.make_node("Transpose", ["edgeseg_f32_nhwc"], ["edgeseg_f32"], perm=[0, 3, 1, 2]),
           helper.make_node("Mul", ["edgeseg_f32", "edgeseg_norm_scale"], ["edgeseg_scaled"]),
           helper.make_node("Add", ["edgeseg_scaled", "edgeseg_norm_bias"], [inner])]
    nodes = pre + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    h, w = spec.image_size
    del g.input[0]
    g.input.insert(0, helper.make_tensor_value_info(name, TensorProto.UINT8, ["batch", h, w, 3]))
    meta = {p.key: p for p in m.metadata_props}
    io = json.loads(meta["edgeseg.io"].value)
    io["input_layout"] = "NHWC-uint8"
    meta["edgeseg.io"].value = json.dumps(io)
    onnx.save(m, str(out))
    return out


def stage_split(bundle: Path, frames: list[np.ndarray], rounds: int, threads: int, tmp: Path) -> dict:
    """Where a camera batch's pre- and post-processing time goes, and what each lever buys.

    ``stages_ms``: each step of the serial path timed alone in one thread, steps interleaved
    round by round (letterbox resize, its padded copy into the batch buffer, normalisation, the
    model, the mask's crop and resize, the threshold), beside the uint8 mask path's steps.
    ``paths``: end to end through ``Segmenter.predict``, bursts of BURST calls interleaved with a
    pause between them (ONNX Runtime's spinning threads would otherwise carry one variant's
    load into the next): the old defaults (serial per-image work, float masks, ONNX Runtime's
    threads spinning), then one lever added at a time; each with its pre, post and their share.
    """
    import cv2

    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.pipeline import QUANT_STEPS, BatchBuffers, prepare, quantise_scores, score_cut
    from edgeseg.runtime.preprocess import normalise_batch, pad_into, place, resize_image

    from benchmarks.memory import cpu_model

    def seg(model=bundle, **kw):
        return Segmenter(model, backend="onnxruntime-cpu", threads=threads, **kw)

    fused_model = fuse_normalisation(cpu_model(bundle), tmp / "model.fused.onnx")
    segs = {"old_defaults": seg(pre_threads=1, exact_masks=True, spin_after_run=True),
            "threads": seg(exact_masks=True, spin_after_run=True),
            "stop_spinning": seg(pre_threads=1, exact_masks=True),
            "stop_spinning_threads": seg(exact_masks=True),
            "stop_spinning_threads_uint8_masks": seg(),
            "stop_spinning_threads_uint8_masks_fused": seg(fused_model)}
    if segs["threads"]._workers.threads == 1:  # at 1 thread the thread levers are the serial paths again
        for name in ("threads", "stop_spinning_threads"):
            segs.pop(name).close()
    default = "stop_spinning_threads_uint8_masks"  # what Segmenter() does now
    int8 = segs["old_defaults"]
    spec = int8.spec
    placements = [place(f.shape[:2], spec.image_size, spec.resize) for f in frames]
    resized = [resize_image(f, (p.height, p.width)) for f, p in zip(frames, placements)]
    batch = BatchBuffers(spec).uint8(len(frames))
    feed, _ = prepare(frames, spec, BatchBuffers(spec))  # the frames' own input: their logits feed the mask steps
    feed = feed.copy()
    logits = int8.runner.infer(feed).copy()
    cut, steps = score_cut(spec), QUANT_STEPS[spec.output]
    crops = [np.ascontiguousarray(s[0, p.top:p.top + p.height, p.left:p.left + p.width]) for s, p in zip(logits, placements)]
    scores = [cv2.resize(c, (p.src_hw[1], p.src_hw[0])) for c, p in zip(crops, placements)]
    quantised = [quantise_scores(c, cut, steps) for c in crops]
    big_u8 = [cv2.resize(q, (p.src_hw[1], p.src_hw[0])) for q, p in zip(quantised, placements)]

    def pad_copy():
        for r, p, slot in zip(resized, placements, batch):
            pad_into(r, p, spec.pad_value, slot)

    steps_res = interleaved({
        "letterbox_resize": lambda: [resize_image(f, (p.height, p.width)) for f, p in zip(frames, placements)],
        "letterbox_pad_copy": pad_copy,
        "normalisation": lambda: normalise_batch(batch, spec.mean, spec.std, out=feed),
        "infer": lambda: segs["stop_spinning"].runner.infer(feed),
        "mask_crop_resize": lambda: [cv2.resize(np.ascontiguousarray(s[0, p.top:p.top + p.height, p.left:p.left + p.width]),
                                                (p.src_hw[1], p.src_hw[0])) for s, p in zip(logits, placements)],
        "threshold": lambda: [np.greater(s, cut).view(np.uint8) for s in scores],
        "uint8_mask_quantise": lambda: [quantise_scores(c, cut, steps) for c in crops],
        "uint8_mask_resize": lambda: [cv2.resize(q, (p.src_hw[1], p.src_hw[0])) for q, p in zip(quantised, placements)],
        "uint8_threshold_in_place": lambda: [cv2.threshold(b, 128, 1, cv2.THRESH_BINARY, dst=b) for b in big_u8],
    }, rounds=rounds, settle_s=SETTLE_S)
    stages = {k: r["median_ms"] for k, r in steps_res.items()}
    serial_steps = ("letterbox_resize", "letterbox_pad_copy", "normalisation", "mask_crop_resize", "threshold")

    calls: dict[str, list[dict]] = {k: [] for k in segs}

    def burst(name):
        def fn():
            for _ in range(BURST):
                segs[name].predict(frames)
                calls[name].append(dict(segs[name].last_timings_ms))
        return fn

    ends = interleaved({k: burst(k) for k in segs}, rounds=rounds, settle_s=SETTLE_S)
    paths = {}
    for name, cs in calls.items():
        cs = cs[-rounds * BURST:]  # the timed rounds, not the warm-up
        med = {k: float(np.median([c[k] for c in cs])) for k in ("preprocess", "infer", "postprocess", "total")}
        paths[name] = {**{f"{k}_ms": v for k, v in med.items()},
                       "pre_post_share": (med["preprocess"] + med["postprocess"]) / med["total"],
                       "call_median_ms": ends[name]["median_ms"] / BURST, "call_p10_ms": ends[name]["p10_ms"] / BURST,
                       "call_p90_ms": ends[name]["p90_ms"] / BURST}
    with seg(exact_masks=True) as reference:
        exact = reference.predict(frames)
    fast = segs[default].predict(frames)
    moved = sum(int((a != b).sum()) for a, b in zip(exact, fast))
    workers = segs[default]._workers.threads
    for s in segs.values():
        s.close()
    out = {"frames": len(frames), "frame_size": list(frames[0].shape[:2]), "threads": threads or "default",
           "pre_threads": workers, "stages_ms": stages,
           "stages_p10_ms": {k: r["p10_ms"] for k, r in steps_res.items()},
           "stages_p90_ms": {k: r["p90_ms"] for k, r in steps_res.items()},
           "pre_post_share_serial_steps": sum(stages[k] for k in serial_steps) / (
               sum(stages[k] for k in serial_steps) + stages["infer"]),
           "paths": paths, "default_path": default, "pre_post_share": paths[default]["pre_post_share"],
           "uint8_masks_moved_pixels": moved, "uint8_masks_moved_share": moved / sum(m.size for m in exact)}
    for name in segs:
        if name != "old_defaults":
            with_spread(out, f"{name}_vs_old_defaults_speedup", ends, "old_defaults", name)
    return out
