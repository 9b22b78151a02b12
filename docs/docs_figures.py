"""The tables of figures in docs/results.md and README.md, rendered from benchmarks/results/*.json.

``FIGURES`` says which figure comes from which key; a table sits between ``<!-- figures:NAME -->`` and
``<!-- /figures -->``. A key a required row needs and its JSON file does not hold is an error naming both.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from docs_common import RESULTS


class MissingFigure(KeyError):
    pass


def _get(data: dict, path: str, file: str) -> Any:
    cur: Any = data
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise MissingFigure(f"benchmarks/results/{file} has no key {path!r}; update FIGURES in docs/generate.py")
        cur = cur[part]
    return cur


@dataclass
class Row:
    """One figure: what it is, how it is shown (``show(get) -> str``), and the JSON keys it reads."""

    label: str
    show: Callable[[Callable[[str], Any]], str]
    keys: str
    headline: str = ""  # the README's one-line label for it; empty: not in the README
    optional: bool = False  # left out when its JSON file does not hold it (a study that has not run that arm)


@dataclass
class Table:
    name: str  # the marker in results.md
    file: str  # benchmarks/results/<file>
    date_keys: tuple[str, ...]  # the key holding when these figures were measured (the first one present)
    command: str  # what reproduces them
    rows: list[Row] = field(default_factory=list)
    anchor: str = ""  # results.md's heading, for the README's links
    generated: Callable[[dict], list[Row]] | None = None  # rows read off the JSON itself (the study's arms, gains)


def _default_smoothing(get) -> dict:
    """The demo clip's figures at the default smoothing strength (a key holding a dot: ``strengths["0.5"]``)."""
    strengths = get("video.smoothing.strengths")
    default = format(get("video.smoothing.default_strength"), "g")
    if default not in strengths:
        raise MissingFigure(f"benchmarks/results/runtime.json has no video.smoothing.strengths[{default!r}]")
    return strengths[default]


def ratio(key: str, digits: int = 2) -> Callable:
    """``3.65x (p10 2.90, p90 4.40)`` from ``key`` and its ``_p10``/``_p90`` spread where it has one."""
    def show(get):
        v = get(key)
        try:
            lo, hi = get(key + "_p10"), get(key + "_p90")
        except MissingFigure:
            return f"{v:.{digits}f}x"
        return f"{v:.{digits}f}x (p10 {lo:.{digits}f}, p90 {hi:.{digits}f})"
    return show


def fmt(key: str, pattern: str, scale: float = 1.0) -> Callable:
    return lambda get: pattern.format(get(key) * scale)


def yes_no(key: str) -> Callable:
    return lambda get: "yes" if get(key) else "no"


def miou_mean_std(prefix: str) -> Callable:
    """``0.7140 ± 0.0136`` from ``<prefix>_mean`` and ``<prefix>_std`` (a single seed has no std)."""
    def show(get):
        mean, std = get(prefix + "_mean"), get(prefix + "_std")
        return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
    return show


def points_mean_std(prefix: str) -> Callable:
    """``+1.74 ± 1.59 points (3 seeds)`` from a paired gain's ``_mean``, ``_std`` and ``_n``."""
    def show(get):
        mean, std = get(prefix + "_mean"), get(prefix + "_std")
        try:
            n = get(prefix + "_n")
        except MissingFigure:
            n = None
        spread = f" ± {std * 100:.2f}" if std is not None else ""
        seeds = f" ({n} seed{'s' if n != 1 else ''})" if n is not None else ""
        return f"{mean * 100:+.2f}{spread} points{seeds}"
    return show


# The study's comparisons, by key (each a paired gain, to-arm minus from-arm); a key not listed shows as its name.
GAIN_LABELS = {
    "gain_kd_unlabelled_vs_gt_only": "c over a: distillation with the unlabelled source frames, vs ground truth alone",
    "gain_kd_labelled_vs_gt_only": "b over a: distillation on the labelled images alone, vs ground truth alone",
    "gain_unlabelled_vs_labelled_only": "c over b: what the unlabelled source frames add",
    "gain_site_vs_source": "d over c: what the unlabelled site frames add",
    "gain_kd_site_vs_gt_only": "d over a",
    "gain_full_labels_vs_gt_only": "all labels over 150 labels, ground truth alone",
    "gain_kd_full_labels": "distillation with all labels over ground truth with all labels",
    "feature_term_effect": "c minus e: what the feature term adds",
    "logit_terms_effect": "c minus f: what the logit terms (KL, MSE) add",
    "site8_gain": "g over c: the 8 site frames",
    "site8_synth_gain": "h over c: the 8 site frames and synthetic site images",
    "site8_synth_hard_gain": "i over c",
    "site8_synth_vs_site8": "h over g: what the synthetic site images add",
    "site8_synth_vs_kd_site": "h over d",
    "site8_synth_hard_vs_site8_synth": "i over h: what the hard examples add",
    "live_teacher_effect": "teachers run live minus cached teacher targets (d)",
    "onnx_teacher_effect": "the teacher as ONNX minus the teacher in torch (d)",
}
HEADLINE_GAINS = {
    "gain_kd_unlabelled_vs_gt_only": "Distillation over ground truth alone (test)",
    "gain_site_vs_source_test_shift": "Unlabelled site frames in distillation (test_shift)",
    "site8_gain_test_shift": "8 unlabelled site frames in distillation (test_shift)",
}


