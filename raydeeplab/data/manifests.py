"""Manifests: a user's own list of files, as CSV, Parquet or text. One reader for every verb
(``predict --input list.csv`` reads a ``path`` column, a generic dataset manifest ``image,mask``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow
import pyarrow.csv
import pyarrow.parquet

from raydeeplab import storage
from raydeeplab.errors import UserError

MANIFEST_EXTENSIONS = (".csv", ".parquet", ".txt")


class ManifestError(UserError):
    """A manifest that cannot be read as the columns asked for; the message names the file."""


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_EXTENSIONS) and not storage.isdir(uri)


def manifest_format(uri: str) -> str:
    """``"text"``, ``"parquet"`` or ``"csv"``, by extension: what this module's reader and the
    batch job's Ray readers both go by."""
    lower = uri.lower()
    return "text" if lower.endswith(".txt") else "parquet" if lower.endswith(".parquet") else "csv"


def read_manifest(uri: str, text_columns: tuple[str, ...]) -> dict[str, list[str]]:
    """Column name -> values (as strings, in file order): :func:`iter_manifest`, whole."""
    columns: dict[str, list[str]] = {}
    for chunk in iter_manifest(uri, text_columns):
        for name, values in chunk.items():
            columns.setdefault(name, []).extend(values)
    return columns


def iter_manifest(uri: str, columns: tuple[str, ...], rows: int = 65536) -> Iterator[dict[str, list[str]]]:
    """The manifest's ``columns`` (name -> values as strings, a null as ""), ``rows`` rows at a
    time (CSV: a block of pyarrow's, 1 MiB), so a list of ten million paths is never held whole;
    an empty manifest is one chunk of empty columns.

    CSV (header row) and Parquet must have the columns by name; only they are read, as text (a
    CSV's other columns are not typed: one that looked numeric for a block and then held text
    ended the read, and a path ``0001`` became ``1``). A ``.txt`` manifest has one row per line:
    with one column the whole line is the value (a path may hold spaces), with several the line
    splits on whitespace into exactly that many fields.
    """
    kind = manifest_format(uri)
    if kind == "text":
        yield from iter_text(uri, columns, rows)
        return
    with storage.open_input(uri) as f:
        try:
            if kind == "parquet":
                parquet = pyarrow.parquet.ParquetFile(f)
                check_columns(uri, columns, parquet.schema_arrow.names)
                batches = parquet.iter_batches(batch_size=rows, columns=list(columns))
            else:
                as_text = pyarrow.csv.ConvertOptions(column_types=dict.fromkeys(columns, pyarrow.string()), include_columns=list(columns))
                batches = pyarrow.csv.open_csv(f, convert_options=as_text)
            empty = True
            for batch in batches:
                empty = False
                yield {name: [text(v) for v in batch.column(name).to_pylist()] for name in columns}
        except KeyError:  # pyarrow: "Column 'path' in include_columns does not exist in CSV file"
            f.seek(0)
            check_columns(uri, columns, pyarrow.csv.open_csv(f).schema.names)
            raise
        except pyarrow.ArrowInvalid as err:
            raise ManifestError(f"{uri}: not a readable manifest ({err})") from None
    if empty:
        yield {name: [] for name in columns}


def check_columns(uri: str, wanted: tuple[str, ...], names: list[str]) -> None:
    if missing := [name for name in wanted if name not in names]:
        raise ManifestError(f"{uri}: no column {', '.join(missing)} (its header: {', '.join(map(repr, names))}); name it so in the header row")


def text(value) -> str:
    """A manifest cell as text: a null is "", bytes (Parquet BINARY without the UTF-8 mark) decoded."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def iter_text(uri: str, columns: tuple[str, ...], rows: int) -> Iterator[dict[str, list[str]]]:
    fields, number = [], 0
    try:
        for number, line in enumerate(storage.iter_lines(uri), 1):
            values = [line] if len(columns) == 1 else line.split()
            if len(values) != len(columns):
                expected = " ".join(columns)
                raise ManifestError(f"{uri}:{number}: expected {expected!r}, got {line!r}")
            fields.append(values)
            if len(fields) == rows:
                yield text_rows(fields, columns)
                fields = []
    except UnicodeDecodeError as err:
        raise ManifestError(f"{uri}: line {number + 1} is not UTF-8 text ({err.reason}); save the list as UTF-8") from None
    if fields or not number:  # an empty manifest still has its columns
        yield text_rows(fields, columns)


def text_rows(fields: list[list[str]], columns: tuple[str, ...]) -> dict[str, list[str]]:
    return {name: [row[i] for row in fields] for i, name in enumerate(columns)}
