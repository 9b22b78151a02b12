"""The docs name only what exists: every `edgeseg ...` and `make ...` they show resolves, every link lands, the
generated pages are current, and the README stays a newcomer's page."""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
# words of a lab notebook, not of a user's page (README and docs/); an ONNX Runtime session is no such word
LOG_WORDS = re.compile(r"\b[Rr]un [ABCD]\b|(?i:\bthis round\b|\bmissed\b|\b(this|that|next|previous|earlier|later) "
                       r"session\b|\bsessions? of (this|the) project\b)")


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    return module


GEN = _generator()
import docs_cli  # noqa: E402  (docs/ is on sys.path once the generator is loaded)
import docs_figures  # noqa: E402


def _commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every `edgeseg ...` or `make ...` in ``path``: code-block lines that start with
    one, and inline code spans that contain `edgeseg ` or start with `make `."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            text = line.strip().removeprefix("$ ")
            text = re.split(r"\s#\s", " " + text, maxsplit=1)[0].strip()
            for part in re.split(r"\s&&\s", text):
                if re.match(r"(edgeseg|make)(\s|$)", part) or "edgeseg " in part:
                    out.append((n, part[part.index("edgeseg"):] if not part.startswith("make") else part))
            continue
        for span in re.findall(r"`([^`]+)`", line):
            for part in (p.strip() for p in re.split(r"\s&&\s", span)):
                if part.startswith("make ") or part == "make":
                    out.append((n, part))
                elif re.search(r"(^|[\s\[(])edgeseg(\s|$)", part):
                    out.append((n, part[part.index("edgeseg"):]))
    return out


def _tokens(command: str) -> list[str]:
    text = re.sub(r"[\[\]()]", " ", command)
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def _placeholder(token: str) -> bool:
    return token in ("...", "…") or bool(re.fullmatch(r"<[^>]+>|[A-Z][A-Z_]*", token))


def _resolve_edgeseg(tokens: list[str]) -> list[str]:
    """What in ``tokens`` (``edgeseg ...``) click does not know: command names and option names."""
    from edgeseg.cli import main

    problems = []
    root = click.Context(main, info_name="edgeseg")
    with root:
        commands: list[tuple[click.Command, click.Context]] = [(main, root)]
        rest = tokens[1:]
        # the command path: words (alternatives joined by |) while the current command is a group
        while rest and isinstance(commands[0][0], click.Group) and not rest[0].startswith("-"):
            word, rest = rest[0], rest[1:]
            if _placeholder(word):  # `edgeseg <group> --help`, `edgeseg calibration ...`: a shape, not a name
                rest = [t for t in rest if not t.startswith("-") or t in ("-h", "--help")]
                break
            nxt = []
            for group, ctx in commands:
                for name in word.split("|"):
                    cmd = group.get_command(ctx, name)
                    if cmd is None or cmd.hidden:
                        problems.append(f"no command `{name}` in `{ctx.command_path}`")
                        continue
                    nxt.append((cmd, click.Context(cmd, info_name=name, parent=ctx)))
            if not nxt:
                return problems
            commands = nxt
        for i, token in enumerate(rest):
            if not token.startswith("-") or token in ("-", "--"):
                continue
            name = token.split("=", 1)[0]
            if re.fullmatch(r"-[a-zA-Z]{2,}", name) and len(set(name[1:])) == 1:
                name = name[:2]  # -vv: a counted flag
            for cmd, ctx in commands:
                params = {o: p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)
                          for o in [*p.opts, *p.secondary_opts]}
                if name not in params:
                    problems.append(f"`{ctx.command_path}` has no option `{name}`")
                    continue
                param = params[name]
                value = token.split("=", 1)[1] if "=" in token else (rest[i + 1] if i + 1 < len(rest) else "")
                if isinstance(param.type, click.Choice) and re.fullmatch(r"[a-z0-9-]+(\|[a-z0-9-]+)*", value):
                    bad = [v for v in value.split("|") if v not in param.type.choices]
                    if bad:
                        problems.append(f"`{ctx.command_path} {name}` takes {'|'.join(param.type.choices)}, not {bad}")
    return problems


def _resolve_make(tokens: list[str], targets: set[str], variables: set[str]) -> list[str]:
    problems = []
    for token in tokens[1:]:
        if token.startswith("-"):
            continue
        if _placeholder(token):
            continue
        if "=" in token:
            if token.split("=", 1)[0] not in variables:
                problems.append(f"the Makefile has no variable `{token.split('=', 1)[0]}`")
        elif token not in targets:
            problems.append(f"the Makefile has no target `{token}`")
    return problems


