"""Text tokenizer: byte-level BPE trained with Hugging Face `tokenizers`, stored as one `tokenizer.json`.

    tok = TextTokenizer.train(texts, vocab_size=512)      # seconds on a small corpus, offline
    tok.save("out/text")                                  # out/text/tokenizer.json
    tok = TextTokenizer.load("out/text")                  # or any existing tokenizer.json (GPT-2, Llama, ...)

Byte-level means every string encodes without an unknown token and decodes back exactly: the 256 byte
symbols are always in the vocabulary and there is no normalizer.

Local ids 0..vocab_size-1 are the BPE ids, the text modality's range in the unified vocabulary. The
special tokens of `mot.vocab.SPECIAL_TOKENS` are appended after them (ids vocab_size, vocab_size+1, ...)
so that the file also works on its own; the model places its specials elsewhere (`UnifiedVocab.special_id`).
`encode` never emits a special token: a literal "<boi>" in the text is encoded as ordinary bytes, since
documents are data and must not be able to open an image span.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from mot.config import ConfigError, load_dataclass
from mot.tokenize.base import TokenizerError
from mot.vocab import SPECIAL_TOKENS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
# Optional, next to tokenizer.json: {"ids": [the file's id of local id 0, of 1, ...]}. An imported vocabulary
# (Chameleon's) whose text ids are not 0..n-1 in the file: the file stays as it was released.
ID_MAP_FILE = "id_map.json"
BYTE_ALPHABET = 256  # the byte-level pre-tokenizer's symbols; a smaller vocabulary cannot cover all text


@dataclass
class TextTokenizerConfig:
    vocab_size: int = 512  # BPE ids (the text modality's range); the special tokens come on top
    min_frequency: int = 2  # a pair must occur this often in the corpus to be merged


def load_text_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TextTokenizerConfig:
    """A `TextTokenizerConfig` from TOML (e.g. tokenizers/text_demo.toml), every key checked."""
    cfg = load_dataclass(TextTokenizerConfig, path, overrides)
    if cfg.vocab_size < BYTE_ALPHABET:
        raise ConfigError(f"{path}: 'vocab_size' must be >= {BYTE_ALPHABET} (the byte alphabet), got {cfg.vocab_size}")
    if cfg.min_frequency < 1:
        raise ConfigError(f"{path}: 'min_frequency' must be >= 1, got {cfg.min_frequency}")
    return cfg


class TextTokenizer:
    modality = "text"

    def __init__(self, tokenizer: Tokenizer, source: str = "<in memory>", file_ids: list[int] | None = None):
        self._tok = tokenizer
        self.source = source  # where it was loaded from, for error messages
        # Special tokens stay in the input as text. Not stored in tokenizer.json, so set on every construction.
        self._tok.encode_special_tokens = True
        self._n_ids = 1 + max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        # encode can emit every id except the block of special tokens at the top (ours, or GPT-2's <|endoftext|>).
        size = self._n_ids
        while size - 1 in special:
            size -= 1
        self._vocab_size = size
        self._file_ids = None if file_ids is None else torch.tensor(file_ids, dtype=torch.long)
        if self._file_ids is not None:  # local id -> file id, and back (-1: no local id)
            self._vocab_size = len(file_ids)
            self._local = torch.full((self._n_ids,), -1, dtype=torch.long)
            self._local[self._file_ids] = torch.arange(len(file_ids))

    # ------------------------------------------------------------ construction

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        show_progress: bool = True,
        min_frequency: int = 2,
    ) -> TextTokenizer:
        """Train a byte-level BPE with `vocab_size` ids on `texts` (fewer if the corpus has too few pairs)."""
        if vocab_size < BYTE_ALPHABET:
            raise TokenizerError(f"vocab_size must be >= {BYTE_ALPHABET} (the byte alphabet), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        # add_prefix_space=False: a leading space is not invented, so decode(encode(s)) == s exactly.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer)
        # Added after training so they take the ids above the BPE range, not 0..6.
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a folder holding tokenizer.json, or a tokenizer.json file (ours or any other)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: no tokenizer file found (expected {TOKENIZER_FILE} or its folder)")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for bad JSON and bad schema alike
            raise TokenizerError(f"{file}: not a valid tokenizer.json: {err}") from None
        id_map = file.parent / ID_MAP_FILE
        file_ids = json.loads(id_map.read_text())["ids"] if id_map.is_file() else None
        return cls(tok, str(file), file_ids)

    def save(self, folder: str | Path) -> None:
        """Write folder/tokenizer.json atomically (temp file, then rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{TOKENIZER_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str(pretty=True))
            if self._file_ids is not None:
                (folder / ID_MAP_FILE).write_text(json.dumps({"ids": self._file_ids.tolist()}))
            os.replace(tmp, folder / TOKENIZER_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # pickling (prepare's worker processes): the Rust object loses encode_special_tokens, so rebuild from JSON
    def __getstate__(self) -> dict:
        ids = None if self._file_ids is None else self._file_ids.tolist()
        return {"json": self._tok.to_str(), "source": self.source, "file_ids": ids}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["json"]), state["source"], state.get("file_ids"))

    def _to_local(self, ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(ids, dtype=torch.long)
        if self._file_ids is None:
            return ids
        local = self._local[ids]
        if (local < 0).any():
            bad = self._tok.id_to_token(int(ids[local < 0][0]))
            raise TokenizerError(f"text tokenizer ({self.source}): the text encodes to {bad!r}, which is not a "
                                 f"text id of this vocabulary ({ID_MAP_FILE})")
        return local

    # ------------------------------------------------------------ protocol

    @property
    def vocab_size(self) -> int:
        """Ids `encode` can emit (0..vocab_size-1); the special tokens of the file sit above them."""
        return self._vocab_size

    def encode(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise TokenizerError(f"text tokenizer ({self.source}): expected a str, got {type(text).__name__}")
        # add_special_tokens=False: no post-processor BOS/EOS (a loaded tokenizer may have one).
        return self._to_local(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[torch.Tensor]:
        """Like `encode` on each text, with the library's thread pool."""
        if self._tok.padding is not None:  # a loaded tokenizer.json may pad a batch to its longest text
            return [self.encode(text) for text in texts]
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._to_local(e.ids) for e in encodings]

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1:
            raise TokenizerError(f"text tokenizer ({self.source}): decode takes 1-D ids, got shape {tuple(ids.shape)}")
        n_ids = self._n_ids if self._file_ids is None else len(self._file_ids)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_ids):
            raise TokenizerError(
                f"text tokenizer ({self.source}): ids must be in 0..{n_ids - 1}, "
                f"got {int(ids.min())}..{int(ids.max())}"
            )
        if self._file_ids is not None:
            ids = self._file_ids[ids]
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    # ------------------------------------------------------------ standalone use

    def special_token_id(self, name: str) -> int:
        """Id of a special token ("<boi>", ...) in this tokenizer.json; not its id in the unified vocabulary."""
        i = self._tok.token_to_id(name)
        if i is None:
            raise KeyError(f"{self.source}: no special token {name!r}")
        return i

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying Hugging Face tokenizer."""
        return self._tok

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"
