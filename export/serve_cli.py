"""``edgeseg serve``: hand a deploy bundle over to Triton Inference Server and DeepStream."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from edgeseg.runtime.console import VERBOSE_HELP, configure_logging, exit_on_user_error

log = logging.getLogger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Serve beyond one process: a Triton model repository, a DeepStream config, a local Triton."""


@main.command(short_help="Write a Triton model repository for a bundle.")
@click.option("--bundle", required=True, type=click.Path(file_okay=False), help="Deploy bundle folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model repository to write.")
@click.option("--max-batch", type=int, default=None, help="Triton max_batch_size (default: the bundle's).")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances (instance_group count).")
@click.option("--max-queue-delay-us", type=int, default=2000, show_default=True,
              help="Dynamic batcher queue delay in microseconds.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime CPU threads of each instance of the CPU model (0: its default, one per physical core).")
@click.option("--preferred-batch", default=None,
              help="Comma-separated preferred batch sizes of the CPU model's dynamic batcher (default: the max batch).")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@exit_on_user_error
def triton(bundle, out, max_batch, instances, max_queue_delay_us, threads, preferred_batch, verbose):
    """Write a Triton model repository (Python backend model + GPU models and ensemble)."""
    from edgeseg.export.triton import write_repository
    from edgeseg.runtime.errors import InputError

    configure_logging(max(verbose, 1))
    try:
        sizes = [int(b) for b in preferred_batch.split(",") if b.strip()] if preferred_batch else None
    except ValueError:
        raise InputError(f"--preferred-batch takes comma-separated integers such as 4,8, got {preferred_batch!r}") from None
    click.echo(json.dumps(write_repository(bundle, out, max_batch, instances, max_queue_delay_us, threads, sizes)))


@main.command(short_help="Write a DeepStream nvinfer config for a bundle.")
@click.option("--bundle", required=True, type=click.Path(file_okay=False), help="Deploy bundle folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the nvinfer config.")
@click.option("--batch-size", type=int, default=None, help="nvinfer batch-size (default: the bundle's max batch).")
@click.option("--gpu-id", type=int, default=0, show_default=True, help="nvinfer gpu-id: the GPU that runs the model.")
@click.option("--tensorrt-version", default="10.3.0", show_default=True,
              help="TensorRT of the DeepStream host (DeepStream 7.1 / JetPack 6: 10.3.0): the INT8 cache's version; "
                   "11+ has no implicit INT8, so the config asks for FP16.")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@exit_on_user_error
def deepstream(bundle, out, batch_size, gpu_id, tensorrt_version, verbose):
    """Write a DeepStream nvinfer config and its normalising ONNX."""
    from edgeseg.export.deepstream import write_config

    configure_logging(verbose)
    click.echo(json.dumps(write_config(bundle, out, batch_size, gpu_id, tensorrt_version)))


@main.command(short_help="Start a local Triton server on a repository.")
@click.option("--repository", required=True, type=click.Path(file_okay=False), help="Model repository (serve triton).")
@click.option("--work", type=click.Path(file_okay=False), default=None, help="Server work folder (default: REPO/../triton-work).")
@click.option("--seconds", type=float, default=0, help="Stop after this many seconds (0: until Ctrl-C).")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@exit_on_user_error
def start(repository, work, seconds, verbose):
    """Start tritonserver on 127.0.0.1 with the repository's CPU model; print its ports."""
    from edgeseg.export.triton_server import TritonServer

    configure_logging(max(verbose, 1))
    repo = Path(repository)
    if not (repo / "edgeseg" / "config.pbtxt").is_file():
        from edgeseg.runtime.errors import InputError

        raise InputError(f"{repo}: not an edgeseg Triton repository; write one with `edgeseg serve triton`")
    server = TritonServer(repo, Path(work) if work else repo.parent / "triton-work")
    with server:
        print(f"Triton serving model 'edgeseg': HTTP {server.http_url}, gRPC {server.grpc_url} "
              f"(log {server.log_file}); Ctrl-C stops it", file=sys.stderr)
        click.echo(json.dumps({"http": server.http_url, "grpc": server.grpc_url, "model": "edgeseg"}))
        try:
            t0 = time.monotonic()
            while (not seconds or time.monotonic() - t0 < seconds) and server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
