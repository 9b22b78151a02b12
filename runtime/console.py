"""Command-line plumbing shared by the stage CLIs: logging set-up and one-line errors."""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, TypeVar

from edgeseg.runtime.errors import EdgesegError

F = TypeVar("F", bound=Callable[..., object])


def configure_logging(verbosity: int) -> None:
    """Log to stderr: warnings by default, info with ``-v``, debug with ``-vv``."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def exit_on_user_error(func: F) -> F:
    """Turn an :class:`EdgesegError` into one line on stderr and exit status 2.

    Unexpected exceptions keep their traceback: they are bugs, not user errors.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EdgesegError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


_warned: set[str] = set()


def warn_renamed(old: str, new: str) -> None:
    """Say once per process that ``old`` was renamed ``new`` (an old spelling kept for one release)."""
    if old not in _warned:
        _warned.add(old)
        print(f"warning: `{old}` is renamed `{new}`; the old spelling goes in the next release", file=sys.stderr)


def hidden_alias(group, command, old_name: str) -> None:
    """Register ``command`` under ``old_name`` in ``group`` as a hidden alias that warns once when used."""
    import click

    def callback(*args, **kwargs):
        warn_renamed(f"{group.name} {old_name}", f"{group.name} {command.name}")
        return command.callback(*args, **kwargs)

    group.add_command(click.Command(old_name, params=command.params, callback=callback, hidden=True,
                                    help=f"Renamed `{command.name}`.", context_settings=command.context_settings))