def _arms(data: dict) -> dict[str, str]:
    """The study's arms in its JSON (name -> what it is), the site arms' own block included."""
    return {**data.get("arms", {}), **data.get("site8_arms", {})}


def study_rows(site: bool) -> Callable[[dict], list[Row]]:
    """Each arm's mIoU on test and test_shift, then every paired gain the study wrote: the site arms (g, h, ...)
    or the others."""
    def rows(data: dict) -> list[Row]:
        out = [Row("teacher (test / test_shift)", lambda get: f"{get('teacher_test_miou_mean'):.4f} / "
                   f"{get('teacher_test_shift_miou_mean'):.4f}", "`teacher_test_miou_mean`, `teacher_test_shift_miou_mean`", optional=True)
               ] if not site else []
        for name, what in _arms(data).items():
            if name.startswith("site8") != site or f"{name}_test_miou_mean" not in data:
                continue
            out.append(Row(f"{what} (test / test_shift)",
                           lambda get, a=name: miou_mean_std(f"{a}_test_miou")(get) + " / "
                           + miou_mean_std(f"{a}_test_shift_miou")(get),
                           f"`{name}_test_miou_mean`, `{name}_test_shift_miou_mean` (`_std`)"))
        for key in data:
            if not key.endswith("_n") or key[:-2] + "_mean" not in data:
                continue
            base = key[:-2]
            plain = base.removesuffix("_test_shift").removesuffix("_test")
            if plain.startswith("site8") != site:
                continue
            split = ("test_shift" if base.endswith("_test_shift") else "test" if base.endswith("_test")
                     else "test_shift" if plain + "_test_mean" in data else "test")
            label = f"{GAIN_LABELS.get(plain, plain)}, {split}"
            out.append(Row(label, points_mean_std(base), f"`{base}_mean`, `_std`, `_n`",
                           headline=HEADLINE_GAINS.get(base, "")))
        return out
    return rows


