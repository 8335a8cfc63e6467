"""Interleaved documents -> token shards that training streams from (`mot prepare`).

Every document becomes one run of unified ids (text ids offset by `vocab[name].start`, and so on):

    <bod>  text ids  |  <boi> image codes <eoi>  |  <bos> speech units <eos>  ...  <eod>

Image codes are the tokenizer's latent grid in row-major order, so a span of h * w codes rebuilds the grid
(for a diffusion objective); the manifest gives h and w per image modality when the tokenizer has `grid_size`.

Documents are cut, in source order, into chunks of `shard_size`; chunk k becomes shard k, whichever worker
writes it, so the output does not depend on the number of workers:

    shard-000007.tokens.npy   int32 (N,): the shard's documents back to back; np.load(..., mmap_mode="r")
    shard-000007.offsets.npy  int64 (D + 1,): document d is tokens[offsets[d]:offsets[d + 1]]
    shard-000007.json         ids and counts of the chunk, its skipped documents; written last = shard complete
    manifest.json             format, schema version, vocab layout, tokenizers, options, per-shard counts
    skipped.json              skipped documents counted by reason, each with its id and what was wrong
    prepare.json              the settings; resuming in this folder needs the same ones

Every file is written under a temporary name and renamed, so a killed run leaves only whole files, and a re-run
(resume=True) skips the chunks whose shard is complete. A document that cannot be used (a missing, corrupt or
unreadable image or audio file, no tokens, more than max_doc_tokens) is skipped and counted; nothing else is lost.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mot.data.documents import Document, open_documents
from mot.data.encode import (
    DocumentEncoder,
    image_grid,
    materialize,
    special_ids,
    tokenizer_info,
    vocab_layout,
)
from mot.data.shards import SCHEMA_VERSION, complete_shard, read_json, shard_name, write_chunk, write_json
from mot.vocab import UnifiedVocab

__all__ = ["PrepareError", "PrepareStats", "prepare"]

FORMAT = "mot-shards"
LAYOUT = (
    "document = <bod> segment* <eod>; text: text ids; image: <boi> codes of the latent grid, row-major, <eoi>; "
    "audio: <bos> speech units <eos>; ids are unified (vocab[name].start + local id)"
)


class PrepareError(ValueError):
    """Settings that cannot be used, or that disagree with an earlier run in the same folder."""


@dataclass
class PrepareStats:
    documents: int
    tokens: int
    shards: int
    written_shards: int
    reused_shards: int
    skipped: dict[str, int]
    seconds: float
    out_dir: str

    def as_dict(self) -> dict:
        return asdict(self)


def _chunks(documents: Iterable[Document], size: int) -> Iterator[tuple[int, list[Document]]]:
    chunk: list[Document] = []
    index = 0
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == size:
            yield index, chunk
            chunk, index = [], index + 1
    if chunk:
        yield index, chunk


def _shard_files(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name.startswith("shard-")]


def _check_settings(out: Path, settings: dict, resume: bool) -> None:
    path = out / "prepare.json"
    for p in out.glob(".*.tmp-*"):  # left by a killed run
        p.unlink()
    if not resume:
        for p in [*_shard_files(out), out / "manifest.json", out / "skipped.json", path]:
            p.unlink(missing_ok=True)
    elif path.is_file():
        before = read_json(path)
        if before is None:
            raise PrepareError(f"{path}: unreadable; delete it or pass resume=False to start over")
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise PrepareError(
                f"{path}: {out} was prepared with different settings ({', '.join(changed)}); use a fresh out_dir, "
                "or resume=False to start over"
            )
    write_json(path, settings)


# Pool workers: each loads the tokenizers once (pickled objects, or zero-argument loaders called here).
_WORKER: dict[str, DocumentEncoder] = {}


def _init_worker(tokenizers: dict, layout: dict, options: dict) -> None:
    import torch

    torch.set_num_threads(1)  # the pool is the parallelism; threads per worker would oversubscribe
    _WORKER["encoder"] = DocumentEncoder({n: materialize(t) for n, t in tokenizers.items()}, layout, **options)


def _run_chunk(index: int, documents: list[Document], out_dir: str) -> dict:
    return write_chunk(_WORKER["encoder"], index, documents, Path(out_dir))


def prepare(
    documents_source: Any,
    tokenizers: dict[str, Any],
    vocab: UnifiedVocab,
    out_dir: str | Path,
    num_workers: int = 1,
    shard_size: int = 1000,
    max_doc_tokens: int | None = None,
    show_progress: bool = True,
    resume: bool = True,
    *,
    image_resolution: int | tuple[int, int] | None = None,
    sample_rate: int | None = None,
    tokenizer_paths: dict[str, str] | None = None,
    source_options: dict | None = None,
    mp_context: str = "spawn",
) -> PrepareStats:
    """Tokenize every document of `documents_source` into shards in `out_dir`; see the module docstring.

    documents_source: anything `open_documents` takes (a JSONL file or folder, a local HF datasets source, a
        DocumentSource, a list of Documents); `source_options` go to `HFDocuments` (split, column names, ...).
    tokenizers: modality name in `vocab` -> a tokenizer (ModalityTokenizer), or a picklable zero-argument
        callable returning one (e.g. `functools.partial(load, path)`), loaded once per worker. Text segments go
        to the tokenizer whose `.modality` is "text", images to "image", audio to "speech".
    shard_size: documents per shard (before skipping). max_doc_tokens: longer documents are skipped (None: no
        limit); keep it at most the model's max_seq_len when the loader continues positions across sequences.
    image_resolution / sample_rate: what images and audio are brought to; default the tokenizers' `resolution`
        (or `image_size`) and `sample_rate` attributes, else images and audio as they are.
    num_workers: processes (0 or 1: in this process). mp_context: multiprocessing start method.
    """
    start = time.perf_counter()
    if shard_size <= 0:
        raise PrepareError(f"shard_size must be positive, got {shard_size}")
    if max_doc_tokens is not None and max_doc_tokens < 3:
        raise PrepareError(f"max_doc_tokens must be at least 3 (<bod>, a token, <eod>), got {max_doc_tokens}")
    source = open_documents(documents_source, **(source_options or {}))
    loaded = {name: materialize(t) for name, t in tokenizers.items()}
    layout = vocab_layout(vocab)
    DocumentEncoder(loaded, layout)  # checks names, sizes and special tokens before any work
    by_modality = {tok.modality: tok for tok in loaded.values()}

    def attr(modality: str, names: tuple[str, ...]) -> Any:
        tok = by_modality.get(modality)
        return next((getattr(tok, n) for n in names if isinstance(getattr(tok, n, None), int | tuple)), None)

    image_resolution = image_resolution or attr("image", ("resolution", "image_size"))
    sample_rate = sample_rate or attr("speech", ("sample_rate",))
    if isinstance(image_resolution, list):
        image_resolution = tuple(image_resolution)
    options = {"max_doc_tokens": max_doc_tokens, "image_resolution": image_resolution, "sample_rate": sample_rate}
    paths = tokenizer_paths or {}
    infos = {name: tokenizer_info(tok, paths.get(name)) for name, tok in loaded.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "schema_version": SCHEMA_VERSION, "vocab": layout, "tokenizers": infos, "shard_size": shard_size,
        "max_doc_tokens": max_doc_tokens, "image_resolution": image_resolution, "sample_rate": sample_rate,
    }
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples become lists
    _check_settings(out, settings, resume)

    metas: dict[int, dict] = {}
    counts = Counter()
    reused = 0
    progress = tqdm(total=source.size_hint(), unit="doc", desc="prepare", disable=not show_progress,
                    dynamic_ncols=True)

    def finish(meta: dict) -> None:
        metas[meta["index"]] = meta
        counts.update(s["reason"] for s in meta["skipped"])
        progress.update(meta["input_documents"])
        if counts:
            progress.set_postfix(skipped=sum(counts.values()), refresh=False)

    def reusable(index: int, docs: list[Document]) -> dict | None:
        return complete_shard(out, index, docs) if resume else None

    with progress:
        if num_workers <= 1:
            encoder = DocumentEncoder(loaded, layout, **options)
            for index, docs in _chunks(source, shard_size):
                meta = reusable(index, docs)
                reused += meta is not None
                finish(meta or write_chunk(encoder, index, docs, out))
        else:
            ctx = multiprocessing.get_context(mp_context)
            with ctx.Pool(num_workers, _init_worker, (tokenizers, layout, options)) as pool:
                pending: deque = deque()
                for index, docs in _chunks(source, shard_size):
                    meta = reusable(index, docs)
                    if meta is not None:
                        reused += 1
                        finish(meta)
                        continue
                    pending.append(pool.apply_async(_run_chunk, (index, docs, str(out))))
                    # Bounded: the reader must not run ahead of the workers with every image in memory.
                    while pending and (len(pending) >= 2 * num_workers or pending[0].ready()):
                        finish(pending.popleft().get())
                while pending:
                    finish(pending.popleft().get())

    n_shards = len(metas)
    for p in _shard_files(out):  # shards of an earlier, longer source
        if p.name.split(".")[0] not in {shard_name(i) for i in range(n_shards)}:
            p.unlink()
    ordered = [metas[i] for i in range(n_shards)]
    reader_skipped = [{"id": s.id, "reason": s.reason, "detail": s.detail} for s in source.skipped]
    skipped = reader_skipped + [s for m in ordered for s in m["skipped"]]
    skipped_counts = dict(sorted(Counter(s["reason"] for s in skipped).items()))
    grids = {name: g for name, tok in loaded.items() if (g := image_grid(tok)) is not None}
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "layout": LAYOUT,
        "token_dtype": "int32",
        "offset_dtype": "int64",
        "vocab": layout,
        "special_ids": special_ids(layout),
        "tokenizers": infos,
        "image_grids": {name: {"h": h, "w": w, "order": "row-major"} for name, (h, w) in grids.items()},
        "options": {"shard_size": shard_size, **options},
        "source": source.description,
        "documents": sum(m["documents"] for m in ordered),
        "tokens": sum(m["tokens"] for m in ordered),
        "skipped": skipped_counts,
        "shards": [
            {"name": m["name"], "documents": m["documents"], "tokens": m["tokens"],
             "tokens_file": f"{m['name']}.tokens.npy", "offsets_file": f"{m['name']}.offsets.npy",
             "meta_file": f"{m['name']}.json"}
            for m in ordered
        ],
    }
    write_json(out / "skipped.json", {"total": len(skipped), "counts": skipped_counts, "documents": skipped})
    write_json(out / "manifest.json", manifest)
    stats = PrepareStats(
        documents=manifest["documents"], tokens=manifest["tokens"], shards=n_shards,
        written_shards=n_shards - reused, reused_shards=reused, skipped=skipped_counts,
        seconds=round(time.perf_counter() - start, 3), out_dir=str(out),
    )
    if show_progress:
        _print_summary(stats, print)
    return stats


def _print_summary(stats: PrepareStats, write: Callable[[str], Any]) -> None:
    write(
        f"prepare: {stats.documents} documents, {stats.tokens} tokens in {stats.shards} shards "
        f"({stats.written_shards} written, {stats.reused_shards} already complete) -> {stats.out_dir} "
        f"in {stats.seconds:.1f}s"
    )
    if stats.skipped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in stats.skipped.items())
        write(f"prepare: skipped {sum(stats.skipped.values())} documents ({reasons}); "
              f"see {os.path.join(stats.out_dir, 'skipped.json')}")
