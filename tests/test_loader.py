"""The packed loader: exact tokens, positions, document masks, determinism, resume and the eval split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mot.data.documents import Document, TextSegment
from mot.data.loader import PackedLoader, document_causal_mask, held_out
from mot.data.prepare import prepare
from mot.vocab import UnifiedVocab
from tests.conftest import tiny_config
from tests.fakes import FakeText

SEQ_LEN, BATCH = 16, 2


@pytest.fixture(scope="module")
def vocab() -> UnifiedVocab:
    return UnifiedVocab(tiny_config())


@pytest.fixture(scope="module")
def shards(tmp_path_factory, vocab):
    """13 text documents of 3 to 41 tokens, some longer than a sequence, in shards of 4."""
    rng = np.random.default_rng(0)
    docs = [Document(f"doc-{i:03d}", [TextSegment("".join(chr(97 + c) for c in rng.integers(0, 26, 3 * i + 1)))])
            for i in range(13)]
    out = tmp_path_factory.mktemp("shards")
    prepare(docs, {"text": FakeText()}, vocab, out, num_workers=0, shard_size=4, show_progress=False)
    return out


def take(loader: PackedLoader, n: int) -> list:
    return [next(loader) for _ in range(n)]


def stream(loader: PackedLoader, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated documents of the first epochs, and each token's offset in its document."""
    docs = [np.asarray(loader.corpus.document(i)) for e in range(epochs) for i in loader.epoch_order(e)]
    return np.concatenate(docs), np.concatenate([np.arange(len(d)) for d in docs])


def test_every_token_is_the_next_one_of_the_shuffled_document_stream(shards, vocab):
    loader = PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=3)
    n = loader.tokens_per_epoch * 2 // (BATCH * SEQ_LEN) + 1  # runs into the third epoch
    batches = take(loader, n)
    tokens = torch.cat([b.tokens.reshape(-1) for b in batches]).numpy()
    expected, _ = stream(loader, 3)
    np.testing.assert_array_equal(tokens, expected[: len(tokens)])
    assert not np.array_equal(loader.epoch_order(0), loader.epoch_order(1))  # reshuffled per epoch
    assert sorted(loader.epoch_order(0)) == list(range(13))
    for b in batches:
        assert b.tokens.shape == b.modality.shape == b.positions.shape == b.document_ids.shape == (BATCH, SEQ_LEN)
        assert torch.equal(b.modality, vocab.modality_of(b.tokens))


def test_positions_start_at_each_document_and_continue_or_restart_in_a_split_one(shards, vocab):
    bod = vocab.special_id("<bod>")
    cont = PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=1)
    restart = PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=1, positions="restart")
    a, b = take(cont, 12), take(restart, 12)
    _, offsets = stream(cont, 3)
    positions = torch.cat([x.positions.reshape(-1) for x in a]).numpy()
    np.testing.assert_array_equal(positions, offsets[: len(positions)])
    tokens = torch.cat([x.tokens for x in a])
    assert torch.equal(tokens == bod, torch.cat([x.positions for x in a]) == 0)  # 0 exactly at <bod>
    assert (torch.cat([x.positions[:, 0] for x in a]) > 0).any()  # some sequence opens with a continuation
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.tokens, y.tokens)
        # restart: each piece of a document counts from 0, i.e. its offsets minus the piece's first offset
        for r in range(BATCH):
            for d in x.document_ids[r].unique():
                piece = x.positions[r][x.document_ids[r] == d]
                assert torch.equal(y.positions[r][x.document_ids[r] == d], piece - piece[0])


def test_document_mask_matches_a_per_token_reference(shards, vocab):
    loader = PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=0)
    bod = vocab.special_id("<bod>")
    for batch in take(loader, 4):
        ids = batch.document_ids
        # a new document id exactly where a <bod> opens one (or at the start of the sequence)
        starts = torch.cat([torch.ones(BATCH, 1, dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], dim=1)
        assert torch.equal(starts[:, 1:], batch.tokens[:, 1:] == bod)
        mask = batch.attn_mask()
        assert mask.shape == (BATCH, 1, SEQ_LEN, SEQ_LEN) and mask.dtype == torch.bool
        reference = torch.zeros_like(mask)
        for r in range(BATCH):
            for q in range(SEQ_LEN):
                for k in range(SEQ_LEN):
                    reference[r, 0, q, k] = k <= q and bool(ids[r, q] == ids[r, k])
        assert torch.equal(mask, reference)
    assert torch.equal(document_causal_mask(torch.zeros(1, 3, dtype=torch.long))[0, 0],
                       torch.ones(3, 3, dtype=torch.bool).tril())


def test_same_seed_same_batches_other_seed_other_batches(shards, vocab):
    first = [b.tokens for b in take(PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=7), 5)]
    again = [b.tokens for b in take(PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=7), 5)]
    other = [b.tokens for b in take(PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=8), 5)]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))


