"""Typed dataclasses from TOML tables: every key checked against its annotation, `--key=value` overrides.

Knows nothing of the run configuration itself (mot/config_schema.py); tokenizer configs are read the same way
(`load_dataclass`).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the source and the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (nested dataclasses built)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table, got {type(value).__name__}")
        return build_dataclass(tp, value, key, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}.{i}", where) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None) and value is None:
        return None
    # bool is a subclass of int: reject True where an int is wanted, and 1 where a bool is.
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def build_dataclass(cls: type, data: dict, prefix: str, where: str):
    """An instance of the dataclass `cls` from a dict of its fields (nested tables built too); `prefix` names
    the table in errors, `where` the source."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {sorted(fields)}"
            raise ConfigError(f"{where}: unknown key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full, where)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        full = [f"{prefix}.{m}" if prefix else m for m in missing]
        raise ConfigError(f"{where}: missing required key(s) {full}")
    return cls(**kwargs)


# ---------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """A TOML literal (`512`, `1e-4`, `true`, `["ffn"]`, `"x"`), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, override: str) -> None:
    """Apply `--model.dim=512` (or `model.dim=512`) to the raw recipe dict in place."""
    text = override.removeprefix("--")
    if "=" not in text:
        raise ConfigError(f"override {override!r}: expected --key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {override!r}: no list entry {'.'.join(parts[: i + 1])}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {override!r}: no list entry {dotted}")
        node[int(last)] = _parse_value(raw)
    else:
        node[last] = _parse_value(raw)


def read_toml(path: str | Path, overrides: list[str] | tuple[str, ...], kind: str) -> dict:
    """The tables of a TOML file as a dict, overrides applied; `kind` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    for override in overrides:
        apply_override(data, override)
    return data


def load_dataclass(cls: type, path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """Any dataclass config (tokenizer configs, ...) from a TOML file, checked like a recipe."""
    return build_dataclass(cls, read_toml(path, overrides, "config"), "", str(path))
