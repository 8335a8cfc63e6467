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

Worker processes read the source in parts (a tar shard each, which this process never opens; for other
sources, runs of documents read here) and decode them; on the CPU they encode too, and with a CUDA device
(device="auto" finds one) a GPU encodes the images and speech in batches in this process (pipeline.py). Under
`torchrun` (or `accelerate launch`), process r of W takes chunks r, r + W, ... on its own GPU
(cuda:LOCAL_RANK), and process 0 merges everyone's shards into one manifest: the output is the same for any
number of processes or workers.

Every file is written under a temporary name and renamed, so a killed run leaves only whole files, and a re-run
(resume=True) skips the chunks whose shard is complete. A document that cannot be used (a missing, corrupt or
unreadable image or audio file, no tokens, more than max_doc_tokens) is skipped and counted; nothing else is lost.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mot.data.batch_encode import DEFAULT_IMAGE_PRECISION, batches_images, check_precision, resolve_device
from mot.data.distributed import ProcessGroup
from mot.data.encode import DocumentDecoder, image_grid, materialize, special_ids, tokenizer_info, vocab_layout
from mot.data.media import IMAGE_POLICIES
from mot.data.pipeline import ChunkLoop
from mot.data.shards import SCHEMA_VERSION, read_json, shard_name, write_json
from mot.data.sources import open_documents
from mot.vocab import UnifiedVocab

