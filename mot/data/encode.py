"""Documents -> their unified token ids, from the modality tokenizers and the unified vocabulary's layout.

    <bod>  text ids  |  <boi> image codes <eoi>  |  <bos> speech units <eos>  ...  <eod>

Encoding a chunk of documents has three steps, so that the costly middle one can run in batches on a GPU
while CPU worker processes do the first:

    decode   (CPU workers)  text -> ids (`encode_batch`); images -> uint8 at the tokenizer's resolution, stacked
                            per size; audio -> the speech tokenizer's unit features; bad documents -> skipped
    encode   (one device)   image batches -> VQGAN codes, features -> speech units (`batch_encode.py`)
    assemble                ids of each document, offset into the unified vocabulary, between its brackets

A tokenizer without the batch interface (`image_batch_encoder` / `speech_batch_encoder` give None) encodes its
items one by one during decode. The layout is a plain dict (`vocab_layout`), so a `DocumentDecoder` pickles to
worker processes without the vocab.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mot.data.batch_encode import ImageBatchEncoder, SpeechBatchEncoder, batches_images, batches_speech
from mot.data.documents import AudioSegment, Document, ImageSegment, TextSegment
from mot.data.media import BadInput, decode_image, load_audio
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


def image_grid(tokenizer: Any, resolution: int | tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(h, w) of the code grid, where the tokenizer exposes `grid_size`: an int, a pair, or a method of the
    image resolution (`ImageTokenizer.grid_size`)."""
    grid = getattr(tokenizer, "grid_size", None)
    if callable(grid):
        try:
            grid = grid(resolution) if resolution else grid()
        except (TokenizerError, TypeError, ValueError):
            return None
    if isinstance(grid, int) and not isinstance(grid, bool):
        return grid, grid
    if isinstance(grid, tuple | list) and len(grid) == 2 and all(isinstance(g, int) for g in grid):
        return int(grid[0]), int(grid[1])
    return None


def tokenizer_info(tokenizer: Any, path: str | None = None, resolution: Any = None) -> dict:
    cls = type(tokenizer)
    info = {"modality": tokenizer.modality, "class": f"{cls.__module__}.{cls.__qualname__}",
            "vocab_size": int(tokenizer.vocab_size)}
    path = path or next((str(getattr(tokenizer, a)) for a in ("path", "folder") if getattr(tokenizer, a, None)), None)
    if path:
        info["path"] = str(path)
    if (grid := image_grid(tokenizer, resolution)) is not None:
        info["grid"] = {"h": grid[0], "w": grid[1], "order": "row-major"}
    return info


def _segment_kind(segment: Any) -> str | None:
    return "text" if isinstance(segment, TextSegment) else "image" if isinstance(segment, ImageSegment) \
        else "audio" if isinstance(segment, AudioSegment) else None


def _as_ids(ids: Any) -> np.ndarray:
    ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    return ids.reshape(-1).astype(np.int64)


@dataclass
class DecodedChunk:
    """A chunk after decode: per document either its parts or why it is skipped, and the media to encode.

    A part is ("ids", kind, local ids), ("image", size, row in images[size]) or ("audio", clip), whose feature
    rows are features[feature_offsets[clip]:feature_offsets[clip + 1]]. Tensors cross from worker processes
    through shared memory, so they are few and stacked."""

    index: int
    input_ids: list[str]
    documents: list[tuple[str, list[tuple]] | dict] = field(default_factory=list)
    images: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None
    feature_offsets: list[int] = field(default_factory=lambda: [0])
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class EncodedMedia:
    """Ids of a chunk's media, on the CPU: codes per image size (N, h*w), units of the feature rows (M,)."""

    codes: dict[tuple[int, int], np.ndarray]
    units: np.ndarray | None


