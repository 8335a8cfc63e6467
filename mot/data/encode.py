"""One document -> its unified token ids, from the modality tokenizers and the unified vocabulary's layout.

    <bod>  text ids  |  <boi> image codes <eoi>  |  <bos> speech units <eos>  ...  <eod>

The layout is a plain dict (`vocab_layout`), so an encoder pickles to worker processes without the vocab.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mot.data.documents import AudioSegment, Document, ImageSegment, TextSegment
from mot.data.media import BadInput, load_audio, load_image
from mot.tokenize.base import ModalityTokenizer, TokenizerError
from mot.vocab import SPECIAL_TOKENS, UnifiedVocab

# Reasons prepare skips a document (besides the readers' and media's).
EMPTY = "empty"
TOO_LONG = "too_long"
NO_TOKENIZER = "no_tokenizer"
TOKENIZER_ERROR = "tokenizer_error"

# Segment type -> the tokenizer modality that encodes it, and the special tokens around its span.
SEGMENT_MODALITY = {"text": "text", "image": "image", "audio": "speech"}
BRACKETS = {"text": None, "image": ("<boi>", "<eoi>"), "audio": ("<bos>", "<eos>")}
REQUIRED_SPECIALS = ("<bod>", "<eod>", "<boi>", "<eoi>", "<bos>", "<eos>")


def vocab_layout(vocab: UnifiedVocab) -> dict:
    """The vocabulary's id layout as JSON-able data (written to the manifest, checked by the loader)."""
    return {
        "size": vocab.size,
        "modalities": [{"name": r.name, "index": r.index, "start": r.start, "size": r.size} for r in vocab.ranges],
        "special_start": vocab.special_start,
        "n_special": vocab.n_special,
        "special_tokens": list(SPECIAL_TOKENS[: vocab.n_special]),
        "special_modality": vocab.special_modality,
    }


def special_ids(layout: dict) -> dict[str, int]:
    return {name: layout["special_start"] + i for i, name in enumerate(layout["special_tokens"])}


def materialize(tokenizer: Any) -> ModalityTokenizer:
    """A tokenizer, or the result of calling a zero-argument loader."""
    if isinstance(tokenizer, ModalityTokenizer):
        return tokenizer
    if callable(tokenizer):
        loaded = tokenizer()
        if isinstance(loaded, ModalityTokenizer):
            return loaded
        raise TypeError(f"tokenizer loader {tokenizer!r} returned {type(loaded).__name__}, not a tokenizer")
    raise TypeError(f"{tokenizer!r} is neither a tokenizer (modality, vocab_size, encode, ...) nor a loader")


def image_grid(tokenizer: Any) -> tuple[int, int] | None:
    """(h, w) of the code grid, where the tokenizer exposes `grid_size` (an int or a pair)."""
    grid = getattr(tokenizer, "grid_size", None)
    if isinstance(grid, int) and not isinstance(grid, bool):
        return grid, grid
    if isinstance(grid, tuple | list) and len(grid) == 2 and all(isinstance(g, int) for g in grid):
        return int(grid[0]), int(grid[1])
    return None


def tokenizer_info(tokenizer: Any, path: str | None = None) -> dict:
    cls = type(tokenizer)
    info = {"modality": tokenizer.modality, "class": f"{cls.__module__}.{cls.__qualname__}",
            "vocab_size": int(tokenizer.vocab_size)}
    path = path or next((str(getattr(tokenizer, a)) for a in ("path", "folder") if getattr(tokenizer, a, None)), None)
    if path:
        info["path"] = str(path)
    if (grid := image_grid(tokenizer)) is not None:
        info["grid"] = {"h": grid[0], "w": grid[1], "order": "row-major"}
    return info


