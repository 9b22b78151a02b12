"""docs/cli.md: every `edgeseg` command and option from the click commands, and the make targets and variables
from the Makefile as it is."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from docs_common import HEADER, ROOT


def _text(text: str) -> str:
    """Prose for a Markdown table cell or paragraph: one line, ``<run_dir>`` kept visible (a renderer would
    take it for an HTML tag), ``|`` not a column break."""
    return " ".join(text.split()).replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _option_row(param) -> tuple[str, str, str]:
    import click

    names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    if not param.is_flag and not param.count:
        names += f" {param.metavar or param.type.get_metavar(param, click.get_current_context()) or param.type.name.upper()}"
    unset = param.default is None or "Sentinel" in repr(param.default) or param.default == ()
    if param.count:
        default = "0"
    elif param.is_flag:
        default = "on" if param.default is True else "off"
    elif unset or param.multiple or param.required:
        default = "required" if param.required else ""
    elif isinstance(param.default, (tuple, list)):
        default = " ".join(str(d) for d in param.default)
    else:
        default = str(param.default)
    help_text = _text((param.help or "").replace("  [required]", ""))
    return names.replace("|", "\\|"), f"`{default}`" if default and default != "required" else default, help_text


def _command_section(path: list[str], cmd) -> list[str]:
    import click

    ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=100, max_content_width=100)
    with ctx:
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        out = [f"### `{' '.join(path)}`", "", f"    {' '.join(path)} {usage}", ""]
        for paragraph in inspect.cleandoc(cmd.help or "").split("\n\n"):
            out += [_text(paragraph), ""]
        rows = [_option_row(p) for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
        if rows:
            out += ["| option | default | meaning |", "|---|---|---|"]
            out += [f"| {n} | {d} | {h} |" for n, d, h in rows]
            out.append("")
    return out


def _makefile() -> tuple[dict[str, dict], dict[str, dict], str]:
    """(targets, variables, header comment) of the Makefile as it is now.

    targets: name -> {"comment": text above the rule, "recipe": [lines], "deps": [names]}
    variables: name -> {"default": value, "comment": text above the assignment} (``?=`` ones: user-settable)
    """
    lines = (ROOT / "Makefile").read_text().splitlines()
    targets: dict[str, dict] = {}
    variables: dict[str, dict] = {}
    comment: list[str] = []
    header: list[str] = []
    current = None
    at_top = True
    for raw in lines:
        if raw.startswith("\t"):
            if current is not None:
                targets[current]["recipe"].append(raw[1:])
            continue
        line = raw.rstrip()
        if line.startswith("#"):
            (header if at_top else comment).append(line.lstrip("#").strip())
            continue
        at_top = False
        if not line:
            comment, current = [], None
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|=)\s*(.*)$", line)
        if m:
            if m.group(2) == "?=":
                variables[m.group(1)] = {"default": m.group(3), "comment": " ".join(comment)}
            comment, current = [], None
            continue
        m = re.match(r"^([^:=\s][^:=]*?)\s*:(?!=)\s*(.*)$", line)
        if m and not m.group(1).startswith("."):
            for name in m.group(1).split():
                targets[name] = {"comment": " ".join(comment), "recipe": [], "deps": m.group(2).split()}
            current = m.group(1).split()[0]
        comment = []
    # a recipe line continued with a trailing backslash is one command
    for t in targets.values():
        joined, buf = [], ""
        for r in t["recipe"]:
            buf += r.rstrip("\\").strip() + " "
            if not r.rstrip().endswith("\\"):
                joined.append(buf.strip())
                buf = ""
        t["recipe"] = joined + ([buf.strip()] if buf.strip() else [])
    return targets, variables, " ".join(header)


def _make_function(text: str, i: int) -> tuple[str, int]:
    """The make expression ``$(...)`` starting at ``text[i]``, rendered for a reader; and the index after it."""
    depth, j = 0, i + 1
    while j < len(text):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            break
        j += 1
    inner = text[i + 2:j]
    name, _, args = inner.partition(" ")
    parts, depth, buf = [], 0, ""
    for ch in args:
        if ch == "," and depth == 0:
            parts.append(buf)
            buf = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        buf += ch
    parts.append(buf)
    parts = [_render_make(p.strip()) for p in parts]
    if name == "if":
        cond = parts[0]
        return (f"[{parts[1]} if {cond}]" if len(parts) == 2 else f"[{parts[1]} if {cond}, else {parts[2]}]"), j + 1
    if name == "filter" and len(parts) == 2:
        return f"{parts[1].lstrip('$')}={parts[0]}", j + 1
    if name == "or":
        return "(" + " or ".join(parts) + ")", j + 1
    if name == "foreach":
        return "--set for each SET", j + 1
    if name == "firstword":
        return parts[0], j + 1
    if name == "wildcard":
        return "(" + " or ".join(parts[0].split()) + ")", j + 1
    simple = {"EDGESEG": "edgeseg", "PY": "python", "PYTHON": "python3", "RUN_DIR": "<run_dir>", "ARGS": "",
              "MAKE": "make", "VENV": "$VENV", "STAMP": "setup"}
    if not args:
        return simple.get(name, f"${name}"), j + 1
    return inner, j + 1


def _render_make(text: str) -> str:
    out, i = "", 0
    while i < len(text):
        if text.startswith("$$", i):
            out, i = out + "$", i + 2
        elif text.startswith("$(", i):
            rendered, i = _make_function(text, i)
            out += rendered
        else:
            out, i = out + text[i], i + 1
    return " ".join(out.split())


def _shell_commands(line: str) -> list[str]:
    """A recipe line split into its shell commands at ``;``, ``&&`` and ``||`` outside quotes and ``$(...)``."""
    out, buf, quote, depth, i = [], "", "", 0, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif line.startswith("$(", i):
            depth += 1
            buf, i = buf + "$(", i + 2
            continue
        elif ch == ")" and depth:
            depth -= 1
        elif not depth and (ch == ";" or line.startswith("&&", i) or line.startswith("||", i)):
            out.append(buf.strip())
            buf, i = "", i + (1 if ch == ";" else 2)
            continue
        buf, i = buf + ch, i + 1
    return [c for c in [*out, buf.strip()] if c]


def _target_runs(targets: dict, name: str, seen: set | None = None) -> list[str]:
    """What ``make name`` runs, one command each, in a reader's words (the commands of its recipe)."""
    seen = seen or set()
    t = targets[name]
    runs = []
    for dep in t["deps"]:  # a rule named by a variable (the set-up stamp) belongs to its target
        if dep.startswith("$(") and dep in targets and dep not in seen:
            seen.add(dep)
            runs += _target_runs(targets, dep, seen)
    for line in t["recipe"]:
        line = line.lstrip("@-")
        loop = re.search(r"for (\w+) in ([^;]+);.*\$\(MAKE\)[^;]*\$\$\1", line)
        if loop:
            runs.append("make " + " ".join(loop.group(2).split()))
            continue
        shell_vars: dict[str, str] = {}
        for cmd in _shell_commands(line):
            cmd = re.sub(r"^(nohup|if|then|else)\s+", "", cmd)
            assign = re.match(r'^(\w+)=("?)(.*)\2$', cmd)
            if assign:
                value = assign.group(3)
                for k, v in shell_vars.items():
                    value = value.replace(f'"$${k}"', v).replace(f"$${k}", v)
                shell_vars[assign.group(1)] = value
                if "$(EDGESEG)" not in value:
                    continue
                cmd = value
            for k, v in shell_vars.items():
                cmd = cmd.replace(f'"$${k}"', v).replace(f"$${k}", v)
            cmd = re.split(r"\s+(?:>>?|2>&1|&\s|&$)", cmd + " ")[0].strip()
            if re.match(r"(echo|printf)\b", cmd):
                continue
            if re.search(r"\$\((EDGESEG|if )|\$\(PY\) -m", cmd):
                runs.append(_render_make(cmd))
            elif cmd.startswith("$(MAKE)"):
                runs.append(_render_make(cmd).replace("--no-print-directory ", ""))
            elif re.search(r"bin/pip install|-m venv|^rm -rf", cmd):
                runs.append(_render_make(cmd).replace("--disable-pip-version-check -q ", "").replace("$VENV/bin/", ""))
    return [r for k, r in enumerate(runs) if r not in runs[:k]]