__all__ = ["PrepareError", "PrepareStats", "prepare", "prepare_for_recipe"]

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
    device: str = "cpu"
    processes: int = 1
    profile: dict = field(default_factory=dict)  # process 0's Profile (pipeline_worker.py)

    def as_dict(self) -> dict:
        return asdict(self)


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
    image_policy: str | None = None,
    device: str = "auto",
    image_precision: str = DEFAULT_IMAGE_PRECISION,
    compile: bool = False,
    encode_batch_size: int | None = None,
    distributed: bool = True,
    tokenizer_paths: dict[str, str] | None = None,
    source_options: dict | None = None,
    mp_context: str = "spawn",
) -> PrepareStats:
    """Tokenize every document of `documents_source` into shards in `out_dir`; see the module docstring.

    documents_source: anything `open_documents` takes (a JSONL file or folder, webdataset-style tar shards, a
        local HF datasets source or parquet files, a DocumentSource, a list of Documents); `source_options` go
        to the reader (split, column names, ...).
    tokenizers: modality name in `vocab` -> a tokenizer (ModalityTokenizer), or a picklable zero-argument
        callable returning one (e.g. `functools.partial(load, path)`), loaded once per worker. Text segments go
        to the tokenizer whose `.modality` is "text", images to "image", audio to "speech".
    shard_size: documents per shard (before skipping). max_doc_tokens: longer documents are skipped (None: no
        limit); keep it at most the model's max_seq_len when the loader continues positions across sequences.
    image_resolution / sample_rate: what images and audio are brought to; default the tokenizers' `resolution`
        (or `image_size`) and `sample_rate` attributes, else images and audio as they are. image_policy: how
        images of another shape get there (media.IMAGE_POLICIES); default the image tokenizer's `preprocess`.
    device: where images and speech are encoded in batches: "cpu", "cuda", "cuda:N" or "auto" (under torchrun:
        cuda:LOCAL_RANK). image_precision: the VQGAN encoder's arithmetic on CUDA (batch_encode.PRECISIONS);
        compile: torch.compile the encoder; encode_batch_size: images per encoder call on CUDA (default: by
        pixels, batch_encode.CUDA_BATCH_PIXELS).
    num_workers: processes (0 or 1: in this process); with CUDA they decode while the GPU encodes.
    distributed: under torchrun, share the work with the other processes (every one must call prepare);
        False: this process prepares everything alone (the trainer's main process does, while others wait).
    mp_context: multiprocessing start method.
    """
    start = time.perf_counter()
    if shard_size <= 0:
        raise PrepareError(f"shard_size must be positive, got {shard_size}")
    if max_doc_tokens is not None and max_doc_tokens < 3:
        raise PrepareError(f"max_doc_tokens must be at least 3 (<bod>, a token, <eod>), got {max_doc_tokens}")
    if encode_batch_size is not None and encode_batch_size <= 0:
        raise PrepareError(f"encode_batch_size must be positive, got {encode_batch_size}")
    try:
        check_precision(image_precision)
    except ValueError as err:
        raise PrepareError(str(err)) from None
    group = ProcessGroup.from_environment() if distributed else ProcessGroup()
    try:
        device = resolve_device(group.device(device))
    except (ValueError, RuntimeError) as err:
        raise PrepareError(str(err)) from None
    source = open_documents(documents_source, **(source_options or {}))
    loaded = {name: materialize(t) for name, t in tokenizers.items()}
    layout = vocab_layout(vocab)
    DocumentDecoder(loaded, layout)  # checks names, sizes and special tokens before any work
    by_modality = {tok.modality: tok for tok in loaded.values()}

    def attr(modality: str, names: tuple[str, ...], kinds: tuple = (int, tuple)) -> Any:
        """The tokenizer's attribute, or its config's (ImageTokenizer and SpeechTokenizer keep them there)."""
        tok = by_modality.get(modality)
        holders = (tok, getattr(tok, "config", None))
        return next((getattr(h, n) for h in holders for n in names if isinstance(getattr(h, n, None), kinds)), None)

    image_resolution = image_resolution or attr("image", ("resolution", "image_size"))
    sample_rate = sample_rate or attr("speech", ("sample_rate",))
    image_policy = image_policy or attr("image", ("preprocess",), (str,)) or IMAGE_POLICIES[0]
    if image_policy not in IMAGE_POLICIES:
        raise PrepareError(f"image_policy {image_policy!r}: choose from {list(IMAGE_POLICIES)}")
    if isinstance(image_resolution, list):
        image_resolution = tuple(image_resolution)
    options = {"max_doc_tokens": max_doc_tokens, "image_resolution": image_resolution, "sample_rate": sample_rate,
               "image_policy": image_policy}
    # The codes depend on the encoder's arithmetic, so a resumed run must use the same.
    batched = batches_images(by_modality.get("image"))
    image_encoding = (image_precision if device.type == "cuda" else "fp32") if batched else None
    paths = tokenizer_paths or {}
    infos = {name: tokenizer_info(tok, paths.get(name), image_resolution) for name, tok in loaded.items()}

    out = Path(out_dir)
    settings = {
        "schema_version": SCHEMA_VERSION, "vocab": layout, "tokenizers": infos, "shard_size": shard_size,
        "max_doc_tokens": max_doc_tokens, "image_resolution": image_resolution, "sample_rate": sample_rate,
        "image_policy": image_policy, "image_precision": image_encoding,
    }
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples become lists

    def check() -> None:
        out.mkdir(parents=True, exist_ok=True)
        _check_settings(out, settings, resume)

    group.on_first(check, PrepareError)  # one process checks (and clears) the folder; all see its error

    loop = ChunkLoop(
        tokenizers=tokenizers, loaded=loaded, layout=layout, options=options, out=out, num_workers=num_workers,
        device=device, image_options={"precision": image_precision, "compile": compile,
                                      "batch_size": encode_batch_size},
        mp_context=mp_context,
    )
    metas: dict[int, dict] = {}
    reused = 0
    desc = "prepare" if group.size == 1 else f"prepare {group.rank}/{group.size}"
    # A source that workers read (tar shards) gives no size up front: the total is estimated as its parts are read.
    progress = tqdm(total=source.size_hint() if source.parts() is None else None, unit="doc", desc=desc,
                    disable=not show_progress or group.rank > 0, dynamic_ncols=True)
    skipped_so_far = Counter()

    def finish(meta: dict, complete_before: bool) -> None:
        nonlocal reused
        reused += complete_before
        metas[meta["index"]] = meta
        skipped_so_far.update(s["reason"] for s in meta["skipped"])
        progress.update(meta["input_documents"] * group.size)  # the other processes run at about this rate
        if skipped_so_far:
            progress.set_postfix(skipped=sum(skipped_so_far.values()), refresh=False)

    def total(documents: int) -> None:
        progress.total = documents
        progress.refresh()

    with progress:
        n_chunks = loop.run(source, shard_size, finish, group.rank, group.size, resume, total)

    gathered = group.gather({"metas": metas, "reused": reused, "profile": loop.profile.as_dict()})
    stats_reused = sum(g["reused"] for g in gathered)
    metas = {i: m for g in gathered for i, m in g["metas"].items()}
    if sorted(metas) != list(range(n_chunks)):
        raise RuntimeError(f"prepare: shards {sorted(set(range(n_chunks)) - set(metas))} are missing after all "
                           f"{group.size} processes finished")
    ordered = [metas[i] for i in range(n_chunks)]
    reader_skipped = [{"id": s.id, "reason": s.reason, "detail": s.detail}
                      for s in [*source.skipped, *loop.reader_skipped]]  # read here, or by the workers
    skipped = reader_skipped + [s for m in ordered for s in m["skipped"]]
    skipped_counts = dict(sorted(Counter(s["reason"] for s in skipped).items()))
    grids = {name: g for name, tok in loaded.items() if (g := image_grid(tok, image_resolution)) is not None}
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
        "options": {"shard_size": shard_size, **options, "image_precision": image_encoding},
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

    def write_manifest() -> None:
        names = {shard_name(i) for i in range(n_chunks)}
        for p in _shard_files(out):  # shards of an earlier, longer source
            if p.name.split(".")[0] not in names:
                p.unlink()
        write_json(out / "skipped.json", {"total": len(skipped), "counts": skipped_counts, "documents": skipped})
        write_json(out / "manifest.json", manifest)

    group.on_first(write_manifest, OSError)
    group.close()
    stats = PrepareStats(
        documents=manifest["documents"], tokens=manifest["tokens"], shards=n_chunks,
        written_shards=n_chunks - stats_reused, reused_shards=stats_reused, skipped=skipped_counts,
        seconds=round(time.perf_counter() - start, 3), out_dir=str(out), device=str(device), processes=group.size,
        profile=gathered[0]["profile"],
    )
    if show_progress and group.rank == 0:
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


