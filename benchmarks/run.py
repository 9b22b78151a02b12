"""``make bench``: run the benchmarks and write ``benchmarks/results/<name>.json``.

    python -m benchmarks.run --config configs/demo.yaml [--only distill,runtime] [--rounds 20]

``--only generator`` measures the shipped generator's KID and updates its keys in ``calibration.json``;
``--only site_check`` validates ``edgeseg runtime check`` on the demo (``site_check.json``); ``--only
memory`` records the peak RSS of the run's own training and synthesis processes
(``distill_train_peak_rss_mb`` in ``distill.json``, ``calibration_synth_peak_rss_mb`` in
``calibration.json``) without rerunning those benchmarks; ``--only schedule`` sets the student's
schedule on val (trains; ``schedule.json``); ``--only video`` reruns the runtime's video figures and
rewrites only the ``video`` key of ``runtime.json``; ``--only demo`` records ``make demo``'s stage times
(its ``<run_dir>/demo_times.tsv``: ``--set run_dir=`` a fresh clone's run) and times ``make test``
(``demo.json``). The distillation study is ``make study``
(``benchmarks/study.py``): it trains for hours and is not part of ``make bench``.

Needs the demo's artifacts (``make demo``): the benchmarks measure what the pipeline built.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import click

from edgeseg.distill.cli import config_options, load, use_schema
from edgeseg.export.config import Config
from edgeseg.runtime.console import exit_on_user_error
from edgeseg.runtime.files import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
# keys of a results file written by another --only block than the file's own benchmark
KEPT_PREFIXES = ("peak_memory", "distill_train_peak", "distill_train_batch", "calibration_synth_peak", "generator_",
                 "video")
BENCHES = ("distill", "calibration", "export", "runtime", "serving", "site_check")


def _machine() -> dict:
    import onnxruntime
    import torch

    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


@click.command()
@config_options
@click.option("--only", default=",".join(BENCHES), show_default=True, help="Comma-separated benchmarks to run.")
@click.option("--rounds", type=int, default=20, show_default=True, help="Interleaved rounds per measurement.")
@exit_on_user_error
def main(config_path, overrides, verbose, only, rounds):
    use_schema(Config)  # the whole file's schema, as the `edgeseg` command hands it to the stages
    cfg = load(config_path, overrides, max(verbose, 1))  # info: minutes of training must show in the log
    wanted = [b.strip() for b in only.split(",") if b.strip()]
    if {"seeds", "site"} & set(wanted):
        raise click.BadParameter("the distillation study is `make study` (python -m benchmarks.study) now, not part of "
                                 "make bench")
    unknown = set(wanted) - set(BENCHES) - {"generator", "memory", "schedule", "video", "demo"}
    if unknown:
        raise click.BadParameter(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHES)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        t0 = time.perf_counter()
        print(f"benchmark {name} ...", file=sys.stderr, flush=True)
        if name == "demo":  # make demo's stage times (its demo_times.tsv) and make test, timed: demo.json
            from benchmarks.bench_demo import run as run_demo

            result = run_demo(cfg)
            result.update(machine=_machine(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            path = write_json_atomic(RESULTS / "demo.json", result)
            print(f"  -> {path} (make demo {result['total_minutes']:.1f} min, make test "
                  f"{result['make_test_seconds'] / 60:.1f} min)", file=sys.stderr)
            continue
        if name == "schedule":  # the student's schedule, set on val before the study (trains; resumes)
            from benchmarks.bench_schedule import schedule_sweep

            result = schedule_sweep(cfg)
            result.update(machine=_machine(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          seconds=time.perf_counter() - t0)
            from benchmarks.bench_schedule import plot_curves

            result["curves_png"] = str(plot_curves(result, RESULTS / "schedule_curves.png").relative_to(RESULTS.parent.parent))
            path = write_json_atomic(RESULTS / "schedule.json", result)
            print(f"  -> {path} (chose {result['chosen']}, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            continue
        if name == "memory":  # the stages' own processes recorded their peaks: copy them into the results
            from benchmarks.bench_calibration import peak_memory
            from benchmarks.bench_distill import training_peak_memory

            for file, found in (("distill.json", training_peak_memory(cfg)), ("calibration.json", peak_memory(cfg))):
                path = RESULTS / file
                result = json.loads(path.read_text()) if path.is_file() else {}
                result.update(found, peak_memory_run_dir=str(cfg.run_dir),
                              peak_memory_measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                write_json_atomic(path, result)
                print(f"  -> {path} {found}", file=sys.stderr)
            continue
        if name == "video":  # the video pipeline's figures alone: only the `video` key of runtime.json changes
            from benchmarks.bench_runtime import video_block

            path = RESULTS / "runtime.json"
            result = json.loads(path.read_text()) if path.is_file() else {}
            result["video"] = {**video_block(cfg, rounds), "machine": _machine(),
                               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": time.perf_counter() - t0}
            write_json_atomic(path, result)
            print(f"  -> {path} (video, {time.perf_counter() - t0:.0f} s) efficiency "
                  f"{result['video']['video_pipeline_efficiency']:.3f}", file=sys.stderr)
            continue
        if name == "generator":  # updates the generator keys of calibration.json, the rest stays as measured
            from benchmarks.bench_generator import run as run_generator

            path = RESULTS / "calibration.json"
            result = json.loads(path.read_text()) if path.is_file() else {}
            result.update(run_generator(cfg, sheet=RESULTS / "generator_samples.png"),
                          generator_kid_measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            write_json_atomic(path, result)
            print(f"  -> {path} (generator KID, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            continue
        if name == "distill":
            from benchmarks.bench_distill import run
            result = run(cfg, rounds)
        elif name == "calibration":
            from benchmarks.bench_calibration import run
            result = run(cfg, config_path, overrides)
        elif name == "export":
            from benchmarks.bench_export import run
            result = run(cfg, rounds)
        elif name == "runtime":
            from benchmarks.bench_runtime import run
            result = run(cfg, rounds)
        elif name == "site_check":
            from benchmarks.bench_site_check import run
            result = run(cfg)
        else:
            from benchmarks.bench_serving import run
            result = run(cfg, rounds)
        result["machine"] = _machine()
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        result["seconds"] = time.perf_counter() - t0
        path = RESULTS / f"{name}.json"
        # keys another command writes into this file stay as it wrote them: the study's (make study), the memory
        # peaks (--only memory), the generator's KID (--only generator), the video figures (--only video)
        from benchmarks.study import is_study_key

        old = json.loads(path.read_text()) if path.is_file() else {}
        kept = {k: v for k, v in old.items() if k.startswith(KEPT_PREFIXES) or (name == "distill" and is_study_key(k))}
        result = {**kept, **result}
        write_json_atomic(path, result)
        headline = {k: round(v, 3) for k, v in result.items() if isinstance(v, float) and ("speedup" in k or "share" in k
                                                                                        or "overhead" in k or "rate" in k)}
        print(f"  -> {path} ({result['seconds']:.0f} s) {headline}", file=sys.stderr)


if __name__ == "__main__":
    main()
