"""What every modality tokenizer provides: local ids 0..vocab_size-1, save/load, encode/decode.

Local ids are placed in the unified vocabulary by `mot.vocab.UnifiedVocab`
(`vocab[name].start + local_id`); the tokenizers themselves know nothing of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ModalityTokenizer(Protocol):
    modality: str  # "text" | "image" | "speech"

    @property
    def vocab_size(self) -> int:
        """Number of local ids this tokenizer emits (the modality's range in the unified vocabulary)."""

    def encode(self, item: Any) -> torch.Tensor:
        """One item (a string, an image tensor (3, H, W) in [0, 1], a mono waveform (T,)) -> 1-D int64 local ids."""

    def decode(self, ids: torch.Tensor) -> Any:
        """1-D local ids -> a string, an image (3, H, W) in [0, 1], or a waveform (T,) in [-1, 1]."""

    def save(self, folder: str | Path) -> None:
        """Write everything needed to load it again into `folder` (weights as safetensors)."""


class TokenizerError(ValueError):
    """A tokenizer file or input that cannot be used; the message names the file or the item."""


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file and rename, so a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def config_to_toml(config) -> str:
    """A flat dataclass config as TOML text (the tokenizers save their config beside their weights)."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in dataclasses.asdict(config).items())


def load_tokenizer_config(cls: type, path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """A tokenizer config dataclass from TOML, every key checked, then its own `check(where)`;
    any problem is a TokenizerError naming the file."""
    from mot.config import ConfigError, load_dataclass

    try:
        config = load_dataclass(cls, path, overrides)
    except ConfigError as err:
        raise TokenizerError(str(err)) from None
    return config.check(str(path))
