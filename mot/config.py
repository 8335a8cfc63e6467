"""Typed run configuration: a TOML recipe, command-line overrides, read into checked dataclasses.

A recipe is a TOML file whose tables mirror the dataclasses of mot/config_schema.py. Every key is checked
before any work starts: an unknown key or a value of the wrong type (mot/config_parse.py), or an inconsistent
combination (mot/config_checks.py), fails with an error naming the file and the key.

    cfg = load_config("recipes/demo.toml", ["--model.dim=256", "--model.untie=[]"])

Import every config name from here: the modules above are how it is built, not where to look it up.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from mot.config_checks import check_run_config
from mot.config_parse import ConfigError, build_dataclass, load_dataclass, read_toml
from mot.config_schema import (
    UNTIE_CHOICES,
    DataConfig,
    KernelChoice,
    ModalityConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "UNTIE_CHOICES",
    "ConfigError",
    "DataConfig",
    "KernelChoice",
    "ModalityConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "build_dataclass",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_dataclass",
]

_build = build_dataclass  # the name mot/tokenize/image.py imports


def config_from_dict(data: dict, where: str = "<dict>") -> RunConfig:
    """A checked `RunConfig` from a recipe's tables (or a run's saved config); `where` names it in errors."""

    def fail(key: str, why: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: '{key}' {why}")

    cfg = build_dataclass(RunConfig, data, "", where)
    check_run_config(cfg, fail)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML recipe, apply `--key=value` overrides, validate everything."""
    data = read_toml(path, overrides, "recipe")
    where = str(path) + (f" (with overrides {list(overrides)})" if overrides else "")
    return config_from_dict(data, where)


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
