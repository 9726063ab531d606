"""Reading table sources (CSV, TSV, Parquet, JSON lines) from any storage, on the driver (headers only) and
in-process (`read_local`, the no-Ray path). Ray Data reads the same files in the wiring."""

from __future__ import annotations

import codecs
import csv
import fnmatch
import io
from typing import Annotated, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import AfterValidator

from pipeline.storage import Storage, StorageOptions, filesystem, open_uri, split_uri

FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv.gz": "csv",
    ".tsv.gz": "csv",
    ".jsonl.gz": "json",
}
CSV_BLOCK_BYTES = 64 << 20  # a CSV row may be this long; ~one block of rows per parse step
HEAD_BYTES = 1 << 16  # what encoding detection and headers read
ROW_ERROR = "_row_error"  # rows that did not parse (CSV, JSON lines): why (null for the others)
UNPARSED = b"\x00unparsed-"  # the marker in every column of such a row (+ a hash of its text)
FILE_COL, LINE_COL = "_file", "_line"  # where a raw row came from: its file's label and its line (or row) number
JSON_BLOCK_BYTES = 16 << 20  # JSON lines parsed per step


def format_of(uri: str) -> str | None:
    name = uri.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return FORMATS[ext]
    return None


def resolve_files(
    paths: str | list[str],
    options: StorageOptions | None = None,
    matches=format_of,
    one: str = "source file",
    many: str = "table files",
) -> list[str]:
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


def _head(uri: str, options: StorageOptions | None, size: int = HEAD_BYTES) -> bytes:
    """The first `size` bytes of a file (decompressed for .gz)."""
    with open_uri(uri, options) as f:
        head = f.read(size)
    if uri.lower().endswith(".gz") and head:
        import gzip
        import zlib

        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(head)).read1(size)
        except (EOFError, OSError, zlib.error):
            pass
    return head


def check_encoding(name: str) -> str:
    """A job file's `encoding:` value: `auto` or a codec Python knows."""
    if name != "auto":
        try:
            codecs.lookup(name)
        except LookupError:
            raise ValueError(
                f"unknown encoding {name!r} (auto, or a Python codec such as utf-8, utf-16, latin-1, cp1252)"
            ) from None
    return name


Encoding = Annotated[str, AfterValidator(check_encoding)]  # the `encoding:` key of table sources


def detect_encoding(uri: str, options: StorageOptions | None = None, declared: str = "auto") -> str:
    """The codec a CSV/TSV is read with: the declared one (checked against the file's head), or from a BOM
    (UTF-8, UTF-16, UTF-32), UTF-16 without one (NUL bytes), else UTF-8. A header that is not UTF-8 is refused
    with what to set."""
    head = _head(uri, options)
    if declared != "auto":
        try:
            codecs.getincrementaldecoder(declared)().decode(head, final=False)
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{uri}: not {declared} (byte {exc.start}: {exc.reason}); fix the source's `encoding:`"
            ) from None
        return declared
    for bom, name in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF8, "utf8"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if head.startswith(bom):
            return name
    even, odd = head[0:2000:2], head[1:2000:2]
    if len(head) >= 4 and odd.count(0) > 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
        return "utf-16-le"
    if len(head) >= 4 and even.count(0) > 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
        return "utf-16-be"
    header = head.split(b"\n", 1)[0] if b"\n" in head or len(head) < HEAD_BYTES else b""
    if not _is_utf8(header):
        raise ValueError(
            f"{uri}: not UTF-8 (its header line has invalid bytes); set the source's `encoding:` "
            "(e.g. latin-1, cp1252, utf-16)"
        )
    return "utf8"  # bad bytes in a row: its id hashes them raw, its text has U+FFFD (name latin-1 etc. in `encoding:`)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def csv_header(uri: str, options: StorageOptions | None = None, encoding: str | None = None) -> list[str]:
    """Column names from the first line of a CSV/TSV (quoted names allowed), in the file's encoding."""
    encoding = encoding or detect_encoding(uri, options)
    head = _head(uri, options)
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    text = codecs.getincrementaldecoder(codec)(errors="replace").decode(head, final=False)
    line = text.splitlines()[:1]
    return next(csv.reader(line, delimiter=delimiter(uri)), []) if line else []