FIGURES: list[Table] = [
    Table("distillation", "distill.json", ("study_measured_at", "seed_study_measured_at"), "make study",
          anchor="distillation", generated=study_rows(site=False), rows=[
              Row("share of a's shift loss (a's test minus test_shift) that the site frames win back (d over c, "
                  "test_shift)", fmt("site_recovered_shift_share", "{:.0f}%", 100),
                  "`site_recovered_shift_share`", optional=True),
              Row("student d (the demo's) vs the teacher on test (mIoU ratio)", fmt("kd_site_vs_teacher_test", "{:.3f}x"),
                  "`kd_site_vs_teacher_test`", headline="Student mIoU over the teacher's (test)", optional=True),
              Row("teacher minus ground truth only (test / test_shift)",
                  lambda get: f"{get('teacher_minus_gt_only_test') * 100:+.2f} / "
                              f"{get('teacher_minus_gt_only_test_shift') * 100:+.2f} points",
                  "`teacher_minus_gt_only_test`, `teacher_minus_gt_only_test_shift`",
                  headline="Teacher over the 150-label student (test / test_shift)", optional=True),
              Row("the same seed's student with the teacher given as ONNX / as torch (test)",
                  lambda get: f"{get('onnx_teacher_test_miou'):.4f} / {get('torch_teacher_test_miou'):.4f}",
                  "`onnx_teacher_test_miou`, `torch_teacher_test_miou`",
                  headline="Student distilled from an ONNX teacher / the torch teacher (test)", optional=True),
              Row("the student's schedule (set on val: schedule.json)",
                  lambda get: f"{get('schedule.epochs')} epochs, lr {get('schedule.lr'):g}, warm-up "
                              f"{get('schedule.warmup_steps')} steps, temperature {get('schedule.temperature')}, "
                              f"unlabelled share {get('unlabelled_share'):g}",
                  "`schedule`, `unlabelled_share`", optional=True),
              Row("what the study cost: every arm's training", fmt("study_train_seconds", "{:.0f} min", 1 / 60),
                  "`study_train_seconds`", optional=True),
          ]),
    Table("site-arms", "distill.json", ("site8_measured_at", "study_measured_at", "seed_study_measured_at"),
          "make study", anchor="at-a-new-site-a-handful-of-frames", generated=study_rows(site=True), rows=[
              Row("h's gain over c as a share of d's (test_shift)", fmt("site8_synth_recovered_share_of_site", "{:.0f}%", 100),
                  "`site8_synth_recovered_share_of_site`", optional=True),
              Row("g's gain over c as a share of d's (test_shift)", fmt("site8_recovered_share_of_site", "{:.0f}%", 100),
                  "`site8_recovered_share_of_site`", optional=True),
          ]),
    Table("student-speed", "distill.json", ("measured_at",), "python -m benchmarks.run --only distill",
          anchor="student-speed", rows=[
              Row("student vs teacher, ONNX Runtime FP32, batch 8, 2 threads", ratio("student_vs_teacher_speedup"),
                  "`student_vs_teacher_speedup` (`_p10`, `_p90`)"),
              Row("the same at 1 thread", ratio("threads_1.student_vs_teacher_speedup"),
                  "`threads_1.student_vs_teacher_speedup`"),
              Row("IOBinding vs session.run (the feature teacher)", ratio("iobinding_vs_run_speedup", 3),
                  "`iobinding_vs_run_speedup`"),
              Row("IOBinding's output equals session.run's", yes_no("iobinding_equals_run"), "`iobinding_equals_run`"),
              Row("training step with the teacher as ONNX over the torch teacher, both live, 2 threads",
                  ratio("onnx_teacher_step_ratio"), "`onnx_teacher_step_ratio`",
                  headline="ONNX teacher's training step over the torch teacher's", optional=True),
              Row("the same at 1 thread", ratio("threads_1.onnx_teacher_step_ratio"),
                  "`threads_1.onnx_teacher_step_ratio`", optional=True),
              Row("training step, teachers live over cached targets, 2 threads", ratio("cached_step_speedup"),
                  "`cached_step_speedup`", headline="Cached teacher targets: training step speed-up", optional=True),
              Row("training step, NCHW over channels_last (live teachers), 2 threads", ratio("channels_last_step_speedup"),
                  "`channels_last_step_speedup`", optional=True),
              Row("cached distillation step over the ground-truth-only step", ratio("cached_vs_baseline_step"),
                  "`cached_vs_baseline_step`", optional=True),
          ]),
    Table("schedule", "schedule.json", ("measured_at",), "python -m benchmarks.run --only schedule",
          anchor="the-students-schedule", generated=lambda data: schedule_rows(data)),
    Table("calibration", "calibration.json", ("measured_at",), "python -m benchmarks.run --only calibration",
          anchor="calibration", rows=[
              Row("pass rate: unguided / mask guidance",
                  lambda get: f"{get('none_pass_rate') * 100:.0f}% / {get('mask_pass_rate') * 100:.0f}%",
                  "`none_pass_rate`, `mask_pass_rate`"),
              Row("median condition IoU: unguided / mask guidance",
                  lambda get: f"{get('none_condition_iou_median'):.2f} / {get('mask_condition_iou_median'):.2f}",
                  "`none_condition_iou_median`, `mask_condition_iou_median`"),
              Row("sampling time, guided over unguided", fmt("guidance_overhead", "{:.2f}x"), "`guidance_overhead`"),
              Row("guided samples per second, 2 threads", fmt("mask_images_per_s", "{:.2f}"), "`mask_images_per_s`"),
              Row("activation coverage on held-out images: synthetic / real / noise",
                  lambda get: " / ".join(f"{get(f'quality.coverage_{s}'):.3f}" for s in ("synthetic", "real", "noise")),
                  "`quality.coverage_synthetic`, `_real`, `_noise`"),
              Row("SQNR of the Q/DQ model each set calibrates: synthetic / real / noise",
                  lambda get: " / ".join(f"{get(f'quality.sqnr_db_{s}'):.1f}" for s in ("synthetic", "real", "noise")) + " dB",
                  "`quality.sqnr_db_synthetic`, `_real`, `_noise`"),
              Row("median SSIM of a kept image to its nearest training image", fmt("quality.train_ssim_median", "{:.2f}"),
                  "`quality.train_ssim_median`"),
              Row("one sampling batch, the generator's UNet in NCHW over NHWC", ratio("channels_last_sampling_speedup"),
                  "`channels_last_sampling_speedup`", optional=True),
          ]),
    Table("generator", "calibration.json", ("generator_kid_measured_at",), "python -m benchmarks.run --only generator",
          anchor="calibration-the-shipped-generator", rows=[
              Row("KID excess ratio, shipped vs run-time generator, 64 px", fmt("generator_kid_excess_ratio", "{:.2f}"),
                  "`generator_kid_excess_ratio`", headline="Shipped generator's KID excess over a run-time one"),
              Row("the same at full resolution", fmt("generator_kid_excess_ratio_native", "{:.2f}"),
                  "`generator_kid_excess_ratio_native`"),
              Row("the same on standardised features", fmt("generator_kid_excess_ratio_standardised", "{:.2f}"),
                  "`generator_kid_excess_ratio_standardised`"),
              Row("KID: shipped / run-time generator / real-vs-real floor",
                  lambda get: " / ".join(f"{get(k):.1f}" for k in ("generator_kid", "generator_kid_baseline",
                                                                   "generator_kid_floor")),
                  "`generator_kid`, `generator_kid_baseline`, `generator_kid_floor`"),
              Row("the shipped generator's training", lambda get: f"{get('generator_shipped.train_steps')} steps, "
                  f"{get('generator_shipped.train_seconds') / 60:.0f} min", "`generator_shipped.train_steps`, `.train_seconds`"),
          ]),
    Table("export", "export.json", ("measured_at",), "python -m benchmarks.run --only export",
          anchor="export", rows=[
              Row("u8s8 INT8 vs FP32, batch 8, 2 threads", ratio("u8s8_vs_fp32_speedup_batch8"),
                  "`u8s8_vs_fp32_speedup_batch8`", headline="INT8 (u8s8) over FP32 on the CPU, batch 8"),
              Row("the same at 1 thread", ratio("threads_1.u8s8_vs_fp32_speedup_batch8"),
                  "`threads_1.u8s8_vs_fp32_speedup_batch8`"),
              Row("s8s8 (TensorRT's flavour) vs FP32 on the CPU", ratio("s8s8_vs_fp32_speedup_batch8"),
                  "`s8s8_vs_fp32_speedup_batch8`"),
              Row("file size FP32 / s8s8 / u8s8", lambda get: " / ".join(f"{get(f'files_mb.{k}'):.1f}" for k in
                                                                         ("fp32", "s8s8", "u8s8")) + " MB",
                  "`files_mb`"),
              Row("u8s8 with ReLU vs FP32 with SiLU, 2 threads",
                  fmt("activation_sweep.default_threads.relu.u8s8_vs_silu_fp32", "{:.2f}x"),
                  "`activation_sweep.default_threads.relu.u8s8_vs_silu_fp32`"),
              Row("INT8 share of the CPU's int8 peak (VNNI), batch 8", fmt("int8_share_of_peak", "{:.0f}%", 100),
                  "`int8_share_of_peak`"),
              Row("FP32 share of the CPU's FMA peak, batch 8", fmt("fp32_share_of_peak", "{:.0f}%", 100),
                  "`fp32_share_of_peak`"),
          ]),
    Table("budget", "export.json", ("measured_at",), "python -m benchmarks.run --only export",
          anchor="export-the-accuracy-budget", rows=[
              Row("s8s8 INT8 loss on val, FP32 minus INT8",
                  lambda get: f"{(get('budget_study.s8s8.val.fp32_miou') - get('budget_study.s8s8.val.int8_miou')) * 100:.2f} points",
                  "`budget_study.s8s8.val.fp32_miou`, `.int8_miou`"),
              Row("nodes the search kept in float (s8s8); budget met",
                  lambda get: f"{len(get('budget_study.s8s8.float_nodes'))}; "
                              f"{'yes' if get('budget_study.s8s8.val.met') else 'no'}",
                  "`budget_study.s8s8.float_nodes`, `.val.met`"),
              Row("test: FP32 / plain s8s8 / mixed",
                  lambda get: " / ".join(f"{get(f'budget_study.s8s8.test.{k}'):.4f}" for k in ("fp32", "plain", "mixed")),
                  "`budget_study.s8s8.test`"),
              Row("test_shift: FP32 / plain s8s8 / mixed",
                  lambda get: " / ".join(f"{get(f'budget_study.s8s8.test_shift.{k}'):.4f}" for k in ("fp32", "plain", "mixed")),
                  "`budget_study.s8s8.test_shift`"),
              Row("u8s8 INT8 loss on val; float nodes kept",
                  lambda get: f"{(get('budget_study.u8s8.val.fp32_miou') - get('budget_study.u8s8.val.int8_miou')) * 100:.2f} "
                              f"points; {len(get('budget_study.u8s8.float_nodes'))}",
                  "`budget_study.u8s8.val`, `.float_nodes`"),
          ]),
    Table("runtime", "runtime.json", ("measured_at",), "python -m benchmarks.run --only runtime",
          anchor="runtime", rows=[
              Row("student vs teacher through the runtime, FP32, 128x128, batch 8", ratio("student_vs_teacher_speedup"),
                  "`student_vs_teacher_speedup`", headline="Student over teacher speed, through the runtime"),
              Row("the same at 1 thread", ratio("threads_1.student_vs_teacher_speedup"),
                  "`threads_1.student_vs_teacher_speedup`"),
              Row("the same on VGA frames", ratio("vga_480x640.student_vs_teacher_speedup"),
                  "`vga_480x640.student_vs_teacher_speedup`"),
              Row("runtime (u8s8) vs torch eager (channels_last), batch 8", ratio("runtime_vs_torch_speedup"),
                  "`runtime_vs_torch_speedup`", headline="Runtime over torch eager, batch 8"),
              Row("runtime vs ONNX Runtime FP32 with the user's own OpenCV pre/post", ratio("runtime_vs_ort_fp32_speedup"),
                  "`runtime_vs_ort_fp32_speedup`"),
              Row("pre + post share of a batch of 8 at 128x128", fmt("pre_post_share_128", "{:.1f}%", 100),
                  "`pre_post_share_128`"),
              Row("the same on 480x640 frames", fmt("pre_post_share_vga", "{:.1f}%", 100), "`pre_post_share_vga`",
                  headline="Pre- and post-processing share at 480x640"),
              Row("the same on 1080x1920 frames", fmt("pre_post_share_1080p", "{:.1f}%", 100), "`pre_post_share_1080p`"),
              Row("1080p frames per second", fmt("hd_1080x1920.throughput_ips.runtime_int8_cpu", "{:.0f}"),
                  "`hd_1080x1920.throughput_ips.runtime_int8_cpu`"),
              Row("the queue (4 callers) vs predict in batches of 8, VGA",
                  ratio("vga_480x640.queue.queue_vs_predict_throughput"), "`vga_480x640.queue.queue_vs_predict_throughput`"),
              Row("peak RSS serving VGA batches: runtime / a bare ONNX Runtime session",
                  lambda get: f"{get('runtime_peak_rss_mb'):.1f} / {get('bare_session_peak_rss_mb'):.1f} MiB "
                              f"({get('runtime_vs_bare_peak_rss'):.2f}x)",
                  "`runtime_peak_rss_mb`, `bare_session_peak_rss_mb`, `runtime_vs_bare_peak_rss`",
                  headline="Serving memory, runtime over a bare ONNX Runtime session"),
          ]),
    Table("video", "runtime.json", ("video.measured_at",), "python -m benchmarks.run --only video",
          anchor="runtime-video", rows=[
              Row("a VGA clip end to end (decode, segment, encode mask and overlay videos), frames/s",
                  fmt("video.end_to_end_fps", "{:.0f}"), "`video.end_to_end_fps`", optional=True),
              Row("the same frames already in memory, same batch, frames/s", fmt("video.in_memory_fps", "{:.0f}"),
                  "`video.in_memory_fps`", optional=True),
              Row("end to end over in memory (video_pipeline_efficiency)", ratio("video.video_pipeline_efficiency"),
                  "`video.video_pipeline_efficiency`", headline="Video end to end over frames in memory (VGA)",
                  optional=True),
              Row("the same at 1 thread", ratio("video.threads_1.video_pipeline_efficiency"),
                  "`video.threads_1.video_pipeline_efficiency`", optional=True),
              Row("live latency per frame, batch 1: p50 / p99",
                  lambda get: f"{get('video.live.batch_1.latency_p50_ms'):.1f} / "
                              f"{get('video.live.batch_1.latency_p99_ms'):.1f} ms", "`video.live.batch_1`", optional=True),
              Row("live latency per frame, micro-batched: p50 / p99",
                  lambda get: f"{get('video.live.micro_batched.latency_p50_ms'):.1f} / "
                              f"{get('video.live.micro_batched.latency_p99_ms'):.1f} ms", "`video.live.micro_batched`",
                  optional=True),
              Row("peak RSS streaming the clip 4 times over vs once", fmt("video.memory.peak_rss_x4_vs_x1", "{:.3f}x"),
                  "`video.memory.peak_rss_x4_vs_x1`", optional=True),
              Row("demo clip, smoothing off / at the default strength: mIoU",
                  lambda get: f"{get('video.smoothing.miou_off'):.4f} / {_default_smoothing(get)['miou']:.4f}",
                  "`video.smoothing.miou_off`, `video.smoothing.strengths`", optional=True),
              Row("demo clip, smoothing off / at the default strength: flicker",
                  lambda get: f"{get('video.smoothing.flicker_off') * 100:.2f}% / "
                              f"{_default_smoothing(get)['flicker'] * 100:.2f}%",
                  "`video.smoothing.flicker_off`, `video.smoothing.strengths`",
                  headline="Flicker on the demo clip, smoothing off / on", optional=True),
          ]),
    Table("stage-split", "runtime.json", ("measured_at",), "python -m benchmarks.run --only runtime",
          anchor="runtime-where-a-vga-batch-goes", rows=[
              *(Row(f"step `{step}`, ms per batch of 8", fmt(f"vga_480x640.stages.stages_ms.{step}", "{:.2f}"),
                    f"`vga_480x640.stages.stages_ms.{step}`")
                for step in ("letterbox_resize", "letterbox_pad_copy", "normalisation", "infer", "mask_crop_resize",
                             "threshold", "uint8_mask_quantise", "uint8_mask_resize", "uint8_threshold_in_place")),
              *(Row(f"path `{path}`: ms per call (p10-p90), pre + post share",
                    lambda get, p=path: f"{get(f'vga_480x640.stages.paths.{p}.call_median_ms'):.1f} "
                                        f"({get(f'vga_480x640.stages.paths.{p}.call_p10_ms'):.1f}-"
                                        f"{get(f'vga_480x640.stages.paths.{p}.call_p90_ms'):.1f}), "
                                        f"{get(f'vga_480x640.stages.paths.{p}.pre_post_share') * 100:.1f}%",
                    f"`vga_480x640.stages.paths.{path}`")
                for path in ("old_defaults", "threads", "stop_spinning", "stop_spinning_threads",
                             "stop_spinning_threads_uint8_masks", "stop_spinning_threads_uint8_masks_fused")),
          ]),
    Table("serving", "serving.json", ("measured_at",), "python -m benchmarks.run --only serving",
          anchor="serving", rows=[
              *(Row(f"{label}, VGA", fmt(f"vga_480x640.{key}.throughput_rps", "{:.0f} req/s"),
                    f"`vga_480x640.{key}.throughput_rps`")
                for key, label in (("inprocess_submit", "in process, Segmenter.submit"), ("triton_grpc", "Triton gRPC"),
                                   ("triton_http", "Triton HTTP"), ("triton_grpc_shm", "Triton gRPC, shared memory"),
                                   ("triton_grpc_shm_2_instances", "Triton gRPC, shared memory, 2 instances"))),
              Row("the best Triton variant vs in process, VGA", ratio("triton_vs_inprocess_throughput"),
                  "`triton_vs_inprocess_throughput`", headline="Triton over the runtime in process, VGA"),
              Row("the same at 128x128", fmt("triton_vs_inprocess_throughput_128", "{:.2f}x"),
                  "`triton_vs_inprocess_throughput_128`"),
              Row("mean batch: Triton, 1 instance / in process",
                  lambda get: f"{get('vga_480x640.server_batching.mean_batch'):.2f} / "
                              f"{get('vga_480x640.inprocess_batching.mean_batch'):.2f}",
                  "`vga_480x640.server_batching.mean_batch`, `vga_480x640.inprocess_batching.mean_batch`"),
          ]),
    Table("site-check", "site_check.json", ("measured_at",), "python -m benchmarks.run --only site_check",
          anchor="at-a-new-site-the-label-free-check", rows=[
              Row("the teacher agreement ranks the shifted conditions as their true drop does", yes_no("ranks_agree"),
                  "`ranks_agree`", headline="Label-free site check ranks the site's conditions as labels do"),
              Row("test passes; shifted conditions flagged (of 3)",
                  lambda get: f"{'yes' if get('test_passes') else 'no'}; {get('shift_conditions_flagged')}",
                  "`test_passes`, `shift_conditions_flagged`"),
              *(Row(f"`{g}`: values out of INT8 range (s8s8 / u8s8); INT8 agreement; teacher agreement; true INT8 mIoU; "
                    "verdict",
                    lambda get, g=g: f"{get(f'groups.{g}.saturation.int8') * 100:.2f}% / "
                                     f"{get(f'groups.{g}.saturation.int8-cpu') * 100:.2f}%; "
                                     f"{get(f'groups.{g}.int8_agreement_miou'):.3f}; "
                                     f"{get(f'groups.{g}.teacher_agreement_miou'):.3f}; "
                                     f"{get(f'groups.{g}.true_int8_miou'):.4f}; "
                                     + ", ".join(get(f"groups.{g}.verdict")),
                    f"`groups.{g}`")
                for g in ("test", "test_shift/low_light", "test_shift/backlight", "test_shift/colour_cast")),
              Row("the reference (64 val images): values out of range (s8s8 / u8s8); INT8 and teacher agreement",
                  lambda get: f"{get('reference.saturation.int8') * 100:.2f}% / {get('reference.saturation.int8-cpu') * 100:.2f}%; "
                              f"{get('reference.int8_agreement_miou'):.3f}; {get('reference.teacher_agreement_miou'):.3f}",
                  "`reference`"),
              Row("check time for the 400 test frames, 2 threads", fmt("groups.test.check_seconds", "{:.0f} s"),
                  "`groups.test.check_seconds`"),
              *(Row(f"`{g}`: predicted INT8 loss (points); true INT8 loss (points)",
                    lambda get, g=g: f"{get(f'groups.{g}.predicted_int8_loss_points'):.2f}; "
                                     f"{get(f'groups.{g}.int8_loss_points'):.2f}",
                    f"`groups.{g}.predicted_int8_loss_points`, `.int8_loss_points`", optional=True)
                for g in ("test", "test_shift/low_light", "test_shift/backlight", "test_shift/colour_cast")),
              Row("\"recalibrate\": hits / false alarms / misses (of 4 folders)",
                  lambda get: f"{get('recalibrate_hits')} / {get('recalibrate_false_alarms')} / {get('recalibrate_misses')}",
                  "`recalibrate_verdict`", headline="Site check's \"recalibrate\": hits / false alarms / misses",
                  optional=True),
              Row("\"adapt\": hits / false alarms / misses (of 4 folders)",
                  lambda get: f"{get('adapt_hits')} / {get('adapt_false_alarms')} / {get('adapt_misses')}",
                  "`adapt_verdict`", optional=True),
          ]),
    Table("memory", "distill.json", ("peak_memory_measured_at",), "python -m benchmarks.run --only memory",
          anchor="memory", rows=[
              Row("peak RSS of the demo student's training", fmt("distill_train_peak_rss_mb", "{:,.0f} MiB"),
                  "`distill_train_peak_rss_mb`"),
          ]),
    Table("memory-synthesis", "calibration.json", ("peak_memory_measured_at",), "python -m benchmarks.run --only memory",
          anchor="memory", rows=[
              Row("peak RSS of calibration synthesis", fmt("calibration_synth_peak_rss_mb", "{:,.0f} MiB"),
                  "`calibration_synth_peak_rss_mb`"),
          ]),
]


