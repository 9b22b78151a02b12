"""Render the generated parts of the docs from the code, the Makefile and the benchmark results.

    .venv/bin/python docs/generate.py            # rewrite them
    .venv/bin/python docs/generate.py --check    # exit 1 naming each stale file (tests/test_docs.py runs it)

- ``docs/cli.md``: every ``edgeseg`` command and option, from the click commands; the make targets and
  variables, from the Makefile as it is (``docs_cli.py``).
- ``docs/configuration.md``: every config key with its default and meaning, from the config dataclasses
  (``docs_config.py``).
- ``docs/results.md`` and ``README.md``: the tables of figures between ``<!-- figures:NAME -->`` and
  ``<!-- /figures -->``, from ``benchmarks/results/*.json`` (``docs_figures.py``). The prose around them is
  written by hand and holds no figure; a figure that a JSON file does not hold is not shown.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # docs/ is a folder of scripts, not a package

from docs_cli import render_cli  # noqa: E402
from docs_common import COMMAND, ROOT  # noqa: E402
from docs_config import render_configuration  # noqa: E402
from docs_figures import fill_figures  # noqa: E402


def outputs() -> dict[Path, str]:
    """Every generated file, path -> the content it should have now."""
    out = {ROOT / "docs" / "cli.md": render_cli(), ROOT / "docs" / "configuration.md": render_configuration()}
    for path in (ROOT / "docs" / "results.md", ROOT / "README.md"):
        if path.is_file():
            out[path] = fill_figures(path.read_text(), path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 if a generated file is stale.")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if not path.is_file() or path.read_text() != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"stale: {', '.join(map(str, stale))}; regenerate with `{COMMAND}`", file=sys.stderr)
        return 1
    for p in stale if not args.check else ():
        print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
