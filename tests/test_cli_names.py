"""One consistent command: one name per idea, whole help lines, help on every option, old spellings kept for
one release (hidden, warning once), `--calib` gone with a line that says what replaced it."""
from __future__ import annotations

import click
import pytest

from edgeseg.cli import STAGES, main
from edgeseg.runtime.console import THREADS_HELP
from tests.conftest import run_cli

# names that mean the same thing everywhere; the old spellings on the right may only be hidden aliases
RENAMED = {"--output": "--out", "--input": "--images", "--target-images": "--images", "--unlabelled": "--images"}


def _commands():
    """(path, command) of every visible command of every stage group."""
    root = click.Context(main, info_name="edgeseg")
    out = []
    with root:
        for name in STAGES:
            group = main.get_command(root, name)
            ctx = click.Context(group, info_name=name, parent=root)
            for c in group.list_commands(ctx):
                cmd = group.get_command(ctx, c)
                if not cmd.hidden:
                    out.append((f"edgeseg {name} {c}", cmd, group))
    return out


COMMANDS = _commands()


def test_group_listings_show_whole_lines():
    """`edgeseg GROUP --help` lists each command's short help whole, never cut with '...' at 80 columns."""
    cut = []
    for path, cmd, group in COMMANDS:
        width = 80 - 6 - max(len(c) for c in group.list_commands(click.Context(group)))
        text = cmd.get_short_help_str(width)
        if text.endswith("...") or not text:
            cut.append(f"{path}: {text!r}")
    assert not cut, "\n".join(cut)
    assert all(len(help_line) <= 70 for _, help_line, _ in STAGES.values())  # `edgeseg --help`'s own lines


def test_every_visible_option_has_help_and_old_spellings_are_hidden():
    missing, visible_old = [], []
    for path, cmd, _ in COMMANDS:
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden:
                continue
            if not (p.help or "").strip():
                missing.append(f"{path} {p.opts[0]}")
            visible_old += [f"{path} {o}" for o in p.opts if o in RENAMED or o == "--calib"]
    assert not missing, f"options without help: {missing}"
    assert not visible_old, f"old spellings shown: {visible_old}"


def test_threads_zero_means_one_thing():
    """Every --threads is ONNX Runtime's thread count, 0 its default (one per physical core)."""
    for path, cmd, _ in COMMANDS:
        for p in cmd.params:
            if isinstance(p, click.Option) and "--threads" in p.opts:
                assert "0: its default, one per physical core" in p.help, (path, p.help)
                assert p.default == 0, path
    assert "0: its default, one per physical core" in THREADS_HELP


def test_plumbing_is_hidden():
    from edgeseg.distill.cli import main as distill

    assert distill.get_command(click.Context(distill), "run-dir").hidden
    assert "run-dir" not in {p.split()[-1] for p, _, _ in COMMANDS}


@pytest.mark.parametrize("module, command, old, new, param", [
    ("edgeseg.distill.cli", "train", "--unlabelled", "--images", "images"),
    ("edgeseg.calibration.cli", "synth", "--target-images", "--images", "images"),
])
def test_an_old_spelling_gives_its_value_to_the_new_one_and_warns_once(module, command, old, new, param, capsys):
    import importlib

    from edgeseg.runtime import console

    cmd = importlib.import_module(module).main.get_command(click.Context(click.Group()), command)
    console._warned.discard(old)
    for _ in range(2):
        ctx = cmd.make_context(command, [old, "frames"])
        assert ctx.params[param] == "frames"
    assert capsys.readouterr().err.count(f"`{old}` is renamed `{new}`") == 1
    assert cmd.make_context(command, [new, "other"]).params[param] == "other"


def test_the_renamed_engine_command_keeps_its_old_spelling_hidden():
    from edgeseg.export.cli import main as export

    ctx = click.Context(export)
    engine, bundle_engine = export.get_command(ctx, "engine"), export.get_command(ctx, "bundle-engine")
    bundle = next(p for p in engine.params if "--bundle" in p.opts)
    assert bundle.hidden and not any(p.hidden for p in bundle_engine.params if isinstance(p, click.Option))
    # bundle-engine reads the bundle's manifest, not a config: it offers no --config or --set
    assert not {"--config", "--set"} & {o for p in bundle_engine.params for o in p.opts}


@pytest.mark.parametrize("args, new", [
    (("export", "quantize", "--calib", "somewhere"), "--calibration site|synthetic|real|DIR"),
    (("calibration", "report", "--calib", "somewhere"), "--calibration synthetic|DIR"),
])
def test_calib_is_gone_and_says_what_replaced_it(args, new):
    r = run_cli(*args)
    assert r.returncode == 2 and r.stderr.strip() == f"error: `--calib` was removed; use `{new}`", r.stderr
