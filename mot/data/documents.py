"""Interleaved documents (text, images, audio in reading order) and the readers that produce them.

A `Document` is an id and a list of segments. Sources (`mot.data.sources.open_documents` picks one):

- JSONL, the corpus format read natively (the demo corpus generator writes it), one document a row:

      {"id": "doc-000001", "segments": [{"type": "text", "text": "..."},
                                        {"type": "image", "path": "images/000001.png"},
                                        {"type": "audio", "path": "audio/000001.wav"}]}

  with paths relative to the JSONL file's folder.
- webdataset-style tar shards (`.tar`, `.tar.gz`, a list of them or a folder of them): image / audio +
  caption samples, read by `mot.data.tar_source.TarDocuments` as captioned pairs (below).
- Any local Hugging Face `datasets` source (a folder, a parquet / jsonl / csv / arrow file, a saved dataset,
  or a `Dataset` object) whose rows have a `segments` column in the same format, or are captioned pairs:
  image + caption, audio + transcript (column names configurable). Each pair gives one document per order,
  `[image, caption]` and `[caption, image]`, with ids `<row id>#image-text` and `<row id>#text-image`
  (audio: `#audio-text`, `#text-audio`); the part before `#` groups them, so a train/eval split keeps
  both orders of one pair on the same side. Parquet (a `.parquet` file or a folder of them) is streamed by
  default: rows are read batch by batch from the files, with no Arrow copy written to the cache; under
  `prepare`, each row group by a worker process (mot/data/parquet_parts.py).

Readers only check that named files exist: a missing one gives a warning naming the row, and the document
is skipped and counted (`source.skipped`). Images and audio (files, bytes, or tar members as `FileRange`s)
are decoded later by `load_image` / `load_audio` (in prepare's workers), where a corrupt one raises
`BadInput` and is skipped and counted there.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mot.data.media import BadInput, load_audio, load_image
from mot.data.parquet_parts import parquet_parts

__all__ = [
    "AudioSegment", "BadInput", "Document", "DocumentList", "DocumentSource", "HFDocuments", "ImageSegment",
    "JsonlDocuments", "Skipped", "TextSegment", "load_audio", "load_image",
]

# Reasons a reader skips a document (prepare adds the decoding and tokenizing ones).
MISSING_FILE = "missing_file"
BAD_ROW = "bad_row"


@dataclass
class TextSegment:
    text: str
    type: ClassVar[str] = "text"


@dataclass
class ImageSegment:
    path: Path | None = None
    # encoded file bytes, a FileRange, a PIL image, an (H, W, 3) uint8 array or a (3, H, W) tensor in [0, 1]
    data: Any = None
    type: ClassVar[str] = "image"


@dataclass
class AudioSegment:
    path: Path | None = None
    data: Any = None  # encoded file bytes, a FileRange, or a waveform array (T,) or (T, channels)
    sample_rate: int | None = None  # required with a waveform array
    type: ClassVar[str] = "audio"


Segment = TextSegment | ImageSegment | AudioSegment


@dataclass
class Document:
    id: str
    segments: list[Segment] = field(default_factory=list)


@dataclass(frozen=True)
class Skipped:
    """A document left out, and why: `reason` is a short key counted in skipped.json, `detail` says where."""

    id: str
    reason: str
    detail: str


class DocumentSourceError(ValueError):
    """A source that cannot be read at all (not found, not local, no usable columns)."""


class DocumentSource:
    """An iterable of documents that records what it skipped (`skipped`, refilled on every pass)."""

    description = "documents"

    def __init__(self) -> None:
        self.skipped: list[Skipped] = []

    def __iter__(self) -> Iterator[Document]:
        raise NotImplementedError

    def size_hint(self) -> int | None:
        """About how many documents a pass yields (for progress bars), or None when unknown."""
        return None

    def parts(self) -> list | None:
        """The source cut into parts that worker processes read by themselves, in document order (each picklable,
        with `read(skip)` -> its documents, skip(id, reason, detail) told what it skips, and `size` in bytes),
        or None: the source is read in the calling process (prepare then hands documents to its workers)."""
        return None

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def _skip(self, doc_id: str, reason: str, detail: str) -> None:
        warnings.warn(f"{detail}; document {doc_id!r} skipped", stacklevel=3)
        self.skipped.append(Skipped(doc_id, reason, detail))


class DocumentList(DocumentSource):
    """Documents already in memory (any iterable of `Document`)."""

    def __init__(self, documents: Iterable[Document], description: str = "in-memory documents"):
        super().__init__()
        self.documents, self.description = documents, description

    def __iter__(self) -> Iterator[Document]:
        self.skipped = []
        yield from self.documents

    def size_hint(self) -> int | None:
        return len(self.documents) if hasattr(self.documents, "__len__") else None


# ---------------------------------------------------------------- segments from rows


def _segment_from_dict(seg: Any, root: Path) -> Segment:
    if not isinstance(seg, dict) or "type" not in seg:
        raise ValueError(f"segment {seg!r} is not an object with a 'type'")
    kind = seg["type"]
    if kind == "text":
        if not isinstance(seg.get("text"), str):
            raise ValueError("text segment without a string 'text'")
        return TextSegment(seg["text"])
    if kind in ("image", "audio", "speech"):
        if not isinstance(seg.get("path"), str) or not seg["path"]:
            raise ValueError(f"{kind} segment without a 'path'")
        path = root / seg["path"]
        return ImageSegment(path=path) if kind == "image" else AudioSegment(path=path)
    raise ValueError(f"unknown segment type {kind!r} (expected 'text', 'image' or 'audio')")


def pair_id(group: str, kind: str, order: str) -> str:
    """The id of a captioned pair's document in one order: "<group>#image-text", "<group>#text-audio", ..."""
    return f"{group}#{order.replace('media', kind)}"


