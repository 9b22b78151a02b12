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


def renamed_option(old: str, new: str, param: str, **kwargs):
    """A hidden option ``old`` kept for one release: it warns once and gives its value to ``param`` (option ``new``).

    The option that replaced it must take :func:`keep_renamed` as its callback, so that its own default
    does not overwrite the value the old spelling gave. ``kwargs``: the old option's type, multiple, ...
    """
    import click

    def callback(ctx, _param, value):
        if value is not None and value != () and value is not False:
            warn_renamed(old, new)
            ctx.params[param] = value
        return value

    return click.option(old, hidden=True, expose_value=False, callback=callback, **kwargs)


def keep_renamed(ctx, param, value):
    """Callback of an option that replaced a renamed one: the old spelling's value wins over this one's default."""
    from click.core import ParameterSource

    if ctx.get_parameter_source(param.name) in (ParameterSource.DEFAULT, None) and param.name in ctx.params:
        return ctx.params[param.name]
    return value


def removed_option(old: str, replacement: str):
    """A hidden option that is gone: using it prints one line naming ``replacement`` and exits with status 2."""
    import click

    def callback(ctx, _param, value):
        if value is not None:
            click.echo(f"error: `{old}` was removed; use `{replacement}`", err=True)
            ctx.exit(2)
        return value

    return click.option(old, hidden=True, expose_value=False, is_eager=True, default=None, callback=callback)


# One meaning of --threads in every command (0: the library's own default, one thread per physical core).
THREADS_HELP = "ONNX Runtime CPU threads (0: its default, one per physical core)."
VERBOSE_HELP = "-v info, -vv debug logging (stderr)."
