"""Chameleon's one vocabulary <-> mot's unified vocabulary.

Chameleon keeps its 8,192 image codes among its BPE ids (`IMGIMG...` tokens, named by the code's digits
written as letters A-J) and marks images with its own special tokens. mot gives every modality one
contiguous range, so the ids are permuted:

    mot text ids    every Chameleon id that is neither an image code nor one of the specials below, in order
    mot image ids   code c -> the Chameleon id of IMGIMG<c>
    mot specials    <pad> <- <pad>, <bod> <- <s>, <eod> <- </s>, <boi> <- <racm3:break>, <eoi> <- <eoss>

A mot id with no Chameleon counterpart (the speech specials, reserved and padding ids) maps to -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mot.vocab import SPECIAL_TOKENS, UnifiedVocab

IMAGE_PREFIX = "IMGIMG"
# mot special -> Chameleon's token of the same role
SPECIAL_NAMES = {"<pad>": "<pad>", "<bod>": "<s>", "<eod>": "</s>", "<boi>": "<racm3:break>", "<eoi>": "<eoss>"}


class VocabMappingError(ValueError):
    """A Chameleon vocabulary that cannot be mapped; the message names what is wrong."""


def image_code_of(name: str) -> int:
    """IMGIMG<digits as letters A-J><one closing letter> -> the code (transformers' `bpe2img`)."""
    digits = name[len(IMAGE_PREFIX) : -1]
    if not digits or any(not "A" <= c <= "J" for c in digits):
        raise VocabMappingError(f"image token {name!r}: expected IMGIMG, the code's digits as letters A-J, a letter")
    return int("".join(str(ord(c) - ord("A")) for c in digits))


def image_token_name(code: int) -> str:
    return IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


@dataclass
class ChameleonVocab:
    hf_size: int
    text_ids: list[int]  # Chameleon id of mot text id i
    image_ids: list[int]  # Chameleon id of image code c
    special_ids: dict[str, int]  # mot special name -> Chameleon id (only those Chameleon has)

    @classmethod
    def from_vocabulary_map(cls, vocabulary_map: dict[str, int], hf_size: int) -> ChameleonVocab:
        codes = {image_code_of(n): i for n, i in vocabulary_map.items() if n.startswith(IMAGE_PREFIX)}
        if not codes:
            raise VocabMappingError("vocabulary_map has no IMGIMG image tokens")
        if sorted(codes) != list(range(len(codes))):
            raise VocabMappingError(f"image codes are not 0..{len(codes) - 1}: {len(codes)} IMGIMG tokens, "
                                    f"largest code {max(codes)}")
        specials = {ours: vocabulary_map[theirs] for ours, theirs in SPECIAL_NAMES.items() if theirs in vocabulary_map}
        taken = set(codes.values()) | set(specials.values())
        bad = [i for i in taken if not 0 <= i < hf_size]
        if bad:
            raise VocabMappingError(f"vocabulary_map ids {bad[:4]} fall outside vocab_size {hf_size}")
        text = [i for i in range(hf_size) if i not in taken]
        return cls(hf_size, text, [codes[c] for c in range(len(codes))], specials)

    def to_dict(self) -> dict:
        return {"hf_size": self.hf_size, "text_ids": self.text_ids, "image_ids": self.image_ids,
                "special_ids": self.special_ids}

    @classmethod
    def from_dict(cls, data: dict) -> ChameleonVocab:
        return cls(data["hf_size"], list(data["text_ids"]), list(data["image_ids"]), dict(data["special_ids"]))

    def mot_to_hf(self, vocab: UnifiedVocab) -> torch.Tensor:
        """(mot vocabulary size,) long: the Chameleon id of every mot id, -1 where there is none."""
        if vocab["text"].size != len(self.text_ids) or vocab["image"].size != len(self.image_ids):
            raise VocabMappingError(f"the model's text/image ranges ({vocab['text'].size}, {vocab['image'].size}) "
                                    f"do not match the mapping's ({len(self.text_ids)}, {len(self.image_ids)})")
        table = torch.full((vocab.size,), -1, dtype=torch.long)
        table[vocab["text"].start : vocab["text"].stop] = torch.tensor(self.text_ids)
        table[vocab["image"].start : vocab["image"].stop] = torch.tensor(self.image_ids)
        for name, hf_id in self.special_ids.items():
            table[vocab.special_id(name)] = hf_id
        return table

    def hf_to_mot(self, vocab: UnifiedVocab) -> torch.Tensor:
        """(Chameleon vocabulary size,) long: the mot id of every Chameleon id (every one has one)."""
        table = torch.full((self.hf_size,), -1, dtype=torch.long)
        forward = self.mot_to_hf(vocab)
        mapped = (forward >= 0).nonzero().squeeze(1)
        table[forward[mapped]] = mapped
        return table

    def vocabulary_map(self, names: dict[int, str] | None = None) -> dict[str, int]:
        """A Chameleon `vocabulary_map`: the image tokens and specials, plus `names` (Chameleon id -> token)."""
        out = {name: hf_id for hf_id, name in (names or {}).items()}
        out.update({image_token_name(c): i for c, i in enumerate(self.image_ids)})
        out.update({SPECIAL_NAMES[n]: i for n, i in self.special_ids.items()})
        return out


def identity_vocab(vocab: UnifiedVocab) -> ChameleonVocab:
    """For a model trained here (text and image modalities): Chameleon ids equal to mot's, specials included."""
    specials = {name: vocab.special_id(name) for name in SPECIAL_NAMES if name in SPECIAL_TOKENS[: vocab.n_special]}
    text = list(range(vocab["text"].start, vocab["text"].stop))
    return ChameleonVocab(vocab.size, text, list(range(vocab["image"].start, vocab["image"].stop)), specials)
