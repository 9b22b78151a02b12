"""The ``edgeseg`` command: one sub-command group per stage, loaded only when it runs.

    edgeseg distill train | train-teacher | evaluate | prepare | ...
    edgeseg calibration synth | report | generator
    edgeseg export onnx | quantize | engine | accuracy | all | bundle | bundle-engine
    edgeseg runtime infer | profile | check
    edgeseg serve triton | deepstream | start

Stage groups are imported lazily: ``edgeseg --help`` and ``edgeseg runtime ...`` work on an edge
device that installed only the runtime, and a stage whose extra is missing says which one to install.
"""
from __future__ import annotations

import importlib
import sys

import click

from edgeseg import __version__

# name -> (module holding the click group ``main``, one-line help, pip extra it needs or None)
STAGES: dict[str, tuple[str, str, str | None]] = {
    "distill": ("edgeseg.distill.cli", "Train the teacher, distil the student, evaluate.", "train"),
    "calibration": ("edgeseg.calibration.cli", "Synthesise an INT8 calibration set and report on it.", "train"),
    "export": ("edgeseg.export.cli", "ONNX, INT8, TensorRT engines, accuracy and the deploy bundle.", "train"),
    "runtime": ("edgeseg.runtime.cli", "Segment images, profile latency, check a new site (no torch).", None),
    "serve": ("edgeseg.export.serve_cli", "Triton repository, DeepStream config and a local Triton server.", "serve"),
}

# Modules only the heavy extras bring; a stage that misses one names the extra instead of a traceback.
_EXTRA_MODULES = {"torch", "torchvision", "timm", "segmentation_models_pytorch", "onnx", "onnxsim", "onnxscript",
                  "diffusers", "skimage", "pycocotools", "polygraphy", "onnxconverter_common", "tritonclient", "google"}


# The command layer's wiring: a stage whose commands take plug-ins from stages downstream of it in
# the data flow. Each listed stage's cli module has ``wire(name, group)``, called when ``name`` loads:
# calibration's generators become distill's sample sources (imports point calibration -> distill,
# and distill itself names no generator). A listed stage that is not installed wires nothing.
WIRING: dict[str, tuple[str, ...]] = {"distill": ("calibration",)}
# The config file's schema: each stage owns its sections, and export's ``Config`` composes them all
# (distill's, then calibration's, then its own). The stages that read the file parse it with that.
SCHEMA = ("edgeseg.export.config", "Config")
_READS_CONFIG = {"distill", "calibration", "export", "serve"}


class StageGroup(click.Group):
    """A click group whose sub-groups are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(STAGES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in STAGES:
            return None
        module, help_line, _ = STAGES[name]
        group = importlib.import_module(module).main
        group.short_help = help_line
        if name in _READS_CONFIG:
            schema = getattr(importlib.import_module(SCHEMA[0]), SCHEMA[1])
            importlib.import_module("edgeseg.distill.cli").use_schema(schema)
        for other in WIRING.get(name, ()):
            try:
                wiring = importlib.import_module(STAGES[other][0])
            except ModuleNotFoundError as e:
                if (e.name or "").split(".")[0] not in _EXTRA_MODULES:
                    raise
                continue
            wiring.wire(name, group)
        return group

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # `edgeseg --help` lists the stages from their one-line help, without importing them.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_line) for name, (_, help_line, _) in STAGES.items()])


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeseg")
def main() -> None:
    """edgeseg: distil -> calibrate -> export -> deploy person segmentation for edge GPUs.

    Each stage is a command group; `edgeseg STAGE --help` lists its commands.
    """


def run() -> None:
    """Console entry point: ``main`` with a one-line hint when a stage's extra is not installed."""
    try:
        main(prog_name="edgeseg")
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in _EXTRA_MODULES:
            raise
        stage = next((s for s in sys.argv[1:] if s in STAGES), None)
        extra = STAGES[stage][2] if stage else "train"
        print(f"error: `edgeseg {stage or ''}` needs {root}, which is not installed; "
              f"install the stage's extra: pip install 'edgeseg[{extra}]'", file=sys.stderr)
        sys.exit(2)
