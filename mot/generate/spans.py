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


class SpanSplitter:
    """`split_spans` one id at a time (streaming): `push` files an id into `spans` and says which span it
    changed (None: the id was dropped)."""

    def __init__(self, vocab: UnifiedVocab):
        self.specials = {vocab.special_start + i: name for i, name in enumerate(SPECIAL_TOKENS[: vocab.n_special])}
        self.ranges = {r.name: r for r in vocab.ranges}
        self.spans: list[Span] = []
        self.open_kind: str | None = None
        self.closer: str | None = None

    def push(self, token: int) -> int | None:
        name = self.specials.get(token)
        if name in BRACKETS:
            self.open_kind, self.closer = BRACKETS[name]
            self.spans.append(Span(self.open_kind, closed=False))
            return len(self.spans) - 1
        if name is not None:
            if self.open_kind is not None and name == self.closer:
                self.spans[-1].closed, self.open_kind = True, None
                return len(self.spans) - 1
            return None
        kind = self.open_kind or "text"
        r = self.ranges.get(kind)
        if r is None or not r.start <= token < r.stop:
            return None
        if kind == "text" and (not self.spans or self.spans[-1].kind != "text"):
            self.spans.append(Span("text"))
        self.spans[-1].ids.append(token - r.start)
        return len(self.spans) - 1


def split_spans(ids: list[int], vocab: UnifiedVocab) -> list[Span]:
    """Text ids outside brackets form text runs; ids between <boi>/<eoi> (<bos>/<eos>) one image (speech)
    span. Other specials, and ids of another modality than their span's, are dropped."""
    splitter = SpanSplitter(vocab)
    for token in ids:
        splitter.push(token)
    return splitter.spans


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