# Make targets and variables the Makefile's comments do not describe (a comment above the rule wins).
TARGET_HELP = {
    "setup": "Create the venv and install the project (train and dev extras), torch from TORCH_SPEC first.",
    "demo": "Every stage on the embedded demo, each stage's wall time in <run_dir>/demo_times.tsv.",
    "prepare": "Make the data and the teachers ready and check them (the shipped demo teachers' SHA-256).",
    "generator": "Rebuild the shipped demo generator (resumable); make demo loads the shipped one.",
    "teacher": "Rebuild the shipped demo teachers (resumable); make demo loads the shipped ones.",
    "distill": "Distil the student, then the ground-truth-only baseline (BASELINE: shipped, 1 trains it, 0 none); "
               "evaluate both.",
    "baseline": "Rebuild the demo's shipped ground-truth-only student (resumable); make demo installs the shipped one.",
    "calibrate": "The calibration set and its report, then labelled pairs steered to the site's images.",
    "calibrate-target": "Labelled target-domain pairs steered to the site's images (part of make calibrate).",
    "export": "ONNX, INT8, the accuracy report and, where TensorRT exists, the engine.",
    "deploy": "The deploy bundle, with the teacher as teacher.onnx when WITH_TEACHER=1.",
    "check": "The label-free site check of the bundle on the site's frames (TARGET, else the demo's 8).",
    "profile": "Latency and throughput of the bundle per batch size.",
    "serve": "A Triton repository for the bundle, served by a local Triton on 127.0.0.1 (Ctrl-C stops it).",
    "bench": "Every benchmark; writes benchmarks/results/*.json (after make demo).",
    "study": "The distillation study at convergence, in the background, resumable (not in bench or CI).",
    "video": "The demo clip through the bundle: mask and overlay videos, and their mIoU and flicker against the "
             "clip's ground truth (summary.json).",
    "test": "The CPU test set (CI); slow, GPU and TensorRT tests are skipped with the reason shown.",
    "test-all": "Every test, the slow ones included.",
    "clean": "Delete CONFIG's run folder.",
}
VARIABLE_HELP = {
    "CONFIG": "The config file every stage reads.",
    "DEVICE": "cpu, cuda or cuda:N (sets the config's device).",
    "DATA": "A folder with train/ and val/ (images/ and masks/): sets data.source=folder and data.root.",
    "SET": "Config overrides, space-separated key=value pairs, each passed as --set.",
    "BASELINE": "The ground-truth-only student beside the distilled one (make distill): shipped installs the demo's "
                "(trained here where it does not fit the config), 1 trains it here, 0 skips it.",
    "TARGET": "A folder of unlabelled images from the deployment site (make calibrate, make check).",
    "TARGET_COUNT": "Labelled target-domain pairs make calibrate writes.",
    "WITH_TEACHER": "1 carries the teacher in the bundle as teacher.onnx (make deploy), for make check's teacher agreement.",
    "TORCH_SPEC": "The torch and torchvision pip requirements make setup installs first.",
    "PYTEST_ARGS": "Extra pytest arguments for make test and make test-all.",
    "STUDY_ARGS": "Extra arguments of the study, e.g. --more-seeds or --arms gt_only,kd_site.",
    "PYTHON": "The Python that creates the venv.",
    "VENV": "The venv folder.",
}


