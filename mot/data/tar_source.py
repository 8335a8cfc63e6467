"""webdataset-style tar shards -> captioned-pair documents (`TarDocuments`).

Members are grouped into samples by webdataset's key rule: the member path up to the first dot of its
basename is the key, the rest the extension ("dir/000123.jpg" and "dir/000123.txt" are sample "dir/000123";
a sample's members are consecutive). A sample holds an image (jpg, jpeg, png, webp), a caption (txt, or json
with a "caption" or "text" string) and optionally audio (wav, flac). Like HFDocuments' captioned pairs, each
medium gives one document per order in `pair_orders`:

    <tar stem>/<key>#image-text  [image, caption]        <tar stem>/<key>#text-image  [caption, image]
    <tar stem>/<key>#audio-text  [audio, caption]        <tar stem>/<key>#text-audio  [caption, audio]

The part before '#' groups a sample, so a train/eval split (`loader.held_out`) keeps it together.

Only headers and captions are read here. An uncompressed tar's images and audio become
`FileRange(tar, offset, size)`, read and decoded by prepare's workers, where a corrupt member is skipped and
counted (corrupt_image / corrupt_audio); a .tar.gz / .tgz is read once, in order, with the bytes in memory.
Skipped and counted here: a sample with media but no (or an empty) caption (missing_caption), a caption that
is not UTF-8 or a json without a caption string (bad_caption), a tar that cannot be opened or is damaged part
way (bad_tar: the samples completed before the damage are kept, the one being read is dropped).

The stdlib `tarfile`, not the `webdataset` package: it gives members as byte ranges for the workers to read
lazily, and adds no dependency.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mot.data.documents import (
    AudioSegment,
    Document,
    DocumentSource,
    DocumentSourceError,
    HFDocuments,
    ImageSegment,
    TextSegment,
    pair_documents,
)
from mot.data.media import FileRange

__all__ = ["TarDocuments", "is_tar", "split_key"]

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac")
CAPTION_EXTS = ("txt", "json")
CAPTION_FIELDS = ("caption", "text")

# Reasons the reader skips a sample or the rest of a tar.
MISSING_CAPTION = "missing_caption"
BAD_CAPTION = "bad_caption"
BAD_TAR = "bad_tar"

_WANTED = frozenset(IMAGE_EXTS + AUDIO_EXTS + CAPTION_EXTS)
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def is_tar(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(TAR_SUFFIXES)


def _stem(path: Path) -> str:
    suffix = next(s for s in TAR_SUFFIXES if path.name.lower().endswith(s))
    return path.name[: -len(suffix)]


def split_key(name: str) -> tuple[str, str] | None:
    """webdataset's rule: "dir/000123.seg.jpg" -> ("dir/000123", "seg.jpg") (extension lower-cased); None for
    a basename without a dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _keyed(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) for each regular file with a key, in tar order."""
    while (member := tar.next()) is not None:
        tar.members.clear()  # read once, in order: keep no index of a large shard
        split = split_key(member.name) if member.isfile() else None
        if split is not None:
            yield *split, member


def _check_end(tar: tarfile.TarFile) -> None:
    """tarfile stops silently at a truncated or garbled header: a whole tar ends with a zero block there."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"truncated or damaged at offset {tar.offset} (no end-of-archive block)")