def test_resume_from_a_state_mid_document_gives_the_same_next_batches(shards, vocab):
    loader = PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=5)
    next(loader)
    while loader.offset == 0:  # stop where a document is carried over into the next batch
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # checkpoints may store it as JSON
    assert state["offset"] > 0 and state["epoch"] == 0
    expected = take(loader, 8)
    assert loader.epoch == 1  # the 8 batches run into the next epoch
    resumed = PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=5)
    resumed.load_state_dict(state)
    for x, y in zip(expected, take(resumed, 8), strict=True):
        for field in ("tokens", "modality", "positions", "document_ids"):
            assert torch.equal(getattr(x, field), getattr(y, field)), field
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(shards, vocab, BATCH, SEQ_LEN, seed=6).load_state_dict(state)


def test_eval_split_holds_out_a_deterministic_disjoint_fraction(shards, vocab):
    train = PackedLoader(shards, vocab, BATCH, SEQ_LEN, split="train", eval_fraction=0.3)
    evals = PackedLoader(shards, vocab, BATCH, SEQ_LEN, split="eval", eval_fraction=0.3)
    assert set(train.documents).isdisjoint(evals.documents)
    assert sorted([*train.documents, *evals.documents]) == list(range(13)) and len(evals.documents) > 0
    held_ids = {evals.corpus.ids[i] for i in evals.documents}
    assert held_ids == {i for i, h in zip(evals.corpus.ids, held_out(evals.corpus.ids, 0.3), strict=True) if h}
    assert sorted(evals.epoch_order(0)) == sorted(evals.documents)
    ids = [f"pair-{i}#{order}" for i in range(400) for order in ("image-text", "text-image")]
    held = held_out(ids, 0.25)
    assert np.array_equal(held[0::2], held[1::2])  # both orders of a pair on the same side
    assert 0.18 < held.mean() < 0.32
    assert np.array_equal(held, held_out(ids, 0.25)) and not np.array_equal(held, held_out(ids, 0.25, split_seed=1))


def test_shards_for_another_vocabulary_are_refused(shards):
    other = UnifiedVocab(tiny_config(n_special_tokens=16))
    with pytest.raises(ValueError, match="vocabulary layout"):
        PackedLoader(shards, other, BATCH, SEQ_LEN)


def test_condition_dropout_removes_leading_captions_reproducibly(tmp_path):
    from mot.data.documents import ImageSegment
    from tests.fakes import FakeImage

    rng = np.random.default_rng(0)
    docs = [Document(f"d{i}", [TextSegment("caption"), ImageSegment(data=rng.integers(0, 255, (16, 16, 3),
                                                                                     dtype=np.uint8))])
            for i in range(40)]
    docs.append(Document("text-only", [TextSegment("no image here")]))
    vocab = UnifiedVocab(tiny_config())
    prepare(docs, {"text": FakeText(), "image": FakeImage()}, vocab, tmp_path, num_workers=0, show_progress=False)
    bod, boi = vocab.special_id("<bod>"), vocab.special_id("<boi>")

    def documents(p: float, epoch: int = 0) -> list[np.ndarray]:
        loader = PackedLoader(tmp_path, vocab, 1, 16, condition_dropout=p)
        loader.epoch = epoch
        return [loader._document(i) for i in range(len(loader.corpus.ids))]

    whole, none, half = documents(0.0), documents(1.0), documents(0.5)
    captioned = [i for i, d in enumerate(whole) if boi in d]
    assert len(captioned) == 40
    for i in captioned:  # p = 1: every caption gone, the image kept whole
        assert list(none[i][:2]) == [bod, boi]
        np.testing.assert_array_equal(none[i][1:], whole[i][list(whole[i]).index(boi):])
    text_only = len(whole) - 1 if boi not in whole[-1] else None
    assert text_only is not None and np.array_equal(none[text_only], whole[text_only])  # nothing to drop
    dropped = sum(len(half[i]) < len(whole[i]) for i in captioned)
    assert 10 <= dropped <= 30
    assert all(np.array_equal(a, b) for a, b in zip(half, documents(0.5), strict=True))  # reproducible
    assert any(not np.array_equal(a, b) for a, b in zip(half, documents(0.5, epoch=1), strict=True))
