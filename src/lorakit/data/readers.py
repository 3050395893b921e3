"""Reading records from files: JSONL, JSON, CSV, Parquet, or a `datasets` directory.

Each reader yields ``(where, record)`` so that a bad record is reported as
``file:line`` (or ``file: record N`` where lines mean nothing). ``pyarrow`` and
``datasets`` are imported only when their format is read.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lorakit.data.errors import DataError
from lorakit.data.formats import Record, resolve_format

Located = Iterator[tuple[str, Any]]


def load_records(path: str | Path, fmt: str = "auto") -> list[Record]:
    """Every record in ``path``, each checked to be readable as ``fmt``.

    Checking here, not at tokenisation, is what lets the error name the line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}")
    records = []
    for where, record in _reader_for(path)(path):
        try:
            resolve_format(record, fmt)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        records.append(record)
    return records


def _reader_for(path: Path) -> Callable[[Path], Located]:
    if path.is_dir():
        return read_saved_dataset
    readers = {".jsonl": read_jsonl, ".ndjson": read_jsonl, ".json": read_json,
               ".csv": read_csv, ".parquet": read_parquet}
    try:
        return readers[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"{path}: unknown data file type {path.suffix!r}; expected one of "
            f"{', '.join(readers)} or a directory saved with datasets' save_to_disk"
        ) from None


def read_jsonl(path: Path) -> Located:
    """One JSON object per line; blank lines are skipped."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"bad JSON: {err.msg} (column {err.colno})"
                raise DataError(f"{path}:{number}: {problem}") from None
            yield f"{path}:{number}", record


def read_json(path: Path) -> Located:
    """A list of records, or an object holding one under "data" or "train"."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: bad JSON: {err.msg} (column {err.colno})") from None
    if isinstance(data, dict):
        key = next((k for k in ("data", "train") if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(f"{path}: a JSON object needs a list under 'data' or 'train' "
                            f"(keys: {', '.join(data)})")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield f"{path}: record {index}", record


def read_csv(path: Path) -> Located:
    """A header row naming the fields; every value is a string."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            # a row with more cells than the header lands under the key None
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}


def read_parquet(path: Path) -> Located:
    import pyarrow.parquet as pq

    for index, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}: row {index}", record


def read_saved_dataset(path: Path) -> Located:
    """A Dataset, or the "train" split (or only split) of a DatasetDict."""
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if "train" in data:
            data = data["train"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise DataError(f"{path}: DatasetDict has splits {list(data)} but no 'train'")
    for index, record in enumerate(data):
        yield f"{path}: row {index}", record