def render_cli() -> str:
    from edgeseg.cli import STAGES, main

    import click

    root = click.Context(main, info_name="edgeseg")
    out = [HEADER, "# Command-line reference", "",
           "One command, `edgeseg`, with a group per stage; `edgeseg <group> <command> --help` prints the same text.",
           "Commands that read the config file take `--config FILE` and repeatable `--set key=value`",
           "([configuration](configuration.md)); `runtime` and `serve` commands take a bundle instead.",
           "Results go to stdout as JSON, logs to stderr. The make targets that run them are at the end.", "",
           "| group | what it does | commands |", "|---|---|---|"]
    groups = {}
    with root:
        for name in STAGES:
            group = main.get_command(root, name)
            groups[name] = group
            cmds = [c for c in group.list_commands(root) if not group.get_command(root, c).hidden]
            out.append(f"| [`edgeseg {name}`](#edgeseg-{name}) | {STAGES[name][1]} | "
                       + ", ".join(f"[`{c}`](#edgeseg-{name}-{c})" for c in cmds) + " |")
        out.append("")
        for name, group in groups.items():
            out += [f"## `edgeseg {name}`", "", _text(inspect.cleandoc(group.help or "")), ""]
            gctx = click.Context(group, info_name=name, parent=root)
            for c in group.list_commands(gctx):
                cmd = group.get_command(gctx, c)
                if not cmd.hidden:
                    out += _command_section(["edgeseg", name, c], cmd)
    targets, variables, _ = _makefile()
    out += ["## Make targets", "",
            "Each target runs `edgeseg` commands with `--config $(CONFIG)` and the `DEVICE`, `DATA` and `SET`",
            "overrides added (not repeated below). Target names are tasks and need not equal a command's name:",
            "`make calibrate` runs `edgeseg calibration ...`, `make deploy` runs `edgeseg export bundle`.", "",
            "| target | what it does | runs |", "|---|---|---|"]
    phony = next((t["deps"] for n, t in targets.items() if n == ".PHONY"), None) or [
        n for n in targets if not n.startswith("$(")]
    for name in phony:
        if name not in targets:
            continue
        what = TARGET_HELP.get(name) or _render_make(targets[name]["comment"])
        if not what:
            raise SystemExit(f"make {name}: no description; add a comment above the rule in the Makefile or an "
                             f"entry in TARGET_HELP ({Path(__file__).relative_to(ROOT)})")
        runs = "<br>".join(f"`{r}`" for r in _target_runs(targets, name)) or "(the targets it depends on: "
        if runs.endswith(": "):
            runs += ", ".join(targets[name]["deps"]) + ")"
        out.append(f"| `make {name}` | {_text(what)} | {runs.replace('|', chr(92) + '|')} |")
    out += ["", "Variables, set on the command line (`make deploy WITH_TEACHER=0`):", "",
            "| variable | default | meaning |", "|---|---|---|"]
    for name, v in variables.items():
        what = VARIABLE_HELP.get(name) or v["comment"]
        if not what:
            raise SystemExit(f"make variable {name}: no description; add a comment above it in the Makefile or an "
                             f"entry in VARIABLE_HELP ({Path(__file__).relative_to(ROOT)})")
        default = f"`{v['default']}`" if v["default"] else "(empty)"
        out.append(f"| `{name}` | {default} | {_text(what)} |")
    return "\n".join(out).rstrip() + "\n"
