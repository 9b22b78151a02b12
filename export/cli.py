"""``edgeseg export``: onnx, quantize, engine, accuracy, all, bundle."""
from __future__ import annotations

import json
import logging
import sys

import click

from edgeseg.distill.cli import config_options, load, use_schema
from edgeseg.export.config import Config
from edgeseg.runtime.console import VERBOSE_HELP, configure_logging, exit_on_user_error, removed_option, warn_renamed

log = logging.getLogger(__name__)


def _echo(obj: dict) -> None:
    click.echo(json.dumps({k: v for k, v in obj.items() if not isinstance(v, (list, dict)) or k in ("files", "strip")},
                          default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Strip, ONNX, Q/DQ INT8, TensorRT engines, accuracy report, deploy bundle."""
    use_schema(Config)  # export owns the whole file's schema: also when run as `python -m edgeseg.export.cli`


# --calibration: the one name of the set the deployed INT8 models are calibrated on (--calib is gone)
_CALIBRATION_HELP = ("The set the deployed INT8 models are calibrated on: site, synthetic, real or a folder of images "
                     "(default: export.calibration, synthetic).")
_CHECKPOINT_HELP = "Distilled student checkpoint (default: <run_dir>/distill/best.pt)."


@main.command(short_help="Strip the projection head and export ONNX.")
@config_options
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help=_CHECKPOINT_HELP)
@exit_on_user_error
def onnx(config_path, overrides, verbose, checkpoint):
    """Strip the projection head, export model.onnx (+ FP16), onnxsim, parity check."""
    from edgeseg.export.stage import run_onnx

    _echo(run_onnx(load(config_path, overrides, max(verbose, 1)), checkpoint))


@main.command(short_help="Q/DQ INT8 models, calibration cache, budget.")
@config_options
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
              help="Calibration method (default: export.calibration_method).")
@click.option("--calibration", "choice", default=None, metavar="site|synthetic|real|DIR", help=_CALIBRATION_HELP)
@removed_option("--calib", "--calibration site|synthetic|real|DIR")
@click.option("--no-contrast", is_flag=True, help="Skip the real-image and noise calibrations.")
@click.option("--no-budget", is_flag=True, help="Skip the accuracy budget search.")
@exit_on_user_error
def quantize(config_path, overrides, verbose, method, choice, no_contrast, no_budget):
    """Q/DQ INT8 (s8s8 + u8s8), TensorRT calibration cache, accuracy budget."""
    from edgeseg.export.stage import run_quantize

    if method:
        overrides = (*overrides, f"export.calibration_method={method}")
    if choice:
        overrides = (*overrides, f"export.calibration={choice}")
    _echo(run_quantize(load(config_path, overrides, max(verbose, 1)), None, not no_contrast, not no_budget))


_DLA_HELP = "DLA core to build for (Jetson); -1 builds for the GPU."


@main.command(short_help="Build a TensorRT engine in <run_dir>/export.")
@config_options
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), default=None,
              help="Engine precision (default: export.precision).")
@click.option("--dla-core", type=int, default=-1, show_default=True, help=_DLA_HELP)
# `engine --bundle` of bundles written before `bundle-engine` (their build_engine.py calls it): kept for one release
@click.option("--bundle", type=click.Path(file_okay=False), default=None, hidden=True)
@exit_on_user_error
def engine(config_path, overrides, verbose, precision, dla_core, bundle):
    """Build a TensorRT engine from <run_dir>/export with the path the installed TensorRT supports (or say why not).

    For a deploy bundle on its target device, use `edgeseg export bundle-engine`."""
    from edgeseg.export.stage import run_engine

    if bundle:
        warn_renamed("export engine --bundle", "export bundle-engine --bundle")
        _build_bundle_engine(bundle, precision, dla_core, verbose)
        return
    cfg = load(config_path, overrides, max(verbose, 1))
    _echo(_said(run_engine(cfg, precision or cfg.export.precision, None, dla_core)))


@main.command("bundle-engine", short_help="Build a bundle's TensorRT engine on this device.")
@click.option("--bundle", required=True, type=click.Path(file_okay=False), help="Deploy bundle folder.")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), default=None,
              help="Engine precision (default: the bundle's).")
@click.option("--dla-core", type=int, default=-1, show_default=True, help=_DLA_HELP)
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@exit_on_user_error
def bundle_engine(bundle, precision, dla_core, verbose):
    """Build a deploy bundle's TensorRT engine on the device it will run on (what the bundle's build_engine.py
    runs): engines are specific to a GPU and a TensorRT version. Reads the bundle's manifest, not a config."""
    _build_bundle_engine(bundle, precision, dla_core, verbose)


def _build_bundle_engine(bundle: str, precision: str | None, dla_core: int, verbose: int) -> None:
    from pathlib import Path

    from edgeseg.export.stage import run_engine

    from edgeseg.runtime.errors import InputError

    configure_logging(max(verbose, 1))
    manifest = Path(bundle) / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"{manifest}: missing; --bundle takes a deploy bundle folder (make deploy writes one, "
                         "runs/demo/bundle)")
    precision = precision or json.loads(manifest.read_text()).get("precision", "int8")
    _echo(_said(run_engine(None, precision, Path(bundle), dla_core), device_build=True))


