"""Generated ids -> the events a page shows as they come: text as it grows, an image or a speech clip when its
span closes (the spans of mot.generate.spans, decoded by the checkpoint's tokenizers)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import soundfile
import torch
from torchvision.utils import save_image

from mot.generate.loop import Generation
from mot.generate.prompt import sample_rate_of
from mot.generate.spans import SpanSplitter, open_span_start
from mot.tokenize.base import TokenizerError
from mot.vocab import UnifiedVocab

Event = dict[str, Any]


def png_data_url(image: torch.Tensor) -> str:
    buffer = io.BytesIO()
    save_image(image.float().cpu(), buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_data_url(wave: torch.Tensor, sample_rate: int) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave.float().cpu().numpy(), sample_rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()


class SpanEvents:
    """Turns the ids of every sample, one at a time (`on_token`), into events passed to `emit`."""

    def __init__(self, vocab: UnifiedVocab, tokenizers: dict[str, Any], prompt: list[int], samples: int,
                 emit: Callable[[Event], None], codecs: dict[str, Any] | None = None):
        self.vocab, self.tokenizers, self.emit, self.codecs = vocab, tokenizers, emit, codecs or {}
        # A prompt ending inside a span (`... <boi>`): that span belongs to the samples.
        tail = open_span_start(prompt, vocab)
        lead = prompt[len(prompt) if tail is None else tail:]
        self.splitters = [SpanSplitter(vocab) for _ in range(samples)]
        for splitter in self.splitters:
            for token in lead:
                splitter.push(token)
        self.sent: list[dict[int, str]] = [{} for _ in range(samples)]  # segment -> the text or "media" sent

    def on_token(self, sample: int, token: int) -> None:
        """Only the span the id went to is looked at: O(that span) per id."""
        k = self.splitters[sample].push(token)
        if k is None:
            return
        span, sent = self.splitters[sample].spans[k], self.sent[sample].get(k)
        if span.kind == "text":
            tok = self.tokenizers.get("text")
            text = tok.decode(torch.tensor(span.ids)) if tok is not None else " ".join(map(str, span.ids))
            if text != sent:
                self.sent[sample][k] = text
                self.emit({"type": "text", "sample": sample, "segment": k, "text": text})
        elif span.closed and sent is None and span.kind not in self.codecs:
            self.sent[sample][k] = "media"
            self.emit(self._media(span.kind, span.ids, sample, k))

    def _media(self, kind: str, ids: list[int], sample: int, segment: int) -> Event:
        tok = self.tokenizers.get(kind)
        if tok is None:
            return {"type": "note", "sample": sample, "segment": segment,
                    "text": f"[{kind}: {len(ids)} ids, no {kind} tokenizer to decode them]"}
        try:
            decoded = tok.decode(torch.tensor(ids, dtype=torch.long))
        except TokenizerError as err:  # its own message (an encoder-only VQGAN, a grid mismatch)
            return {"type": "note", "sample": sample, "segment": segment, "text": f"[{kind}: {err}]"}
        if kind == "image":
            return {"type": "image", "sample": sample, "segment": segment, "src": png_data_url(decoded)}
        return {"type": "audio", "sample": sample, "segment": segment,
                "src": wav_data_url(decoded, sample_rate_of(tok))}

    def finish(self, results: list[Generation]) -> None:
        """After the loop: the images of a diffusion modality, drawn from the samples' latents."""
        codec = self.codecs.get("image")
        if codec is None:
            return
        for sample, result in enumerate(results):
            for k, latents in enumerate(result.latents):
                image = self.tokenizers["image"].decode_latents(codec.tokens_to_latents(latents[None]))[0]
                self.emit({"type": "image", "sample": sample, "segment": 1000 + k, "src": png_data_url(image)})
