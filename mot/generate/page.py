"""The generation page: HTML with the text, the images (PNG files next to it) and the speech (WAV files,
with an audio player), plus a JSON of the raw token ids.

    out/page.html   out/page.json   out/page-sample1-image1.png   out/page-sample1-speech1.wav ...

An image span of a diffusion modality holds placeholder ids; its picture comes from the sample's latents
(`Generation.latents`; a prompt image's from `Generation.prompt_latents`), through the modality's
`LatentCodec` and the VQGAN decoder, and the generated latents themselves go to
out/page-latents.safetensors (keys sample<i>-image<k>).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import soundfile
import torch
from safetensors.torch import save_file
from torchvision.utils import save_image

from mot.data.encode import vocab_layout
from mot.generate.loop import Generation
from mot.generate.prompt import image_grid_of, sample_rate_of
from mot.generate.session import GenerationRequest, Session
from mot.generate.spans import Span, open_span_start, split_spans
from mot.tokenize.base import TokenizerError
from mot.vocab import UnifiedVocab

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 2rem auto; padding: 0 1rem; }
section { border-top: 1px solid #ccc; padding: 0.5rem 0 1rem; }
.text { white-space: pre-wrap; }
.prompt { color: #555; }
img { width: 256px; image-rendering: pixelated; display: block; margin: 0.5rem 0; border: 1px solid #ddd; }
audio { display: block; margin: 0.5rem 0; }
.note { color: #a00; font-size: 0.9em; }
.meta { color: #666; font-size: 0.85em; }
"""


class _Renderer:
    """Decodes spans to HTML, writing each image and speech span to a file beside the page.

    codecs: the latent codec of a diffusion modality, by name: its spans are drawn from latents, not ids."""

    def __init__(self, out: Path, tokenizers: dict[str, Any], codecs: dict[str, Any] | None = None):
        self.out, self.tokenizers, self.codecs = out, tokenizers, codecs or {}
        self.files: list[Path] = []

    def _file(self, label: str, kind: str, index: int, suffix: str) -> Path:
        path = self.out.with_name(f"{self.out.stem}-{label}-{kind}{index}{suffix}")
        self.files.append(path)
        return path

    def span(self, span: Span, label: str, index: int, latents: torch.Tensor | None = None) -> str:
        tok = self.tokenizers.get(span.kind)
        if tok is None:
            return f'<p class="note">[{span.kind}: {len(span.ids)} ids, no {span.kind} tokenizer to decode them]</p>'
        ids = torch.tensor(span.ids, dtype=torch.long)
        if span.kind == "text":
            return f'<span class="text">{html.escape(tok.decode(ids))}</span>'
        if not span.closed or not span.ids:
            return f'<p class="note">[unfinished {span.kind} span: {len(span.ids)} ids]</p>'
        if span.kind in self.codecs:
            return self.latent_image(span, label, index, latents)
        if span.kind == "image":
            h, w = image_grid_of(tok)
            if len(span.ids) != h * w:
                return f'<p class="note">[image span of {len(span.ids)} codes; the tokenizer\'s grid is {h}x{w}]</p>'
            try:
                image = tok.decode(ids).float().cpu()
            except TokenizerError as err:  # an encoder-only VQGAN (imported): the rest of the page still counts
                return f'<p class="note">[image span of {len(span.ids)} codes: {html.escape(str(err))}]</p>'
            path = self._file(label, "image", index, ".png")
            save_image(image, path)
            return f'<img src="{html.escape(path.name)}" alt="{label} image {index}">'
        path = self._file(label, "speech", index, ".wav")
        wave = tok.decode(ids).float().cpu().numpy()
        soundfile.write(path, wave, sample_rate_of(tok), subtype="PCM_16")
        return f'<audio controls src="{html.escape(path.name)}"></audio>'

    def latent_image(self, span: Span, label: str, index: int, latents: torch.Tensor | None) -> str:
        """A diffusion span: its latent tokens -> the VQGAN's latent grid -> its decoder."""
        codec = self.codecs[span.kind]
        if latents is None:
            return f'<p class="note">[{span.kind} span of {len(span.ids)} latent tokens: no latents to decode]</p>'
        if latents.shape != (codec.tokens_per_image, codec.token_dim):
            return (f'<p class="note">[{span.kind} span with latents {tuple(latents.shape)}; the codec takes '
                    f'({codec.tokens_per_image}, {codec.token_dim})]</p>')
        grid = codec.tokens_to_latents(latents[None])
        path = self._file(label, span.kind, index, ".png")
        save_image(self.tokenizers[span.kind].decode_latents(grid)[0].float().cpu(), path)
        return f'<img src="{html.escape(path.name)}" alt="{label} {span.kind} {index}">'

    def section(self, title: str, label: str, ids: list[int], vocab: UnifiedVocab, css: str = "",
                latents: list[torch.Tensor] | None = None) -> str:
        """latents: the clean latents of the diffusion spans among `ids`, in order (a sample's `latents`)."""
        counts: dict[str, int] = {}
        parts = []
        pending = iter(latents or [])
        for span in split_spans(ids, vocab):
            counts[span.kind] = counts.get(span.kind, 0) + 1
            span_latents = next(pending, None) if span.kind in self.codecs and span.closed else None
            parts.append(self.span(span, label, counts[span.kind], span_latents))
        body = "".join(parts) or '<p class="note">[nothing]</p>'
        return f'<section class="{css}"><h2>{html.escape(title)}</h2><div>{body}</div></section>\n'