def schedule_rows(data: dict) -> list[Row]:
    """The schedule sweep: what each decision chose, then every run's best val mIoU (and at which epoch)."""
    out = [Row("chosen (on val)", lambda get: ", ".join(f"{k} {v}" for k, v in get("chosen").items()), "`chosen`")]
    for i, d in enumerate(data.get("decisions", [])):
        out.append(Row(f"decision: {d['knob']}", lambda get, i=i: (
            f"{get('decisions')[i]['chose']} (val mIoU {get('decisions')[i]['val_miou']:.4f})"), f"`decisions[{i}]`"))
    for name in data.get("runs", {}):
        out.append(Row(f"run `{name}`: best val mIoU (epoch), training minutes",
                       lambda get, n=name: f"{get('runs')[n]['best_val_miou']:.4f} ({get('runs')[n]['best_epoch']}), "
                                           f"{get('runs')[n]['train_seconds'] / 60:.1f}", f"`runs.{name}`"))
    return out


def _machine(data: dict) -> str:
    m = data.get("machine", {})
    gpu = m.get("gpu") or "no GPU"  # the benchmarks' machine block names a GPU where one served
    return (f"{m.get('machine', '?')}, {m.get('cpu_count', '?')} CPU cores, {gpu}; Python {m.get('python', '?')}, "
            f"torch {m.get('torch', '?')}, ONNX Runtime {m.get('onnxruntime', '?')}")


