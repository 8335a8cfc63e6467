"""Packed batches over prepared shards: documents back to back, cut into fixed-length sequences.

Every epoch the documents of the split are shuffled with `np.random.default_rng((seed, epoch))` and
concatenated into one stream; the stream runs over epochs forever and is cut into sequences of `seq_len`
tokens, `batch_size` sequences a batch (an epoch's last sequence goes on with the next epoch's first
documents; nothing is padded or dropped). A document that does not fit in what is left of a sequence is
split, and its rest opens the next sequence.

Per token a batch gives the tower (`modality`), the rotary position and a document id local to its sequence
(0, 1, 2, ... in order of appearance) for `document_causal_mask`. Positions start at 0 at each document's
`<bod>`. In the piece of a split document that opens a sequence they go on from where the previous piece
stopped (`positions="continue"`, the default: RoPE sees each token at its offset in the document, so prepare
with max_doc_tokens <= model.max_seq_len), or start again at 0 (`positions="restart"`). Either way the piece
attends only to itself: the earlier part of its document is in another sequence.

The state (`state_dict`) is the epoch, the cursor into that epoch's document order, and how many tokens of the
document under the cursor were already emitted (the carried-over partial document): a loader given that state
yields exactly the batches the original would have yielded next.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mot.data.encode import vocab_layout
from mot.data.shards import ShardedCorpus
from mot.vocab import UnifiedVocab

__all__ = ["PackedBatch", "PackedLoader", "ShardedCorpus", "document_causal_mask", "held_out"]

STATE_VERSION = 1


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: query t may attend to key s iff s <= t in the same document."""
    seq_len = document_ids.shape[-1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal)[:, None]


