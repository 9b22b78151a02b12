"""The installed package: one `edgeseg` namespace, one `edgeseg` command, a torch-free base install."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgeseg.cli import STAGES, main
from tests.conftest import ROOT

STAGE_FOLDERS = ("distill", "calibration", "export", "runtime")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the sources: setuptools' build/ folder would otherwise keep stale modules.
    src = tmp_path_factory.mktemp("src") / "edgeseg"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "results"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("edgeseg-*.whl")
    return path


def test_the_wheel_installs_one_namespace_and_one_command(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names}
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        meta = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert top == {"edgeseg", wheel.name.split("-py")[0] + ".dist-info"}, top
    for stage in STAGE_FOLDERS:
        assert f"edgeseg/{stage}/__init__.py" in names
    assert "edgeseg/runtime/backends/onnxrt.py" in names
    assert {"edgeseg/__init__.py", "edgeseg/__main__.py", "edgeseg/cli.py"} <= set(names)
    assert not any(n.startswith("edgeseg/runtime/_root") for n in names)  # the root is mapped, not nested
    assert re.findall(r"^(\S+) = (\S+)$", entry_points, re.M) == [("edgeseg", "edgeseg.cli:run")]
    # An edge device's plain install brings the runtime's needs only: torch and friends sit in extras.
    base = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert base and not any(re.search(r"\b(torch|timm|segmentation-models-pytorch|diffusers|onnxsim)\b", line)
                            for line in base), base


def test_source_imports_only_the_namespace():
    # Old top-level names would still import from a checkout (the repository root is on sys.path in
    # tests) but not from an installed wheel: no module may use them.
    bad = []
    for folder in (*STAGE_FOLDERS, "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.match(r"\s*(from|import) (distill|calibration|export|runtime)\b", line):
                    bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def _walk(group: click.Group, ctx: click.Context, path: tuple[str, ...]):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, click.Context(cmd, parent=ctx, info_name=name), (*path, name))


def test_help_at_every_level_lists_commands_with_one_line_each():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"], prog_name="edgeseg")
    assert top.exit_code == 0, top.output
    for stage in STAGES:
        assert re.search(rf"^  {stage}\s+\S.+$", top.output, re.M), top.output
    commands = list(_walk(main, click.Context(main, info_name="edgeseg"), ()))
    assert {p[0] for p, _ in commands} == set(STAGES)
    assert ("distill", "train") in {p for p, _ in commands} and ("runtime", "infer") in {p for p, _ in commands}
    for path, cmd in commands:
        r = runner.invoke(main, [*path, "--help"], prog_name="edgeseg")
        assert r.exit_code == 0, (path, r.output)
        assert r.output.startswith(f"Usage: edgeseg {' '.join(path)}"), r.output
        assert cmd.get_short_help_str(), f"`edgeseg {' '.join(path)}` has no help line"
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            for sub in cmd.list_commands(ctx):
                listed = re.search(rf"^  {re.escape(sub)}\s+\S", r.output, re.M)
                # hidden commands (plumbing, old names kept for one release) are not listed; the rest are
                assert bool(listed) != cmd.get_command(ctx, sub).hidden, (path, sub, r.output)


def test_python_m_edgeseg_and_the_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgeseg", "--version"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("edgeseg, version "), r.stdout + r.stderr
    script = Path(sys.executable).parent / "edgeseg"
    r = subprocess.run([str(script), "runtime", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "infer" in r.stdout and "profile" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([str(script), "nosuchstage"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "No such command 'nosuchstage'" in r.stderr


def test_a_stage_without_its_extra_names_the_pip_line(tmp_path):
    # An edge device has the runtime only: hide torch and run a training command.
    code = ("import sys\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
            "sys.meta_path.insert(0, Hide())\n"
            "sys.argv = ['edgeseg', 'distill', 'train', '--config', sys.argv[1]]\n"
            "from edgeseg.cli import run\n"
            "run()\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs" / "demo.yaml")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-1500:]
    assert r.stderr.strip().splitlines()[-1] == ("error: `edgeseg distill` needs torch, which is not installed; "
                                                 "install the stage's extra: pip install 'edgeseg[train]'")


def test_imports_point_against_the_data_flow():
    """distill -> calibration -> export -> runtime: a stage imports only the stages after it in that chain's
    reverse (runtime is the base). Read from the parsed code (imports inside functions count too); no stage
    names a project module in a string: only the `edgeseg` command's stage table loads stages by name, and its
    WIRING is how calibration's generators reach distill."""
    import ast

    allowed = {"runtime": {"runtime", "cli"}, "distill": {"distill", "runtime"},
               "calibration": {"calibration", "distill", "runtime"},
               "export": {"export", "calibration", "distill", "runtime"}}
    table = ROOT / "runtime" / "_root" / "cli.py"
    bad = []
    for stage, ok in allowed.items():
        for path in (ROOT / stage).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Call) and path != table:
                    f = node.func
                    called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    arg = node.args[0] if node.args else None
                    if called in ("import_module", "__import__") and not (
                            isinstance(arg, ast.Constant) and not str(arg.value).startswith("edgeseg")):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {called}(...) of a project module")
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "edgeseg" and len(parts) > 1 and parts[1] not in ok:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {name}")
    assert not bad, "\n".join(bad)


def test_the_torch_floor_has_the_torch_apis_the_code_calls():
    # torch.amp.GradScaler("cuda") (the trainer) exists from torch 2.3; an older torch allowed by the
    # floor would fail on the first CUDA training step.
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    (floor,) = [re.fullmatch(r"torch>=(\d+)\.(\d+)", r.replace(" ", "")) for r in requires if r.startswith("torch>")]
    uses_amp_scaler = any("torch.amp.GradScaler(" in p.read_text() for p in (ROOT / "distill").rglob("*.py"))
    assert not uses_amp_scaler or (int(floor[1]), int(floor[2])) >= (2, 3), floor[0]
