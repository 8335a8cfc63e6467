"""The data commands end to end, as a user runs them: demo corpus -> tokenizers -> shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _mot(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "mot.cli", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_demo_corpus_to_tokenizers_to_shards(tmp_path):
    data, toks, shards = tmp_path / "demo", tmp_path / "tok", tmp_path / "shards"
    _mot("demo-data", "--out", str(data), "--scale", "0.01", "--no-speech")
    docs = data / "documents.jsonl"
    _mot("tokenizer", "train", "text", "--data", str(docs), "--config", "tokenizers/text_demo.toml",
         "--out", str(toks / "text"))
    _mot("tokenizer", "train", "image", "--data", str(docs), "--config", "tokenizers/vqgan_demo.toml",
         "--out", str(toks / "image"), "--steps=2", "--batch_size=2")

    encoded = _mot("tokenizer", "encode", "text", "--tokenizer", str(toks / "text"), "a red circle on the left")
    ids = json.loads(encoded.stdout)
    decoded = _mot("tokenizer", "decode", "text", "--tokenizer", str(toks / "text"), "--ids", json.dumps(ids))
    assert decoded.stdout.strip() == "a red circle on the left"

    image = sorted((data / "images").glob("*.png"))[0]
    codes = json.loads(_mot("tokenizer", "encode", "image", "--tokenizer", str(toks / "image"), str(image)).stdout)
    assert len(codes) == 64 and all(0 <= c < 512 for c in codes)
    _mot("tokenizer", "decode", "image", "--tokenizer", str(toks / "image"), "--ids", json.dumps(codes),
         "--out", str(tmp_path / "decoded.png"))
    assert (tmp_path / "decoded.png").stat().st_size > 0

    _mot("prepare", "--recipe", "recipes/demo.toml", "--data", str(docs), "--tokenizers", str(toks),
         "--out", str(shards), "--workers", "1")
    manifest = json.loads((shards / "manifest.json").read_text())
    tokens = np.concatenate([np.load(p) for p in sorted(shards.glob("shard-*.tokens.npy"))])
    n_docs = sum(1 for _ in docs.open())
    skipped = json.loads((shards / "skipped.json").read_text())
    assert sum(s["documents"] for s in manifest["shards"]) + sum(skipped["counts"].values()) == n_docs
    assert tokens.max() < 1216 and tokens.min() >= 0  # inside the demo recipe's unified vocabulary
