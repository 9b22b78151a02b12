"""``edgeseg runtime``: segment images, profile latency, check a bundle at a new site. Torch-free."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from edgeseg.runtime.console import THREADS_HELP, VERBOSE_HELP, configure_logging, exit_on_user_error
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

_BACKENDS = click.Choice(["auto", "tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"])


def _save_png(array, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Batched person segmentation from a deploy bundle, ONNX model or TensorRT engine."""


@main.command()
@click.option("--bundle", required=True, type=click.Path(), help="Deploy bundle folder, .onnx or .engine.")
@click.option("--input", "input_dir", required=True, type=click.Path(file_okay=False), help="Folder of images.")
@click.option("--output", "output_dir", required=True, type=click.Path(file_okay=False), help="Where masks and overlays go.")
@click.option("--backend", type=_BACKENDS, default="auto", show_default=True)
@click.option("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0 = default).")
@click.option("--device-id", type=int, default=0, show_default=True, help="CUDA GPU for GPU backends.")
@click.option("--cuda-graphs", is_flag=True, help="Replay a CUDA graph per batch size (native TensorRT backend).")
@click.option("-v", "--verbose", count=True)
@exit_on_user_error
def infer(bundle, input_dir, output_dir, backend, threads, device_id, cuda_graphs, verbose):
    """Write <name>.mask.png (0/255) and <name>.overlay.png for every image in --input."""
    import numpy as np
    from tqdm import tqdm

    from edgeseg.runtime.images import IMAGE_SUFFIXES, read_rgb
    from edgeseg.runtime.segmenter import Segmenter

    configure_logging(verbose)
    src, dst = Path(input_dir), Path(output_dir)
    if not src.is_dir():
        raise InputError(f"{src}: input folder does not exist")
    files = sorted(p for p in src.iterdir() if p.is_file())
    if not files:
        raise InputError(f"{src}: input folder is empty")
    dst.mkdir(parents=True, exist_ok=True)
    done, skipped = 0, []
    with Segmenter(bundle, backend=backend, threads=threads, device_id=device_id, cuda_graphs=cuda_graphs) as seg:
        print(f"backend {seg.backend} on {seg.device}", file=sys.stderr)
        batch: list[tuple[Path, np.ndarray]] = []

        def flush():
            nonlocal done
            masks = seg.predict([img for _, img in batch])
            for (path, img), mask in zip(batch, masks):
                _save_png(mask * 255, dst / f"{path.stem}.mask.png")
                overlay = img.copy()
                m = mask.astype(bool)
                overlay[m] = (overlay[m] * 0.45 + np.array([255, 40, 40]) * 0.55).astype(np.uint8)
                _save_png(overlay, dst / f"{path.stem}.overlay.png")
                done += 1
            batch.clear()

        for path in tqdm(files, desc="segmenting", disable=None):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(path.name)
                log.warning("skipping %s: not an image file", path.name)
                continue
            try:
                batch.append((path, read_rgb(path)))
            except InputError as e:
                skipped.append(path.name)
                log.warning("skipping %s", e)
                continue
            if len(batch) == seg.max_batch:
                flush()
        if batch:
            flush()
    if skipped:
        print(f"skipped {len(skipped)} non-image or unreadable file(s): {', '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""), file=sys.stderr)
    click.echo(json.dumps({"output": str(dst), "images": done, "skipped": len(skipped)}))


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
