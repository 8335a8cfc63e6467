"""Prompts for generation: the checkpoint's tokenizers, and a prompt encoded the way training documents are.

A prompt is a document without its end: `<bod>` then the segments (image, audio, then text, so the
text reads as what comes next: a caption to continue, or the request before an image), through
the same `DocumentEncoder` that `mot prepare` uses, minus the final `<eod>`. `then="image"` appends
`<boi>` (text-to-image: the next tokens must be an image), `then="speech"` appends `<bos>`.

Under a diffusion image modality (Transfusion setting) a prompt image is held as latent tokens:
`latent_prompt` swaps each image span of VQGAN codes for n placeholder ids and returns the span's clean
latent tokens beside the ids (for `generate(..., prompt_latents=...)`), as the trainer's LatentBatcher does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mot.data.documents import AudioSegment, Document, ImageSegment, TextSegment
from mot.data.encode import DocumentEncoder, vocab_layout
from mot.data.media import BadInput
from mot.vocab import UnifiedVocab

if TYPE_CHECKING:
    from mot.objectives.latents import LatentCodec

THEN = {"auto": None, "image": "<boi>", "speech": "<bos>"}
TOKENIZER_KINDS = ("text", "image", "speech")


class GenerationError(ValueError):
    """A generation request that cannot be served; the message says what is missing and where."""


def load_tokenizers(folder: str | Path | None, vocab: UnifiedVocab) -> dict[str, Any]:
    """The tokenizer of every modality of the model found in `folder`/<modality name>."""
    from mot.tokenize.load import load_tokenizer

    if folder is None:
        return {}
    found = {}
    for r in vocab.ranges:
        sub = Path(folder) / r.name
        if r.name in TOKENIZER_KINDS and sub.is_dir():
            found[r.name] = load_tokenizer(r.name, sub)
            if found[r.name].vocab_size > r.size:
                raise GenerationError(f"{sub}: the {r.name} tokenizer has {found[r.name].vocab_size} ids, but the "
                                      f"model's {r.name} range holds {r.size}: not this checkpoint's tokenizer")
    return found


def image_grid_of(tokenizer: Any) -> tuple[int, int]:
    """(h, w) of an image tokenizer's code grid: `grid_size()` (the VQGAN) or a `grid_size` attribute."""
    grid = tokenizer.grid_size
    grid = grid() if callable(grid) else grid
    return (grid, grid) if isinstance(grid, int) else tuple(grid)


def image_resolution_of(tokenizer: Any) -> int | None:
    config = getattr(tokenizer, "config", None)
    return getattr(config, "resolution", None) or getattr(tokenizer, "resolution", None)


def sample_rate_of(tokenizer: Any) -> int:
    config = getattr(tokenizer, "config", None)
    return getattr(config, "sample_rate", None) or tokenizer.sample_rate


def build_prompt(
    vocab: UnifiedVocab,
    tokenizers: dict[str, Any],
    text: str = "",
    image: str | Path | None = None,
    audio: str | Path | None = None,
    then: str = "auto",
) -> list[int]:
    """Unified ids `<bod> [<boi> codes <eoi>] [<bos> units <eos>] [text ids] [<boi> | <bos>]`."""
    names = [r.name for r in vocab.ranges]
    segments = []
    for flag, value, kind, segment in (("--image", image, "image", ImageSegment),
                                       ("--audio", audio, "speech", AudioSegment)):
        if value is None:
            continue
        if kind not in names:
            raise GenerationError(f"{flag} {value}: the checkpoint's model has no {kind} modality (it has {names})")
        if kind not in tokenizers:
            raise GenerationError(f"{flag} {value}: no {kind} tokenizer was found with the checkpoint")
        if not Path(value).is_file():
            raise GenerationError(f"{flag} {value}: file not found")
        segments.append(segment(path=Path(value)))
    if text:
        if "text" not in tokenizers:
            raise GenerationError("--prompt: no text tokenizer was found with the checkpoint")
        segments.append(TextSegment(text))
    if then not in THEN:
        raise GenerationError(f"then={then!r}: choose from {list(THEN)}")
    if THEN[then]:
        kind = "image" if then == "image" else "speech"
        if kind not in names or kind not in tokenizers:
            raise GenerationError(f"--then {then}: the checkpoint has no {kind} modality with a tokenizer "
                                  f"(modalities {names}, tokenizers {sorted(tokenizers)})")

    ids = [vocab.special_id("<bod>")]
    if segments:
        image_tok, speech_tok = tokenizers.get("image"), tokenizers.get("speech")
        encoder = DocumentEncoder(tokenizers, vocab_layout(vocab),
                                  image_resolution=image_resolution_of(image_tok) if image_tok else None,
                                  sample_rate=sample_rate_of(speech_tok) if speech_tok else None,
                                  image_policy=getattr(image_tok, "preprocess", "center_crop"))
        try:
            ids = encoder.encode(Document("prompt", segments)).tolist()[:-1]  # a prompt has no <eod>
        except BadInput as err:
            raise GenerationError(f"prompt: {err.detail}") from None
    if THEN[then]:
        ids.append(vocab.special_id(THEN[then]))
    return ids


def latent_prompt(vocab: UnifiedVocab, codecs: dict[str, LatentCodec], ids: list[int],
                  ) -> tuple[list[int], list[torch.Tensor]]:
    """A prompt's image spans of VQGAN codes -> n placeholder ids each, and their clean latent tokens (n, dim) in
    span order; codecs: the `LatentCodec` of the diffusion image modality by name ({}: the ids come back as
    they are). Only whole spans (`<boi>`, grid * grid codes, `<eoi>`) can be swapped."""
    names = [r.name for r in vocab.ranges]
    if "image" not in codecs or "image" not in names:
        return list(ids), []
    codec, image = codecs["image"], vocab.ranges[names.index("image")]
    boi, eoi = vocab.special_id("<boi>"), vocab.special_id("<eoi>")
    codes_per_image = codec.grid**2
    out: list[int] = []
    latents: list[torch.Tensor] = []
    i = 0
    while i < len(ids):
        if not image.start <= ids[i] < image.stop:
            out.append(ids[i])
            i += 1
            continue
        stop = i
        while stop < len(ids) and image.start <= ids[stop] < image.stop:
            stop += 1
        if stop - i != codes_per_image or i == 0 or ids[i - 1] != boi or stop == len(ids) or ids[stop] != eoi:
            raise GenerationError(f"prompt: an image span of {stop - i} codes; the diffusion image modality takes "
                                  f"whole images of {codes_per_image} codes between <boi> and <eoi>")
        codes = torch.tensor(ids[i:stop], dtype=torch.long) - image.start
        latents.append(codec.codes_to_tokens(codes[None])[0])
        out += [image.start] * codec.tokens_per_image
        i = stop
    return out, latents