class DocumentDecoder:
    """The decode step (and, for tokenizers without the batch interface, their encoding too)."""

    def __init__(
        self,
        tokenizers: dict[str, ModalityTokenizer],
        layout: dict,
        max_doc_tokens: int | None = None,
        image_resolution: int | tuple[int, int] | None = None,
        sample_rate: int | None = None,
        image_policy: str = "center_crop",
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
        self.image_resolution, self.sample_rate, self.image_policy = image_resolution, sample_rate, image_policy
        image_tok = self.by_segment.get("image", (None, None))[1]
        speech_tok = self.by_segment.get("audio", (None, None))[1]
        # Only the capability matters here; the batch encoders themselves live where encoding runs.
        self.batch_images, self.batch_audio = batches_images(image_tok), batches_speech(speech_tok)
        self.image_factor = getattr(image_tok, "downsample_factor", 1)

    def tokenizer(self, kind: str) -> ModalityTokenizer | None:
        return self.by_segment[kind][1] if kind in self.by_segment else None

    # -- one segment

    def _checked(self, kind: str, ids: Any, item: Any = None) -> np.ndarray:
        name, tok, _ = self.by_segment[kind]
        ids = _as_ids(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
            raise ValueError(f"{name} tokenizer returned ids outside 0..{tok.vocab_size - 1}: "
                             f"min {ids.min()}, max {ids.max()}")
        if kind == "image" and (grid := image_grid(tok, self.image_resolution)) is not None \
                and ids.size != grid[0] * grid[1]:
            raise ValueError(f"{name} tokenizer gave {ids.size} codes for a {tuple(item.shape[1:])} image but its "
                             f"grid_size is {grid}; set image_resolution to what the tokenizer expects")
        return ids

    def _encode_one(self, kind: str, item: Any) -> np.ndarray:
        name, tok, _ = self.by_segment[kind]
        try:
            with torch.no_grad():
                return self._checked(kind, tok.encode(item), item)
        except TokenizerError as err:
            raise BadInput(TOKENIZER_ERROR, f"{name} tokenizer: {err}") from err

    def _text_ids(self, texts: list[str]) -> list[np.ndarray | BadInput]:
        """Every text of a chunk at once (`encode_batch` where the tokenizer has it)."""
        if not texts:
            return []
        name, tok, _ = self.by_segment["text"]
        batch = getattr(tok, "encode_batch", None)
        if batch is not None and all(isinstance(t, str) for t in texts):
            try:
                return [self._checked("text", ids) for ids in batch(texts)]
            except TokenizerError:
                pass  # find which text it was, below
        out: list[np.ndarray | BadInput] = []
        for text in texts:
            try:
                out.append(self._encode_one("text", text))
            except BadInput as err:
                out.append(err)
        return out

    def _image(self, segment: ImageSegment) -> torch.Tensor | np.ndarray:
        """uint8 (3, H, W) for the batch encoder, or the ids of a tokenizer that encodes one image at a time."""
        pixels = decode_image(segment, self.image_resolution, self.image_policy)
        if not self.batch_images:
            return self._encode_one("image", pixels.float() / 255)
        height, width = pixels.shape[1:]
        if height % self.image_factor or width % self.image_factor:
            raise BadInput(TOKENIZER_ERROR, f"{self.by_segment['image'][0]} tokenizer: image size {height}x{width} "
                                            f"is not a multiple of the VQGAN's downsampling factor "
                                            f"{self.image_factor}")
        return pixels

    def _audio(self, segment: AudioSegment) -> torch.Tensor | np.ndarray:
        """Unit features (n, dim) for the batch encoder, or the ids of a tokenizer without `features`."""
        waveform = load_audio(segment, self.sample_rate)
        if not self.batch_audio:
            return self._encode_one("audio", waveform)
        name, tok, _ = self.by_segment["audio"]
        try:
            return tok.features(waveform).float()
        except (TokenizerError, RuntimeError) as err:  # RuntimeError: a clip too short for the STFT's padding
            raise BadInput(TOKENIZER_ERROR, f"{name} tokenizer: {err}") from err

    # -- a chunk

    def decode(self, documents: list[Document], index: int = 0) -> DecodedChunk:
        chunk = DecodedChunk(index, [d.id for d in documents])
        has_text = "text" in self.by_segment
        doc_texts = [[s.text for s in d.segments if isinstance(s, TextSegment) and s.text] if has_text else []
                     for d in documents]
        # A captioned pair's two documents share their caption and their media segment: each is decoded and
        # encoded once per chunk.
        flat = [t for texts in doc_texts for t in texts]
        if all(isinstance(t, str) for t in flat):
            unique = list(dict.fromkeys(flat))
            encoded = dict(zip(unique, self._text_ids(unique), strict=True))
            text_ids = [[encoded[t] for t in texts] for texts in doc_texts]
        else:  # a text that is no string fails its own document, in _text_ids
            ids = iter(self._text_ids(flat))
            text_ids = [[next(ids) for _ in texts] for texts in doc_texts]
        images: dict[tuple[int, int], list[torch.Tensor]] = {}
        features: list[torch.Tensor] = []
        media: dict[int, tuple[tuple, int]] = {}  # id(segment) -> (part, size) of a document decoded already
        for doc, texts in zip(documents, text_ids, strict=True):
            marks = ({size: len(items) for size, items in images.items()}, len(features))
            try:
                chunk.documents.append((doc.id, self._decode_document(doc, texts, images, features, media)))
            except BadInput as err:
                for size, items in images.items():  # drop what this document had added
                    del items[marks[0].get(size, 0):]
                del features[marks[1]:]
                chunk.documents.append({"id": doc.id, "reason": err.reason, "detail": err.detail})
        chunk.images = {size: torch.stack(items) for size, items in images.items() if items}
        chunk.features = torch.cat(features) if features else None
        chunk.feature_offsets = np.cumsum([0] + [f.shape[0] for f in features]).tolist()
        chunk.counts = {"images": sum(len(v) for v in images.values()), "audio": len(features),
                        "image_pixels": sum(len(v) * s[0] * s[1] for s, v in images.items())}
        return chunk

    def _decode_document(self, doc: Document, texts: list, images: dict, features: list,
                         media: dict[int, tuple[tuple, int]]) -> list[tuple]:
        """The document's parts; its media segments' parts go into `media` once the whole document is kept, for
        other documents holding the same segment object (a pair's other order)."""
        parts: list[tuple] = []
        mine: dict[int, tuple[tuple, int]] = {}
        total, content = 2, 0  # <bod> and <eod>
        texts = iter(texts)
        for segment in doc.segments:
            kind = _segment_kind(segment)
            if kind is None:
                raise BadInput("bad_segment", f"document {doc.id!r}: {type(segment).__name__} is not a segment")
            if kind not in self.by_segment:
                raise BadInput(NO_TOKENIZER, f"document {doc.id!r}: no tokenizer for {kind} segments "
                                             f"(have {sorted(self.by_segment)})")
            if kind == "text" and not segment.text:
                continue
            if kind == "text":
                ids = next(texts)
                if isinstance(ids, BadInput):
                    raise ids
                part, size = ("ids", kind, ids), ids.size
            elif id(segment) in media:
                part, size = media[id(segment)]
            elif kind == "image":
                item = self._image(segment)
                if isinstance(item, np.ndarray):
                    part, size = ("ids", kind, item), item.size
                else:
                    key = tuple(item.shape[1:])
                    images.setdefault(key, []).append(item)
                    part = ("image", key, len(images[key]) - 1)
                    size = key[0] // self.image_factor * (key[1] // self.image_factor)
            else:
                item = self._audio(segment)
                if isinstance(item, np.ndarray):
                    part, size = ("ids", kind, item), item.size
                else:
                    features.append(item)
                    part, size = ("audio", len(features) - 1), item.shape[0]
            if kind != "text":
                mine[id(segment)] = (part, size)
            if size == 0:
                continue
            parts.append(part)
            total, content = total + size + (2 if BRACKETS[kind] else 0), content + 1
            if self.max_doc_tokens and total > self.max_doc_tokens:  # stop decoding as soon as it is too long
                raise BadInput(TOO_LONG, f"document {doc.id!r}: more than max_doc_tokens={self.max_doc_tokens} "
                                         f"tokens ({total} after {content} of {len(doc.segments)} segments)")
        if not content:
            raise BadInput(EMPTY, f"document {doc.id!r}: no tokens (no segments, or only empty ones)")
        media.update(mine)
        return parts

    # -- assemble

    def assemble(self, chunk: DecodedChunk, media: EncodedMedia) -> tuple[list[np.ndarray], list[str], list[dict]]:
        """(unified ids of each kept document, their ids, the skipped documents) in chunk order."""
        arrays, ids, skipped = [], [], []
        for entry, result in zip(chunk.documents, self.assemble_each(chunk, media), strict=True):
            if isinstance(result, dict):
                skipped.append(result)
            else:
                arrays.append(result)
                ids.append(entry[0])
        return arrays, ids, skipped

    def assemble_each(self, chunk: DecodedChunk, media: EncodedMedia) -> list[np.ndarray | dict]:
        """Per document of the chunk, in order: its unified ids (int64), or the dict saying why it is skipped."""
        out: list[np.ndarray | dict] = []
        bod, eod = np.array([self.specials["<bod>"]]), np.array([self.specials["<eod>"]])
        for entry in chunk.documents:
            if isinstance(entry, dict):
                out.append(entry)
                continue
            pieces = [bod]
            for part in entry[1]:
                if part[0] == "ids":
                    kind, local = part[1], part[2]
                elif part[0] == "image":
                    kind, local = "image", media.codes[part[1]][part[2]]
                else:
                    first, end = chunk.feature_offsets[part[1]], chunk.feature_offsets[part[1] + 1]
                    kind, local = "audio", media.units[first:end]
                unified = local.astype(np.int64) + self.by_segment[kind][2]
                if BRACKETS[kind]:
                    begin, end = (self.specials[s] for s in BRACKETS[kind])
                    unified = np.concatenate([[begin], unified, [end]])
                pieces.append(unified)
            pieces.append(eod)
            out.append(np.concatenate(pieces).astype(np.int64))
        return out


class MediaEncoder:
    """The encode step on one device: a chunk's images and features -> ids (`batch_encode.py`)."""

    def __init__(self, decoder: DocumentDecoder, device: str | torch.device = "cpu", **image_options: Any):
        image_tok, speech_tok = decoder.tokenizer("image"), decoder.tokenizer("audio")
        self.images = ImageBatchEncoder(image_tok, device, **image_options) if decoder.batch_images else None
        self.speech = SpeechBatchEncoder(speech_tok, device) if decoder.batch_audio else None

    def submit(self, chunk: DecodedChunk) -> dict:
        """Queue the chunk's encoding (asynchronous on CUDA); `collect` brings the ids back."""
        codes = {size: self.images(batch) for size, batch in chunk.images.items()}
        units = self.speech(chunk.features) if chunk.features is not None else None
        return {"codes": codes, "units": units}

    @staticmethod
    def collect(pending: dict) -> EncodedMedia:
        codes = {size: c.cpu().numpy() for size, c in pending["codes"].items()}
        units = pending["units"].cpu().numpy() if pending["units"] is not None else None
        return EncodedMedia(codes, units)

    def __call__(self, chunk: DecodedChunk) -> EncodedMedia:
        return self.collect(self.submit(chunk))


class DocumentEncoder:
    """Document -> unified ids (int64 array), or `BadInput` saying why the document can't be used: decode,
    encode and assemble for one document on the CPU (what `mot generate` uses for prompts)."""

    def __init__(self, tokenizers: dict[str, ModalityTokenizer], layout: dict, **options: Any):
        self.decoder = DocumentDecoder(tokenizers, layout, **options)
        self.media = MediaEncoder(self.decoder, "cpu")

    def encode_chunk(self, documents: list[Document], index: int = 0):
        chunk = self.decoder.decode(documents, index)
        return self.decoder.assemble(chunk, self.media(chunk))

    def encode(self, doc: Document) -> np.ndarray:
        arrays, _, skipped = self.encode_chunk([doc])
        if skipped:
            raise BadInput(skipped[0]["reason"], skipped[0]["detail"])
        return arrays[0]


def quiet_worker_threads() -> None:
    """In a worker process: one thread for torch and for `tokenizers` (the pool is the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
