"""Manifests: a user's own list of files, as CSV, Parquet or text. One reader for every verb
(``predict --input list.csv`` reads a ``path`` column, a generic dataset manifest ``image,mask``).
"""

from __future__ import annotations

import io

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
    """Column name -> values (as strings, in file order).

    CSV (header row) and Parquet keep their own column names. A ``.txt`` manifest has one row
    per line, named ``text_columns``: with one column the whole line is the value (a path may
    hold spaces), with several the line splits on whitespace into exactly that many fields.
    """
    kind = manifest_format(uri)
    if kind == "text":
        return read_text(uri, text_columns)
    data = io.BytesIO(storage.read_bytes(uri))
    try:
        if kind == "parquet":
            table = pyarrow.parquet.read_table(data)
        else:
            table = pyarrow.csv.read_csv(data)
    except pyarrow.ArrowInvalid as err:
        raise ManifestError(f"{uri}: not a readable manifest ({err})") from None
    return {name: ["" if v is None else str(v) for v in table.column(name).to_pylist()] for name in table.column_names}


def read_text(uri: str, columns: tuple[str, ...]) -> dict[str, list[str]]:
    rows = []
    for number, line in enumerate(storage.iter_lines(uri), 1):
        fields = [line] if len(columns) == 1 else line.split()
        if len(fields) != len(columns):
            expected = " ".join(columns)
            raise ManifestError(f"{uri}:{number}: expected {expected!r}, got {line!r}")
        rows.append(fields)
    return {name: [row[i] for row in rows] for i, name in enumerate(columns)}