def pair_documents(group: str, kind: str, media: Segment, text: TextSegment, orders: tuple[str, ...]) -> list[Document]:
    """A captioned pair as one document per order: "<group>#image-text" [media, text], "#text-image" [text, media]."""
    return [Document(pair_id(group, kind, order), [media, text] if order == "media-text" else [text, media])
            for order in orders]


def _missing_files(doc: Document) -> list[Path]:
    return [s.path for s in doc.segments if getattr(s, "path", None) is not None and not s.path.is_file()]


def first_row(path: Path) -> dict | None:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return row if isinstance(row, dict) else None
    return None


class JsonlDocuments(DocumentSource):
    """Documents from one or more JSONL files of `{"id", "segments"}` rows (paths relative to each file)."""

    def __init__(self, paths: str | Path | list[str | Path]):
        super().__init__()
        self.paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
        for p in self.paths:
            if not p.is_file():
                raise DocumentSourceError(f"{p}: JSONL file not found")
        self.description = ", ".join(str(p) for p in self.paths)

    def size_hint(self) -> int:
        n = 0
        for path in self.paths:
            with open(path, encoding="utf-8") as f:
                n += sum(1 for line in f if line.strip())
        return n

    def __iter__(self) -> Iterator[Document]:
        self.skipped = []
        for path in self.paths:
            with open(path, encoding="utf-8") as f:
                for row, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    doc_id = f"{path.stem}:{row}"
                    try:
                        obj = json.loads(line)
                        if not isinstance(obj, dict) or not isinstance(obj.get("segments"), list):
                            raise ValueError("expected an object with a 'segments' list")
                        doc_id = str(obj.get("id", doc_id))
                        doc = Document(doc_id, [_segment_from_dict(s, path.parent) for s in obj["segments"]])
                    except ValueError as err:  # JSONDecodeError is a ValueError
                        self._skip(doc_id, BAD_ROW, f"{path}: row {row}: {err}")
                        continue
                    missing = _missing_files(doc)
                    if missing:
                        self._skip(doc_id, MISSING_FILE, f"{path}: row {row}: file not found: {missing[0]}")
                        continue
                    yield doc


