"""docs/configuration.md: every config key with its default and meaning, from the config dataclasses (a field's
trailing or preceding comment is its meaning)."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from typing import Any

from docs_common import HEADER


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment (the lines just above it and the text after it on its own line), for one class."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = textwrap.dedent(source).splitlines()
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body[0].body
    fields = [n for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    out = {}
    for k, node in enumerate(fields):
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        trailing = []
        for ln in range(node.lineno - 1, node.end_lineno):
            code = lines[ln]
            if "#" in code and not code.strip().startswith("#"):
                trailing.append(code.split("#", 1)[1].strip())
        # comment lines right below a field, followed by a blank line or code that is not a field, continue it
        below, j = [], node.end_lineno
        while j < len(lines) and lines[j].strip().startswith("#"):
            below.append(lines[j].strip().lstrip("#").strip())
            j += 1
        nxt = fields[k + 1] if k + 1 < len(fields) else None
        if below and (nxt is None or nxt.lineno - 1 != j):
            trailing += below
        out[node.target.id] = " ".join([*above, *trailing]).strip()
    return out


# Meanings of the fields whose dataclass carries no comment for them (class.field -> meaning); a comment in the
# dataclass is the better home, and wins.


def _meaning(cls: type, name: str, required: bool = True) -> str:
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            text = _field_comments(klass).get(name, "")
            if text:  # one table cell: `|` is no column break, and <run_dir> no HTML tag
                return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    if required:
        raise SystemExit(f"{cls.__name__}.{name}: no meaning; give the field a comment in its dataclass")
    return ""


def _annotation(cls: type, name: str) -> str:
    for klass in cls.__mro__:
        ann = klass.__dict__.get("__annotations__", {})
        if name in ann:
            text = ann[name] if isinstance(ann[name], str) else getattr(ann[name], "__name__", str(ann[name]))
            m = re.match(r"Literal\[(.*)\]$", text)
            if m:
                return " \\| ".join(v.strip().strip("\"'") for v in m.group(1).split(","))
            return text.replace("|", "\\|")
    return ""


def _value(v: Any) -> str:
    if isinstance(v, str):
        return f'`"{v}"`' if v == "" else f"`{v}`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, tuple):
        if len(v) > 2 and all(isinstance(x, str) for x in v):
            return f"{len(v)} strings (see the source)"
        return "`[" + ", ".join(str(x) for x in v) + "]`"
    return f"`{v}`"


def render_configuration() -> str:
    from edgeseg.export.config import Config

    owners = {"edgeseg.distill.config": ("distill", "distill/config.py"),
              "edgeseg.calibration.config": ("calibration", "calibration/config.py"),
              "edgeseg.export.config": ("export", "export/config.py")}
    cfg = Config()
    out = [HEADER, "# Configuration", "",
           "One YAML file drives every stage (`configs/demo.yaml` for the demo, `configs/yolov9_b0_from_b3.yaml`",
           "for the reference design at 640x640). Each stage owns its sections: `distill/config.py` (the run's",
           "settings, data, models, loss, training), `calibration/config.py` (`calibration`) and `export/config.py`",
           "(`export`, `deploy`); `export`'s `Config` is the whole file. A key left out takes the default below.",
           "", "- Set a key in the file, or on the command line: `--set train.epochs=3` (repeatable), or",
           "  `make distill SET=\"train.epochs=3 export.precision=fp16\"`.",
           "- An unknown key fails with a \"did you mean\"; a wrong type or a value out of range names the",
           "  dotted key and what is allowed.",
           "- The resolved config is saved in every checkpoint, ONNX file (`metadata_props`), engine sidecar and",
           "  bundle manifest.", ""]
    top, sections = [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        (sections if dataclasses.is_dataclass(value) else top).append(f)
    out += ["## Run settings (`distill/config.py`)", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for f in top:
        out.append(f"| `{f.name}` | {_annotation(type(cfg), f.name)} | {_value(getattr(cfg, f.name))} | "
                   f"{_meaning(type(cfg), f.name)} |")
    out.append("")

    def rows(obj: Any, prefix: str) -> list[str]:
        lines, nested = [], []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                nested.append((f.name, v))
                continue
            lines.append(f"| `{prefix}{f.name}` | {_annotation(type(obj), f.name)} | {_value(v)} | "
                         f"{_meaning(type(obj), f.name)} |")
        for name, v in nested:
            lines += rows(v, f"{prefix}{name}.")
        return lines

    for f in sections:
        v = getattr(cfg, f.name)
        owner = next(o for klass in type(cfg).__mro__ if f.name in klass.__dict__.get("__annotations__", {})
                     for m, o in owners.items() if klass.__module__ == m)
        doc = " ".join(inspect.cleandoc(type(v).__doc__ or "").split("\n\n")[0].split())
        meaning = _meaning(type(cfg), f.name, required=False)
        out += [f"## `{f.name}` (`{owner[1]}`)", "", doc + (f" {meaning}" if meaning else ""), "",
                "| key | type | default | meaning |", "|---|---|---|---|", *rows(v, f"{f.name}."), ""]
    return "\n".join(out).rstrip() + "\n"
