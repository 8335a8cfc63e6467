"""What a worker process of `mot prepare` does with a part of the source, and the pool of those processes.

pipeline.py's loop gives each task to a worker (or, with at most one worker, runs it in its own process); the
task is one part of the source:

    TarPart    a webdataset tar, or a byte range of a large one (tar_source.py): the worker reads its headers,
               captions and media itself, so the main process never parses a tar
    documents  for the other sources (JSONL, datasets, documents in memory): a run of `decode_batch` documents
               that the main process read

A "scan" task only reads a part's document ids. A "decode" task sends the part back in pieces of up to
`decode_batch` documents as it reads them:

    CPU   decoded, encoded and assembled there: each document's unified ids, or why it is skipped
    CUDA  decoded there (uint8 pixels at the tokenizer's resolution, log-mel features, text ids; the tensors
          through shared memory); the main process encodes each piece on the GPU while the workers decode the
          next ones, and assembles

At most `2 * workers` pieces wait for the main process (a worker waits while it is behind), and a worker whose
main process is gone stops. These live apart from the loop so that the worker side (what a spawned process
imports and runs) can be read and timed on its own (bench/prepare.py).
"""

from __future__ import annotations

import bisect
import os
import pickle
import queue
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from typing import Any

import numpy as np
import torch

from mot.data.batch_encode import CUDA_BATCH_PIXELS
from mot.data.documents import Document, Skipped
from mot.data.encode import DecodedChunk, DocumentDecoder, MediaEncoder, materialize, quiet_worker_threads

WORKER_DIED = ("prepare: a worker process died (killed, out of memory, or its tokenizers failed to load); the "
               "shards finished so far are kept, and a rerun resumes from them")


@dataclass
class Profile:
    """Seconds this process spent per stage, and the media it saw (counted where they were decoded)."""

    wait_decode: float = 0.0  # waiting for decoded pieces (CUDA mode: from workers, or decoding them here)
    wait_workers: float = 0.0  # CPU mode with workers: waiting for their assembled pieces
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