# ---------------------------------------------------------------- Hugging Face datasets


def _holds_parquet(path: Path) -> bool:
    return path.suffix == ".parquet" if path.is_file() else next(path.rglob("*.parquet"), None) is not None


def _load_hf(
    source: Any, split: str, data_files: Any, cache_dir: str | None, streaming: bool | None
) -> tuple[Any, Path | None]:
    """(dataset, folder for relative paths) from a Dataset object or a local path; never downloads.
    streaming None: streamed for parquet (a file, or a folder holding them), else memory-mapped Arrow."""
    import datasets

    if isinstance(source, datasets.Dataset | datasets.IterableDataset):
        return source, None
    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        return source[split], None
    path = Path(source)
    if not path.exists():
        raise DocumentSourceError(
            f"{source}: no such local file or folder (documents are read from local files only; nothing is "
            "downloaded)"
        )
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        return (ds[split] if isinstance(ds, datasets.DatasetDict) else ds), path
    stream = _holds_parquet(path) if streaming is None else streaming
    if path.is_dir():
        ds = datasets.load_dataset(str(path), data_files=data_files, split=split, cache_dir=cache_dir,
                                   streaming=stream)
        return ds, path
    builders = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}
    if path.suffix not in builders:
        raise DocumentSourceError(f"{path}: unknown file type {path.suffix!r}; expected one of {sorted(builders)}")
    ds = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir,
                               streaming=stream)
    return ds, path.parent


@dataclass(frozen=True)
class RowReader:
    """How a row of a `datasets` or parquet source becomes documents: a `segments` column, or captioned pairs.
    Picklable: prepare's workers read parquet row groups with it (mot/data/parquet_parts.py)."""

    description: str
    segments_column: str | None
    pairs: tuple[tuple[str, str, str], ...]  # (kind, media column, text column)
    id_column: str
    pair_orders: tuple[str, ...]
    root: Path | None  # folder that relative paths are under

    def media(self, kind: str, value: Any) -> Segment:
        make = ImageSegment if kind == "image" else AudioSegment
        if isinstance(value, dict):
            if value.get("bytes"):
                return make(data=value["bytes"])
            if value.get("array") is not None:  # a decoded audio dict
                return AudioSegment(data=value["array"], sample_rate=value.get("sampling_rate"))
            value = value.get("path")
        if isinstance(value, str | Path):
            path = Path(value)
            return make(path=path if path.is_absolute() or self.root is None else self.root / path)
        if value is None:
            raise ValueError(f"empty {kind} value")
        return make(data=value)

    def documents(self, row: dict, index: int) -> list[Document]:
        base = str(row.get(self.id_column) or f"row-{index:06d}")
        if self.segments_column:
            segs = row[self.segments_column] or []
            root = self.root or Path(".")
            # Parquet gives every struct all keys; drop the None ones before parsing.
            segs = [{k: v for k, v in s.items() if v is not None} if isinstance(s, dict) else s for s in segs]
            return [Document(base, [_segment_from_dict(s, root) for s in segs])]
        docs = []
        for kind, media_col, text_col in self.pairs:
            if row.get(media_col) is None or row.get(text_col) is None:
                continue
            media, text = self.media(kind, row[media_col]), TextSegment(str(row[text_col]))
            docs += pair_documents(base, kind, media, text, self.pair_orders)
        return docs

    def read(self, rows: Iterable[dict], first: int, skip: Callable[[str, str, str], None]) -> Iterator[Document]:
        """The documents of rows numbered from `first`; a bad row or a missing file goes to skip(id, reason,
        detail)."""
        for index, row in enumerate(rows, first):
            try:
                docs = self.documents(row, index)
            except (ValueError, TypeError, AttributeError) as err:
                skip(f"row-{index:06d}", BAD_ROW, f"{self.description}: row {index}: {err}")
                continue
            for doc in docs:
                missing = _missing_files(doc)
                if missing:
                    skip(doc.id, MISSING_FILE, f"{self.description}: row {index}: file not found: {missing[0]}")
                    continue
                yield doc


