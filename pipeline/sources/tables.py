"""Reading table sources (CSV, TSV, Parquet, JSON lines) from any storage, on the driver (headers only) and
in-process (`read_local`, the no-Ray path). Ray Data reads the same files in the wiring."""
from __future__ import annotations

import csv
import fnmatch
import io
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.storage import Storage, StorageOptions, filesystem, open_uri, split_uri

FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json",
           ".csv.gz": "csv", ".tsv.gz": "csv", ".jsonl.gz": "json"}
CSV_BLOCK_BYTES = 64 << 20   # a CSV field may be this long; ~one block of rows per parse step


def format_of(uri: str) -> str | None:
    name = uri.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return FORMATS[ext]
    return None


def resolve_files(paths: str | list[str], options: StorageOptions | None = None, matches=format_of,
                  one: str = "source file", many: str = "table files") -> list[str]:
    """URIs of the files named by a path, a directory (every file under it that `matches`) or a glob (`*`, `?`).
    `one` / `many` name them in the errors."""
    out = []
    for p in [paths] if isinstance(paths, str) else list(paths):
        head, name = split_uri(p)
        if any(c in name for c in "*?["):
            st = Storage(head or ".", options)
            out += [st.uri(e.path) for e in st.list() if fnmatch.fnmatch(e.path, name)]
            continue
        st = Storage(p, options)
        if st.is_dir():
            out += [st.uri(e.path) for e in st.list(recursive=True) if matches(e.path)]
        elif st.exists(""):
            out.append(p)
        else:
            raise FileNotFoundError(f"{one} {p} does not exist")
    if not out:
        raise FileNotFoundError(f"no {many} at {paths}")
    return sorted(out)


def delimiter(uri: str) -> str:
    return "\t" if ".tsv" in uri.lower() else ","


def csv_header(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Column names from the first line of a CSV/TSV (quoted names allowed)."""
    with open_uri(uri, options) as f:
        head = f.read(1 << 16)
    if uri.lower().endswith(".gz"):
        import gzip
        head = gzip.GzipFile(fileobj=io.BytesIO(head)).read1(1 << 16) if head else b""
    line = head.decode("utf-8", "replace").splitlines()[:1]
    return next(csv.reader(line, delimiter=delimiter(uri)), []) if line else []


def table_columns(uri: str, fmt: str, options: StorageOptions | None = None) -> list[str]:
    """Column names of a table file: the CSV header, the Parquet schema, or the first JSON record's keys."""
    if fmt == "csv":
        return csv_header(uri, options)
    with open_uri(uri, options) as f:
        if fmt == "parquet":
            return pq.ParquetFile(f).schema_arrow.names
        first = f.read(1 << 20).split(b"\n", 1)[0]
    import json
    return list(json.loads(first)) if first.strip() else []


def csv_options(uri: str, columns: list[str]) -> dict:
    """pyarrow CSV options: every column as binary (decoded on the workers, so bad bytes fail one row, not the
    job), quoted newlines allowed, large blocks so one long field does not abort the read."""
    return dict(
        read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=True),
        parse_options=pacsv.ParseOptions(delimiter=delimiter(uri), newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in columns}, strings_can_be_null=False))


def read_local(source) -> Iterator[pa.Table]:
    """The raw tables of a source's plan, read in this process."""
    plan = source.plan()
    if plan.format == "items":
        for item in plan.items:
            rows = source.list_chunk(item)
            if rows:
                yield pa.Table.from_pylist(rows)
        return
    for uri in plan.uris:
        fs, path = filesystem(uri, source.storage)
        if plan.format == "parquet":
            yield pq.read_table(path, filesystem=fs)
        elif plan.format == "json":
            with fs.open_input_stream(path) as f:
                yield pajson.read_json(f)
        else:
            with fs.open_input_stream(path, compression="detect") as f:
                yield pacsv.read_csv(f, **csv_options(uri, csv_header(uri, source.storage)))