def _has(data: dict, key: str) -> bool:
    try:
        _get(data, key, "")
        return True
    except MissingFigure:
        return False


def _load(file: str) -> dict:
    return json.loads((RESULTS / file).read_text())


def _rows(t: Table, data: dict) -> list[tuple[Row, str]]:
    """(row, its value shown) for every row of ``t`` its JSON holds; a missing key of a required row is an error."""
    get = lambda key: _get(data, key, t.file)  # noqa: E731
    out = []
    for r in [*(t.generated(data) if t.generated else []), *t.rows]:
        try:
            out.append((r, r.show(get)))
        except MissingFigure:
            if not r.optional:
                raise
    return out


def render_table(t: Table) -> str:
    data = _load(t.file)
    date_key = next((k for k in t.date_keys if _has(data, k)), None)
    if date_key is None:
        raise MissingFigure(f"benchmarks/results/{t.file} has none of {t.date_keys}; update FIGURES in docs/generate.py")
    # a block measured on its own (runtime.json's `video`) carries its own date and machine
    prefix = date_key.rpartition(".")[0]
    scope = _get(data, prefix, t.file) if prefix else data
    machine_key = f"{prefix}.machine" if prefix else "machine"
    out = [f"Measured {str(_get(data, date_key, t.file))[:10]} on {_machine(scope)} (`{t.file}` `{date_key}`, "
           f"`{machine_key}`). "
           f"Reproduce: `{t.command}`.", "", f"| figure | value | key in `{t.file}` |", "|---|---|---|"]
    out += [f"| {r.label} | {shown} | {r.keys} |" for r, shown in _rows(t, data)]
    return "\n".join(out)


