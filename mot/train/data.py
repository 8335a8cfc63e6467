"""Training data for a run: prepare the shards if needed, and the train/eval loaders.

Every process packs the same global stream (it is cheap: memory-mapped copies) and keeps its own rows of
each global micro-batch, so a batch holds the same sequences whatever the number of devices and
accumulation steps: a 2-GPU run sees exactly the data of a 1-GPU run with twice the accumulation. Under
train.cuda_graph a thread packs the next micro-batches while the GPU replays the step (`Prefetched`).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from mot.config import ConfigError, RunConfig
from mot.data.loader import PackedBatch, PackedLoader
from mot.vocab import UnifiedVocab


def shards_ready(folder: str | Path) -> bool:
    return (Path(folder) / "manifest.json").is_file()


def ensure_prepared(cfg: RunConfig, where: str) -> Path:
    """The shard folder of the recipe; made from `data.documents` (generated first for the demo) if missing."""
    d = cfg.data
    if not d.shards:
        raise ConfigError(f"{where}: 'data.shards' is not set: name a folder written by `mot prepare`")
    shards = Path(d.shards)
    if shards_ready(shards):
        return shards
    if not d.documents:
        raise ConfigError(f"{where}: 'data.shards' = {shards} holds no prepared corpus (no manifest.json) and "
                          "'data.documents' is not set; run `mot prepare` first")
    documents = Path(d.documents)
    if not documents.exists():
        if not d.demo:
            raise ConfigError(f"{where}: 'data.documents' = {documents} does not exist")
        from mot.data.demo import generate_demo_corpus

        print(f"mot: generating the demo corpus into {documents.parent}")
        generate_demo_corpus(documents.parent)
    if not d.tokenizers or not Path(d.tokenizers).is_dir():
        raise ConfigError(f"{where}: 'data.tokenizers' = {d.tokenizers!r} is not a folder of tokenizers "
                          "(text/ image/ speech/); needed to prepare {documents}")
    from mot.data.prepare import prepare_for_recipe

    print(f"mot: preparing {documents} into {shards} with the tokenizers in {d.tokenizers}")
    # Called in the main process alone (the others wait), so it must not join a torchrun group.
    prepare_for_recipe(cfg, where, documents, d.tokenizers, shards, workers=d.prepare_workers, distributed=False)
    return shards


class RankSlice:
    """Iterates a loader of global micro-batches and yields this process's rows of each."""

    def __init__(self, loader: PackedLoader, rank: int, world_size: int):
        if loader.batch_size % world_size:
            raise ValueError(f"global micro-batch {loader.batch_size} does not split over {world_size} processes")
        self.loader, self.rank, self.rows = loader, rank, loader.batch_size // world_size

    def __iter__(self) -> RankSlice:
        return self

    def __next__(self) -> PackedBatch:
        batch = next(self.loader)
        rows = slice(self.rank * self.rows, (self.rank + 1) * self.rows)
        return PackedBatch(batch.tokens[rows], batch.modality[rows], batch.positions[rows], batch.document_ids[rows])

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        pass


class Prefetched:
    """A RankSlice's micro-batches drawn up to `depth` ahead by a thread, for a step that leaves the host idle
    while the GPU works (train.cuda_graph: the thread packs the next batches during the replay and the step's
    one sync). `state_dict` is the loader's position after the last batch handed out, as without prefetching,
    and `close` puts the loader back there."""

    def __init__(self, batches: RankSlice, depth: int = 2):
        self.batches, self.depth = batches, depth
        self.position = batches.state_dict()
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self) -> PackedBatch:
        if self._thread is None:
            self._queue, self._stop = queue.Queue(self.depth), threading.Event()
            # The thread holds the batches, not this object: one dropped unclosed still stops (__del__).
            self._thread = threading.Thread(target=_produce, args=(self.batches, self._queue, self._stop),
                                            daemon=True, name="mot-prefetch")
            self._thread.start()
        batch, position = self._queue.get()
        if isinstance(batch, BaseException):
            self.close()
            raise batch
        self.position = position
        return batch

    def state_dict(self) -> dict:
        return self.position

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.batches.load_state_dict(state)
        self.position = self.batches.state_dict()

    def close(self) -> None:
        """Stop the thread and put the loader back after the last batch handed out."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.batches.load_state_dict(self.position)

    def __del__(self) -> None:
        if self._stop is not None:
            self._stop.set()


def _produce(batches: RankSlice, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetched's thread: (batch, the loader's position after it) into `out` until `stop`; an error goes in as
    the batch, for the consumer to raise."""
    while not stop.is_set():
        try:
            item = (next(batches), batches.state_dict())
        except BaseException as err:
            item, stop_after = (err, None), True
        else:
            stop_after = False
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if stop_after:
            return


def build_loaders(cfg: RunConfig, shards: Path, vocab: UnifiedVocab, micro_batch: int, rank: int, world_size: int):
    """(train, eval) iterators of this process's rows; eval is None when nothing is held out."""
    t, d = cfg.train, cfg.data
    global_micro = micro_batch * world_size
    train = PackedLoader(shards, vocab, global_micro, t.seq_len, seed=t.seed, split="train",
                         eval_fraction=d.eval_fraction, positions=d.positions,
                         condition_dropout=d.condition_dropout)
    eval_loader = None
    if d.eval_fraction > 0:
        eval_loader = PackedLoader(train.corpus, vocab, global_micro, t.seq_len, seed=t.seed, split="eval",
                                   eval_fraction=d.eval_fraction, shuffle=False, positions=d.positions)
    return train, eval_loader
