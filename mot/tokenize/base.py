"""What every modality tokenizer provides: local ids 0..vocab_size-1, save/load, encode/decode.

Local ids are placed in the unified vocabulary by `mot.vocab.UnifiedVocab`
(`vocab[name].start + local_id`); the tokenizers themselves know nothing of it.
"""

from __future__ import annotations

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