def held_out(ids: list[str], eval_fraction: float, split_seed: int = 0) -> np.ndarray:
    """Bool per document: held out for eval. Decided by a hash of the id's group (the part before '#', which
    keeps both orders of a captioned pair together), so it is stable however the corpus is sharded."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    def unit(doc_id: str) -> float:
        digest = hashlib.blake2b(f"{split_seed}:{doc_id.split('#', 1)[0]}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64
    return np.array([unit(i) < eval_fraction for i in ids], dtype=bool)


def count_towers(modality: torch.Tensor, n_modalities: int) -> tuple[int, ...]:
    """Tokens per modality of a (B, T) host tensor: the `tower_counts` a batch hands the model."""
    return tuple(torch.bincount(modality.reshape(-1), minlength=n_modalities).tolist())


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # (B, T) int64 unified ids
    modality: torch.Tensor  # (B, T) int64 tower index
    positions: torch.Tensor  # (B, T) int64 rotary positions
    document_ids: torch.Tensor  # (B, T) int64, local to each sequence
    # tokens per modality, counted on the host (MoTTransformer's tower_counts); see `counted`
    tower_counts: tuple[int, ...] | None = None

    def attn_mask(self) -> torch.Tensor:
        return document_causal_mask(self.document_ids)

    def counted(self, n_modalities: int) -> PackedBatch:
        """This batch with its tokens per modality counted on the host (call before moving it to the GPU)."""
        return dataclasses.replace(self, tower_counts=count_towers(self.modality, n_modalities))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return PackedBatch(move(self.tokens), move(self.modality), move(self.positions), move(self.document_ids),
                           self.tower_counts)


class PackedLoader:
    """An endless, resumable iterator of `PackedBatch` over a prepared shard folder (or a `ShardedCorpus`).

    split: "train" (documents not held out), "eval" (held out: `eval_fraction` of them, see `held_out`) or
    "all". rank / world_size: each rank takes every world_size-th document of the shared epoch order.
    """

    def __init__(
        self,
        shards: str | Path | ShardedCorpus,
        vocab: UnifiedVocab,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        split: Literal["train", "eval", "all"] = "train",
        eval_fraction: float = 0.0,
        split_seed: int = 0,
        shuffle: bool = True,
        positions: Literal["continue", "restart"] = "continue",
        rank: int = 0,
        world_size: int = 1,
        condition_dropout: float = 0.0,
    ):
        self.corpus = shards if isinstance(shards, ShardedCorpus) else ShardedCorpus(shards)
        if self.corpus.manifest["vocab"] != vocab_layout(vocab):
            raise ValueError(f"{self.corpus.folder}: the shards were prepared for another vocabulary layout "
                             f"({self.corpus.manifest['vocab']}) than the model's ({vocab_layout(vocab)})")
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
        if positions not in ("continue", "restart"):
            raise ValueError(f"positions must be 'continue' or 'restart', got {positions!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.vocab, self.batch_size, self.seq_len = vocab, batch_size, seq_len
        self.seed, self.split, self.eval_fraction, self.split_seed = seed, split, eval_fraction, split_seed
        self.shuffle, self.positions, self.rank, self.world_size = shuffle, positions, rank, world_size
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {condition_dropout}")
        self.condition_dropout = condition_dropout
        self._span_opens = np.array([vocab.special_id("<boi>"), vocab.special_id("<bos>")])
        self._bod = vocab.special_id("<bod>")
        self._text = next((r for r in vocab.ranges if r.name == "text"), None)
        held = held_out(self.corpus.ids, eval_fraction, split_seed)
        keep = {"train": ~held, "eval": held, "all": np.ones_like(held)}[split]
        self.documents = np.flatnonzero(keep)
        if len(self.documents) < world_size:
            raise ValueError(f"{self.corpus.folder}: split {split!r} (eval_fraction={eval_fraction}) has "
                             f"{len(self.documents)} documents, fewer than world_size={world_size}")
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------ the document stream

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Corpus indices of this rank's documents in the order epoch `epoch` reads them."""
        if epoch != self._order_epoch:
            order = self.documents
            if self.shuffle:
                order = order[np.random.default_rng((self.seed, epoch)).permutation(len(order))]
            self._order, self._order_epoch = order[self.rank :: self.world_size], epoch
        return self._order

    @property
    def tokens_per_epoch(self) -> int:
        return int(self.corpus.lengths[self.epoch_order(self.epoch)].sum())

    def _sequence(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens = np.empty(self.seq_len, dtype=np.int64)
        positions = np.empty(self.seq_len, dtype=np.int64)
        document_ids = np.empty(self.seq_len, dtype=np.int64)
        filled, local = 0, 0
        while filled < self.seq_len:
            doc = self._document(self.epoch_order(self.epoch)[self.cursor])
            n = min(len(doc) - self.offset, self.seq_len - filled)
            tokens[filled : filled + n] = doc[self.offset : self.offset + n]
            first = self.offset if self.positions == "continue" else 0
            positions[filled : filled + n] = np.arange(first, first + n)
            document_ids[filled : filled + n] = local
            filled, local, self.offset = filled + n, local + 1, self.offset + n
            if self.offset == len(doc):  # document done: the next sequence starts with the next document
                self.offset, self.cursor = 0, self.cursor + 1
                if self.cursor == len(self.epoch_order(self.epoch)):
                    self.epoch, self.cursor = self.epoch + 1, 0
        return tokens, positions, document_ids

    def _document(self, index: int) -> np.ndarray:
        """The document's tokens; with condition dropout, a leading caption (the text between <bod> and the
        first image or speech span) is removed with that probability, decided by (seed, epoch, document) so
        that a resumed loader makes the same choices. Teaches the unconditional stream of guidance."""
        doc = self.corpus.document(index)
        if not self.condition_dropout or self._text is None:
            return doc
        opens = np.flatnonzero(np.isin(doc, self._span_opens))
        if not len(opens) or opens[0] < 2 or doc[0] != self._bod:
            return doc
        if not ((doc[1 : opens[0]] >= self._text.start) & (doc[1 : opens[0]] < self._text.stop)).all():
            return doc
        if np.random.default_rng((self.seed, self.epoch, int(index), 1)).random() >= self.condition_dropout:
            return doc
        return np.concatenate([doc[:1], doc[opens[0] :]])

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> PackedBatch:
        rows = [self._sequence() for _ in range(self.batch_size)]
        tokens, positions, document_ids = (torch.from_numpy(np.stack(col)) for col in zip(*rows, strict=True))
        return PackedBatch(tokens, self.vocab.modality_of(tokens), positions, document_ids)

    # ------------------------------------------------------------ resume

    def _identity(self) -> dict:
        return {
            "seed": self.seed, "split": self.split, "eval_fraction": self.eval_fraction,
            "split_seed": self.split_seed, "shuffle": self.shuffle, "rank": self.rank,
            "world_size": self.world_size, "documents": len(self.documents),
            "condition_dropout": self.condition_dropout,
            "corpus_tokens": int(self.corpus.manifest["tokens"]),
        }

    def state_dict(self) -> dict:
        """Where the stream stands: epoch, cursor into the epoch's order, tokens of the current document already
        emitted (its rest is the carried-over partial document), plus what must match to resume."""
        order = self.epoch_order(self.epoch)
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor, "offset": self.offset,
                "carry_document": self.corpus.ids[order[self.cursor]], **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')}, expected {STATE_VERSION}")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has {value!r}; "
                                 "resume with the same data, split and seed")
        order = self.epoch_order(state["epoch"])
        if not 0 <= state["cursor"] < len(order):
            raise ValueError(f"loader state cursor {state['cursor']} is outside the epoch's {len(order)} documents")
        if not 0 <= state["offset"] < self.corpus.lengths[order[state["cursor"]]]:
            raise ValueError(f"loader state offset {state['offset']} is outside its document")
        if state.get("carry_document") != self.corpus.ids[order[state["cursor"]]]:
            raise ValueError(f"loader state was at document {state.get('carry_document')!r}, which these shards "
                             f"have elsewhere; resume with the same shards")
        self.epoch, self.cursor, self.offset = state["epoch"], state["cursor"], state["offset"]