def _samples(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {extension: caption bytes, media FileRange or bytes}) per sample; raises at damage, after
    yielding the samples completed before it."""
    compressed = not path.name.lower().endswith(".tar")
    size = path.stat().st_size
    with tarfile.open(path, "r:gz" if compressed else "r:") as tar:
        key, sample = None, {}
        for member_key, ext, member in _keyed(tar):
            if member_key != key:
                if sample:
                    yield key, sample
                key, sample = member_key, {}
            if ext not in _WANTED or ext in sample:  # webdataset refuses a repeated extension; the first is kept
                continue
            if not compressed and member.offset_data + member.size > size:
                raise tarfile.ReadError(f"member {member.name!r} ends past the end of the file (truncated)")
            if compressed or ext in CAPTION_EXTS:
                sample[ext] = tar.extractfile(member).read()
            else:
                sample[ext] = FileRange(path, member.offset_data, member.size)
        _check_end(tar)
        if sample:
            yield key, sample


def _caption(sample: dict[str, Any]) -> tuple[str | None, str, str]:
    """(caption, "", "") or (None, reason, what is wrong)."""
    try:
        if "txt" in sample:
            text = sample["txt"].decode("utf-8")
        elif "json" in sample:
            obj = json.loads(sample["json"])
            fields = [obj.get(f) for f in CAPTION_FIELDS] if isinstance(obj, dict) else []
            text = next((v for v in fields if isinstance(v, str)), None)
            if text is None:
                return None, BAD_CAPTION, f"json caption without a string {' or '.join(map(repr, CAPTION_FIELDS))}"
        else:
            return None, MISSING_CAPTION, "no txt or json caption"
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, BAD_CAPTION, f"unreadable caption: {err}"
    text = text.strip()
    return (text, "", "") if text else (None, MISSING_CAPTION, "empty caption")


SCANNED_FOR_HINT = 2


class TarDocuments(DocumentSource):
    """Captioned-pair documents from webdataset-style tar shards: one tar, a list of them, or a folder of
    *.tar / *.tar.gz / *.tgz (in name order). See the module docstring."""

    ORDERS = HFDocuments.ORDERS

    def __init__(self, source: str | Path | list[str | Path], *, pair_orders: tuple[str, ...] = ORDERS):
        super().__init__()
        bad = [o for o in pair_orders if o not in self.ORDERS]
        if bad or not pair_orders:
            raise DocumentSourceError(f"pair_orders {pair_orders!r}: choose from {list(self.ORDERS)}")
        paths = [Path(p) for p in (source if isinstance(source, list | tuple) else [source])]
        if len(paths) == 1 and paths[0].is_dir():
            paths = sorted((p for p in paths[0].iterdir() if p.is_file() and is_tar(p)), key=lambda p: p.name)
            if not paths:
                raise DocumentSourceError(f"{source}: no *.tar / *.tar.gz / *.tgz files in the folder")
        for p in paths:
            if not p.is_file() or not is_tar(p):
                raise DocumentSourceError(f"{p}: not a .tar / .tar.gz / .tgz file")
        self.paths, self.pair_orders = paths, tuple(pair_orders)
        names = [str(p) for p in paths]
        self.description = ", ".join(names) if len(names) <= 8 else \
            f"{names[0]}, ..., {names[-1]} ({len(names)} tar files)"
        self._hints: dict[tuple, int] = {}

    def _documents(self, path: Path, key: str, sample: dict[str, Any]) -> list[Document]:
        media = [(kind, next((sample[e] for e in exts if e in sample), None))
                 for kind, exts in (("image", IMAGE_EXTS), ("audio", AUDIO_EXTS))]
        media = [(kind, data) for kind, data in media if data is not None]
        if not media:
            return []
        group = f"{_stem(path)}/{key}"
        caption, reason, problem = _caption(sample)
        if caption is None:
            self._skip(group, reason, f"{path}: sample {key!r}: {problem}")
            return []
        text, docs = TextSegment(caption), []
        for kind, data in media:
            segment = ImageSegment(data=data) if kind == "image" else AudioSegment(data=data)
            docs += pair_documents(group, kind, segment, text, self.pair_orders)
        return docs

    def __iter__(self) -> Iterator[Document]:
        self.skipped = []
        for path in self.paths:
            kept = 0
            try:
                for key, sample in _samples(path):
                    kept += 1
                    yield from self._documents(path, key, sample)
            except _TAR_ERRORS as err:
                self._skip(_stem(path), BAD_TAR, f"{path}: {err or type(err).__name__}; samples kept from before "
                                                  f"the damage: {kept}")

    def size_hint(self) -> int | None:
        """Documents a pass yields if every sample is whole and captioned, from a scan of the first files'
        headers (cached per file while its size and mtime stay) and the sizes of the others; None when a tar is
        compressed (no cheap scan)."""
        if any(not p.name.lower().endswith(".tar") for p in self.paths):
            return None
        # A header scan costs as much as reading the headers for real (prepare's main process does that too),
        # so beyond SCANNED_FOR_HINT files the others are estimated at the scanned ones' media per byte.
        scanned = self.paths[:SCANNED_FOR_HINT]
        total, scanned_bytes = 0, 0
        for path in scanned:
            stat = path.stat()
            cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
            if cache_key not in self._hints:
                self._hints[cache_key] = _count_media(path)
            total, scanned_bytes = total + self._hints[cache_key], scanned_bytes + stat.st_size
        rest = sum(p.stat().st_size for p in self.paths[SCANNED_FOR_HINT:])
        if rest and scanned_bytes:
            total += round(total * rest / scanned_bytes)
        return total * len(self.pair_orders)


def _count_media(path: Path) -> int:
    """Samples with an image plus samples with audio in an uncompressed tar, reading headers only."""
    count, key, kinds = 0, None, set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member_key, ext, _ in _keyed(tar):
                if member_key != key:
                    count, key, kinds = count + len(kinds), member_key, set()
                kind = "image" if ext in IMAGE_EXTS else "audio" if ext in AUDIO_EXTS else None
                if kind:
                    kinds.add(kind)
    except _TAR_ERRORS:
        pass
    return count + len(kinds)