class HFDocuments(DocumentSource):
    """Documents from a local Hugging Face `datasets` source: a `segments` column, or captioned pairs.

    streaming: read the files as a `datasets.IterableDataset` (nothing converted or cached; size_hint None);
    None = streamed for parquet (a file or a folder holding them), memory-mapped Arrow otherwise. Image bytes
    may be an Image-feature struct ({"bytes", "path"}) or a plain binary column."""

    ORDERS = ("media-text", "text-media")

    def __init__(
        self,
        source: Any,
        *,
        split: str = "train",
        data_files: Any = None,
        segments_column: str = "segments",
        image_column: str = "image",
        caption_column: str = "caption",
        audio_column: str = "audio",
        transcript_column: str = "transcript",
        id_column: str = "id",
        pair_orders: tuple[str, ...] = ORDERS,
        cache_dir: str | None = None,
        streaming: bool | None = None,
    ):
        super().__init__()
        import datasets

        bad = [o for o in pair_orders if o not in self.ORDERS]
        if bad or not pair_orders:
            raise DocumentSourceError(f"pair_orders {pair_orders!r}: choose from {list(self.ORDERS)}")
        ds, self.root = _load_hf(source, split, data_files, cache_dir, streaming)
        self.description = str(source) if not isinstance(source, datasets.Dataset) else "datasets.Dataset"
        columns = list(ds.column_names or ds.features or next(iter(ds), {}))
        self.segments_column = segments_column if segments_column in columns else None
        self.pairs = [
            (kind, media, text)
            for kind, media, text in (("image", image_column, caption_column), ("audio", audio_column,
                                                                               transcript_column))
            if media in columns and text in columns
        ]
        if not self.segments_column and not self.pairs:
            raise DocumentSourceError(
                f"{self.description}: columns {columns} hold neither a {segments_column!r} column nor captioned "
                f"pairs ({image_column!r} + {caption_column!r}, or {audio_column!r} + {transcript_column!r}); "
                "set segments_column / image_column / caption_column / audio_column / transcript_column"
            )
        # Decode nothing here: bytes go to the workers, where a corrupt file is skipped and counted.
        features = ds.features or {}
        for kind, media, _ in self.pairs:
            feature_type = datasets.Image if kind == "image" else datasets.Audio
            if isinstance(features.get(media), feature_type):
                ds = ds.cast_column(media, feature_type(decode=False))
        self.dataset, self.id_column, self.pair_orders = ds, id_column, pair_orders
        self._len = len(ds) if isinstance(ds, datasets.Dataset) else None
        self.rows = RowReader(self.description, self.segments_column, tuple(self.pairs), id_column,
                              tuple(pair_orders), self.root)
        self._parquet = (source, split) if data_files is None and self._len is None and isinstance(source, str | Path) \
            and _holds_parquet(Path(source)) else None

    def __iter__(self) -> Iterator[Document]:
        self.skipped = []
        yield from self.rows.read(self.dataset, 0, self._skip)

    def parts(self) -> list | None:
        """Streamed local parquet: one part per row group, read by prepare's workers (parquet_parts.py)."""
        if self._parquet is None:
            return None
        try:
            return parquet_parts(*self._parquet, self.rows)
        except ValueError as err:
            raise DocumentSourceError(str(err)) from err

    def size_hint(self) -> int | None:
        if self._len is None:  # streaming
            return None
        return self._len * (len(self.pair_orders) * len(self.pairs) if not self.segments_column else 1)
