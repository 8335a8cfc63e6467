"""The unified vocabulary: one id space for every modality; a token's id range gives its modality.

Layout (in the order of `model.modalities`, then the specials, then padding):

    [ text ids | image codes | speech units | specials | pad to a multiple of 64 ]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mot.config import ModelConfig

# Fixed names of the first special tokens; the rest of model.n_special_tokens is reserved.
SPECIAL_TOKENS = ("<pad>", "<bod>", "<eod>", "<boi>", "<eoi>", "<bos>", "<eos>")  # bos/eos: speech


@dataclass(frozen=True)
class ModalityRange:
    name: str
    index: int  # tower index
    start: int  # first unified id
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size


class UnifiedVocab:
    def __init__(self, cfg: ModelConfig):
        self.ranges: list[ModalityRange] = []
        start = 0
        for i, mod in enumerate(cfg.modalities):
            self.ranges.append(ModalityRange(mod.name, i, start, mod.vocab_size))
            start += mod.vocab_size
        self.special_start = start
        self.n_special = cfg.n_special_tokens
        used = start + cfg.n_special_tokens
        self.size = cfg.vocab_multiple_of * -(-used // cfg.vocab_multiple_of)
        names = [r.name for r in self.ranges]
        self.special_modality = names.index(cfg.special_modality) if cfg.special_modality else 0
        # Upper bounds of the modality ranges, for bucketize.
        self._bounds = torch.tensor([r.stop for r in self.ranges], dtype=torch.long)

    def __getitem__(self, name: str) -> ModalityRange:
        for r in self.ranges:
            if r.name == name:
                return r
        raise KeyError(f"no modality {name!r}; have {[r.name for r in self.ranges]}")

    def special_id(self, name: str) -> int:
        if name not in SPECIAL_TOKENS[: self.n_special]:
            raise KeyError(f"no special token {name!r} among {list(SPECIAL_TOKENS[: self.n_special])}")
        return self.special_start + SPECIAL_TOKENS.index(name)

    def modality_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Tower index of every token id; specials and padding ids go to the special modality's tower."""
        if ids.device.type == "cpu":  # the loader's hot path: a few comparisons beat torch's CPU bucketize
            # (bench/NOTES.md, 2026-12-03 third entry)
            modality = torch.zeros(ids.shape, dtype=torch.long)
            for bound in self._bounds.tolist():
                modality += ids >= bound
        else:
            modality = torch.bucketize(ids, self._bounds.to(ids.device), right=True)
        return torch.where(modality >= len(self.ranges), self.special_modality, modality)
