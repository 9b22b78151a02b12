"""``edgeseg export``: onnx, quantize, engine, accuracy, all, bundle."""
from __future__ import annotations

import json
import logging
import sys

import click

from edgeseg.distill.cli import config_options, load, use_schema
from edgeseg.export.config import Config
from edgeseg.runtime.console import configure_logging, exit_on_user_error

log = logging.getLogger(__name__)


def _echo(obj: dict) -> None:
    click.echo(json.dumps({k: v for k, v in obj.items() if not isinstance(v, (list, dict)) or k in ("files", "strip")},
                          default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Strip, ONNX, Q/DQ INT8, TensorRT engines, accuracy report, deploy bundle."""
    use_schema(Config)  # export owns the whole file's schema: also when run as `python -m edgeseg.export.cli`


@main.command()
@config_options
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Distillation checkpoint (default: <run_dir>/distill/best.pt).")
@exit_on_user_error
def onnx(config_path, overrides, verbose, checkpoint):
    """Strip the projection head, export model.onnx (+ FP16), onnxsim, parity check."""
    from edgeseg.export.stage import run_onnx

    _echo(run_onnx(load(config_path, overrides, max(verbose, 1)), checkpoint))


@main.command()
@config_options
@click.option("--calib", type=click.Path(file_okay=False), default=None,
              help="Calibration folder (default: <run_dir>/calibration/synthetic).")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
              help="Calibration method (default: export.calibration_method).")
@click.option("--calibration", "choice", default=None, metavar="site|synthetic|real|DIR",
              help="The set the deployed INT8 models are calibrated on (export.calibration; default synthetic).")
@click.option("--no-contrast", is_flag=True, help="Skip the real-image and noise calibrations.")
@click.option("--no-budget", is_flag=True, help="Skip the accuracy budget search.")
@exit_on_user_error
def quantize(config_path, overrides, verbose, calib, method, choice, no_contrast, no_budget):
    """Q/DQ INT8 (s8s8 + u8s8), TensorRT calibration cache, accuracy budget."""
    from edgeseg.export.stage import run_quantize

    if method:
        overrides = (*overrides, f"export.calibration_method={method}")
    if choice:
        overrides = (*overrides, f"export.calibration={choice}")
    _echo(run_quantize(load(config_path, overrides, max(verbose, 1)), calib, not no_contrast, not no_budget))


@main.command()
@config_options
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), default=None,
              help="Engine precision (default: export.precision).")
@click.option("--bundle", type=click.Path(file_okay=False), default=None,
              help="Build into a deploy bundle (on the target device) instead of <run_dir>/export.")
@click.option("--dla-core", type=int, default=-1, show_default=True, help="DLA core (Jetson); -1 = GPU.")
@exit_on_user_error
def engine(config_path, overrides, verbose, precision, bundle, dla_core):
    """Build a TensorRT engine with the path the installed TensorRT supports (or say why not)."""
    from pathlib import Path

    from edgeseg.export.stage import run_engine

    if bundle:
        configure_logging(max(verbose, 1))
        import json as _json

        precision = precision or _json.loads((Path(bundle) / "manifest.json").read_text()).get("precision", "int8")
        _echo(_said(run_engine(None, precision, Path(bundle), dla_core), device_build=True))
        return
    cfg = load(config_path, overrides, max(verbose, 1))
    _echo(_said(run_engine(cfg, precision or cfg.export.precision, None, dla_core)))


@main.command()
@config_options
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None)
@exit_on_user_error
def accuracy(config_path, overrides, verbose, checkpoint):
    """Teacher -> student -> FP32 -> INT8 on the validation set: accuracy.json, table, gallery."""
    from edgeseg.export.stage import run_accuracy

    report = run_accuracy(load(config_path, overrides, max(verbose, 1)), checkpoint)
    print_table(report)
    _echo(report)


@main.command("all")
@config_options
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None)
@click.option("--calib", type=click.Path(file_okay=False), default=None)
@click.option("--calibration", "choice", default=None, metavar="site|synthetic|real|DIR",
              help="The set the deployed INT8 models are calibrated on (export.calibration; default synthetic).")
@exit_on_user_error
def all_steps(config_path, overrides, verbose, checkpoint, calib, choice):
    """onnx, quantize, engine and accuracy in one go (`make export`)."""
    from edgeseg.export.stage import run_accuracy, run_engine, run_onnx, run_quantize, validation_set

    if choice:
        overrides = (*overrides, f"export.calibration={choice}")
    cfg = load(config_path, overrides, max(verbose, 1))
    run_onnx(cfg, checkpoint)
    # val selects (the budget search); the report is on test and test_shift, never on val when they exist
    run_quantize(cfg, calib, val=validation_set(cfg))
    report = run_accuracy(cfg, checkpoint)
    print_table(report)
    _said(run_engine(cfg, cfg.export.precision))
    _echo(report)


@main.command()
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
