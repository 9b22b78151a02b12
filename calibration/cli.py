"""``edgeseg calibration``: synthesise an INT8 calibration set, and report on one."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from edgeseg.distill.cli import config_options, load
from edgeseg.runtime.console import exit_on_user_error, keep_renamed, removed_option, renamed_option
from edgeseg.runtime.errors import InputError

log = logging.getLogger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Diffusion-synthesised INT8 calibration sets, guided by the teacher."""


def wire(stage: str, group: click.Group) -> None:
    """Plug calibration's generators into an upstream stage's commands (called by the `edgeseg` command)."""
    if stage == "distill":
        from edgeseg.calibration.hard_examples import hard_example_generator
        from edgeseg.distill.cli import GENERATORS

        GENERATORS["hard_examples"] = hard_example_generator


@main.command(short_help="Generate, filter and write a calibration set.")
@config_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: <run_dir>/calibration/synthetic).")
@click.option("--count", type=int, default=None, help="Images to keep (default: calibration.count).")
@click.option("--guidance", type=click.Choice(["none", "task", "confidence", "mode", "mask"]), default=None,
              help="Teacher guidance (default: calibration.guidance.mode).")
@click.option("--student", type=click.Path(dir_okay=False), default=None,
              help="Student checkpoint for confidence guidance (default: <run_dir>/distill/best.pt).")
@click.option("--teacher-masks", is_flag=True,
              help="Write the teacher's masks as labels (default: the conditioning masks of the mask-conditioned "
                   "generator; none for the others).")
@click.option("--images", type=click.Path(), default=None, callback=keep_renamed,
              help="Folder of a few unlabelled images of the deployment site to steer synthesis towards "
                   "(default: calibration.target.images).")
@renamed_option("--target-images", "--images", "images", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@exit_on_user_error
def synth(config_path, overrides, verbose, out, count, guidance, student, teacher_masks, images, overwrite):
    """Generate, filter and write a calibration set (images, labels, manifest.json)."""
    from edgeseg.calibration.synth import Synthesizer

    cfg = load(config_path, overrides, max(verbose, 1))
    out = out or cfg.stage_dir("calibration") / "synthetic"
    manifest = Synthesizer(cfg, guidance, student, images).run(out, count, overwrite=overwrite,
                                                               teacher_masks=teacher_masks)
    counts = manifest["counts"]
    print(f"kept {counts['kept']} of {counts['generated']} generated; dropped {counts['dropped']}", file=sys.stderr)
    click.echo(json.dumps({"out": str(out), "counts": counts, "seconds": manifest["seconds"]}))


@main.command(short_help="Pretrain the shipped demo generator (make generator).")
@config_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where the pretrained generator goes (default: the shipped one, calibration/assets/demo_generator).")
@click.option("--steps", type=int, default=3000, show_default=True, help="Optimiser steps.")
@click.option("--checkpoint-every", type=int, default=250, show_default=True,
              help="Steps between resumable checkpoints (<out>.partial/state.pt).")
@exit_on_user_error
def generator(config_path, overrides, verbose, out, steps, checkpoint_every):
    """Pretrain the mask-conditioned generator on the world's labelled corpus and ship it in fp16 (make generator)."""
    import dataclasses
    import shlex

    from edgeseg.calibration.generator import SHIPPED, pretrain
    from edgeseg.calibration.synth import GENERATOR_SPLIT
    from edgeseg.distill.data import split_samples

    if steps < 1 or checkpoint_every < 1:
        raise InputError(f"--steps and --checkpoint-every must be >= 1, got {steps} and {checkpoint_every}")
    cfg = load(config_path, overrides, max(verbose, 1))
    ddpm = dataclasses.replace(cfg.calibration.ddpm, train_steps=steps)
    command = shlex.join(["edgeseg", "calibration", "generator", *sys.argv[3:]])
    meta = pretrain(ddpm, split_samples(cfg, GENERATOR_SPLIT), out or SHIPPED, cfg.calibration.seed, command,
                    checkpoint_every)
    click.echo(json.dumps({"out": str(out or SHIPPED), "sha256": meta["sha256"], "train_seconds": meta["train_seconds"]}))


@main.command(short_help="Compare a calibration set with real and noise sets.")
@config_options
@click.option("--calibration", default="synthetic", show_default=True, metavar="synthetic|DIR",
              help="The calibration set to report on: synthetic (<run_dir>/calibration/synthetic) or its folder.")
@removed_option("--calib", "--calibration synthetic|DIR")
@click.option("--student", type=click.Path(dir_okay=False), default=None,
              help="Student checkpoint (default: <run_dir>/distill/best.pt).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where report.json and contact_sheet.png go (default: the calibration folder's parent).")
@exit_on_user_error
def report(config_path, overrides, verbose, calibration, student, out):
    """Coverage, histogram KL and SQNR of a calibration set vs real and noise sets."""
    from edgeseg.calibration.report import build_report

    cfg = load(config_path, overrides, max(verbose, 1))
    calib = cfg.stage_dir("calibration") / "synthetic" if calibration == "synthetic" else Path(calibration)
    r = build_report(cfg, calib, student, out)
    rows = [("coverage", "coverage"), ("SQNR (dB)", "sqnr_db"), ("hist KL", "hist_kl"), ("max/p99.99", "max_over_p9999")]
    print(f"{'':14s}{'synthetic':>11s}{'real':>11s}{'noise':>11s}", file=sys.stderr)
    for label, key in rows:
        print(f"{label:14s}" + "".join(f"{r[f'{key}_{s}']:11.4f}" for s in ("synthetic", "real", "noise")), file=sys.stderr)
    click.echo(json.dumps({k: v for k, v in r.items() if k != "per_tensor"}))


if __name__ == "__main__":
    main()
