"""The loop of `mot prepare`: a source in, shards out, on the CPU or with a GPU.

The source is read in parts, each one task for one worker process (pipeline_worker.py: a webdataset tar or a
byte range of one, read by the worker; or a run of documents this process read), and each part comes back in
pieces: assembled by the worker on the CPU, or decoded there and encoded here on the GPU (CUDA mode).

Documents are numbered in source order across parts, and chunk k (documents k * shard_size, ...) becomes
shard k, whichever worker read them: the output does not depend on the number of workers or processes. Under
torchrun process r of W writes chunks r, r + W, ...: its workers first scan each part (headers and captions:
the ids of its documents), so that it decodes only the documents of its own chunks. A resumed run scans too,
to find the chunks that already have a complete shard (made from the same document ids), and decodes only the
others. A fresh run in one process does not scan: the ids come back with the pieces.

Pieces waiting for this process are bounded (a worker waits while this process is behind), and so are the
parts in work ahead of the oldest unfinished one. `Profile` (pipeline_worker.py) says where this process spent
its time.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mot.data.documents import Document, DocumentSource, Skipped
from mot.data.encode import DocumentDecoder, MediaEncoder
from mot.data.pipeline_worker import Piece, Profile, Scan, _Inline, _RemoteTraceback, _task, _Workers, pieces_for
from mot.data.shards import complete_shard, write_shard


@dataclass
class _Part:
    part: Any  # a reader's part (read by a worker), or a list of documents (read here)
    size: int = 0  # bytes of a reader's part, for the progress estimate
    ids: list[str] | None = None  # every document's id, once scanned or decoded
    count: int | None = None
    skipped: list[Skipped] = field(default_factory=list)  # what its reader skipped
    start: int | None = None  # number of its first document in the source
    wanted: list[tuple[int, int]] | None = None  # positions to decode
    outcomes: dict[int, np.ndarray | dict] = field(default_factory=dict)  # position -> ids, or why skipped
    decoded_ids: list[str] = field(default_factory=list)  # from the pieces, without a scan
    decoded: bool = False


@dataclass
class ChunkLoop:
    """Tokenizes a source into shards of `shard_size` documents (`run`); see the module docstring."""

    tokenizers: dict[str, Any]  # as given to prepare: tokenizers or zero-argument loaders (they go to workers)
    loaded: dict[str, Any]
    layout: dict
    options: dict  # DocumentDecoder options
    out: Path
    num_workers: int
    device: torch.device
    image_options: dict  # ImageBatchEncoder options (precision, compile, batch_size)
    decode_batch: int | None = None  # documents per piece; None: by image size (pieces_for)
    mp_context: str = "spawn"
    profile: Profile = field(default_factory=Profile)
    reader_skipped: list[Skipped] = field(default_factory=list)  # what the workers' readers skipped, in order

    def encodes_here(self) -> bool:
        """Whether this process encodes the media (CUDA mode), else the workers (or, without them, this
        process) encode as they decode."""
        return self.device.type == "cuda"

    def run(self, source: DocumentSource, shard_size: int, finish: Callable[[dict, bool], None], rank: int = 0,
            world: int = 1, resume: bool = True, on_total: Callable[[int], None] | None = None) -> int:
        """Shards of this process's chunks (k % world == rank): written, or reused when resuming, each given to
        finish(meta, reused); on_total(estimated documents of the source) as parts are read; returns the number
        of chunks in the source."""
        scan = world > 1 or (resume and any(self.out.glob("shard-*.json")))
        run = _Run(self, source, shard_size, finish, rank, world, resume, scan, on_total)
        try:
            total = run.execute()
        finally:
            run.pool.close(finished=run.finished)
        return -(-total // shard_size)


class _Run:
    """One ChunkLoop.run: the parts, what is known of them, and the chunks as they are cut."""

    def __init__(self, loop: ChunkLoop, source: DocumentSource, shard_size: int, finish: Callable[[dict, bool], None],
                 rank: int, world: int, resume: bool, scan: bool, on_total: Callable[[int], None] | None):
        self.loop, self.size, self.finish, self.rank, self.world = loop, shard_size, finish, rank, world
        self.resume, self.scan, self.on_total, self.finished = resume, scan, on_total, False
        self.profile = loop.profile
        self.per_piece = loop.decode_batch or pieces_for(loop.options.get("image_resolution"))
        workers = max(1, loop.num_workers)
        self.ahead = 2 * workers  # parts in work from the oldest unfinished one on
        self.scan_ahead = 4 * workers  # parts scanned beyond those
        self.here = loop.encodes_here()
        self.decoder = DocumentDecoder(loop.loaded, loop.layout, **loop.options)
        self.media = MediaEncoder(self.decoder, loop.device, **loop.image_options) if self.here else None
        reader_parts = source.parts()
        self.reads_here = reader_parts is None
        self.read_here = 0  # documents read here
        if self.reads_here:
            documents = iter(source)
            self._next_part = lambda: self._documents_part(documents)
            self.total_size = 0
        else:
            pending = iter(reader_parts)
            self._next_part = lambda: next((_Part(p, p.size) for p in pending), None)
            self.total_size = sum(p.size for p in reader_parts)
        self.parts: dict[int, _Part] = {}  # by number, from the oldest not yet cut into chunks
        self.n_parts = 0  # parts taken from the source
        self.exhausted = False
        self.known = 0  # parts[:known] have their ids and start
        self.known_docs = 0  # documents in parts[:known]
        self.counted = [0, 0]  # documents and bytes of the reader's parts whose counts are known
        self.next_scan = self.next_decode = self.frontier = 0
        self.outstanding = self.scans_out = 0
        self.decisions: dict[int, Any] = {}  # chunk -> "write", "other" (another process's) or a reused meta
        self.in_flight: list = []  # (piece, its encoding queued on the device)
        self.chunk_ids: list[str] = []  # the chunk being cut: its documents' ids and outcomes
        self.chunk_outcomes: list = []
        self.inline = loop.num_workers <= 1
        if self.inline:
            media = None if self.here else MediaEncoder(self.decoder, "cpu")
            profile = None if self.here else self.profile
            self.pool = _Inline(lambda task: _task(task, self.per_piece, self.decoder, media, profile))
        else:
            init = (loop.tokenizers, loop.layout, loop.options, not self.here)
            self.pool = _Workers(loop.num_workers, loop.mp_context, init, self.per_piece)

    def _documents_part(self, documents: Iterator[Document]) -> _Part | None:
        """The next documents read here, up to a piece and never past the end of a chunk."""
        batch = list(itertools.islice(documents, min(self.per_piece, self.size - self.read_here % self.size)))
        self.read_here += len(batch)
        return _Part(batch, ids=[d.id for d in batch]) if batch else None

    # -- what is known

    def _more(self, n: int) -> None:
        """Parts up to n in `parts`, where the source has them."""
        while not self.exhausted and self.n_parts < n:
            part = self._next_part()
            if part is None:
                self.exhausted = True
            else:
                self.parts[self.n_parts] = part
                self.n_parts += 1
                self._advance()

    def _advance(self) -> None:
        while self.known < self.n_parts and self.parts[self.known].ids is not None:
            part = self.parts[self.known]
            part.start, part.count = self.known_docs, len(part.ids)
            self.known_docs += part.count
            self.known += 1

    def _all_known(self) -> bool:
        return self.exhausted and self.known == self.n_parts

    def _counted(self, part: _Part, count: int) -> None:
        if self.reads_here or self.on_total is None:
            return
        self.counted[0] += count
        self.counted[1] += part.size
        left = self.total_size - self.counted[1]
        self.on_total(self.counted[0] + (round(self.counted[0] * left / self.counted[1]) if self.counted[1] else 0))

    def _decide(self, k: int) -> bool:
        """What becomes of chunk k (self.decisions[k]); False while not all its documents are known."""
        if k in self.decisions:
            return True
        if k % self.world != self.rank:
            self.decisions[k] = "other"
            return True
        if not self.scan:
            self.decisions[k] = "write"
            return True
        first, end = k * self.size, (k + 1) * self.size
        if self.reads_here:
            while self.known_docs < end and not self.exhausted:
                self._more(self.n_parts + 1)
        if self.known_docs < end and not self._all_known():
            return False
        ids: list[str] = []
        for i in range(self.frontier, self.known):  # an undecided chunk's parts are not cut yet
            part = self.parts[i]
            if part.start >= end:
                break
            ids += part.ids[max(0, first - part.start) : max(0, end - part.start)]
        meta = complete_shard(self.loop.out, k, ids) if self.resume else None
        self.decisions[k] = meta if meta is not None else "write"
        return True

    def _plan(self, i: int) -> bool:
        """parts[i].wanted: the positions that fall in chunks this process writes; False while undecided."""
        part = self.parts[i]
        if not self.scan:
            part.wanted = None
            return True
        if i >= self.known:
            return False
        first, end = part.start, part.start + part.count
        ranges: list[tuple[int, int]] = []
        for k in range(first // self.size, (end - 1) // self.size + 1 if end > first else first // self.size):
            if not self._decide(k):
                return False
            if self.decisions[k] == "write":
                ranges.append((max(first, k * self.size) - first, min(end, (k + 1) * self.size) - first))
        part.wanted = ranges
        return True

    # -- tasks

    def _pump(self) -> None:
        blocked = False
        while self.next_decode - self.frontier < self.ahead:
            self._more(self.next_decode + 1)
            if self.next_decode >= self.n_parts:
                break
            if not self._plan(self.next_decode):
                blocked = True
                break
            part = self.parts[self.next_decode]
            if part.wanted == []:
                part.decoded = True  # nothing of it to decode here
            else:
                self.pool.submit(("decode", self.next_decode, part.part, part.wanted))
                self.outstanding += 1
            self.next_decode += 1
        if not self.scan or self.reads_here:
            return
        while self.scans_out < self.ahead and (blocked or self.next_scan < self.next_decode + self.scan_ahead):
            self._more(self.next_scan + 1)
            if self.next_scan >= self.n_parts:
                break
            self.pool.submit(("scan", self.next_scan, self.parts[self.next_scan].part, None))
            self.outstanding += 1
            self.scans_out += 1
            self.next_scan += 1

    def _handle(self, message: tuple) -> None:
        if message[0] == "error":
            raise message[1] from _RemoteTraceback(message[2])
        if message[0] == "scan":
            scan: Scan = message[1]
            part = self.parts[scan.part]
            part.ids, part.skipped = scan.ids, scan.skipped
            self.outstanding -= 1
            self.scans_out -= 1
            self._counted(part, len(scan.ids))
            self._advance()
            return
        piece: Piece = message[1]
        self.profile.add_counts(piece.counts)
        if piece.chunk is None:
            start = time.perf_counter()
            ends = np.cumsum([r if isinstance(r, int) else 0 for r in piece.results]).tolist()
            outcomes = [r if isinstance(r, dict) else piece.tokens[e - r : e]
                        for r, e in zip(piece.results, ends, strict=True)]
            self._place(piece, outcomes)
            self.profile.write += time.perf_counter() - start
            return
        start = time.perf_counter()
        pending = self.media.submit(piece.chunk)  # queued on the device; the previous piece completes meanwhile
        self.profile.encode_submit += time.perf_counter() - start
        if self.in_flight:
            self._complete(*self.in_flight.pop())
        self.in_flight.append((piece, pending))

    def _complete(self, piece: Piece, pending: dict) -> None:
        start = time.perf_counter()
        encoded = self.media.collect(pending)
        collected = time.perf_counter()
        self.profile.encode_wait += collected - start
        outcomes = [r if isinstance(r, dict) else r.astype(np.int32)
                    for r in self.decoder.assemble_each(piece.chunk, encoded)]
        self._place(piece, outcomes)
        self.profile.write += time.perf_counter() - collected

    def _place(self, piece: Piece, outcomes: list) -> None:
        part = self.parts[piece.part]
        part.outcomes.update(zip(piece.positions, outcomes, strict=True))
        if part.ids is None:
            part.decoded_ids += piece.ids
        if piece.last:
            self.outstanding -= 1
            part.decoded = True
            if part.ids is None:  # not scanned: all of it was decoded
                part.ids, part.skipped = part.decoded_ids, piece.skipped
                part.decoded_ids = []
                self._counted(part, piece.count)
                self._advance()

    # -- chunks

    def _finalize(self) -> None:
        """Cut the parts that are done, oldest first, into chunks."""
        while self.frontier < self.known and self.parts[self.frontier].decoded:
            part = self.parts[self.frontier]
            for skip in part.skipped:
                warnings.warn(f"{skip.detail}; document {skip.id!r} skipped", stacklevel=2)
                self.loop.reader_skipped.append(skip)
            for position, doc_id in enumerate(part.ids):
                number = part.start + position
                k = number // self.size
                self._decide(k)
                if self.decisions[k] == "write":
                    self.chunk_ids.append(doc_id)
                    self.chunk_outcomes.append(part.outcomes[position])
                if (number + 1) % self.size == 0:
                    self._close(k)
            del self.parts[self.frontier]
            self.frontier += 1

    def _close(self, k: int) -> None:
        decision = self.decisions.pop(k)
        if decision == "write":
            start = time.perf_counter()
            kept = [(i, o) for i, o in zip(self.chunk_ids, self.chunk_outcomes, strict=True)
                    if not isinstance(o, dict)]
            skipped = [o for o in self.chunk_outcomes if isinstance(o, dict)]
            meta = write_shard(self.loop.out, k, self.chunk_ids, [o for _, o in kept], [i for i, _ in kept], skipped)
            self.profile.write += time.perf_counter() - start
            self.finish(meta, False)
        elif decision != "other":
            self.finish(decision, True)  # a complete shard from an earlier run
        self.chunk_ids, self.chunk_outcomes = [], []

    def execute(self) -> int:
        """Everything; returns the number of documents in the source."""
        wait = "wait_decode" if self.here else "wait_workers" if not self.inline else None
        while True:
            state = None
            while state != (state := (self.next_decode, self.next_scan, self.frontier, self.n_parts)):
                self._pump()  # parts with nothing to decode here finish at once, so pump again
                self._finalize()
            if self._all_known() and self.frontier == self.n_parts:
                break
            start = time.perf_counter()
            message = self.pool.poll()
            if message is None:
                if self.in_flight:
                    self._complete(*self.in_flight.pop())
                    continue
                if self.outstanding == 0:
                    raise RuntimeError("prepare: nothing left to wait for, but the source is not done (a bug)")
                message = self.pool.get()
            if wait:
                setattr(self.profile, wait, getattr(self.profile, wait) + time.perf_counter() - start)
            self._handle(message)
        if self.known_docs % self.size:
            self._decide(self.known_docs // self.size)
            self._close(self.known_docs // self.size)
        self.finished = True
        return self.known_docs
