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
`FileRange(tar, offset, size)`, read and decoded later, where a corrupt member is skipped and counted
(corrupt_image / corrupt_audio); a .tar.gz / .tgz is read once, in order, with the bytes in memory.
Skipped and counted here: a sample with media but no (or an empty) caption (missing_caption), a caption that
is not UTF-8 or a json without a caption string (bad_caption), a tar that cannot be opened or is damaged part
way (bad_tar: the samples completed before the damage are kept, the one being read is dropped).

`TarDocuments.parts()` cuts the shards into `TarPart`s that prepare's worker processes read by themselves
(headers, captions and media), so that prepare's main process never parses a tar: a whole tar, or for an
uncompressed tar over PART_BYTES, the samples whose first header lies in one of its byte ranges. A part's
reader walks the headers from the start of the tar up to its range (it seeks over the data), so every part
sees the same samples and the same damage as a whole read; the bad_tar skip is reported by the part in which
the sample being read at the damage began.

The stdlib `tarfile`, not the `webdataset` package: it gives members as byte ranges for the workers to read
lazily, and adds no dependency.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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

__all__ = ["TarDocuments", "TarPart", "is_tar", "read_tar", "split_key"]

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

Skip = Callable[[str, str, str], None]  # skip(document or sample id, reason, detail)


def is_tar(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(TAR_SUFFIXES)


def _stem(path: Path) -> str:
    suffix = next(s for s in TAR_SUFFIXES if path.name.lower().endswith(s))
    return path.name[: -len(suffix)]


def sample_group(path: Path, key: str) -> str:
    """The id group of a tar's sample (the part of its documents' ids before '#')."""
    return f"{_stem(path)}/{key}"


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


class _Walk:
    """Where a walk through a tar is: samples completed so far (from the start of the tar), and the offset of
    the first header of the sample being read (None between samples)."""

    def __init__(self) -> None:
        self.kept, self.reading, self.offset = 0, None, 0


def _samples(path: Path, start: int = 0, stop: int | None = None,
             walk: _Walk | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {extension: caption bytes, media FileRange or bytes}) per sample whose first header is at an offset
    in [start, stop) (stop None: to the end); raises at damage, after yielding the samples completed before it.
    The samples before `start` are walked (headers only, to count them and find the range), not read."""
    walk = walk or _Walk()
    compressed = not path.name.lower().endswith(".tar")
    size = path.stat().st_size
    with tarfile.open(path, "r:gz" if compressed else "r:") as tar:
        key, sample, wanted = None, {}, False
        for member_key, ext, member in _keyed(tar):
            if member_key != key:
                if sample:
                    walk.kept += 1
                    if wanted:
                        yield key, sample
                if stop is not None and member.offset >= stop:
                    return
                key, sample, wanted = member_key, {}, member.offset >= start
                walk.reading = member.offset
            if ext not in _WANTED or ext in sample:  # webdataset refuses a repeated extension; the first is kept
                continue
            if not compressed and member.offset_data + member.size > size:
                raise tarfile.ReadError(f"member {member.name!r} ends past the end of the file (truncated)")
            if not wanted:
                sample[ext] = True  # walked over: only that the sample has members counts
            elif compressed or ext in CAPTION_EXTS:
                sample[ext] = tar.extractfile(member).read()
            else:
                sample[ext] = FileRange(path, member.offset_data, member.size)
        walk.offset = tar.offset
        _check_end(tar)
        if sample:
            walk.kept += 1
            walk.reading = None
            if wanted:
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


def _documents(path: Path, key: str, sample: dict[str, Any], pair_orders: tuple[str, ...],
               skip: Skip) -> list[Document]:
    media = [(kind, next((sample[e] for e in exts if e in sample), None))
             for kind, exts in (("image", IMAGE_EXTS), ("audio", AUDIO_EXTS))]
    media = [(kind, data) for kind, data in media if data is not None]
    if not media:
        return []
    group = sample_group(path, key)
    caption, reason, problem = _caption(sample)
    if caption is None:
        skip(group, reason, f"{path}: sample {key!r}: {problem}")
        return []
    text, docs = TextSegment(caption), []
    for kind, data in media:
        segment = ImageSegment(data=data) if kind == "image" else AudioSegment(data=data)
        docs += pair_documents(group, kind, segment, text, pair_orders)
    return docs


def read_tar(path: Path, pair_orders: tuple[str, ...], skip: Skip, start: int = 0,
             stop: int | None = None) -> Iterator[Document]:
    """The documents of one tar's samples whose first header is at an offset in [start, stop); what is
    skipped goes to skip(id, reason, detail)."""
    walk = _Walk()
    try:
        for key, sample in _samples(path, start, stop, walk):
            yield from _documents(path, key, sample, pair_orders, skip)
    except _TAR_ERRORS as err:
        # Every part of the tar meets the damage at the same sample; the part that sample began in reports it.
        at = walk.offset if walk.reading is None else walk.reading
        if start <= at and (stop is None or at < stop):
            skip(_stem(path), BAD_TAR, f"{path}: {err or type(err).__name__}; samples kept from before the "
                                       f"damage: {walk.kept}")


# An uncompressed tar larger than this is read in parts of about this size, by as many workers. Each part's
# reader walks the headers before its range again, so parts are kept large: at 256 MiB a 1 GiB shard of
# 100 kB JPEGs walks 2.5x its headers in all, against decoding 10,000 images.
PART_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TarPart:
    """The samples of one tar whose first header is at an offset in [start, stop) (stop None: to the end): a
    piece of a TarDocuments that a worker process reads by itself. Picklable and small."""

    path: Path
    pair_orders: tuple[str, ...]
    start: int = 0
    stop: int | None = None
    size: int = 0  # bytes of the range, for progress estimates

    def read(self, skip: Skip) -> Iterator[Document]:
        return read_tar(self.path, self.pair_orders, skip, self.start, self.stop)


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

    def __iter__(self) -> Iterator[Document]:
        self.skipped = []
        for path in self.paths:
            yield from read_tar(path, self.pair_orders, self._skip)

    def parts(self, part_bytes: int | None = None) -> list[TarPart]:
        """The tars as parts for worker processes to read (see the module docstring), in document order:
        documents read part after part are those of a pass over the source, and so are the skips. part_bytes:
        PART_BYTES unless given."""
        part_bytes = part_bytes or PART_BYTES
        parts = []
        for path in self.paths:
            size = path.stat().st_size
            n = 1 if not path.name.lower().endswith(".tar") else max(1, -(-size // part_bytes))
            bounds = [size * i // n for i in range(n)] + [None]
            parts += [TarPart(path, self.pair_orders, bounds[i], bounds[i + 1],
                              (bounds[i + 1] if bounds[i + 1] is not None else size) - bounds[i]) for i in range(n)]
        return parts

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
