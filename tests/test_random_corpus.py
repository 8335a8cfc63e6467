"""mot/data/random_corpus.py: documents in the prepared layout, read back by the loader, with the token shares and
lengths asked for. Each document is parsed token by token, independently of how it was written."""

from __future__ import annotations

import numpy as np
import pytest

from mot.data.loader import PackedLoader
from mot.data.random_corpus import write_random_corpus
from mot.data.shards import ShardedCorpus
from mot.vocab import UnifiedVocab
from tests.conftest import tiny_config


def parse(doc: np.ndarray, vocab: UnifiedVocab, image_tokens: int) -> dict[str, int]:
    """Token counts per modality of one document, asserting the grammar <bod> segment* <eod> on the way."""
    special = {name: vocab.special_id(name) for name in ("<bod>", "<eod>", "<boi>", "<eoi>", "<bos>", "<eos>")}
    assert doc[0] == special["<bod>"] and doc[-1] == special["<eod>"]
    counts = {"text": 0, "image": 0, "speech": 0}
    inside, run = None, 0
    for token in doc[1:-1].tolist():
        if token == special["<boi>"] or token == special["<bos>"]:
            assert inside is None, "a span opened inside another"
            inside, run = ("image" if token == special["<boi>"] else "speech"), 0
        elif token == special["<eoi>"] or token == special["<eos>"]:
            assert inside == ("image" if token == special["<eoi>"] else "speech"), "a span closed that was not open"
            if inside == "image":
                assert run == image_tokens, f"an image of {run} codes"
            inside = None
        else:
            r = vocab[inside or "text"]
            assert r.start <= token < r.stop, f"id {token} outside the {r.name} range inside a {inside or 'text'} run"
            counts[r.name] += 1
            run += 1
    return counts


def test_documents_follow_the_layout_with_the_asked_shares(tmp_path):
    vocab = UnifiedVocab(tiny_config())
    manifest = write_random_corpus(tmp_path, vocab, tokens=60_000, doc_len=(200, 800), image_tokens=16,
                                   shard_tokens=20_000, seed=3)
    corpus = ShardedCorpus(tmp_path)
    assert manifest["tokens"] >= 60_000 and len(manifest["shards"]) >= 3
    assert len(corpus) == manifest["documents"]
    totals = {"text": 0, "image": 0, "speech": 0}
    for i in range(len(corpus)):
        doc = np.asarray(corpus.document(i))
        assert 200 <= len(doc) <= 800
        for name, n in parse(doc, vocab, image_tokens=16).items():
            totals[name] += n
    shares = {name: n / sum(totals.values()) for name, n in totals.items()}
    for name, target in {"text": 0.2, "image": 0.62, "speech": 0.18}.items():
        assert shares[name] == pytest.approx(target, abs=0.05), shares


def test_the_loader_packs_it_like_a_prepared_corpus(tmp_path):
    vocab = UnifiedVocab(tiny_config())
    write_random_corpus(tmp_path, vocab, tokens=5_000, doc_len=(20, 60), fractions={"text": 0.5, "speech": 0.5},
                        image_tokens=16)
    batch = next(PackedLoader(tmp_path, vocab, batch_size=2, seq_len=64))
    assert batch.tokens.shape == (2, 64)
    assert not (batch.modality == vocab["image"].index).any()  # no image asked for, none written
    assert (batch.modality == vocab["speech"].index).any() and (batch.modality == vocab["text"].index).any()


def test_bad_arguments_are_named(tmp_path):
    vocab = UnifiedVocab(tiny_config())
    with pytest.raises(ValueError, match="fractions for text/image/speech"):
        write_random_corpus(tmp_path, vocab, tokens=100, doc_len=(10, 20), fractions={"video": 1.0})
    with pytest.raises(ValueError, match="doc_len"):
        write_random_corpus(tmp_path, vocab, tokens=100, doc_len=(20, 10))
