"""Unified ids -> the document's spans: runs of text, image spans, speech spans (local ids each)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mot.vocab import SPECIAL_TOKENS, UnifiedVocab

BRACKETS = {"<boi>": ("image", "<eoi>"), "<bos>": ("speech", "<eos>")}


@dataclass
class Span:
    kind: str  # "text" | "image" | "speech"
    ids: list[int] = field(default_factory=list)  # local ids of the modality's tokenizer
    closed: bool = True  # an image or speech span ended by its end token


def split_spans(ids: list[int], vocab: UnifiedVocab) -> list[Span]:
    """Text ids outside brackets form text runs; ids between <boi>/<eoi> (<bos>/<eos>) one image (speech)
    span. Other specials, and ids of another modality than their span's, are dropped."""
    specials = {vocab.special_start + i: name for i, name in enumerate(SPECIAL_TOKENS[: vocab.n_special])}
    ranges = {r.name: r for r in vocab.ranges}
    spans: list[Span] = []
    open_kind, closer = None, None
    for token in ids:
        name = specials.get(token)
        if name in BRACKETS:
            open_kind, closer = BRACKETS[name]
            spans.append(Span(open_kind, closed=False))
            continue
        if name is not None:
            if open_kind is not None and name == closer:
                spans[-1].closed, open_kind = True, None
            continue
        kind = open_kind or "text"
        r = ranges.get(kind)
        if r is None or not r.start <= token < r.stop:
            continue
        if kind == "text" and (not spans or spans[-1].kind != "text"):
            spans.append(Span("text"))
        spans[-1].ids.append(token - r.start)
    return spans


def open_span_start(ids: list[int], vocab: UnifiedVocab) -> int | None:
    """Index of the <boi> / <bos> of a span still open at the end of `ids` (a prompt asking for an image)."""
    specials = {vocab.special_start + i: name for i, name in enumerate(SPECIAL_TOKENS[: vocab.n_special])}
    start = None
    for i, token in enumerate(ids):
        name = specials.get(token)
        if name in BRACKETS:
            start = i
        elif name in ("<eoi>", "<eos>"):
            start = None
    return start