DEMO_COMMAND = "make demo && python -m benchmarks.run --only demo"


def _end_to_end_rows() -> tuple[dict, list[tuple[str, str, str, str]]]:
    """``demo.json`` and its rows (label, value, key, README headline), or ({}, []) before it is recorded."""
    path = RESULTS / "demo.json"
    if not path.is_file():
        return {}, []
    data = json.loads(path.read_text())
    get = lambda key: _get(data, key, "demo.json")  # noqa: E731
    rows = [(f"`make demo`, stage `{k}`", f"{v / 60:.1f} min", f"`stages_seconds.{k}`", "")
            for k, v in get("stages_seconds").items()]
    rows.append(("`make demo`, in all", f"{get('total_seconds') / 60:.1f} min", "`total_seconds`",
                 "`make demo` on 2 CPU cores"))
    if "make_test_seconds" in data:
        rows.append(("`make test`", f"{data['make_test_seconds'] / 60:.1f} min", "`make_test_seconds`",
                     "`make test` on 2 CPU cores"))
    return data, rows


def render_end_to_end() -> str:
    """``make demo``'s wall time per stage and ``make test``'s, from ``demo.json`` where it has been recorded."""
    data, rows = _end_to_end_rows()
    if not data:
        return ("`make demo` writes each stage's wall time to `<run_dir>/demo_times.tsv`; "
                f"`{DEMO_COMMAND}` records them, with `make test` timed, in `benchmarks/results/demo.json`, "
                "whose figures this table shows.")
    out = [f"Measured {str(_get(data, 'measured_at', 'demo.json'))[:10]} on {_machine(data)} (`demo.json` "
           f"`measured_at`, `machine`). Reproduce: `{DEMO_COMMAND}`.", "", "| figure | value | key in `demo.json` |",
           "|---|---|---|"]
    return "\n".join(out + [f"| {a} | {b} | {c} |" for a, b, c, _ in rows])