def write_page(
    out: str | Path,
    vocab: UnifiedVocab,
    tokenizers: dict[str, Any],
    results: list[Generation],
    settings: dict[str, Any] | None = None,
    codecs: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the page, its media files and `<stem>.json`; returns every path written, the page first.

    codecs: the `LatentCodec` of a diffusion image modality, by name (its spans are drawn from the latents)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render = _Renderer(out, tokenizers, codecs)
    settings = settings or {}
    shared = all(r.prompt == results[0].prompt for r in results)
    parts = []
    for i, result in enumerate(results, 1):
        # A prompt ending inside a span (`... <boi>`): that span is shown with the samples that complete it.
        tail = open_span_start(result.prompt, vocab)
        tail = len(result.prompt) if tail is None else tail
        if not shared or i == 1:
            title, label = ("prompt", "prompt") if shared else (f"prompt {i}", f"prompt{i}")
            parts.append(render.section(title, label, result.prompt[:tail], vocab, "prompt",
                                        latents=result.prompt_latents))
        ending = "ended the document" if result.finished else "stopped at max tokens"
        parts.append(render.section(f"sample {i} ({len(result.tokens)} tokens, {ending})", f"sample{i}",
                                    result.prompt[tail:] + result.tokens, vocab, latents=result.latents))
    meta = html.escape(", ".join(f"{k}={v}" for k, v in settings.items()))
    page = (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>mot generate</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>mot generate</h1><p class=\"meta\">{meta}</p>\n"
            + "".join(parts) + "</body></html>\n")
    out.write_text(page, encoding="utf-8")
    record = {
        "settings": settings,
        "vocab": vocab_layout(vocab),
        "samples": [{"prompt": r.prompt, "tokens": r.tokens, "finished": r.finished,
                     **({"latent_spans": len(r.latents)} if r.latents else {})} for r in results],
        "files": [p.name for p in render.files],
    }
    latents = {f"sample{i}-image{k}": z.contiguous() for i, r in enumerate(results, 1)
               for k, z in enumerate(r.latents, 1)}
    if latents:  # the diffusion spans' clean latent tokens, (n, token_dim) each
        render.files.append(out.with_name(f"{out.stem}-latents.safetensors"))
        save_file(latents, render.files[-1])
        record["files"].append(render.files[-1].name)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=1, default=str))
    return [out, json_path, *render.files]


def generate_page(session: Session, request: GenerationRequest, out: str | Path, ckpt: str | Path) -> list[Path]:
    """Generate `request` with `session` and write the page (the `mot generate` command); prints the rate."""
    start = time.perf_counter()
    results = session.generate(request)
    seconds = time.perf_counter() - start
    new = sum(len(r.tokens) for r in results)
    print(f"generated {new} tokens in {seconds:.1f} s ({new / seconds:.1f} tokens/s) on {session.device}")
    config = session.config(request)
    settings = {"ckpt": str(ckpt), "prompt": request.prompt, "image": request.image, "audio": request.audio,
                "then": request.then, "temperature": request.temperature, "top_k": request.top_k,
                "top_p": request.top_p, "seed": request.seed, "max_tokens": request.max_tokens,
                "guidance_scale": request.guidance_scale, "samples": request.samples,
                "image_tokens": config.image_tokens, "speech_max_tokens": config.speech_max_tokens}
    if session.codecs:
        settings.update(diffusion_steps=config.diffusion_steps, diffusion_eta=config.diffusion_eta)
    return write_page(out, session.vocab, session.tokenizers, results, settings, session.codecs)