@main.command(short_help="Teacher -> student -> FP32 -> INT8 accuracy report.")
@config_options
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help=_CHECKPOINT_HELP)
@exit_on_user_error
def accuracy(config_path, overrides, verbose, checkpoint):
    """Teacher -> student -> FP32 -> INT8 on the test split, test_shift beside it (val only when there is no
    test split): accuracy.json, table, gallery."""
    from edgeseg.export.stage import run_accuracy

    report = run_accuracy(load(config_path, overrides, max(verbose, 1)), checkpoint)
    print_table(report)
    _echo(report)


@main.command("all", short_help="onnx, quantize, accuracy and engine (make export).")
@config_options
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help=_CHECKPOINT_HELP)
@click.option("--calibration", "choice", default=None, metavar="site|synthetic|real|DIR", help=_CALIBRATION_HELP)
@removed_option("--calib", "--calibration site|synthetic|real|DIR")
@exit_on_user_error
def all_steps(config_path, overrides, verbose, checkpoint, choice):
    """onnx, quantize, engine and accuracy in one go (`make export`)."""
    from edgeseg.export.stage import run_accuracy, run_engine, run_onnx, run_quantize, validation_set

    if choice:
        overrides = (*overrides, f"export.calibration={choice}")
    cfg = load(config_path, overrides, max(verbose, 1))
    run_onnx(cfg, checkpoint)
    # val selects (the budget search); the report is on test and test_shift, never on val when they exist
    run_quantize(cfg, None, val=validation_set(cfg))
    report = run_accuracy(cfg, checkpoint)
    print_table(report)
    _said(run_engine(cfg, cfg.export.precision))
    _echo(report)


@main.command(short_help="Write the deploy bundle (make deploy).")
@config_options
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Bundle folder (default: <run_dir>/bundle).")
@click.option("--allow-over-budget", is_flag=True, help="Write the bundle even if the precision misses the budget.")
@click.option("--with-teacher", is_flag=True,
              help="Carry the teacher as teacher.onnx (large) for `edgeseg runtime check`'s teacher agreement.")
@exit_on_user_error
def bundle(config_path, overrides, verbose, out, allow_over_budget, with_teacher):
    """Write the deploy bundle and its .tar.gz (`make deploy`)."""
    from pathlib import Path

    from edgeseg.export.bundle import write_bundle

    cfg = load(config_path, overrides, max(verbose, 1))
    out = Path(out) if out else Path(cfg.run_dir) / "bundle"
    calib_manifest = cfg.stage_dir("calibration") / "synthetic" / "manifest.json"
    manifest = write_bundle(cfg, cfg.stage_dir("export"), out, calib_manifest, allow_over_budget, with_teacher)
    click.echo(json.dumps({"bundle": str(out), "archive": str(out) + ".tar.gz", "precision": manifest["precision"],
                           "budget": manifest["budget"]}))


def _said(result: dict, device_build: bool = False) -> dict:
    """Say on stderr why no engine was built (if none was); the result, unchanged."""
    if not result.get("built"):
        why = result.get("reason")
        if not device_build:
            print(f"TensorRT engine: skipped ({why}); everything else is built, and the bundle's build_engine.py "
                  "builds the engine on the target device", file=sys.stderr)
        else:
            print(f"TensorRT engine: not built ({why})", file=sys.stderr)
    return result


def print_table(report: dict) -> None:
    """The accuracy report's table on stderr: each backend's mIoU, person and boundary IoU, agreement, delta."""
    rows = report["backends"]
    print(f"accuracy on {report.get('split', '?')} ({report.get('note', '')})", file=sys.stderr)
    print(f"{'backend':16s}{'mIoU':>8s}{'person':>8s}{'boundary':>9s}{'agree':>8s}{'delta':>8s}", file=sys.stderr)
    for name, r in rows.items():
        agree = f"{r['agreement_fp32']:8.4f}" if r.get("agreement_fp32") is not None else f"{'':8s}"
        delta = f"{r['delta_points']:+8.2f}" if r.get("delta_points") is not None else f"{'':8s}"
        print(f"{name:16s}{r['miou']:8.4f}{r['person_iou']:8.4f}{r['boundary_iou']:9.4f}{agree}{delta}", file=sys.stderr)
    print("(delta: mIoU points vs the previous step of teacher -> student -> fp32 -> int8 -> mixed; contrasts vs fp32)",
          file=sys.stderr)
    for label, key in (("deployed INT8", "deployed_int8"), ("CPU-served", "cpu_model")):
        if report.get(f"{key}_miou") is not None:
            print(f"{label} (chosen on val): {report.get(key)} mIoU {report[f'{key}_miou']:.4f}, "
                  f"{report[f'{key}_loss_points']:.2f} points below FP32 on {report.get('split', '?')}", file=sys.stderr)


if __name__ == "__main__":
    main()
