"""``make bench``: run the benchmarks and write ``benchmarks/results/<name>.json``.

    python -m benchmarks.run --config configs/demo.yaml [--only distill,runtime] [--rounds 20] [--seeds 0,1,2]

``--only seeds`` reruns the distillation seed study alone and updates its keys in ``distill.json``
(the speed figures there stay as they were measured); ``--only generator`` measures the shipped
generator's KID and updates its keys in ``calibration.json``; ``--only site`` runs the site arms (g, h, i)
beside a, c and d and updates the ``site8*`` keys of ``distill.json``; ``--only site_check`` validates
``edgeseg runtime check`` on the demo (``site_check.json``); ``--only memory`` records the peak RSS of the
run's own training and synthesis processes (``distill_train_peak_rss_mb`` in ``distill.json``,
``calibration_synth_peak_rss_mb`` in ``calibration.json``) without rerunning those benchmarks.

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

RESULTS = Path(__file__).resolve().parent / "results"
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
@click.option("--seeds", default="0,1,2", show_default=True, help="Training seeds of the distillation seed study.")
@click.option("--arms", default=None, help="Comma-separated arms of the seed study (default: all of ARMS).")
@exit_on_user_error
def main(config_path, overrides, verbose, only, rounds, seeds, arms):
    use_schema(Config)  # the whole file's schema, as the `edgeseg` command hands it to the stages
    cfg = load(config_path, overrides, max(verbose, 1))  # info: minutes of training must show in the log
    wanted = [b.strip() for b in only.split(",") if b.strip()]
    unknown = set(wanted) - set(BENCHES) - {"seeds", "generator", "site", "memory"}
    if unknown:
        raise click.BadParameter(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHES)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        t0 = time.perf_counter()
        print(f"benchmark {name} ...", file=sys.stderr, flush=True)
        if name == "seeds":
            from benchmarks.bench_distill import seed_study

            path = RESULTS / "distill.json"
            from benchmarks.bench_distill import STALE_PREFIXES

            result = json.loads(path.read_text()) if path.is_file() else {}
            result = {k: v for k, v in result.items() if not k.startswith(STALE_PREFIXES)}
            study = seed_study(cfg, tuple(int(x) for x in seeds.split(",") if x.strip()),
                               tuple(a.strip() for a in arms.split(",")) if arms else None)
            result.update(study, seed_study_measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          seed_study_seconds=time.perf_counter() - t0)
            path.write_text(json.dumps(result, indent=1, default=str))
            print(f"  -> {path} (seed study, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            continue
        if name == "site":  # the site arms beside a, c and d (reused when trained): only the site8 keys change
            from benchmarks.bench_distill import SITE_ARMS, seed_study

            path = RESULTS / "distill.json"
            result = json.loads(path.read_text()) if path.is_file() else {}
            result = {k: v for k, v in result.items() if not k.startswith("site8")}
            study = seed_study(cfg, tuple(int(x) for x in seeds.split(",") if x.strip()),
                               ("gt_only", "kd_unlabelled", "kd_site", *SITE_ARMS))
            result.update({k: v for k, v in study.items() if k.startswith("site8")},
                          site8_per_seed=[{split: {a: v for a, v in row[split].items() if a in SITE_ARMS}
                                           for split in study["splits"]} | {"seed": row["seed"]} for row in study["per_seed"]],
                          site8_arms={a: study["arms"][a] for a in SITE_ARMS if a in study["arms"]},
                          site8_arm_seeds={a: study["arm_seeds"][a] for a in SITE_ARMS if a in study["arm_seeds"]},
                          site8_arm_train_seconds={a: study["arm_train_seconds"][a] for a in SITE_ARMS
                                                   if a in study["arm_train_seconds"]},
                          site8_study_seconds=time.perf_counter() - t0,
                          site8_measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            path.write_text(json.dumps(result, indent=1, default=str))
            print(f"  -> {path} (site arms, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            continue
        if name == "memory":  # the stages' own processes recorded their peaks: copy them into the results
            from benchmarks.bench_calibration import peak_memory
            from benchmarks.bench_distill import training_peak_memory

            for file, found in (("distill.json", training_peak_memory(cfg)), ("calibration.json", peak_memory(cfg))):
                path = RESULTS / file
                result = json.loads(path.read_text()) if path.is_file() else {}
                result.update(found, peak_memory_run_dir=str(cfg.run_dir),
                              peak_memory_measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                path.write_text(json.dumps(result, indent=1, default=str))
                print(f"  -> {path} {found}", file=sys.stderr)
            continue
        if name == "generator":  # updates the generator keys of calibration.json, the rest stays as measured
            from benchmarks.bench_generator import run as run_generator

            path = RESULTS / "calibration.json"
            result = json.loads(path.read_text()) if path.is_file() else {}
            result.update(run_generator(cfg, sheet=RESULTS / "generator_samples.png"),
                          generator_kid_measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            path.write_text(json.dumps(result, indent=1, default=str))
            print(f"  -> {path} (generator KID, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            continue
        if name == "distill":
            from benchmarks.bench_distill import run
            result = run(cfg, rounds, tuple(int(x) for x in seeds.split(",") if x.strip()))
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
        path.write_text(json.dumps(result, indent=1, default=str))
        headline = {k: round(v, 3) for k, v in result.items() if isinstance(v, float) and ("speedup" in k or "share" in k
                                                                                        or "overhead" in k or "rate" in k)}
        print(f"  -> {path} ({result['seconds']:.0f} s) {headline}", file=sys.stderr)


if __name__ == "__main__":
    main()