def default_workers(device: str) -> int:
    """The cores this process may use, shared with the other processes of a torchrun on this machine; with a
    GPU one core is left for the process that feeds it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    gpu = device != "cpu" and torch.cuda.is_available()
    return max(1, cores - 1 if gpu else cores)


def prepare_for_recipe(cfg, recipe: str | Path, data: str | Path, tokenizers: str | Path, out: str | Path,
                       workers: int | None = 1, shard_size: int = 1000, max_doc_tokens: int = 0, **options):
    """Tokenize `data` into shards for the recipe's vocabulary with the tokenizers in `tokenizers`/<modality>;
    options go to `prepare` (device, image_precision, compile, encode_batch_size)."""
    from functools import partial

    from mot.config import ConfigError
    from mot.tokenize.load import load_tokenizer
    from mot.vocab import UnifiedVocab

    vocab = UnifiedVocab(cfg.model)
    loaders, paths = {}, {}
    for mod in cfg.model.modalities:
        folder = Path(tokenizers) / mod.name
        if not folder.exists():
            print(f"note: no tokenizer at {folder}: documents with {mod.name} segments are skipped and counted")
            continue
        tok = load_tokenizer(mod.name, folder)
        if tok.vocab_size > mod.vocab_size:
            raise ConfigError(f"{recipe}: model.modalities '{mod.name}' has vocab_size {mod.vocab_size}, "
                              f"but the tokenizer in {folder} emits {tok.vocab_size} ids")
        loaders[mod.name] = partial(load_tokenizer, mod.name, str(folder))
        paths[mod.name] = str(folder)
    if workers is None:
        workers = default_workers(options.get("device", "auto"))
    return prepare(data, loaders, vocab, out, num_workers=workers, shard_size=shard_size,
                   max_doc_tokens=max_doc_tokens or cfg.model.max_seq_len, tokenizer_paths=paths, **options)