def test_every_command_in_the_docs_resolves():
    """Each `edgeseg ...` through click (command path, option names, choices) and each `make ...` against the
    Makefile as it is (targets, variables); every unresolved one is listed with its file and line."""
    targets_, variables_, _ = docs_cli._makefile()
    targets = {t for t in targets_ if not t.startswith((".", "$("))}
    variables = set(variables_)
    found, unresolved = 0, []
    for path in USER_DOCS:
        for line, command in _commands(path):
            tokens = _tokens(command)
            problems = (_resolve_make(tokens, targets, variables) if tokens[0] == "make"
                        else _resolve_edgeseg(tokens))
            found += 1
            unresolved += [f"{path.relative_to(ROOT)}:{line}: {command}\n    {p}" for p in problems]
    assert found > 50, found  # the extraction works
    assert not unresolved, "commands the docs name that do not exist:\n" + "\n".join(unresolved)


def test_the_resolver_refuses_what_does_not_exist():
    targets, variables = {"demo", "test"}, {"CONFIG"}
    assert _resolve_edgeseg(_tokens("edgeseg export quantize|all --calibration site")) == []
    assert _resolve_edgeseg(_tokens("edgeseg export quantize --calib DIR"))  # removed
    assert _resolve_edgeseg(_tokens("edgeseg distill train --unlabelled DIR"))  # hidden: the old spelling
    assert _resolve_edgeseg(_tokens("edgeseg distill run-dir"))  # hidden plumbing
    assert _resolve_edgeseg(_tokens("edgeseg calibration synth --guidance bogus"))
    assert _resolve_edgeseg(_tokens("edgeseg nosuch"))
    assert _resolve_make(_tokens("make demo CONFIG=x.yaml"), targets, variables) == []
    assert _resolve_make(_tokens("make deploy"), targets, variables) and _resolve_make(_tokens("make test NOPE=1"),
                                                                                     targets, variables)
    lines = [c for _, c in _commands(ROOT / "README.md")]
    assert any(c.startswith("make demo") for c in lines) and any(c.startswith("edgeseg runtime") for c in lines)


def test_generated_docs_are_current():
    """docs/cli.md, docs/configuration.md and the figure tables of docs/results.md and README.md equal a fresh
    render from the commands, the Makefile, the config dataclasses and benchmarks/results/*.json."""
    stale = [str(p.relative_to(ROOT)) for p, text in GEN.outputs().items()
             if not p.is_file() or p.read_text() != text]
    assert not stale, f"stale: {', '.join(stale)}; regenerate with `{GEN.COMMAND}`"


def test_a_figure_that_changes_in_its_json_makes_results_md_stale(monkeypatch):
    """The tables are read from the JSON files: a changed key changes the page (so a stale figure cannot pass)."""
    import json

    real = docs_figures._load

    def moved(file):
        data = real(file)
        if file == "runtime.json":
            data = json.loads(json.dumps(data))
            data["student_vs_teacher_speedup"] += 1.0
        return data

    results = ROOT / "docs" / "results.md"
    before = docs_figures.fill_figures(results.read_text(), results)
    monkeypatch.setattr(docs_figures, "_load", moved)
    assert docs_figures.fill_figures(results.read_text(), results) != before


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m and not fenced:
            slug = _slug(m.group(2))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def test_every_link_lands():
    """Relative links in the README and docs/ name files that exist, and headings that exist in them."""
    broken = []
    for path in USER_DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                    continue
                file, _, anchor = target.partition("#")
                dest = (path.parent / file).resolve() if file else path
                if not dest.exists():
                    broken.append(f"{path.relative_to(ROOT)}:{n}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{path.relative_to(ROOT)}:{n}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_newcomers_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024, len(text.encode())
    for heading in ("Requirements", "Quick start", "Your own data", "On the device", "Results", "Documentation",
                    "Licence"):
        assert re.search(rf"^## {heading}", text, re.M), heading


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_hold_no_lab_notebook_words(path):
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if LOG_WORDS.search(line)]
    assert not hits, "\n".join(hits)


def test_every_make_target_and_variable_is_described():
    """docs/cli.md's make table covers the Makefile as it is: a new target or variable needs a description."""
    cli = (ROOT / "docs" / "cli.md").read_text()
    targets, variables, _ = docs_cli._makefile()
    missing = [f"make {t}" for t in targets if not t.startswith((".", "$(")) and f"| `make {t}` |" not in cli]
    missing += [v for v in variables if f"| `{v}` |" not in cli]
    assert not missing, f"{missing}: regenerate with `{GEN.COMMAND}`"
