"""Byte-level BPE text tokenizer: lossless, never emits special tokens, loads any tokenizer.json."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from mot.config import ConfigError
from mot.tokenize.base import ModalityTokenizer, TokenizerError
from mot.tokenize.text import TextTokenizer, TextTokenizerConfig, load_text_config
from mot.vocab import SPECIAL_TOKENS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "a red circle on the left and a blue square on the right",
    "a green triangle in the center",
    "a yellow square at the top and a purple circle at the bottom",
    "an orange triangle on the right",
] * 50

HARD_TEXTS = [
    "héllo wörld, naïve café — ¿qué tal?",
    "emoji 😀🎉👩‍👩‍👧 and CJK 漢字かな",
    "  leading spaces,   several   spaces, trailing  ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "",
    " ",
    "<boi><eoi><pad> literal specials <bod>text<eod> <bos> <eos>",
    "\x00 control \x7f chars",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, vocab_size=300, show_progress=False)


def test_train_gives_byte_alphabet_plus_merges(tok):
    assert isinstance(tok, ModalityTokenizer)
    assert tok.modality == "text"
    assert 256 < tok.vocab_size <= 300
    # merges compress the training text well below one id per byte
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize("text", HARD_TEXTS + CORPUS[:4])
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert tok.decode(ids) == text


def test_special_tokens_are_in_the_file_but_never_encoded(tok, tmp_path):
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in data["added_tokens"] if t["special"]}
    assert set(SPECIAL_TOKENS) <= set(added)
    # specials sit above the BPE range, in SPECIAL_TOKENS order
    assert [added[name] for name in SPECIAL_TOKENS] == list(range(tok.vocab_size, tok.vocab_size + len(SPECIAL_TOKENS)))
    assert tok.special_token_id("<boi>") == added["<boi>"]
    for t in (tok, TextTokenizer.load(tmp_path), pickle.loads(pickle.dumps(tok))):
        for text in HARD_TEXTS:
            ids = t.encode(text)
            assert ids.numel() == 0 or int(ids.max()) < t.vocab_size, text
            assert t.decode(ids) == text
        batch = t.encode_batch(HARD_TEXTS)
        assert all(torch.equal(a, t.encode(s)) for a, s in zip(batch, HARD_TEXTS, strict=True))
    # the raw library would have split the literal out as one special id: we must not
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert added["<boi>"] in raw.encode("x <boi> y").ids
    assert added["<boi>"] not in tok.encode("x <boi> y").tolist()
    # decoding a special id (standalone use) shows it
    assert tok.decode([tok.special_token_id("<boi>")]) == "<boi>"


def test_save_load_gives_identical_ids(tok, tmp_path):
    tok.save(tmp_path / "t")
    again = TextTokenizer.load(tmp_path / "t" / "tokenizer.json")
    assert again.vocab_size == tok.vocab_size
    for text in CORPUS[:4] + HARD_TEXTS:
        assert torch.equal(again.encode(text), tok.encode(text))


def test_loads_a_tokenizer_json_made_by_the_raw_library(tmp_path):
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<|endoftext|>"],  # GPT-2 style: special token at id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.load(tmp_path)
    assert tok.vocab_size == raw.get_vocab_size()
    text = "a red circle <|endoftext|> 😀"
    assert tok.encode(text).tolist() != raw.encode(text).ids  # raw splits the special out ...
    assert 0 not in tok.encode(text).tolist()  # ... we never emit it
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(CORPUS[0]).tolist() == raw.encode(CORPUS[0]).ids


def test_clear_errors_name_the_file(tok, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer file found"):
        TextTokenizer.load(tmp_path / "nowhere")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=rf"{bad}.*not a valid tokenizer.json"):
        TextTokenizer.load(tmp_path)
    bad.write_text('{"hello": 1}')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        TextTokenizer.load(bad)
    with pytest.raises(TokenizerError, match="ids must be in"):
        tok.decode([tok.vocab_size + 100])
    with pytest.raises(TokenizerError, match="expected a str"):
        tok.encode(b"bytes")
    with pytest.raises(TokenizerError, match=">= 256"):
        TextTokenizer.train(CORPUS, vocab_size=100, show_progress=False)


def test_demo_config_loads_and_checks_keys(tmp_path):
    cfg = load_text_config("tokenizers/text_demo.toml")
    assert cfg == TextTokenizerConfig(vocab_size=512, min_frequency=2)
    (tmp_path / "bad.toml").write_text("vocab_sise = 512\n")
    with pytest.raises(ConfigError, match="did you mean 'vocab_size'"):
        load_text_config(tmp_path / "bad.toml")
    (tmp_path / "small.toml").write_text("vocab_size = 100\n")
    with pytest.raises(ConfigError, match="vocab_size"):
        load_text_config(tmp_path / "small.toml")


def test_encode_batch_equals_encode_even_for_a_file_that_pads_batches(tok, tmp_path):
    texts = CORPUS[:3] + HARD_TEXTS
    assert [t.tolist() for t in tok.encode_batch(texts)] == [tok.encode(t).tolist() for t in texts]
    tok.save(tmp_path / "t")
    raw = Tokenizer.from_file(str(tmp_path / "t" / "tokenizer.json"))
    raw.enable_padding(pad_id=0, pad_token="<pad>")  # as a downloaded tokenizer.json may have it
    raw.save(str(tmp_path / "padded.json"))
    padded = TextTokenizer.load(tmp_path / "padded.json")
    assert padded._tok.padding is not None
    # prepare batch-encodes a chunk's texts: each must get the ids it gets alone, whatever it is batched with
    assert [t.tolist() for t in padded.encode_batch(texts)] == [tok.encode(t).tolist() for t in texts]
