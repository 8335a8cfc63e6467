"""A prepared corpus of random ids in the document layout `mot prepare` writes: data for timing the trainer.

    write_random_corpus("/tmp/corpus", UnifiedVocab(cfg), tokens=2_000_000, doc_len=(1024, 4096))

Documents are `<bod> segment* <eod>` with text runs, images (`<boi>`, `image_tokens` codes, `<eoi>`) and speech
(`<bos>`, units, `<eos>`), each segment's kind drawn so that the token shares follow `fractions`. Ids are
uniform inside each modality's range, so nothing here can be learned: it gives the loader, the masks and the
towers the shapes of real data (document lengths, span boundaries, modality mix) at any scale, in seconds.
The folder is read by the loader like any prepared one (`manifest.json`, the same shard files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mot.data.encode import special_ids, vocab_layout
from mot.data.prepare import FORMAT, LAYOUT
from mot.data.shards import SCHEMA_VERSION, write_json, write_shard
from mot.vocab import UnifiedVocab

TEXT_RUN = (16, 400)  # a text segment's length is uniform in this range
SPEECH_RUN = (100, 700)  # speech units per segment, uniform


def _segment(kind: str, rng: np.random.Generator, vocab: UnifiedVocab, ids: dict[str, int],
             image_tokens: int) -> np.ndarray:
    if kind == "text":
        r = vocab["text"]
        return r.start + rng.integers(0, r.size, rng.integers(*TEXT_RUN, endpoint=True))
    if kind == "image":
        r = vocab["image"]
        return np.concatenate([[ids["<boi>"]], r.start + rng.integers(0, r.size, image_tokens), [ids["<eoi>"]]])
    r = vocab["speech"]
    units = r.start + rng.integers(0, r.size, rng.integers(*SPEECH_RUN, endpoint=True))
    return np.concatenate([[ids["<bos>"]], units, [ids["<eos>"]]])


def random_document(rng: np.random.Generator, vocab: UnifiedVocab, length: int, fractions: dict[str, float],
                    image_tokens: int, written: dict[str, int]) -> np.ndarray:
    """One document of exactly `length` ids (the last segment cut short, `<eod>` last). Each segment's kind is
    drawn in proportion to how far that kind's tokens in `written` (the corpus so far; updated here) fall short
    of its fraction, so the shares hold whatever the cuts at document ends take away."""
    ids = special_ids(vocab_layout(vocab))
    kinds = [k for k in fractions if fractions[k] > 0]
    parts, filled = [np.array([ids["<bod>"]])], 1
    while filled < length - 1:
        total = sum(written.values()) + 1
        shortfall = np.array([max(fractions[k] * total - written[k], 0.0) for k in kinds]) + 1e-9
        kind = kinds[rng.choice(len(kinds), p=shortfall / shortfall.sum())]
        parts.append(_segment(kind, rng, vocab, ids, image_tokens)[: length - 1 - filled])
        filled += len(parts[-1])
        written[kind] += len(parts[-1])
    parts.append(np.array([ids["<eod>"]]))
    return np.concatenate(parts).astype(np.int32)


def write_random_corpus(out: str | Path, vocab: UnifiedVocab, tokens: int, doc_len: tuple[int, int],
                        fractions: dict[str, float] | None = None, image_tokens: int = 1024, seed: int = 0,
                        shard_tokens: int = 4_000_000) -> dict:
    """Documents of uniform random lengths in `doc_len` until `tokens` ids are written; the manifest."""
    fractions = fractions or {"text": 0.2, "image": 0.62, "speech": 0.18}
    unknown = set(fractions) - {"text", "image", "speech"}
    if unknown or not 2 < doc_len[0] <= doc_len[1]:
        raise ValueError(f"random corpus: fractions for text/image/speech only (got {sorted(fractions)}), "
                         f"doc_len a range of at least 3 tokens (got {doc_len})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    metas, docs, written, per_kind = [], [], 0, dict.fromkeys(fractions, 0)
    while written < tokens:
        length = int(rng.integers(*doc_len, endpoint=True))
        docs.append(random_document(rng, vocab, length, fractions, image_tokens, per_kind))
        written += len(docs[-1])
        if sum(map(len, docs)) >= shard_tokens or written >= tokens:
            names = [f"random-{len(metas):06d}-{i:06d}" for i in range(len(docs))]
            metas.append(write_shard(out, len(metas), names, docs, names, []))
            docs = []
    layout = vocab_layout(vocab)
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "layout": LAYOUT, "token_dtype": "int32",
        "offset_dtype": "int64", "vocab": layout, "special_ids": special_ids(layout), "tokenizers": {},
        "image_grids": {}, "options": {"random": {"doc_len": list(doc_len), "fractions": fractions,
                                                  "image_tokens": image_tokens, "seed": seed,
                                                  "tokens": per_kind}},
        "source": "random ids (mot.data.random_corpus)",
        "documents": sum(m["documents"] for m in metas), "tokens": sum(m["tokens"] for m in metas), "skipped": {},
        "shards": [{"name": m["name"], "documents": m["documents"], "tokens": m["tokens"],
                    "tokens_file": f"{m['name']}.tokens.npy", "offsets_file": f"{m['name']}.offsets.npy",
                    "meta_file": f"{m['name']}.json"} for m in metas],
    }
    write_json(out / "manifest.json", manifest)
    return manifest
