"""User-facing error types shared by every stage (the runtime is the base layer)."""
from __future__ import annotations


class EdgesegError(Exception):
    """An error caused by the user's input, not by a bug.

    The message is one line that names what was wrong (the file, field or tensor), the value
    received, what is allowed, and the fix. The CLIs print it without a traceback and exit
    with status 2.
    """


class ConfigError(EdgesegError, ValueError):
    """A config file or override that does not match the schema."""


class InputError(EdgesegError, ValueError):
    """A bad input file or array: missing, unreadable, wrong shape, size, dtype or content."""


class BackendUnavailableError(EdgesegError, RuntimeError):
    """An optional backend was asked for but its hardware or package is not present."""


class IntegrityError(EdgesegError):
    """A bundle or engine file that does not match its manifest (hash, GPU, TensorRT version)."""


class ClosedError(EdgesegError, RuntimeError):
    """A request to a Segmenter (or its queue) after ``close()``."""
