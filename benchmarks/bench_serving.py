"""Serving benchmark: the same client load through Triton (HTTP, gRPC, gRPC with system shared memory)
and through Segmenter.submit in process.

8 client threads send camera frames (VGA, 480x640: the headline) and the demo's own 128x128
validation images, one request each (a bounded count per round), against a real ``tritonserver``
on 127.0.0.1 serving the demo bundle's repository, and against the in-process micro-batching
queue. Variants are interleaved round by round. Throughput is requests per second of wall time
per round (median, p10 and p90 over rounds; the Triton/in-process ratio is taken per round, both
ran back to back); latency percentiles pool every request of every round.

What Triton offers for large inputs is used and named in the results: system shared memory
(``tritonclient.utils.shared_memory``: the client writes the frame into a region the server reads,
and the server writes the mask into another, so neither crosses the socket), and the dynamic
batcher's preferred batch sizes and queue delay (``SERVER``). Headline keys are at the default
thread count (the model's ONNX Runtime threads); ``threads_1`` repeats at 1 thread.
"""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from edgeseg.export.config import Config

log = logging.getLogger(__name__)

CLIENTS = 8
# The Triton side batches as the in-process queue does: a batch goes when 8 requests wait or 2 ms
# after the first (Segmenter max_batch 8, max_wait_ms 2); one instance (two instances of a 2-thread
# model on 2 cores would contend). A first run with preferred sizes [4, 8] sent batches of 4 on
# average and served VGA at 0.70x in-process (CHANGELOG.md, 2026-12-01 "Serving").
SERVER = {"instances": 1, "max_queue_delay_us": 2000, "preferred_batch": [8]}
# Beside it, what Triton's instance groups offer: two instances of one ONNX Runtime thread each, so
# one instance letterboxes and masks while the other runs the model (8 closed-loop clients leave
# about 4 requests queued per batch: the second instance takes them at once).
TWO_INSTANCES = {"instances": 2, "max_queue_delay_us": 2000, "preferred_batch": [8], "threads": 1}


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p10, p90) of ``values``."""
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) >= 2 else [values[0]] * 9
    return statistics.median(values), q[0], q[-1]


def _load(make, images, requests: int) -> tuple[float, list[float]]:
    """Wall seconds and per-request latencies (ms) of ``requests`` sends spread over CLIENTS threads.

    ``make()`` returns ``(send, close)`` for one client; senders are made (and shared memory
    registered) before the clock starts, and closed after it stops.
    """
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

    senders = [make() for _ in range(CLIENTS)]
    threads = [threading.Thread(target=client, args=(c, senders[c][0])) for c in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):  # never release a region a request may still be using
        raise RuntimeError(f"a client did not finish {requests} requests in 600 s")
    for _, close in senders:
        close()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return wall, latencies


def triton_sender(module, url: str, shape: tuple[int, ...], shm: bool = False):
    """A client factory for Triton over ``module`` (tritonclient.http or .grpc); ``shm``: system shared memory.

    With shared memory each client owns two regions (its frame, its mask), registered with the
    server once per client and unregistered when it closes.
    """
    def make():
        client = module.InferenceServerClient(url)
        image_bytes, mask_shape = int(np.prod(shape)), [1, shape[0], shape[1]]
        if not shm:
            def send(image):
                x = module.InferInput("IMAGE", [1, *image.shape], "UINT8")
                x.set_data_from_numpy(image[None])
                return client.infer("edgeseg", [x], outputs=[module.InferRequestedOutput("MASK")]).as_numpy("MASK")
            return send, client.close
        import tritonclient.utils.shared_memory as shm_util

        tag = uuid.uuid4().hex[:12]
        regions, registered = {}, []

        def close():
            """Unregister and destroy every region made so far, then close the client; the first error after."""
            errors = []
            for name, handle, _ in regions.values():
                try:
                    if name in registered:
                        _unregister(client, name)
                except Exception as e:  # noqa: BLE001  (the others are still released)
                    errors.append(e)
                shm_util.destroy_shared_memory_region(handle)
            client.close()
            if errors:
                raise errors[0]

        try:
            for kind, size in (("in", image_bytes), ("out", image_bytes // 3)):
                name, key = f"edgeseg_{kind}_{tag}", f"/edgeseg_{kind}_{tag}"
                regions[kind] = (name, shm_util.create_shared_memory_region(name, key, size), size)
                client.register_system_shared_memory(name, key, size)
                registered.append(name)
        except Exception:
            close()
            raise

        def send(image):
            name, handle, size = regions["in"]
            shm_util.set_shared_memory_region(handle, [image[None]])
            x = module.InferInput("IMAGE", [1, *image.shape], "UINT8")
            x.set_shared_memory(name, size)
            out_name, out_handle, out_size = regions["out"]
            y = module.InferRequestedOutput("MASK")
            y.set_shared_memory(out_name, out_size)
            client.infer("edgeseg", [x], outputs=[y])
            return shm_util.get_contents_as_numpy(out_handle, np.uint8, mask_shape).copy()

        return send, close
    return make


def _unregister(client, name: str, tries: int = 100) -> None:
    """Unregister a shared-memory region, waiting (bounded) while the server still holds it.

    The response can reach the client a moment before the server lets go of the request's input
    region ("currently in use"), more often with two model instances.
    """
    from tritonclient.utils import InferenceServerException

    for attempt in range(tries):
        try:
            client.unregister_system_shared_memory(name)
            return
        except InferenceServerException as e:
            if "in use" not in str(e) or attempt == tries - 1:
                raise
            time.sleep(0.01)


def measure(bundle: Path, image_sets: dict[str, list[np.ndarray]], threads: int, rounds: int, requests: int) -> dict:
    """Every image set through every variant, rounds interleaved, one server for all of them."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from edgeseg.export.triton import write_repository
    from edgeseg.export.triton_server import TritonServer
    from edgeseg.runtime import Segmenter

    out: dict = {"threads": threads or "default", "clients": CLIENTS, "requests_per_round": requests,
                 "rounds": rounds, "server": {**SERVER, "threads": threads}, "server_2_instances": TWO_INSTANCES}
    with tempfile.TemporaryDirectory() as tmp:
        repo, repo2 = Path(tmp) / "repo", Path(tmp) / "repo2"
        write_repository(bundle, repo, threads=threads, **SERVER)
        write_repository(bundle, repo2, **TWO_INSTANCES)
        with TritonServer(repo, Path(tmp) / "work") as server, TritonServer(repo2, Path(tmp) / "work2") as server2, \
                Segmenter(bundle, backend="onnxruntime-cpu", threads=threads, max_wait_ms=2.0) as seg:
            for set_name, images in image_sets.items():
                shape = images[0].shape
                variants = {"triton_http": triton_sender(httpclient, server.http_url, shape),
                            "triton_grpc": triton_sender(grpcclient, server.grpc_url, shape),
                            "triton_grpc_shm": triton_sender(grpcclient, server.grpc_url, shape, shm=True),
                            "triton_grpc_shm_2_instances": triton_sender(grpcclient, server2.grpc_url, shape, shm=True),
                            "inprocess_submit": lambda: ((lambda image: seg.submit(image).result(timeout=60)),
                                                         lambda: None)}
                for make in variants.values():  # warm-up: sessions, connections, first batches
                    _load(make, images, CLIENTS * 4)
                before, before2 = server.metrics(), server2.metrics()
                seg_batches = (seg._batcher.batches, seg._batcher.requests)
                walls = {k: [] for k in variants}
                lats = {k: [] for k in variants}
                for _ in range(rounds):
                    for name, make in variants.items():
                        wall, lat = _load(make, images, requests)
                        walls[name].append(wall)
                        lats[name].extend(lat)
                after, after2 = server.metrics(), server2.metrics()
                out[set_name] = summarise(walls, lats, requests, before, after)
                out[set_name]["server_batching_2_instances"] = batching(before2, after2)
                runs, items = seg._batcher.batches - seg_batches[0], seg._batcher.requests - seg_batches[1]
                out[set_name]["inprocess_batching"] = {"requests": items, "batches": runs, "mean_batch": items / max(1, runs)}
                log.info("serving bench, %s, %s threads: Triton (%s) %.2fx in process", set_name, threads or "default",
                         out[set_name]["best_triton_variant"], out[set_name]["triton_vs_inprocess_throughput"])
                out[set_name]["image_size"] = list(shape[:2])
    return out


