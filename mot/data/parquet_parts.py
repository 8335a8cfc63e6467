"""Streamed local parquet cut into row groups that prepare's worker processes read by themselves (issue 17): the
main process never iterates rows nor pickles image bytes, as for tars (tar_source.py).

    parts = parquet_parts("pairs/", "train", rows)   # rows: the source's RowReader; one ParquetPart per row group

The files are those `datasets` streams for the split, in its order (its own data-file resolution), and rows are
numbered across them as it numbers them, so documents, ids and skips equal those of `HFDocuments.__iter__`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ParquetPart:
    """Row group `row_group` of one parquet file, whose first row is row `first` of the source."""

    path: Path
    row_group: int
    first: int
    rows: Any  # mot.data.documents.RowReader (not imported: documents imports this module)
    size: int = 0  # bytes of the row group, for progress estimates

    def read(self, skip) -> Iterator:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(self.path).read_row_group(self.row_group)
        yield from self.rows.read(table.to_pylist(), self.first, skip)


def split_files(source: str | Path, split: str) -> list[Path]:
    """The parquet files `datasets.load_dataset` streams for `split` of a local file or folder, in its order."""
    path = Path(source)
    if path.is_file():
        return [path]
    from datasets.data_files import DataFilesDict, get_data_patterns

    patterns = get_data_patterns(str(path))
    if split not in patterns:
        raise ValueError(f"{source}: no {split!r} split among {sorted(patterns)}")
    files = DataFilesDict.from_patterns({split: patterns[split]}, base_path=str(path))[split]
    return [Path(f) for f in files if str(f).endswith(".parquet")]


def parquet_parts(source: str | Path, split: str, rows: Any) -> list[ParquetPart]:
    import pyarrow.parquet as pq

    parts, first = [], 0
    for path in split_files(source, split):
        meta = pq.ParquetFile(path).metadata
        for group in range(meta.num_row_groups):
            info = meta.row_group(group)
            parts.append(ParquetPart(path, group, first, rows, info.total_byte_size))
            first += info.num_rows
    return parts
