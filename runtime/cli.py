"""``edgeseg runtime``: segment images, profile latency, check a bundle at a new site. Torch-free."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from edgeseg.runtime.console import (THREADS_HELP, VERBOSE_HELP, configure_logging, exit_on_user_error, keep_renamed,
                                     renamed_option)
from edgeseg.runtime.errors import EdgesegError, InputError
from edgeseg.runtime.files import write_json_atomic
from edgeseg.runtime.smoothing import DEFAULT_SMOOTHING

log = logging.getLogger(__name__)

_BACKENDS = click.Choice(["auto", "tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Batched person segmentation from a deploy bundle, ONNX model or TensorRT engine."""


@main.command(short_help="Masks and overlays for images, a video, a camera or a stream.")
@click.option("--bundle", required=True, type=click.Path(), help="Deploy bundle folder, .onnx or .engine.")
@click.option("--images", "source", type=str, default=None, callback=keep_renamed, metavar="SOURCE",
              help="A folder of images, an image or video file (mp4, avi, mkv, mov), a glob of images in quotes, "
                   "a camera index (0) or a stream URL (rtsp://, http://).  [required]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, callback=keep_renamed,
              help="Where masks, overlays and summary.json go.  [required]")
@renamed_option("--input", "--images", "source", type=str)
@renamed_option("--output", "--out", "out_dir", type=click.Path(file_okay=False))
@click.option("--backend", type=_BACKENDS, default="auto", show_default=True,
              help="Inference backend; auto takes the best available.")
@click.option("--threads", type=int, default=0, show_default=True, help=THREADS_HELP)
@click.option("--device-id", type=int, default=0, show_default=True, help="CUDA GPU for GPU backends.")
@click.option("--cuda-graphs", is_flag=True, help="Replay a CUDA graph per batch size (native TensorRT backend).")
@click.option("--batch", type=int, default=0, show_default=True,
              help="Most frames per model call (0: the model's maximum; 1: lowest latency for a live source).")
@click.option("--smooth", type=float, default=None, metavar="STRENGTH",
              help="Temporal smoothing of the probabilities against flicker: the past's weight in a moving average, "
                   f"in [0, 1) (0: off); restarts at scene cuts.  [default: {DEFAULT_SMOOTHING} for a video, camera "
                   "or stream; 0 for images]")
@click.option("--drop-late", is_flag=True,
              help="Live sources: drop frames the model cannot keep up with (counted) instead of falling behind.")
@click.option("--save-masks", is_flag=True, help="Videos: also write each frame's mask as <out>/masks/NNNNN.png (0/255).")
@click.option("--truth", type=click.Path(file_okay=False), default=None,
              help="Folder of ground-truth masks named like the frames (NNNNN.png for a video): adds mIoU and "
                   "flicker to summary.json.")
@click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True,
              help="Seconds a camera or stream may take to open or deliver a frame.")
@click.option("--reconnects", type=int, default=3, show_default=True,
              help="Attempts to reopen a live source each time it stops delivering, before giving up.")