def table_columns(uri: str, fmt: str, options: StorageOptions | None = None, encoding: str | None = None) -> list[str]:
    """Column names of a table file: the CSV header, the Parquet schema, or the first JSON record's keys."""
    if fmt == "csv":
        return csv_header(uri, options, encoding)
    with open_uri(uri, options) as f:
        if fmt == "parquet":
            return pq.ParquetFile(f).schema_arrow.names
        first = f.read(1 << 20).split(b"\n", 1)[0]
    import json

    return list(json.loads(first)) if first.strip() else []


def csv_options(uri: str, columns: list[str], encoding: str = "utf8") -> dict:
    """pyarrow CSV options: every column as binary (decoded on the workers, so bad bytes fail one row, not the
    job), quoted newlines allowed, large blocks so one long field does not abort the read."""
    return dict(
        read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False, encoding=encoding),
        parse_options=pacsv.ParseOptions(delimiter=delimiter(uri), newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in columns}, strings_can_be_null=False),
    )


class _BadRows:
    """pyarrow's invalid_row_handler: rows with the wrong number of fields are kept here, not fatal."""

    def __init__(self):
        self.rows: list = []

    def __call__(self, row) -> str:
        self.rows.append(row)
        return "skip"


def file_labels(uris: list[str]) -> dict[str, str]:
    """Short names of a source's files for row positions (`<label>:<line>`): their paths below the folder they
    share (the file name for a single file), so a position does not change when the whole tree moves."""
    parts = [str(u).split("/") for u in uris]
    common = 0
    if len(parts) > 1:
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
    else:
        common = len(parts[0]) - 1 if parts else 0
    return {u: "/".join(p[common:]) for u, p in zip(uris, parts)}


def with_position(table: pa.Table, label: str, lines) -> pa.Table:
    """`table` plus FILE_COL (the file's label) and LINE_COL (each row's line or row number in that file)."""
    table = table.append_column(FILE_COL, pa.array([label] * table.num_rows, pa.string()))
    return table.append_column(LINE_COL, pa.array(lines, pa.int64()))


def read_csv_stream(
    f, uri: str, columns: list[str], encoding: str = "utf8", label: str | None = None
) -> Iterator[pa.Table]:
    """The tables of one CSV/TSV stream, every column binary plus `ROW_ERROR` (null for good rows) and the rows'
    positions (FILE_COL, LINE_COL: the record's number counting the header as 1, the line number unless a quoted
    field spans lines). A row that does not parse (the wrong number of fields) becomes a row of its own: every
    column holds an `UNPARSED` marker unique to its text and file, and `ROW_ERROR` says why, so it is recorded
    as that row's failure."""
    label = label or split_uri(uri)[1]
    opts = csv_options(uri, columns, encoding)
    bad = _BadRows()
    opts["parse_options"].invalid_row_handler = bad
    reader = pacsv.open_csv(f, **opts)
    schema = pa.schema(list(reader.schema) + [pa.field(ROW_ERROR, pa.string())])
    last, skipped = 1, set()  # the last record numbered (1: the header); records skipped as unparsable
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            batch = None
        good = batch.num_rows if batch is not None else 0
        numbers = [r.number for r in bad.rows]
        if all(n is not None for n in numbers):  # the good records are the numbers no skipped record has
            skipped.update(numbers)
            lines = []
            while len(lines) < good:
                last += 1
                if last not in skipped:
                    lines.append(last)
            skipped = {n for n in skipped if n > last}
        else:  # (pyarrow did not number them: the good ones are counted alone)
            lines, last = list(range(last + 1, last + 1 + good)), last + good
        if good:
            table = pa.Table.from_batches([batch]).append_column(ROW_ERROR, pa.nulls(good, pa.string()))
            yield with_position(table, label, lines)
        if bad.rows:
            errors = [
                f"unparsable {'row' if r.number is None else f'line {r.number}'} of {label}: expected "
                f"{r.expected_columns} fields, got {r.actual_columns}: {_text(r.text)[:200]!r}"
                for r in bad.rows
            ]
            yield with_position(_unparsed([_text(r.text) for r in bad.rows], errors, label, schema), label, numbers)
            bad.rows = []
        if batch is None:
            return


def _text(text) -> str:
    return text if isinstance(text, str) else str(text)