def summarise(walls: dict, lats: dict, requests: int, before: dict, after: dict) -> dict:
    """Throughput (median, p10, p90 over rounds), latency percentiles, and each Triton variant vs in process."""
    res: dict = {}
    for name in walls:
        med, p10, p90 = _quantiles([requests / w for w in walls[name]])
        q = statistics.quantiles(lats[name], n=100)
        res[name] = {"throughput_rps": med, "throughput_rps_p10": p10, "throughput_rps_p90": p90,
                     "latency_p50_ms": q[49], "latency_p99_ms": q[98]}
    for name in walls:
        if name.startswith("triton"):
            per_round = [w_in / w_t for w_in, w_t in zip(walls["inprocess_submit"], walls[name])]
            med, p10, p90 = _quantiles(per_round)
            res[f"{name}_vs_inprocess_throughput"] = med
            res[f"{name}_vs_inprocess_throughput_p10"], res[f"{name}_vs_inprocess_throughput_p90"] = p10, p90
    best = max((n for n in walls if n.startswith("triton")), key=lambda n: res[f"{n}_vs_inprocess_throughput"])
    res["best_triton_variant"] = best  # as a user would deploy it: the fastest (a best of 4: biased up by noise)
    for suffix in ("", "_p10", "_p90"):
        res["triton_vs_inprocess_throughput" + suffix] = res[f"{best}_vs_inprocess_throughput{suffix}"]
    res["server_batching"] = batching(before, after)
    return res