@click.option("-v", "--verbose", count=True, help="-v info (with a progress line every 5 s), -vv debug logging (stderr).")
@exit_on_user_error
def infer(bundle, source, out_dir, backend, threads, device_id, cuda_graphs, batch, smooth, drop_late, save_masks,
          truth, timeout_s, reconnects, verbose):
    """Masks (0/255) and overlays of every frame of --images into --out, pipelined.

    Images give <name>.mask.png and <name>.overlay.png; a video, camera or stream gives mask.mp4
    and overlay.mp4 at its own size and frame rate. One line on stderr sums the run up (frames,
    frames/s, p50/p99 latency per frame, drops, backend); summary.json holds it all.
    """
    from edgeseg.runtime import video
    from edgeseg.runtime.segmenter import Segmenter
    from edgeseg.runtime.sources import open_source

    configure_logging(verbose)
    # FFmpeg's own lines ("moov atom not found", "Connection refused") would precede the one line this command
    # says: quiet unless -v (OpenCV reads the variable when it first opens a video; a user's own setting wins)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "16" if verbose else "-8")
    if source is None or out_dir is None:
        raise click.UsageError(f"Missing option '{'--images' if source is None else '--out'}'.")
    if batch < 0 or (smooth is not None and not 0.0 <= smooth < 1.0):
        raise InputError(f"--batch must be >= 0 and --smooth in [0, 1), got {batch} and {smooth}")
    dst = Path(out_dir)
    scorer = video.TruthScorer(truth) if truth else None
    with open_source(source, timeout_s, reconnects) as src, \
            Segmenter(bundle, backend=backend, threads=threads, device_id=device_id, cuda_graphs=cuda_graphs) as seg:
        if smooth is None:  # a folder of images may be unrelated pictures: smoothing only where frames follow frames
            smooth = 0.0 if src.kind == "images" else DEFAULT_SMOOTHING
        options = video.RunOptions(smooth=smooth, drop_late=drop_late, max_batch=batch or None, save_masks=save_masks)
        sink = video.sink_for(src, dst, save_masks)
        try:
            summary = video.run(seg, src, sink, options, scorer)
        except (EdgesegError, KeyboardInterrupt) as e:  # a stream lost half-way, or Ctrl-C (how a camera run
            if hasattr(e, "summary"):  # ends): what was written is finalised; sum it up, then stop
                write_json_atomic(dst / "summary.json", e.summary)
                print(video.summary_line(e.summary), file=sys.stderr)
            if isinstance(e, KeyboardInterrupt):
                print(f"stopped (Ctrl-C); the output is in {dst}", file=sys.stderr)
                sys.exit(130)
            raise
    write_json_atomic(dst / "summary.json", summary)
    if summary.get("skipped"):
        skipped = src.skipped
        print(f"skipped {len(skipped)} non-image or unreadable file(s): {', '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""), file=sys.stderr)
    print(video.summary_line(summary), file=sys.stderr)
    result = {"output": str(dst), "frames": summary["written"], "summary": str(dst / "summary.json")}
    if src.kind == "images":
        result.update(images=summary["written"], skipped=summary["skipped"])
    else:
        result.update(sink.outputs())
    click.echo(json.dumps(result))


@main.command(short_help="Latency and throughput per batch size.")
@click.option("--bundle", required=True, type=click.Path(), help="Deploy bundle folder, .onnx or .engine.")
@click.option("--batch", "batches", default="1,2,4,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--iters", type=int, default=30, show_default=True, help="Timed iterations per batch size.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed iterations per batch size first.")
@click.option("--image-size", nargs=2, type=int, default=(480, 640), show_default=True, metavar="H W",
              help="Size of the (synthetic) input images; they are resized to the model's input.")
@click.option("--backend", type=_BACKENDS, default="auto", show_default=True,
              help="Inference backend; auto takes the best available.")
@click.option("--threads", type=int, default=0, show_default=True, help=THREADS_HELP)
@click.option("--device-id", type=int, default=0, show_default=True, help="CUDA GPU for GPU backends.")
@click.option("--cuda-graphs", is_flag=True, help="Replay a CUDA graph per batch size (native TensorRT backend).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for profile.json and latency.png (default: <bundle>/../profile).")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@exit_on_user_error
def profile(bundle, batches, iters, warmup, image_size, backend, threads, device_id, cuda_graphs, out, verbose):
    """p50/p90/p99 latency, throughput and per-stage split per batch size."""
    from edgeseg.runtime.profiler import plot, print_table
    from edgeseg.runtime.profiler import profile as run_profile
    from edgeseg.runtime.segmenter import Segmenter

    configure_logging(verbose)
    try:
        sizes = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--batch must be comma-separated integers, got {batches!r}") from None
    if iters < 1:
        raise InputError(f"--iters must be >= 1, got {iters}")
    out_dir = Path(out) if out else Path(bundle).resolve().parent / "profile"
    with Segmenter(bundle, backend=backend, threads=threads, device_id=device_id, cuda_graphs=cuda_graphs) as seg:
        bad = [b for b in sizes if not 1 <= b <= seg.max_batch]
        if bad:
            raise InputError(f"--batch sizes {bad} outside 1..{seg.max_batch} (the model's profile maximum)")
        result = run_profile(seg, sizes, iters, warmup, tuple(image_size))
    result["threads"] = threads
    write_json_atomic(out_dir / "profile.json", result)
    plot(result, out_dir / "latency.png")
    print_table(result)
    click.echo(json.dumps({"profile": str(out_dir / "profile.json"), "plot": str(out_dir / "latency.png"),
                           "backend": result["backend"], "device": result["device"]}))


@main.command(short_help="Label-free check of a bundle on a site's frames.")
@click.option("--bundle", required=True, type=click.Path(), help="Deploy bundle folder (with its FP32 and INT8 models).")
@click.option("--images", required=True, type=click.Path(), help="Folder of unlabelled frames from the site.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where site_check.json and site_check.png go (default: <images>/../site_check).")
@click.option("--limit", type=int, default=0, help="Check only the first N frames by name (0 = all).")
@click.option("--require-teacher", is_flag=True, help="Fail if the bundle carries no teacher (export bundle --with-teacher).")
@click.option("--threads", type=int, default=0, show_default=True, help=THREADS_HELP)
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@exit_on_user_error
def check(bundle, images, out, limit, require_teacher, threads, verbose):
    """Label-free site check: INT8 range fit, INT8 and teacher agreement, and what to do (recalibrate, adapt)."""
    from edgeseg.runtime.check import run_check

    configure_logging(verbose)
    if limit < 0:
        raise InputError(f"--limit must be >= 0, got {limit}")
    r = run_check(bundle, images, out, threads, limit, require_teacher)
    sat = ", ".join(f"{role} {v['saturation'] * 100:.2f}%" for role, v in r["range_fit"].items())
    teacher = f"{r['teacher_agreement_miou']:.4f}" if r["teacher_agreement_miou"] is not None else "no teacher in the bundle"
    print(f"{r['frames']} frames in {r['seconds']:.1f} s: values out of INT8 range {sat}; INT8 vs FP32 mIoU "
          f"{r['int8_agreement_miou']:.4f}; student vs teacher mIoU {teacher}", file=sys.stderr)
    for f in r["findings"]:
        print(f"{f['finding']}: {f['why']}\n  -> {f['command']}", file=sys.stderr)
    if not r["findings"]:
        print(r["verdict"][0], file=sys.stderr)
    click.echo(json.dumps({"report": r["report"], "figure": r["figure"], "verdict": r["verdict"]}))


if __name__ == "__main__":
    main()
