"""Typed config loading: YAML file + ``a.b=value`` overrides -> frozen dataclasses.

Only the CLIs read files; everything else takes the dataclass. Unknown keys are an error with
a "did you mean" suggestion, a wrong type names the dotted path, and range checks raised by a
dataclass's ``__post_init__`` are prefixed with the section they came from.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union

import yaml

from edgeseg.runtime.errors import ConfigError

T = TypeVar("T")

__all__ = ["ConfigError", "load_config", "parse_config", "config_to_dict", "apply_overrides", "require"]


def require(condition: bool, field: str, message: str) -> None:
    """Raise a ConfigError for ``field`` unless ``condition`` holds (for ``__post_init__``)."""
    if not condition:
        raise ConfigError(f"{field} {message}")


def load_config(path: str | Path, cls: type[T], overrides: Iterable[str] = ()) -> T:
    """Load ``path`` (YAML) into ``cls``, after applying ``key.path=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file such as configs/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides, cls)
    return parse_config(raw, cls, source=str(path))


def apply_overrides(raw: dict, overrides: Iterable[str], cls: type) -> dict:
    """Return a copy of ``raw`` with each ``a.b.c=value`` applied (value parsed as YAML)."""
    raw = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parts = key.split(".")
        _check_key_path(parts, cls)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return raw


def parse_config(raw: dict, cls: type[T], source: str = "config") -> T:
    """Build ``cls`` from a plain mapping, validating keys and types recursively."""
    return _build(cls, raw, prefix="", source=source)


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain YAML/JSON-friendly data (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


# --- internals -------------------------------------------------------------------------------


def _deep_copy(d):
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_key_path(parts: list[str], cls: type) -> None:
    current: Any = cls
    for i, part in enumerate(parts):
        current = _strip_optional(current)
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:i])} is not a section")
        hints = _hints(current)
        if part not in hints:
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1]), part, hints))
        current = hints[part]


def _unknown_key_message(dotted: str, key: str, allowed: Iterable[str], source: str = "") -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    where = f" in {source}" if source else ""
    return f"unknown config key '{dotted}'{where}{hint} (allowed here: {', '.join(allowed)})"


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _build(cls: type, raw: Any, prefix: str, source: str):
    section = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{section}' in {source} must be a mapping, got {raw!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), str(key), fields, source))
    kwargs = {}
    for name, f in fields.items():
        dotted = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing config key '{dotted}' in {source}")
            continue
        kwargs[name] = _convert(hints[name], raw[name], dotted, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks name the field only; add the section it lives in.
        raise ConfigError(f"config {prefix}{e} (in {source})") from None


def _convert(tp: Any, value: Any, dotted: str, source: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted + ".", source)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, dotted, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config field '{dotted}' has an invalid value {value!r}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config field '{dotted}' must be one of {list(allowed)}, got {value!r}{hint}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{dotted}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"config field '{dotted}' must have {len(args)} items, got {len(value)}: {value!r}")
        item_types = [args[0]] * len(value) if (not args or args[-1] is Ellipsis) else list(args)
        items = [_convert(t, v, f"{dotted}[{i}]", source) for i, (t, v) in enumerate(zip(item_types, value))]
        return tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{dotted}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field '{dotted}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{dotted}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{dotted}' must be a string, got {value!r}")
        return value
    raise TypeError(f"config schema: unsupported type {tp!r} for {dotted}")  # a bug in the schema
