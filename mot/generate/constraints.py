"""Modality-constrained decoding over the unified vocabulary, as in Chameleon.

Every sample carries a `SpanState`: in text, inside an image span, inside a speech span, or
done (after <eod>). The state picks one row of a table of allowed-id masks:

    text          text ids, <eod>, and <boi> / <bos> when an image / speech span still fits the budget
    image span    image codes only, exactly `image_tokens` of them, then <eoi> is forced
    speech span   speech units (at least one), then units or <eos>; <eos> forced at the cap or the budget's end
    done          <pad> only (the sample waits for the rest of the batch)

Under a diffusion image modality the loop fills an open image span itself (n latent tokens, their ids
the placeholder) and advances the state through them, so <eoi> is the only choice after them.

So text never holds an image code or a speech unit, an image span always holds the VQGAN grid's
number of codes, and a span is opened only if the token budget lets it close: every generated
span decodes. Ids past a tokenizer's size (`usable`) are never sampled, since they cannot be decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from mot.generate.host import to_device
from mot.vocab import UnifiedVocab

TEXT, IMAGE, SPEECH, DONE = "text", "image", "speech", "done"

# Rows of the mask table.
_TEXT_ROWS = 4  # text ids + <eod>, plus <boi> (bit 1) and <bos> (bit 0)
_IMAGE_CODE, _IMAGE_END, _SPEECH_FIRST, _SPEECH, _SPEECH_END, _DONE = range(_TEXT_ROWS, _TEXT_ROWS + 6)


@dataclass(frozen=True)
class SpanState:
    """Where one sample stands. `budget`: tokens it may still emit; `count`: codes or units in the open span."""

    kind: str = TEXT
    count: int = 0
    budget: int = 0

    @property
    def in_span(self) -> bool:
        return self.kind in (IMAGE, SPEECH)

    @property
    def live(self) -> bool:
        return self.kind != DONE and self.budget > 0


class ModalityConstraints:
    """The allowed next ids of every sample, and the state each emitted id leads to."""

    def __init__(
        self,
        vocab: UnifiedVocab,
        image_tokens: int | None = None,
        speech_max_tokens: int | None = None,
        usable: dict[str, int] | None = None,
    ):
        """image_tokens: codes per image (the VQGAN grid, h * w); None = the model may not open images.
        speech_max_tokens: cap on the units of one speech span; None = no speech.
        usable: local ids per modality name a tokenizer can decode (default the modality's whole range)."""
        names = [r.name for r in vocab.ranges]
        specials = [s for s in ("<pad>", "<bod>", "<eod>") if not _has_special(vocab, s)]
        if specials:
            raise ValueError(f"generation needs the special tokens {specials}; model.n_special_tokens is "
                             f"{vocab.n_special}")
        if image_tokens is not None:
            if IMAGE not in names or not _has_special(vocab, "<eoi>"):
                raise ValueError(f"image_tokens={image_tokens}, but the model has no image modality with "
                                 f"<boi>/<eoi> (modalities {names}, {vocab.n_special} special tokens)")
            if image_tokens <= 0:
                raise ValueError(f"image_tokens must be positive, got {image_tokens}")
        if speech_max_tokens is not None:
            if SPEECH not in names or not _has_special(vocab, "<eos>"):
                raise ValueError(f"speech_max_tokens={speech_max_tokens}, but the model has no speech modality "
                                 f"with <bos>/<eos> (modalities {names}, {vocab.n_special} special tokens)")
            if speech_max_tokens <= 0:
                raise ValueError(f"speech_max_tokens must be positive, got {speech_max_tokens}")
        self.vocab, self.image_tokens, self.speech_max_tokens = vocab, image_tokens, speech_max_tokens
        self.id = {s: vocab.special_id(s) for s in ("<pad>", "<bod>", "<eod>", "<boi>", "<eoi>", "<bos>", "<eos>")
                   if _has_special(vocab, s)}
        self.table = self._build_table(usable or {})
        self._device_tables: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------ the masks

    def _ids(self, name: str, usable: dict[str, int]) -> slice:
        if name not in [r.name for r in self.vocab.ranges]:
            return slice(0, 0)
        r = self.vocab[name]
        size = usable.get(name, r.size)
        if not 0 < size <= r.size:
            raise ValueError(f"usable ids of {name!r}: {size} is not in 1..{r.size} (its vocabulary range)")
        return slice(r.start, r.start + size)

    def _build_table(self, usable: dict[str, int]) -> torch.Tensor:
        table = torch.zeros(_DONE + 1, self.vocab.size, dtype=torch.bool)
        for row in range(_TEXT_ROWS):
            table[row, self._ids(TEXT, usable)] = True
            table[row, self.id["<eod>"]] = True
            if row & 2 and self.image_tokens:
                table[row, self.id["<boi>"]] = True
            if row & 1 and self.speech_max_tokens:
                table[row, self.id["<bos>"]] = True
        if self.image_tokens:
            table[_IMAGE_CODE, self._ids(IMAGE, usable)] = True
            table[_IMAGE_END, self.id["<eoi>"]] = True
        if self.speech_max_tokens:
            table[_SPEECH_FIRST, self._ids(SPEECH, usable)] = True
            table[_SPEECH, self._ids(SPEECH, usable)] = True
            table[_SPEECH, self.id["<eos>"]] = True
            table[_SPEECH_END, self.id["<eos>"]] = True
        table[_DONE, self.id["<pad>"]] = True
        return table

    def _row(self, state: SpanState) -> int:
        if not state.live:
            return _DONE
        if state.kind == IMAGE:
            return _IMAGE_CODE if state.count < self.image_tokens else _IMAGE_END
        if state.kind == SPEECH:
            if state.count == 0:
                return _SPEECH_FIRST
            return _SPEECH_END if state.count >= self.speech_max_tokens or state.budget == 1 else _SPEECH
        # A span opens only when it can close within the budget: <boi> codes <eoi>, or <bos> unit <eos>.
        image = bool(self.image_tokens) and state.budget >= self.image_tokens + 2
        speech = bool(self.speech_max_tokens) and state.budget >= 3
        return 2 * image + speech

    def allowed(self, states: Sequence[SpanState], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, V) bool: the ids each sample may emit next."""
        device = torch.device(device)
        if device not in self._device_tables:
            self._device_tables[device] = self.table.to(device)
        return self._device_tables[device][to_device([self._row(s) for s in states], device)]

    # ------------------------------------------------------------ the states

    def advance(self, state: SpanState, token: int) -> SpanState:
        """The state after `state` emits `token`; a token the state does not allow is a ValueError."""
        if not self.table[self._row(state), token]:
            raise ValueError(f"token {token} is not allowed in state {state}")
        return self._step(state, token, state.budget - 1)

    def _step(self, state: SpanState, token: int, budget: int) -> SpanState:
        ids = self.id
        if token == ids["<eod>"]:
            return SpanState(DONE, 0, budget)
        if token == ids.get("<boi>"):
            return SpanState(IMAGE, 0, budget)
        if token == ids.get("<bos>"):
            return SpanState(SPEECH, 0, budget)
        if token in (ids.get("<eoi>"), ids.get("<eos>")):
            return SpanState(TEXT, 0, budget)
        return replace(state, count=state.count + state.in_span, budget=budget)

    def start(self, prompt: Sequence[int], budget: int) -> SpanState:
        """The state at the end of a prompt (it may end inside a span: `... <boi>` asks for an image)."""
        state = SpanState(TEXT, 0, budget)
        for token in prompt:
            if token == self.id["<eod>"]:
                raise ValueError("the prompt holds <eod>: it ends the document, there is nothing to continue")
            state = self._step(state, int(token), budget)
        if state.kind == IMAGE:
            if not self.image_tokens:
                raise ValueError("the prompt ends inside an image span, but image generation is off "
                                 "(no image tokenizer or image_tokens)")
            left = self.image_tokens - state.count + 1
            if state.count > self.image_tokens:
                raise ValueError(f"the prompt's open image span holds {state.count} codes; an image has "
                                 f"{self.image_tokens}")
            if budget < left:
                raise ValueError(f"the prompt ends inside an image span that needs {left} more tokens, but the "
                                 f"budget is {budget} new tokens")
        if state.kind == SPEECH:
            if not self.speech_max_tokens:
                raise ValueError("the prompt ends inside a speech span, but speech generation is off")
            if budget < (1 if state.count else 2):
                raise ValueError(f"the prompt ends inside a speech span; {budget} new tokens cannot close it")
        return state

    def opens_span(self, token: int) -> bool:
        return token in (self.id.get("<boi>"), self.id.get("<bos>"))


def _has_special(vocab: UnifiedVocab, name: str) -> bool:
    try:
        vocab.special_id(name)
    except KeyError:
        return False
    return True
