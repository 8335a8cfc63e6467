"""The shard files on disk: writing one shard atomically, checking a shard is complete, reading them back.

Per shard `shard-NNNNNN`: `.tokens.npy` (int32 unified ids, documents back to back), `.offsets.npy` (int64,
D + 1 entries from 0), `.json` (ids, counts, skipped documents; written last, so its presence after the two
arrays means the shard is complete). `manifest.json` lists the shards (see prepare.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

SCHEMA_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write to a temporary name in the same folder, flush to disk, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ids_digest(input_ids: list[str]) -> str:
    return hashlib.blake2b("\n".join(input_ids).encode(), digest_size=16).hexdigest()


def write_shard(out: Path, index: int, input_ids: list[str], arrays: list[np.ndarray], ids: list[str],
                skipped: list[dict]) -> dict:
    """Write shard `index` (the encoded documents of a chunk whose documents were `input_ids`) atomically;
    its metadata last, so a shard with metadata is whole."""
    tokens = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    name = shard_name(index)
    _atomic_write(out / f"{name}.tokens.npy", lambda f: np.save(f, tokens))
    _atomic_write(out / f"{name}.offsets.npy", lambda f: np.save(f, offsets))
    meta = {
        "schema_version": SCHEMA_VERSION, "index": index, "name": name,
        "input_documents": len(input_ids), "input_digest": _ids_digest(input_ids),
        "documents": len(ids), "tokens": int(tokens.size), "ids": ids, "skipped": skipped,
    }
    write_json(out / f"{name}.json", meta)
    return meta


def complete_shard(out: Path, index: int, input_ids: list[str]) -> dict | None:
    """The shard's metadata if shard `index` is whole and was made from documents with these same ids, else
    None."""
    name = shard_name(index)
    meta = read_json(out / f"{name}.json")
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        return None
    if meta.get("input_documents") != len(input_ids) or meta.get("input_digest") != _ids_digest(input_ids):
        return None
    try:
        tokens = np.load(out / f"{name}.tokens.npy", mmap_mode="r")
        offsets = np.load(out / f"{name}.offsets.npy")
    except (OSError, ValueError):
        return None
    if tokens.shape != (meta["tokens"],) or offsets.shape != (meta["documents"] + 1,):
        return None
    if offsets[0] != 0 or offsets[-1] != meta["tokens"]:
        return None
    return meta


class ShardedCorpus:
    """Prepared shards, memory-mapped: any document's tokens without reading the others."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = read_json(self.folder / "manifest.json")
        if not isinstance(manifest, dict):
            raise FileNotFoundError(f"{self.folder / 'manifest.json'}: missing or unreadable; run `mot prepare` first")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{self.folder}: shard schema version {manifest.get('schema_version')}, this code reads "
                             f"{SCHEMA_VERSION}; prepare the corpus again")
        self.manifest = manifest
        self.tokens: list[np.ndarray] = []
        shard_of, starts, lengths, self.ids = [], [], [], []
        for i, shard in enumerate(manifest["shards"]):
            tokens = np.load(self.folder / shard["tokens_file"], mmap_mode="r")
            offsets = np.load(self.folder / shard["offsets_file"])
            meta = read_json(self.folder / shard["meta_file"]) or {}
            if tokens.shape != (shard["tokens"],) or offsets.shape != (shard["documents"] + 1,):
                raise ValueError(f"{self.folder / shard['name']}: files disagree with manifest.json; prepare again")
            self.tokens.append(tokens)
            shard_of.append(np.full(shard["documents"], i, dtype=np.int32))
            starts.append(offsets[:-1])
            lengths.append(np.diff(offsets))
            self.ids.extend(meta.get("ids") or [f"{shard['name']}:{d}" for d in range(shard["documents"])])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dtype=dt)
        self.shard_of = cat(shard_of, np.int32)
        self.starts, self.lengths = cat(starts, np.int64), cat(lengths, np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, index: int) -> np.ndarray:
        """Unified ids of document `index` (a read-only int32 view into the memory map)."""
        start = self.starts[index]
        return self.tokens[self.shard_of[index]][start : start + self.lengths[index]]
