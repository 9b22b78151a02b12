"""``edgeseg distill``: train the teacher, distil the student, evaluate, expose ONNX features."""
from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import click

from edgeseg.runtime.console import (VERBOSE_HELP, configure_logging, exit_on_user_error, hidden_alias, keep_renamed,
                                     renamed_option)
from edgeseg.runtime.files import write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/demo.yaml"
# Regenerating sample sources by name -> factory(config) -> Generate, filled by the command layer
# (the `edgeseg` command wires calibration's hard-example generator here: see its WIRING).
GENERATORS: dict = {}
# The schema the config file is parsed with: the whole file's (export's ``Config``, every stage's sections),
# handed in by the command layer (the `edgeseg` command, the benchmarks); distill's own sections alone
# (``DistillConfig``) until then.
SCHEMA: list[type] = []


def use_schema(cls: type) -> None:
    """Parse config files with ``cls`` from now on (the command layer's choice: the whole file's schema)."""
    SCHEMA[:] = [cls]


def config_options(f):
    """--config, --set and -v, shared by every stage command."""
    f = click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config field, e.g. --set train.epochs=3 (repeatable).")(f)
    f = click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
                     type=click.Path(dir_okay=False), help="YAML config file.")(f)
    return f


def load(config_path: str, overrides: tuple[str, ...], verbose: int):
    from edgeseg.distill.config import DistillConfig, load_config

    configure_logging(verbose)
    return load_config(config_path, SCHEMA[0] if SCHEMA else DistillConfig, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Knowledge distillation: B3 teacher (+ ONNX feature teacher) -> B0 student."""


@main.command(short_help="Distil the student from the teachers.")
@config_options
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (checkpoint, exit 0).")
@click.option("--baseline", is_flag=True, help="Train the student on ground truth alone (no teacher terms).")
@click.option("--fresh", is_flag=True, help="Ignore an existing last.pt and start over.")
@click.option("--extra-data", type=click.Path(), default=None,
              help="Folder of extra labelled pairs (images/, masks/), e.g. from `calibration synth --images` "
                   "(train.extra_data).")
@click.option("--extra-share", type=float, default=None,
              help="Share of each epoch's images drawn from --extra-data, in [0, 1) (train.extra_share).")
@click.option("--hard-examples", "hard_share", type=float, default=None,
              help="Share of each epoch's images from confidence-guided hard examples, regenerated against the "
                   "student every --hard-every epochs, in [0, 1) (train.hard_examples.share).")
@click.option("--hard-every", type=int, default=None, help="Epochs between hard-example regenerations.")
@click.option("--images", type=click.Path(), default=None, callback=keep_renamed,
              help="Folder of unlabelled images (frames from the site, say): teacher terms only (data.unlabelled).")
@renamed_option("--unlabelled", "--images", "images", type=click.Path())
@click.option("--unlabelled-share", type=float, default=None,
              help="Share of each epoch's samples from the unlabelled sources, in [0, 1) (train.unlabelled_share).")
@click.option("--ship", is_flag=True,
              help="With --baseline, when training has finished: write it as the demo's shipped baseline (fp16, SHA-256) "
                   "under distill/assets/demo_teachers (make baseline).")
@exit_on_user_error
def train(config_path, overrides, verbose, max_steps, baseline, fresh, extra_data, extra_share, hard_share, hard_every,
          images, unlabelled_share, ship):
    """Distil the student from the teacher and the feature teacher (optionally with synthetic pairs and
    unlabelled images)."""
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer

    options = {"train.extra_data": extra_data, "train.extra_share": extra_share,
               "train.hard_examples.share": hard_share, "train.hard_examples.every": hard_every,
               "data.unlabelled": images, "train.unlabelled_share": unlabelled_share}
    overrides = tuple(overrides) + tuple(f"{k}={v}" for k, v in options.items() if v is not None)
    cfg = load(config_path, overrides, max(verbose, 1))
    if ship and not baseline:
        from edgeseg.runtime.errors import InputError

        raise InputError("--ship ships the ground-truth-only student: add --baseline (make baseline)")
    job = job_for(cfg, "baseline" if baseline else "student")
    generators = {name: factory(cfg) for name, factory in GENERATORS.items()}
    metrics = Trainer(cfg, job, max_steps=max_steps, fresh=fresh, generators=generators).run()
    if int(os.environ.get("RANK", "0")) == 0:
        out = {"checkpoint": str(job.out_dir / "last.pt"), **_plain(metrics)}
        if ship:
            from edgeseg.distill.shipped import ship_baseline

            meta = ship_baseline(cfg, job.out_dir, _command(config_path, overrides, "train --baseline --ship"))
            out["shipped"] = {"sha256": meta["sha256"], "val_miou_fp16": meta["val_miou_fp16"], "bytes": meta["bytes"]}
        click.echo(json.dumps(out))


@main.command("install-baseline", short_help="Use the shipped demo baseline instead of training it (make distill).")
@config_options
@click.option("--or-train", is_flag=True,
              help="Where the shipped baseline does not fit the config (your data, other settings), train one here.")
@exit_on_user_error
def install_baseline(config_path, overrides, verbose, or_train):
    """Put the shipped ground-truth-only student (distill/assets/demo_teachers/baseline.safetensors, SHA-256
    checked) at <run_dir>/distill-baseline/best.pt, where `distill train --baseline` writes one. Refused unless
    the config trains exactly what was shipped (--or-train then trains it)."""
    from edgeseg.distill.job import job_for
    from edgeseg.distill.shipped import baseline_misfit, install_baseline as install
    from edgeseg.distill.trainer import Trainer

    cfg = load(config_path, overrides, max(verbose, 1))
    why = baseline_misfit(cfg) if or_train else None
    if why is None:
        click.echo(json.dumps({"baseline": str(install(cfg)), "source": "shipped"}))
        return
    logging.getLogger(__name__).warning("the shipped baseline does not fit: %s; training one here", why)
    job = job_for(cfg, "baseline")
    Trainer(cfg, job).run()
    click.echo(json.dumps({"baseline": str(job.out_dir / "best.pt"), "source": "trained here"}))


@main.command("train-teacher", short_help="Train the segmentation teacher (make teacher).")
@config_options
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (checkpoint, exit 0).")
@click.option("--fresh", is_flag=True, help="Ignore an existing last.pt and start over.")
@click.option("--ship", is_flag=True,
              help="When training has finished, write the teacher as the shipped demo teacher (fp16, SHA-256) "
                   "under distill/assets/demo_teachers (make teacher).")
@exit_on_user_error
def train_teacher(config_path, overrides, verbose, max_steps, fresh, ship):
    """Train the B3 teacher on ground truth until val mIoU stops improving (the demo's `make teacher`)."""
    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer

    cfg = load(config_path, overrides, max(verbose, 1))
    job = job_for(cfg, "teacher")
    metrics = Trainer(cfg, job, max_steps=max_steps, fresh=fresh).run()
    out = {"checkpoint": str(job.out_dir / "best.pt"), **_plain(metrics)}
    if ship and (job.out_dir / "last.pt").is_file():
        from edgeseg.distill.shipped import ship_teacher

        meta = ship_teacher(cfg, job.out_dir, _command(config_path, overrides, "train-teacher --ship"))
        out["shipped"] = {"sha256": meta["sha256"], "val_miou_fp16": meta["val_miou_fp16"], "bytes": meta["bytes"]}
    click.echo(json.dumps(out))


@main.command("run-dir", hidden=True)
@config_options
@exit_on_user_error
def run_dir(config_path, overrides, verbose):
    """Print the config's run_dir (where every stage writes)."""
    click.echo(load(config_path, overrides, verbose).run_dir)


@main.command("train-feature-teacher", short_help="Demo only: train the feature teacher, export ONNX.")
@config_options
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Output ONNX (default: <run_dir>/feature_teacher/featext.onnx).")
@click.option("--fresh", is_flag=True, help="Retrain even if an up-to-date model is there.")
@click.option("--ship", is_flag=True,
              help="Write the trained detector as the shipped demo feature teacher (fp16, SHA-256) under "
                   "distill/assets/demo_teachers (make teacher).")
@exit_on_user_error
def train_feature_teacher(config_path, overrides, verbose, out, fresh, ship):
    """Demo only: train the stand-in feature teacher (a person detector) on the teacher corpus until its val
    loss stops improving, and export it to ONNX."""
    from edgeseg.distill.config import config_to_dict
    from edgeseg.distill.data import split_samples
    from edgeseg.distill.demo_feature_teacher import export_demo_feature_teacher, train_demo_detector

    cfg = load(config_path, overrides, max(verbose, 1))
    path = Path(out or cfg.stage_dir("feature_teacher") / "featext.onnx")
    samples = split_samples(cfg, "teacher")
    ft = cfg.feature_teacher
    key = {"version": 3, "images": len(samples), "image_size": list(cfg.data.image_size), "epochs": ft.demo_epochs,
           "patience": ft.demo_patience, "seed": cfg.seed, "split": cfg.data.teacher_split or "train",
           "demo": config_to_dict(cfg.data.demo) if cfg.data.source == "demo" else None}
    stamp = path.with_suffix(".json")
    if not fresh and path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        log.info("demo feature teacher %s is up to date", path)
        summary = json.loads(stamp.read_text())
    else:
        detector, summary = train_demo_detector(
            samples, tuple(cfg.data.image_size), ft.demo_epochs, seed=cfg.seed, val_samples=split_samples(cfg, "val"),
            patience=ft.demo_patience, state_file=path.with_name(path.stem + ".partial.pt"))
        export_demo_feature_teacher(detector, path, tuple(cfg.data.image_size), summary)
        torch_state = {k: v for k, v in detector.state_dict().items()}
        summary = {"key": key, **summary}
        write_json_atomic(stamp, summary)
        import torch

        torch.save(torch_state, path.with_suffix(".pt"))
        path.with_name(path.stem + ".partial.pt").unlink(missing_ok=True)
    out_info = {"model": str(path)}
    if ship:
        import torch

        from edgeseg.distill.shipped import DETECTOR, ship as ship_asset

        state = torch.load(path.with_suffix(".pt"), weights_only=True)
        meta = ship_asset(state, DETECTOR, {
            "what": "the demo's feature teacher: a person detector (centre heatmap + box sizes), trained to convergence "
                    "on the teacher corpus; its neck's Concat is the matched tensor",
            "command": _command(config_path, overrides, "train-feature-teacher --ship"), "width": 16,
            "tensor": ft.tensor, "data": key, "seed": cfg.seed,
            **{k: summary.get(k) for k in ("epochs", "epochs_max", "best_epoch", "best_val_loss", "stopped_early",
                                           "curve", "train_seconds")}})
        out_info["shipped"] = {"sha256": meta["sha256"], "bytes": meta["bytes"]}
    click.echo(json.dumps(out_info))


hidden_alias(main, train_feature_teacher, "export-feature-teacher")  # the old name, for one release


@main.command(short_help="Check the data and teachers every stage reads.")
@config_options
@exit_on_user_error
def prepare(config_path, overrides, verbose):
    """Make the inputs every stage reads ready and check them: the demo data set (generated once), the teacher's
    weights (the shipped ones' SHA-256) and the feature teacher's ONNX (the shipped detector exported)."""
    from edgeseg.distill.data import has_split, split_samples, student_data
    from edgeseg.distill.models import load_teacher
    from edgeseg.distill.teachers import feature_teacher_model

    cfg = load(config_path, overrides, max(verbose, 1))
    splits = {s: len(split_samples(cfg, s)) for s in ("train", "val", "test", "test_shift") if has_split(cfg, s)}
    data = student_data(cfg)
    load_teacher(cfg)  # a missing, damaged or mismatched teacher fails here, in seconds, not in the first step
    info = {"run_dir": cfg.run_dir, "splits": splits, "labelled": len(data.labelled),
            "unlabelled": {k: len(v) for k, v in data.unlabelled.items()}, "teacher": str(cfg.teacher_checkpoint)}
    if cfg.feature_teacher.enabled and cfg.loss.feature > 0:
        info["feature_teacher"] = str(feature_teacher_model(cfg))
    click.echo(json.dumps(info))


@main.command("expose-feature", short_help="Expose an ONNX model's tensor as its output.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--layer", required=True, help="Name of the tensor to expose, e.g. segmentation_model_34_Concat_output_0.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Output ONNX (default: cached next to MODEL).")
@click.option("--input-size", nargs=2, type=int, default=None, metavar="H W",
              help="Input size for which to report the tensor's shape (default: the model's static size, else 640 640).")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@exit_on_user_error
def expose_feature(model, layer, out, input_size, verbose):
    """Cut MODEL at tensor LAYER (pruned, cached) and print its shape for the input size."""
    from edgeseg.distill.feature_onnx import expose_tensor, probe_output_shape

    configure_logging(verbose)
    path = expose_tensor(model, layer, out)
    input_hw, shape = probe_output_shape(path, tuple(input_size) if input_size else None)
    click.echo(json.dumps({"model": str(path), "tensor": layer, "input_size": list(input_hw), "shape": list(shape)}))


@main.command("inspect-teacher", short_help="Look at the teacher's masks before a long run.")
@config_options
@click.option("--images", type=click.Path(file_okay=False), default=None,
              help="A folder of your images (with images/ and masks/ to score against; default: the val split).")
@click.option("--limit", type=int, default=16, show_default=True, help="How many images to look at.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where inspect.png and inspect.json go (default: <run_dir>/inspect-teacher).")
@exit_on_user_error
def inspect_teacher(config_path, overrides, verbose, images, limit, out):
    """Run the teacher (torch or ONNX) on a few images through training's preprocessing: its masks, their mIoU
    against the labels there are, and the usual mistakes (swapped channels, a range off by 255, a matte read as
    logits, an empty output) flagged one line each with the fix."""
    from edgeseg.distill.device import use_device
    from edgeseg.distill.inspect import inspect_teacher as run_inspection

    cfg = load(config_path, overrides, verbose)
    report = run_inspection(cfg, images, limit, Path(out) if out else cfg.stage_dir("inspect-teacher"),
                            use_device(cfg.device, cfg.threads))
    miou = f"mIoU {report['miou']:.3f}, " if report["miou"] is not None else "no labels, "
    print(f"teacher on {report['images']} images: {miou}person fraction {report['person_fraction']:.3f}, "
          f"uncertain {report['uncertain_share']:.3f}; picture: {report['picture']}", file=sys.stderr)
    for flag in report["flags"]:
        print(f"check: {flag}", file=sys.stderr)
    click.echo(json.dumps(report))


@main.command(short_help="Teacher vs student on test (and test_shift).")
@config_options
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Distilled student checkpoint (default: <run_dir>/distill/best.pt).")
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint of the same student trained on ground truth alone (adds student_nodistill_miou).")
@click.option("--with-baseline", is_flag=True, help="Use <run_dir>/distill-baseline/best.pt as --baseline.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Report JSON (default: <run_dir>/distill/report.json).")
@click.option("--latency-repeats", type=int, default=20, show_default=True, help="Timed forward passes per model.")
@exit_on_user_error
def evaluate(config_path, overrides, verbose, checkpoint, baseline, with_baseline, out, latency_repeats):
    """Teacher vs student on the test split (test_shift beside it): mIoU, agreement, size, latency."""
    cfg = load(config_path, overrides, verbose)
    checkpoint = checkpoint or cfg.stage_dir("distill") / "best.pt"
    if with_baseline and not baseline:
        baseline = cfg.stage_dir("distill-baseline") / "best.pt"
    report = _evaluate(cfg, checkpoint, baseline, latency_repeats)
    path = write_json_atomic(Path(out) if out else cfg.stage_dir("distill") / "report.json", report)
    _print_table(report)
    click.echo(json.dumps({"report": str(path), **report}))


def _evaluate(cfg, checkpoint: str, baseline: str | None, latency_repeats: int) -> dict:
    """The report: quality on the report splits (test, with test_shift beside it), size and latency."""
    import torch

    from edgeseg.distill.data import report_splits
    from edgeseg.distill.device import use_device
    from edgeseg.distill.evaluation import latency_ms, score_split
    from edgeseg.distill.models import count_parameters, load_model, load_teacher

    from edgeseg.distill.onnx_teacher import OnnxSegmentationTeacher
    from edgeseg.distill.shipped import provenance

    device = use_device(cfg.device, cfg.threads)
    teacher = load_teacher(cfg, device)
    is_onnx = isinstance(teacher, OnnxSegmentationTeacher)
    student = load_model(cfg.student, checkpoint, cfg.student.feature_stride, keys=("student",)).to(device)
    models = {"teacher": teacher, "student": student}
    if baseline:
        models["baseline"] = load_model(cfg.student, baseline, cfg.student.feature_stride, keys=("student",)).to(device)
    splits, note = report_splits(cfg)
    blocks = {}
    for split in splits:
        s = score_split(cfg, models, split, device)
        block = {"teacher_miou": s["teacher"]["miou"], "student_miou": s["student"]["miou"],
                 "teacher_person_iou": s["teacher"]["person_iou"], "student_person_iou": s["student"]["person_iou"],
                 "agreement": s["student"]["agreement"], "images": s["student"]["images"]}
        if "baseline" in s:
            block["student_nodistill_miou"] = s["baseline"]["miou"]
            block["student_nodistill_agreement"] = s["baseline"]["agreement"]
            # what the teacher knows beyond the student's labels: the most distillation could hand on
            block["teacher_minus_gt_only"] = s["teacher"]["miou"] - s["baseline"]["miou"]
        blocks[split] = block
    lat = latency_ms({"teacher": teacher, "student": student}, cfg.data.image_size, device, repeats=latency_repeats)
    report = {"split": splits[0], "selection_split": "val", "note": note, **blocks[splits[0]]}
    for split in splits[1:]:
        report[split] = blocks[split]
    report.update({
        "teacher_params": teacher.parameter_count() if is_onnx else count_parameters(teacher),
        "student_params": count_parameters(student),
        "teacher_size_mb": teacher.size_mb if is_onnx else _state_size_mb(teacher), "student_size_mb": _state_size_mb(student),
        "teacher_kind": "onnx" if is_onnx else "torch",
        "teacher_latency_ms": lat["teacher"], "student_latency_ms": lat["student"],
        "latency_backend": ("teacher: ONNX Runtime (IOBinding), student: " if is_onnx else "")
                           + f"torch eager, {device}, batch 1, {torch.get_num_threads()} threads",
        "image_size": list(cfg.data.image_size),
        "data": _data_summary(cfg),
    })
    if baseline:
        report["baseline_checkpoint"] = {"path": str(baseline), "source": provenance(baseline)}
    return report


def _data_summary(cfg) -> dict:
    """The label budget, the teacher's corpus and the unlabelled sources the student trained with."""
    from edgeseg.distill.data import split_samples, student_data

    data = student_data(cfg)
    return {"label_budget": {"labelled": len(data.labelled), "train_images": data.epoch_length,
                             "labelled_seed": cfg.data.labelled_seed},
            "teacher_corpus": {"split": cfg.data.teacher_split or "train", "images": len(split_samples(cfg, "teacher"))},
            "unlabelled_sources": {name: len(items) for name, items in data.unlabelled.items()},
            "unlabelled_share": cfg.train.unlabelled_share,
            "baseline": "ground truth alone, the labelled images only, same steps"}


def _state_size_mb(model) -> float:
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def _print_table(report: dict) -> None:
    rows = [("mIoU", "teacher_miou", "student_miou"), ("person IoU", "teacher_person_iou", "student_person_iou"),
            ("params", "teacher_params", "student_params"), ("size (MB)", "teacher_size_mb", "student_size_mb"),
            ("latency (ms)", "teacher_latency_ms", "student_latency_ms")]
    print(f"on {report['split']} ({report['note']})", file=sys.stderr)
    print(f"{'':14s}{'teacher':>12s}{'student':>12s}", file=sys.stderr)
    for label, a, b in rows:
        fa = f"{report[a]:12.4f}" if isinstance(report[a], float) else f"{report[a]:12d}"
        fb = f"{report[b]:12.4f}" if isinstance(report[b], float) else f"{report[b]:12d}"
        print(f"{label:14s}{fa}{fb}", file=sys.stderr)
    print(f"agreement with teacher: {report['agreement']:.4f}", file=sys.stderr)
    if "student_nodistill_miou" in report:
        print(f"student trained on ground truth alone: mIoU {report['student_nodistill_miou']:.4f} "
              f"(teacher {report['teacher_minus_gt_only'] * 100:+.2f} points above it)", file=sys.stderr)
    d = report["data"]
    print(f"labels: {d['label_budget']['labelled']} of {d['label_budget']['train_images']} train images; unlabelled: "
          + (", ".join(f"{k} {v}" for k, v in d["unlabelled_sources"].items()) or "none")
          + f" (share {d['unlabelled_share']})", file=sys.stderr)
    if "test_shift" in report:
        s = report["test_shift"]
        print(f"test_shift: teacher {s['teacher_miou']:.4f}, student {s['student_miou']:.4f}"
              + (f", ground truth alone {s['student_nodistill_miou']:.4f}" if "student_nodistill_miou" in s else ""),
              file=sys.stderr)


def _command(config_path: str, overrides: tuple[str, ...], sub: str) -> str:
    """The command line that rebuilds a shipped asset (recorded beside it)."""
    sets = "".join(f" --set {o}" for o in overrides)
    return f"edgeseg distill {sub} --config {config_path}{sets}"


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}


if __name__ == "__main__":
    main()