def batching(before: dict, after: dict) -> dict:
    """Requests and model executions a server ran between two metric reads, and their mean batch."""
    count = {k: after.get(k, 0) - before.get(k, 0) for k in ("nv_inference_count", "nv_inference_exec_count")}
    return {**count, "mean_batch": count["nv_inference_count"] / max(1, count["nv_inference_exec_count"])}


def camera_frames(images: list[np.ndarray], hw: tuple[int, int] = (480, 640)) -> list[np.ndarray]:
    """The demo's images enlarged to a camera's frame size (people in them, as a camera would send)."""
    import cv2

    return [cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR) for img in images]


HEADLINE_SET = "vga_480x640"


def run(cfg: Config, rounds: int = 20) -> dict:
    from edgeseg.distill.data import load_sample, split_samples

    bundle = Path(cfg.run_dir) / "bundle"
    if not (bundle / "manifest.json").is_file():
        raise FileNotFoundError(f"run `make deploy` first: {bundle} is missing")
    images = [load_sample(s)[0] for s in split_samples(cfg, "val")[:64]]
    sets = {HEADLINE_SET: camera_frames(images), "demo_128x128": images}
    r = max(5, rounds // 2)
    out = {"default_threads": os.cpu_count(),
           "images": {HEADLINE_SET: "demo validation images enlarged to 480x640 (bilinear)",
                      "demo_128x128": f"demo validation images {images[0].shape[1]}x{images[0].shape[0]}"}}
    for threads in (0, 1):
        res = measure(bundle, sets, threads, r, 256)
        block = {**res, "triton_vs_inprocess_throughput": res[HEADLINE_SET]["triton_vs_inprocess_throughput"],
                 "triton_vs_inprocess_throughput_p10": res[HEADLINE_SET]["triton_vs_inprocess_throughput_p10"],
                 "triton_vs_inprocess_throughput_p90": res[HEADLINE_SET]["triton_vs_inprocess_throughput_p90"],
                 "triton_vs_inprocess_throughput_128": res["demo_128x128"]["triton_vs_inprocess_throughput"]}
        if threads == 0:
            out.update(block)
        else:
            out["threads_1"] = block
    return out