def _unparsed(texts: list[str], errors: list[str], label: str, schema: pa.Schema) -> pa.Table:
    """Rows that did not parse: an `UNPARSED` marker unique to the text and file in each text column, the reason
    in ROW_ERROR."""
    import hashlib

    name = label.rsplit("/", 1)[-1].encode("utf-8", "surrogateescape")
    markers = [
        UNPARSED + hashlib.sha256(name + b"\0" + t.encode("utf-8", "surrogateescape")).hexdigest()[:16].encode()
        for t in texts
    ]
    cols = {
        f.name: pa.array(markers, pa.binary()).cast(f.type)
        if f.type in (pa.binary(), pa.string())
        else pa.nulls(len(texts), f.type)
        for f in schema
        if f.name != ROW_ERROR
    }
    return pa.table({**cols, ROW_ERROR: pa.array(errors, pa.string())}, schema=schema)


def read_json_stream(f, uri: str, label: str | None = None, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The tables of one JSON-lines stream, with ROW_ERROR and the rows' positions (LINE_COL: the line number).
    A line that is not a JSON object becomes a row of its own, failed with its line number and why (as CSV rows
    that do not parse); the other lines are read as usual."""
    label = label or split_uri(uri)[1]
    schema = pa.schema([pa.field(c, pa.string()) for c in columns or ["_"]])
    line, rest = 0, b""
    while True:
        chunk = f.read(JSON_BLOCK_BYTES)
        data = rest + (chunk or b"")
        cut = data.rfind(b"\n") + 1 if chunk else len(data)
        block, rest = data[:cut], data[cut:]
        if block:
            for table in _json_block(block, line, label, schema):
                schema = pa.schema([c for c in table.schema if c.name not in (ROW_ERROR, FILE_COL, LINE_COL)])
                yield table
            line += block.count(b"\n") + (not block.endswith(b"\n"))
        if not chunk:
            return


def _json_block(block: bytes, line: int, label: str, schema: pa.Schema) -> Iterator[pa.Table]:
    import json

    lines = block.split(b"\n")
    numbered = [(line + i + 1, t) for i, t in enumerate(lines) if t.strip()]
    try:
        table = pajson.read_json(io.BytesIO(block))
        if table.num_rows == len(numbered):
            yield with_position(_ok(table), label, [n for n, _ in numbered])
            return
    except pa.ArrowInvalid:
        pass
    good, bad = [], []  # the slow path, for a block with a bad line: which lines are not JSON objects
    for n, t in numbered:
        try:
            rec = json.loads(t)
            (good if isinstance(rec, dict) else bad).append((n, t, f"not a JSON object: {type(rec).__name__}"))
        except ValueError as exc:
            bad.append((n, t, describe_error(exc)))
    if good:
        table = pajson.read_json(io.BytesIO(b"\n".join(t for _, t, _ in good)))
        schema = table.schema
        yield with_position(_ok(table), label, [n for n, _, _ in good])
    if bad:
        texts = [t.decode("utf-8", "replace") for _, t, _ in bad]
        errors = [f"unparsable line {n} of {label}: {why}: {t[:200]!r}" for (n, _, why), t in zip(bad, texts)]
        full = pa.schema(list(schema) + [pa.field(ROW_ERROR, pa.string())])
        yield with_position(_unparsed(texts, errors, label, full), label, [n for n, _, _ in bad])


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _ok(table: pa.Table) -> pa.Table:
    return table.append_column(ROW_ERROR, pa.nulls(table.num_rows, pa.string()))


def read_parquet_file(f, label: str) -> Iterator[pa.Table]:
    """The tables of one Parquet file (a random-access file), with the rows' positions (LINE_COL: row number)."""
    pf = pq.ParquetFile(f)
    start = 1
    for batch in pf.iter_batches(batch_size=65536):
        table = pa.Table.from_batches([batch])
        yield with_position(table, label, range(start, start + table.num_rows))
        start += table.num_rows


def read_local(source) -> Iterator[pa.Table]:
    """The raw tables of a source's plan, read in this process."""
    plan = source.plan()
    if plan.format == "items":
        for item in plan.items:
            rows = source.list_chunk(item)
            if rows:
                yield pa.Table.from_pylist(rows)
        return
    labels = file_labels(plan.uris)
    for uri in plan.uris:
        fs, path = filesystem(uri, source.storage)
        if plan.format == "parquet":
            with fs.open_input_file(path) as f:
                yield from read_parquet_file(f, labels[uri])
        elif plan.format == "json":
            with fs.open_input_stream(path, compression="detect") as f:
                yield from read_json_stream(f, uri, labels[uri], plan.columns)
        else:
            with fs.open_input_stream(path, compression="detect") as f:
                enc = plan.encodings.get(uri) or detect_encoding(uri, source.storage)
                yield from read_csv_stream(f, uri, csv_header(uri, source.storage, enc), enc, labels[uri])