class DocumentEncoder:
    """Document -> unified ids (int64 array), or `BadInput` saying why the document can't be used."""

    def __init__(
        self,
        tokenizers: dict[str, ModalityTokenizer],
        layout: dict,
        max_doc_tokens: int | None = None,
        image_resolution: int | tuple[int, int] | None = None,
        sample_rate: int | None = None,
    ):
        ranges = {m["name"]: m for m in layout["modalities"]}
        self.specials = special_ids(layout)
        missing = [s for s in REQUIRED_SPECIALS if s not in self.specials]
        if missing:
            raise ValueError(f"model.n_special_tokens={layout['n_special']} leaves out {missing}; prepare needs "
                             f"{list(SPECIAL_TOKENS[:7])}")
        self.by_segment: dict[str, tuple[str, ModalityTokenizer, int]] = {}
        for name, tok in tokenizers.items():
            if name not in ranges:
                raise ValueError(f"tokenizer {name!r}: no modality of that name in the vocabulary ({list(ranges)})")
            if tok.vocab_size > ranges[name]["size"]:
                raise ValueError(f"tokenizer {name!r} has {tok.vocab_size} ids but model.modalities gives "
                                 f"{name!r} only {ranges[name]['size']}")
            kinds = [k for k, m in SEGMENT_MODALITY.items() if m == tok.modality]
            if not kinds:
                raise ValueError(f"tokenizer {name!r}: unknown modality {tok.modality!r} "
                                 f"(expected one of {sorted(set(SEGMENT_MODALITY.values()))})")
            if kinds[0] in self.by_segment:
                raise ValueError(f"tokenizers {self.by_segment[kinds[0]][0]!r} and {name!r} both encode "
                                 f"{kinds[0]} segments; give one tokenizer per modality")
            self.by_segment[kinds[0]] = (name, tok, ranges[name]["start"])
        self.max_doc_tokens = max_doc_tokens
        self.image_resolution, self.sample_rate = image_resolution, sample_rate

    def _local_ids(self, kind: str, segment: Any) -> np.ndarray:
        name, tok, _ = self.by_segment[kind]
        if isinstance(segment, TextSegment):
            item = segment.text
        elif isinstance(segment, ImageSegment):
            item = load_image(segment, self.image_resolution)
        else:
            item = load_audio(segment, self.sample_rate)
        try:
            with torch.no_grad():
                ids = tok.encode(item)
        except TokenizerError as err:
            raise BadInput(TOKENIZER_ERROR, f"{name} tokenizer: {err}") from err
        ids = (ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)).reshape(-1)
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
            raise ValueError(f"{name} tokenizer returned ids outside 0..{tok.vocab_size - 1}: "
                             f"min {ids.min()}, max {ids.max()}")
        if kind == "image" and (grid := image_grid(tok)) is not None and ids.size != grid[0] * grid[1]:
            raise ValueError(f"{name} tokenizer gave {ids.size} codes for a {tuple(item.shape[1:])} image but its "
                             f"grid_size is {grid}; set image_resolution to what the tokenizer expects")
        return ids

    def encode(self, doc: Document) -> np.ndarray:
        parts = [np.array([self.specials["<bod>"]], dtype=np.int64)]
        total, content = 2, 0  # <bod> and <eod>
        for segment in doc.segments:
            kind = "text" if isinstance(segment, TextSegment) else "image" if isinstance(segment, ImageSegment) \
                else "audio" if isinstance(segment, AudioSegment) else None
            if kind is None:
                raise BadInput("bad_segment", f"document {doc.id!r}: {type(segment).__name__} is not a segment")
            if kind not in self.by_segment:
                raise BadInput(NO_TOKENIZER, f"document {doc.id!r}: no tokenizer for {kind} segments "
                                             f"(have {sorted(self.by_segment)})")
            if kind == "text" and not segment.text:
                continue
            ids = self._local_ids(kind, segment)
            if ids.size == 0:
                continue
            ids = ids + self.by_segment[kind][2]
            if BRACKETS[kind]:
                begin, end = (self.specials[s] for s in BRACKETS[kind])
                ids = np.concatenate([[begin], ids, [end]])
            parts.append(ids)
            total, content = total + ids.size, content + 1
            if self.max_doc_tokens and total > self.max_doc_tokens:  # stop encoding as soon as it is too long
                raise BadInput(TOO_LONG, f"document {doc.id!r}: more than max_doc_tokens={self.max_doc_tokens} "
                                         f"tokens ({total} after {content} of {len(doc.segments)} segments)")
        if not content:
            raise BadInput(EMPTY, f"document {doc.id!r}: no tokens (no segments, or only empty ones)")
        parts.append(np.array([self.specials["<eod>"]], dtype=np.int64))
        return np.concatenate(parts)
