"""The chunk loop of `mot prepare`: chunks of documents in, shard metadata out, on the CPU or with a GPU.

    CPU   each worker process decodes, encodes and writes whole chunks (one chunk = one shard)
    CUDA  worker processes decode pieces of chunks (`decode_batch` documents: pixels, features, text ids);
          this process encodes each piece's media in batches on the GPU while the workers decode the next
          ones, assembles the documents and writes the shards

Either way the shard of chunk k holds the same documents in the same order. Decoded tensors come back from
the workers through shared memory (torch.multiprocessing). `Profile` says where this process waited.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mot.data.batch_encode import CUDA_BATCH_PIXELS
from mot.data.documents import Document
from mot.data.encode import DocumentDecoder, EncodedMedia, MediaEncoder, materialize, quiet_worker_threads
from mot.data.shards import write_shard


@dataclass
class Profile:
    """Seconds this process spent per stage, and the media it saw (counted where they were decoded)."""

    wait_decode: float = 0.0  # waiting for decoded pieces (CUDA mode: from workers, or decoding them here)
    wait_workers: float = 0.0  # CPU mode with workers: waiting for their finished shards
    decode: float = 0.0  # CPU mode without workers: decoding here
    encode_submit: float = 0.0  # copying batches to the device and queuing the encoder
    encode_wait: float = 0.0  # waiting for the device's results
    encode: float = 0.0  # encoding in this process on the CPU
    write: float = 0.0  # assembling documents and writing shards
    counts: dict[str, int] = field(default_factory=dict)

    def add_counts(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + value

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def chunks(documents: Iterable[Document], size: int) -> Iterator[tuple[int, list[Document]]]:
    chunk: list[Document] = []
    index = 0
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == size:
            yield index, chunk
            chunk, index = [], index + 1
    if chunk:
        yield index, chunk


def pieces_for(resolution: int | tuple[int, int] | None) -> int:
    """Documents per decode task: about one encoder batch of images (CUDA_BATCH_PIXELS), 16 to 256 documents,
    so that small images still make big GPU batches and big ones do not pile up in shared memory."""
    if not resolution:
        return 64
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    return max(16, min(256, CUDA_BATCH_PIXELS // (height * width)))


# Worker processes: each loads the tokenizers once (pickled objects, or zero-argument loaders called here).
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizers: dict, layout: dict, options: dict, encode_here: bool) -> None:
    quiet_worker_threads()
    decoder = DocumentDecoder({n: materialize(t) for n, t in tokenizers.items()}, layout, **options)
    _WORKER["decoder"] = decoder
    _WORKER["media"] = MediaEncoder(decoder, "cpu") if encode_here else None


def _shard_of_chunk(decoder: DocumentDecoder, media: MediaEncoder, index: int, documents: list[Document],
                    out: Path, profile: Profile) -> dict:
    """CPU mode: decode, encode and write one chunk here, timing each step into `profile`."""
    start = time.perf_counter()
    chunk = decoder.decode(documents, index)
    decoded = time.perf_counter()
    encoded = media(chunk)
    done = time.perf_counter()
    meta = write_shard(out, index, chunk.input_ids, *decoder.assemble(chunk, encoded))
    profile.decode, profile.encode = profile.decode + decoded - start, profile.encode + done - decoded
    profile.write += time.perf_counter() - done
    profile.add_counts(chunk.counts)
    return meta


def _encode_and_write(index: int, documents: list[Document], out_dir: str) -> tuple[dict, dict]:
    profile = Profile()
    meta = _shard_of_chunk(_WORKER["decoder"], _WORKER["media"], index, documents, Path(out_dir), profile)
    return meta, profile.counts


def _decode(index: int, documents: list[Document]):
    return _WORKER["decoder"].decode(documents, index)


@dataclass
class ChunkLoop:
    """Runs every chunk that `todo(index, docs)` says needs work (else it returns the finished shard's meta)."""

    tokenizers: dict[str, Any]  # as given to prepare: tokenizers or zero-argument loaders (they go to workers)
    loaded: dict[str, Any]
    layout: dict
    options: dict  # DocumentDecoder options
    out: Path
    num_workers: int
    device: torch.device
    image_options: dict  # ImageBatchEncoder options (precision, compile, batch_size)
    decode_batch: int | None = None  # documents per decode task (CUDA mode); None: by image size
    mp_context: str = "spawn"
    profile: Profile = field(default_factory=Profile)

    def run(self, work: Iterable[tuple[int, list[Document]]], finish: Callable[[dict], None]) -> None:
        try:
            self._run(work, finish)
        except BrokenProcessPool as err:
            raise RuntimeError("prepare: a worker process died (killed, out of memory, or its tokenizers failed to "
                               "load); the shards finished so far are kept, and a rerun resumes from them") from err

    def _run(self, work: Iterable[tuple[int, list[Document]]], finish: Callable[[dict], None]) -> None:
        if self.device.type == "cuda":
            self._run_with_device(work, finish)
        elif self.num_workers <= 1:
            decoder = DocumentDecoder(self.loaded, self.layout, **self.options)
            media = MediaEncoder(decoder, "cpu")
            for index, docs in work:
                finish(_shard_of_chunk(decoder, media, index, docs, self.out, self.profile))
        else:
            self._run_on_cpu_workers(work, finish)

    def _pool(self, encode_here: bool) -> ProcessPoolExecutor:
        # An executor, not multiprocessing.Pool: a worker that dies (OOM killer, a failing tokenizer loader)
        # raises BrokenProcessPool here instead of being replaced forever while prepare hangs.
        ctx = torch.multiprocessing.get_context(self.mp_context)  # tensors come back through shared memory
        return ProcessPoolExecutor(self.num_workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(self.tokenizers, self.layout, self.options, encode_here))

    def _run_on_cpu_workers(self, work, finish) -> None:
        with self._pool(encode_here=True) as pool:
            pending: deque = deque()

            def take() -> None:
                start = time.perf_counter()
                meta, counts = pending.popleft().result()
                self.profile.wait_workers += time.perf_counter() - start
                self.profile.add_counts(counts)
                finish(meta)

            for index, docs in work:
                pending.append(pool.submit(_encode_and_write, index, docs, str(self.out)))
                # Bounded: the reader must not run ahead of the workers with every image in memory.
                while pending and (len(pending) >= 2 * self.num_workers or pending[0].done()):
                    take()
            while pending:
                take()

    def _run_with_device(self, work, finish) -> None:
        decoder = DocumentDecoder(self.loaded, self.layout, **self.options)
        media = MediaEncoder(decoder, self.device, **self.image_options)
        per_piece = self.decode_batch or pieces_for(self.options.get("image_resolution"))
        shards: dict[int, dict] = {}  # index -> its documents' ids, its number of pieces, the assembled ones
        in_flight: list = []  # the piece whose encoding the device is running: (index, chunk, pending ids)

        def complete(index: int, chunk, pending: dict) -> None:
            start = time.perf_counter()
            encoded: EncodedMedia = media.collect(pending)
            collected = time.perf_counter()
            self.profile.encode_wait += collected - start
            shard = shards[index]
            shard["assembled"][chunk.index] = decoder.assemble(chunk, encoded)  # (arrays, ids, skipped)
            if len(shard["assembled"]) == shard["pieces"]:  # pieces finish in order; write them in order anyway
                del shards[index]
                pieces = [shard["assembled"][p] for p in range(shard["pieces"])]
                arrays, ids, skipped = ([x for piece in pieces for x in piece[k]] for k in range(3))
                finish(write_shard(self.out, index, shard["input_ids"], arrays, ids, skipped))
            self.profile.write += time.perf_counter() - collected

        def take(get: Callable[[], Any]) -> None:
            start = time.perf_counter()
            index, chunk = get()
            decoded = time.perf_counter()
            pending = media.submit(chunk)  # queued on the device; the previous piece completes meanwhile
            submitted = time.perf_counter()
            self.profile.wait_decode += decoded - start
            self.profile.encode_submit += submitted - decoded
            self.profile.add_counts(chunk.counts)
            if in_flight:
                complete(*in_flight.pop())
            in_flight.append((index, chunk, pending))

        def pieces(index: int, docs: list[Document]) -> list[list[Document]]:
            parts = [docs[i : i + per_piece] for i in range(0, len(docs), per_piece)]
            shards[index] = {"input_ids": [d.id for d in docs], "pieces": len(parts), "assembled": {}}
            return parts

        if self.num_workers <= 1:
            for index, docs in work:
                for piece, sub in enumerate(pieces(index, docs)):
                    take(lambda i=index, p=piece, s=sub: (i, decoder.decode(s, p)))
        else:
            with self._pool(encode_here=False) as pool:
                queue: deque = deque()
                for index, docs in work:
                    for piece, sub in enumerate(pieces(index, docs)):
                        queue.append((index, pool.submit(_decode, piece, sub)))
                    while queue and (len(queue) >= 2 * self.num_workers or queue[0][1].done()):
                        i, result = queue.popleft()
                        take(lambda i=i, r=result: (i, r.result()))
                while queue:
                    i, result = queue.popleft()
                    take(lambda i=i, r=result: (i, r.result()))
        if in_flight:
            complete(*in_flight.pop())