def pieces_for(resolution: int | tuple[int, int] | None) -> int:
    """Documents per piece: about one encoder batch of images (CUDA_BATCH_PIXELS), 16 to 256 documents, so
    that small images still make big GPU batches and big ones do not pile up in shared memory."""
    if not resolution:
        return 64
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    return max(16, min(256, CUDA_BATCH_PIXELS // (height * width)))


# ---------------------------------------------------------------- what a worker does with a part


@dataclass
class Scan:
    """A part's documents by id, and what its reader skipped: the part read, nothing decoded."""

    part: int
    ids: list[str]
    skipped: list[Skipped]


@dataclass
class Piece:
    """Up to `decode_batch` documents of a part (at `positions` in it): decoded (`chunk`, for this process to
    encode and assemble), or assembled (`tokens`: the kept documents' unified ids back to back, int32;
    `results`: per document its number of tokens, or the dict saying why it is skipped). A part's last piece
    (perhaps empty) also gives the number of documents in the part and what its reader skipped."""

    part: int
    positions: list[int]
    ids: list[str]
    chunk: DecodedChunk | None = None
    tokens: np.ndarray | None = None
    results: list | None = None
    counts: dict = field(default_factory=dict)
    last: bool = False
    count: int = 0
    skipped: list[Skipped] = field(default_factory=list)


def _documents_of(part: Any, skipped: list[Skipped]) -> Iterable[Document]:
    if isinstance(part, list):
        return part
    return part.read(lambda doc_id, reason, detail: skipped.append(Skipped(doc_id, reason, detail)))


def _scan(number: int, part: Any) -> Scan:
    known = getattr(part, "ids_without_reading", lambda: None)()  # a part that knows its ids without being read
    if known is not None:
        return Scan(number, known, [])
    skipped: list[Skipped] = []
    return Scan(number, [doc.id for doc in _documents_of(part, skipped)], skipped)


def _ranges(ranges: list[tuple[int, int]] | None) -> Callable[[int], tuple[bool, bool]]:
    """position -> (whether it is in one of the (first, end) ranges, whether it ends one); None: all, no ends."""
    if ranges is None:
        return lambda position: (True, False)
    starts = [r[0] for r in ranges]

    def where(position: int) -> tuple[bool, bool]:
        i = bisect.bisect_right(starts, position) - 1
        inside = i >= 0 and position < ranges[i][1]
        return inside, inside and position + 1 == ranges[i][1]

    return where


def _pieces(number: int, part: Any, wanted: list[tuple[int, int]] | None, per_piece: int,
            decoder: DocumentDecoder, media: MediaEncoder | None, profile: Profile | None = None) -> Iterator[Piece]:
    """A part's documents at the `wanted` positions ((first, end) ranges, one per chunk: a piece ends with each;
    None: all) in pieces, decoded, and encoded and assembled too when `media` is given; times go to `profile`
    (when this runs in prepare's main process)."""
    skipped: list[Skipped] = []
    where = _ranges(wanted)
    batch: list[tuple[int, Document]] = []
    count = 0

    def piece() -> Piece:
        start = time.perf_counter()
        chunk = decoder.decode([doc for _, doc in batch], number)
        out = Piece(number, [position for position, _ in batch], chunk.input_ids, counts=chunk.counts)
        decoded = time.perf_counter()
        if media is None:
            out.chunk = chunk
        else:
            results = decoder.assemble_each(chunk, media(chunk))
            arrays = [r for r in results if not isinstance(r, dict)]
            out.tokens = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
            out.results = [r if isinstance(r, dict) else r.size for r in results]
        if profile is not None:
            profile.decode += decoded - start
            profile.encode += time.perf_counter() - decoded
        return out

    for position, doc in enumerate(_documents_of(part, skipped)):
        count = position + 1
        inside, ends = where(position)
        if inside:
            batch.append((position, doc))
            if len(batch) == per_piece or ends:  # a chunk's last document: its shard can be written
                yield piece()
                batch = []
    last = piece()
    last.last, last.count, last.skipped = True, count, skipped
    yield last


def _task(task: tuple, per_piece: int, decoder: DocumentDecoder, media: MediaEncoder | None,
          profile: Profile | None = None) -> Iterator[tuple]:
    """The messages of one task: ("scan", Scan) or ("piece", Piece), ..."""
    kind, number, part, wanted = task
    if kind == "scan":
        yield "scan", _scan(number, part)
    else:
        for piece in _pieces(number, part, wanted, per_piece, decoder, media, profile):
            yield "piece", piece


# ---------------------------------------------------------------- worker processes


# In a worker process: the tokenizers, loaded once (pickled objects, or zero-argument loaders called here).
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizers: dict, layout: dict, options: dict, encode_here: bool) -> None:
    quiet_worker_threads()
    decoder = DocumentDecoder({n: materialize(t) for n, t in tokenizers.items()}, layout, **options)
    _WORKER["decoder"] = decoder
    _WORKER["media"] = MediaEncoder(decoder, "cpu") if encode_here else None


def _decode(index: int, documents: list[Document]) -> DecodedChunk:
    """The decode step alone, in a worker set up by _init_worker (bench/prepare.py times it)."""
    return _WORKER["decoder"].decode(documents, index)


class _RemoteTraceback(Exception):
    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _worker_main(tasks, results, slots, init_args: tuple, per_piece: int) -> None:
    parent = os.getppid()

    def parent_alive() -> bool:  # a main process that is killed leaves no one to stop its workers
        return os.getppid() == parent

    def put(message: tuple) -> None:
        while not slots.acquire(timeout=1.0):
            if not parent_alive():
                raise SystemExit(1)
        results.put(message)  # written to the pipe before put returns: nothing is lost if this process dies next

    try:
        _init_worker(*init_args)
        while True:
            try:
                task = tasks.get(timeout=1.0)
            except queue.Empty:
                if not parent_alive():
                    return
                continue
            if task is None:
                return
            for message in _task(task, per_piece, _WORKER["decoder"], _WORKER["media"]):
                put(message)
    except SystemExit:
        return
    except BaseException as err:  # to prepare's main process, which raises it
        text = "".join(traceback.format_exception(err))
        try:
            pickle.dumps(err)
        except Exception:
            err = RuntimeError(f"{type(err).__name__}: {err}")
        put(("error", err, text))


class _Workers:
    """Worker processes that take tasks in order and send back their messages; at most `2 * n` messages wait for
    this process (pieces hold decoded media), a worker with another one waits for a slot."""

    def __init__(self, n: int, mp_context: str, init_args: tuple, per_piece: int):
        ctx = torch.multiprocessing.get_context(mp_context)  # tensors come back through shared memory
        self.tasks = ctx.Queue()
        self.results = ctx.SimpleQueue()  # as concurrent.futures' process pool: a put is written at once
        self.slots = ctx.Semaphore(2 * n)
        self.procs = [ctx.Process(target=_worker_main, args=(self.tasks, self.results, self.slots, init_args,
                                                             per_piece), name=f"mot-prepare-{i}", daemon=True)
                      for i in range(n)]
        for p in self.procs:
            p.start()

    def submit(self, task: tuple) -> None:
        self.tasks.put(task)

    def _take(self) -> tuple:
        message = self.results.get()
        self.slots.release()
        return message

    def poll(self) -> tuple | None:
        return None if self.results.empty() else self._take()

    def get(self) -> tuple:
        # Wait for a message or for a worker to end (killed by the OOM killer or a signal, it sends nothing):
        # what the others sent is taken first, then prepare stops instead of waiting forever.
        reader = self.results._reader  # as concurrent.futures waits on its result queue
        while True:
            wait([reader, *(p.sentinel for p in self.procs)])
            if not self.results.empty():
                return self._take()
            if any(p.exitcode is not None for p in self.procs):
                raise RuntimeError(WORKER_DIED)

    def close(self, finished: bool) -> None:
        # Finished, every worker waits idle for a task (all it sent has arrived): SIGTERM ends it at once, where a
        # clean exit (tearing down torch) would cost this process about a second of waiting. After an error,
        # they may be busy: killed.
        for p in self.procs:
            if p.exitcode is None and finished:
                p.terminate()
            elif p.exitcode is None:
                p.kill()
        for p in self.procs:
            p.join()
        self.tasks.cancel_join_thread()
        self.tasks.close()
        self.results.close()


class _Inline:
    """The tasks run in this process, one message at a time, when asked for one."""

    def __init__(self, run: Callable[[tuple], Iterator[tuple]]):
        self.run, self.queue, self.current = run, deque(), None

    def submit(self, task: tuple) -> None:
        self.queue.append(task)

    def poll(self) -> tuple | None:
        while True:
            if self.current is None:
                if not self.queue:
                    return None
                self.current = self.run(self.queue.popleft())
            message = next(self.current, None)
            if message is not None:
                return message
            self.current = None

    def get(self) -> tuple:
        message = self.poll()
        if message is None:
            raise RuntimeError("prepare: waiting for a task that was never given (a bug)")
        return message

    def close(self, finished: bool) -> None:
        self.queue.clear()
        self.current = None