def render_headlines() -> str:
    out = ["| headline | figure | measured in |", "|---|---|---|"]
    out += [f"| {h} | {value} | [results](docs/results.md#end-to-end) |" for _, value, _, h in _end_to_end_rows()[1] if h]
    for t in FIGURES:
        if not (RESULTS / t.file).is_file():  # a benchmark not run yet (its section says how to run it)
            continue
        for r, shown in _rows(t, _load(t.file)):
            if r.headline:
                out.append(f"| {r.headline} | {shown} | [results](docs/results.md#{t.anchor}) |")
    return "\n".join(out)


_MARKER = re.compile(r"(<!-- figures:([\w-]+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def fill_figures(text: str, path: Path) -> str:
    """``text`` with every figures block re-rendered; an unknown block name is an error."""
    tables = {t.name: t for t in FIGURES}

    def one(m: re.Match) -> str:
        name = m.group(2)
        if name == "headlines":
            body = render_headlines()
        elif name == "end-to-end":
            body = render_end_to_end()
        elif name in tables:
            body = render_table(tables[name])
        else:
            raise SystemExit(f"{path}: unknown figures block {name!r}; known: headlines, end-to-end, {', '.join(tables)}")
        return f"{m.group(1)}{body}\n{m.group(4)}"

    return _MARKER.sub(one, text)
