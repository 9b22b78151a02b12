"""Serving benchmark: the same client load through Triton (HTTP, gRPC) and through Segmenter.submit in process.

8 client threads send the demo's validation images one request each (bounded count), against a
real ``tritonserver`` on 127.0.0.1 serving the demo bundle's repository, and against the
in-process micro-batching queue, variants interleaved round by round. Throughput is requests per
second of wall time; latency percentiles pool every request of every round. Headline keys are at
the default thread count (the model's ONNX Runtime threads); ``threads_1`` repeats at 1 thread.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgeseg.export.config import Config

CLIENTS = 8


def _load(send, images, requests: int) -> tuple[float, list[float]]:
    """Wall seconds and per-request latencies (ms) of ``requests`` sends spread over CLIENTS threads."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client(c: int, sender):
        mine = []
        for r in range(c, requests, CLIENTS):
            t0 = time.perf_counter()
            try:
                sender(images[r % len(images)])
            except Exception as e:  # counted, never silently lost
                errors.append(repr(e))
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            latencies.extend(mine)

    senders = [send() for _ in range(CLIENTS)]
    threads = [threading.Thread(target=client, args=(c, senders[c])) for c in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return wall, latencies


def measure(bundle: Path, images: list[np.ndarray], threads: int, rounds: int, requests: int) -> dict:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from edgeseg.export.triton import write_repository
    from edgeseg.export.triton_server import TritonServer
    from edgeseg.runtime import Segmenter

    def triton_sender(module, url):
        def make():
            client = module.InferenceServerClient(url)

            def send(image):
                x = module.InferInput("IMAGE", [1, *image.shape], "UINT8")
                x.set_data_from_numpy(image[None])
                return client.infer("edgeseg", [x], outputs=[module.InferRequestedOutput("MASK")]).as_numpy("MASK")
            return send
        return make

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_repository(bundle, repo, instances=1, max_queue_delay_us=2000, threads=threads)
        with TritonServer(repo, Path(tmp) / "work") as server, \
                Segmenter(bundle, backend="onnxruntime-cpu", threads=threads, max_wait_ms=2.0) as seg:
            variants = {"triton_http": triton_sender(httpclient, server.http_url),
                        "triton_grpc": triton_sender(grpcclient, server.grpc_url),
                        "inprocess_submit": lambda: (lambda image: seg.submit(image).result(timeout=60))}
            for make in variants.values():  # warm-up: sessions, connections, first batches
                _load(make, images, CLIENTS * 2)
            walls = {k: [] for k in variants}
            lats = {k: [] for k in variants}
            for _ in range(rounds):
                for name, make in variants.items():
                    wall, lat = _load(make, images, requests)
                    walls[name].append(wall)
                    lats[name].extend(lat)
            metrics = server.metrics()
    out = {"threads": threads or "default", "clients": CLIENTS, "requests_per_round": requests, "rounds": rounds,
           "server_batching": {"inference_count": metrics.get("nv_inference_count"),
                               "execution_count": metrics.get("nv_inference_exec_count")}}
    for name in variants:
        thr = [requests / w for w in walls[name]]
        q = statistics.quantiles(lats[name], n=100)
        out[name] = {"throughput_rps": statistics.median(thr), "throughput_rps_p10": min(thr),
                     "throughput_rps_p90": max(thr), "latency_p50_ms": q[49], "latency_p99_ms": q[98]}
    base = out["inprocess_submit"]["throughput_rps"]
    out["triton_http_vs_inprocess_throughput"] = out["triton_http"]["throughput_rps"] / base
    out["triton_grpc_vs_inprocess_throughput"] = out["triton_grpc"]["throughput_rps"] / base
    # headline: the faster protocol, as a user would deploy it
    out["triton_vs_inprocess_throughput"] = max(out["triton_http_vs_inprocess_throughput"],
                                                out["triton_grpc_vs_inprocess_throughput"])
    return out


def run(cfg: Config, rounds: int = 20) -> dict:
    from edgeseg.distill.data import load_sample, split_samples

    bundle = Path(cfg.run_dir) / "bundle"
    if not (bundle / "manifest.json").is_file():
        raise FileNotFoundError(f"run `make deploy` first: {bundle} is missing")
    images = [load_sample(s)[0] for s in split_samples(cfg, "val")[:64]]
    r = max(3, rounds // 4)
    out = {"default_threads": os.cpu_count(), "images": f"demo validation images {images[0].shape[1]}x{images[0].shape[0]}"}
    out.update(measure(bundle, images, 0, r, 256))
    one = measure(bundle, images, 1, r, 256)
    out["threads_1"] = {k: v for k, v in one.items() if k.endswith("throughput") or k.startswith(("triton_", "inprocess"))}
    return out
