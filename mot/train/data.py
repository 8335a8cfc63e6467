"""Training data for a run: prepare the shards if needed, and the train/eval loaders.

Every process packs the same global stream (it is cheap: memory-mapped copies) and keeps its own rows of
each global micro-batch, so a batch holds the same sequences whatever the number of devices and
accumulation steps: a 2-GPU run sees exactly the data of a 1-GPU run with twice the accumulation.
"""

from __future__ import annotations

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
