"""Any corpus source -> the DocumentSource that reads it (JSONL, webdataset tars, HF datasets / parquet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mot.data.documents import Document, DocumentList, DocumentSource, HFDocuments, JsonlDocuments, first_row
from mot.data.tar_source import TarDocuments, is_tar


def open_documents(source: Any, **options: Any) -> DocumentSource:
    """A DocumentSource for `source`:

    - a DocumentSource: itself; a list of Documents: wrapped;
    - a `.jsonl` file, or a folder holding `.jsonl` files, whose rows have `segments`: the native JSONL reader
      (a folder's files in name order);
    - a `.tar` / `.tar.gz` / `.tgz` file, a list of them, or a folder holding them (and no such JSONL):
      `TarDocuments(source, **options)` (webdataset-style shards);
    - anything else local (a folder, a parquet / jsonl / csv / arrow file, a saved dataset, a `datasets.Dataset`):
      `HFDocuments(source, **options)`.
    """
    if isinstance(source, DocumentSource):
        return source
    if isinstance(source, list | tuple) and all(isinstance(d, Document) for d in source):
        return DocumentList(list(source))
    if isinstance(source, list | tuple) and source and all(isinstance(p, str | Path) and is_tar(p) for p in source):
        return TarDocuments(list(source), **options)
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_file() and path.suffix == ".jsonl" and "segments" in (first_row(path) or {}):
            return JsonlDocuments(path)
        if path.is_file() and is_tar(path):
            return TarDocuments(path, **options)
        if path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            if files and all("segments" in (first_row(f) or {}) for f in files):
                return JsonlDocuments(files)
            if any(is_tar(f) for f in path.iterdir() if f.is_file()):
                return TarDocuments(path, **options)
    return HFDocuments(source, **options)
