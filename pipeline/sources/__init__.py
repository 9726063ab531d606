"""Sources: one module per dataset, found by its `type` (`pipeline/sources/<type>.py` defines `Source` + `Config`).

A source never lists its samples on the driver. It says how its raw rows are read (`plan()`: CSV, Parquet or
JSON files that Ray Data reads in parallel, or a short list of listing chunks), and three steps that run on the
workers over Arrow tables:
- `list_chunk(item)`: one listing chunk -> raw rows (folder and listing sources only);
- `keys(raw)`: raw rows -> the same rows plus `id`, `group` (what shares a download; default the id) and `order`
  (a deterministic tie-break between rows with the same id);
- `describe(rows)`: the rows still to do -> descriptor rows (`pipeline.rows.Row`), failed with a reason when bad.

Ids, buckets and the resume filter are the wiring's business (`pipeline/ray_job.py`), and `iter_rows()` runs the
same steps in-process, without Ray, for tests and small tools. A new source is one new module here.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from pipeline.config import Config, ConfigError, validate
from pipeline.rows import Row, fail, new_row
from pipeline.storage import StorageOptions

BRANCHES = ("media", "3d")
_TYPE = re.compile(r"^[a-z][a-z0-9_]*$")


class SourceConfig(Config):
    type: str
    name: str | None = None  # name in ids and shards (default: the type)
    limit: int | None = Field(None, ge=1)  # at most N samples (a sample of the source, not "the first N")
    licence: str | None = None  # its samples' licence where they state none (pipeline/licences.py)

    @field_validator("licence")
    @classmethod
    def _licence(cls, v: str | None) -> str | None:
        from pipeline.licences import normalise

        return normalise(v)

    @property
    def source_name(self) -> str:
        return self.name or self.type


@dataclass
class Read:
    """How Ray Data reads a source: `csv`/`parquet`/`json` files (paths inside `filesystem_uri`'s filesystem),
    or `items` (small listing chunks expanded by `Source.list_chunk` on the workers)."""

    format: Literal["csv", "parquet", "json", "items"]
    uris: list[str] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)
    columns: list[str] | None = None  # csv: header names, all read as binary (decoded on workers)
    encodings: dict[str, str] = field(default_factory=dict)  # csv: uri -> codec (tables.detect_encoding)


class Source:
    Config: ClassVar[type[SourceConfig]] = SourceConfig
    branches: ClassVar[tuple[str, ...]] = ("media",)  # what it can yield: media (images, videos) and/or 3d
    licence: ClassVar[str] = "unknown"  # the dataset's licence or terms, for rows that state none of their own

    def __init__(
        self,
        cfg: SourceConfig,
        storage: StorageOptions | None = None,
        id_rule: int | None = None,
        require_licence: frozenset[str] | None = None,
    ):
        from pipeline.sources.ids import ID_RULE, check_rule

        self.cfg = cfg
        self.storage = storage or StorageOptions()
        self.id_rule = check_rule(ID_RULE if id_rule is None else id_rule)  # the store's (pipeline/sources/ids.py)
        self.require_licence = require_licence

    def described(self, rows: pa.Table) -> list[Row]:
        """`describe`, then every row's `licence` (its own, the job's `licence:`, else the dataset's) and the job's
        `require_licence` (a row whose licence is not allowed is skipped)."""
        from pipeline.licences import apply

        return apply(self.describe(rows), self.cfg.licence or self.licence, self.require_licence)

    @property
    def name(self) -> str:
        return self.cfg.source_name

    def plan(self) -> Read:
        raise NotImplementedError

    def list_chunk(self, item: Any) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} has no listing chunks")

    def keys(self, raw: pa.Table) -> pa.Table:
        raise NotImplementedError

    def describe(self, rows: pa.Table) -> list[Row]:
        raise NotImplementedError


def source_module(type_: str, key: str = "sources.type"):
    """The module `pipeline.sources.<type>` (a source is one module: nothing else registers it)."""
    known = ", ".join(available())
    if not _TYPE.match(type_ or "") or type_ not in available():  # (ids, tables: helper modules, not sources)
        raise ConfigError(f"{key}: got {type_!r}; expected one of {known}")
    try:
        return importlib.import_module(f"pipeline.sources.{type_}")
    except ModuleNotFoundError as exc:
        if exc.name != f"pipeline.sources.{type_}":
            raise
        raise ConfigError(f"{key}: got {type_!r}; expected one of {known}") from None


def available() -> list[str]:
    import pkgutil

    here = __path__  # noqa: F821 (package attribute)
    return sorted(
        m.name
        for m in pkgutil.iter_modules(here)
        if not m.name.startswith("_") and m.name != "ids" and m.name != "tables"
    )


def source_config(data: dict, index: int = 0) -> SourceConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"sources.{index}: expected a mapping, got {data!r}")
    mod = source_module(data.get("type", ""), f"sources.{index}.type")
    return validate(mod.Source.Config, data, prefix=f"sources.{index}")


def make_source(
    cfg: SourceConfig,
    storage: StorageOptions | None = None,
    id_rule: int | None = None,
    require_licence: frozenset[str] | None = None,
) -> Source:
    return source_module(cfg.type).Source(cfg, storage, id_rule, require_licence)


# ---- helpers shared by the source modules --------------------------------------------------------------------


def text_column(table: pa.Table, name: str) -> pa.Array:
    """A column as UTF-8 strings (binary CSV columns decoded; invalid bytes become U+FFFD); absent -> nulls."""
    if name not in table.column_names:
        return pa.nulls(table.num_rows, pa.string())
    col = table.column(name).combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        try:
            return col.cast(pa.string())
        except pa.ArrowInvalid:
            return pa.array([None if v is None else v.decode("utf-8", "replace") for v in col.to_pylist()], pa.string())
    if pa.types.is_nested(col.type):  # lists, structs, maps (Parquet, JSON lines) have no cast: JSON text
        import json

        return pa.array(
            [None if v is None else json.dumps(v, sort_keys=True, default=str) for v in col.to_pylist()], pa.string()
        )
    return pc.cast(col, pa.string())


def key_column(table: pa.Table, name: str, id_rule: int) -> pa.Array:
    """A key column for `make_ids`: its raw bytes (binary CSV columns undecoded) under id rule 2, the decoded text
    under rule 1 (what stores written before rule 2 hashed)."""
    col = table.column(name).combine_chunks() if name in table.column_names else None
    if (
        id_rule > 1
        and col is not None
        and (
            pa.types.is_binary(col.type)
            or pa.types.is_large_binary(col.type)
            or pa.types.is_string(col.type)
            or pa.types.is_large_string(col.type)
        )
    ):
        return col
    return text_column(table, name)


def texts(table: pa.Table, name: str) -> list[str]:
    """A column as stripped Python strings ('' for nulls)."""
    return [(v or "").strip() for v in text_column(table, name).to_pylist()]


def keyed(source: Source, raw: pa.Table) -> pa.Table:
    """`source.keys(raw)`, with each row's position in its file (tables.FILE_COL, LINE_COL; null where the read
    gives none) and ROW_ERROR. Rows that did not parse (ROW_ERROR) are keyed apart (their columns hold a unique
    marker, so each gets an id of its own) and keep their reason. A source whose keys() makes several rows of
    one raw row (the clips of a video) says which raw row each came from in RAW_INDEX."""
    from pipeline.sources.tables import FILE_COL, LINE_COL, ROW_ERROR

    if ROW_ERROR not in raw.column_names:
        raw = raw.append_column(ROW_ERROR, pa.nulls(raw.num_rows, pa.string()))
    for name, typ in ((FILE_COL, pa.string()), (LINE_COL, pa.int64())):
        if name not in raw.column_names:
            raw = raw.append_column(name, pa.nulls(raw.num_rows, typ))
    err = raw.column(ROW_ERROR)
    parts = []
    for part in (raw.filter(pc.is_null(err)), raw.filter(pc.is_valid(err))):
        if part.num_rows or (not parts and not raw.num_rows):
            parts.append(_keyed_part(source, part))
    return pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]


RAW_INDEX = "raw_index"  # keys(): the raw row an output row came from, when keys() expands rows


def _keyed_part(source: Source, raw: pa.Table) -> pa.Table:
    from pipeline.sources.tables import FILE_COL, LINE_COL, ROW_ERROR

    extra = [FILE_COL, LINE_COL, ROW_ERROR]
    out = source.keys(raw.drop_columns(extra))
    if RAW_INDEX in out.column_names:
        index = out.column(RAW_INDEX)
        out = out.drop_columns([RAW_INDEX])
    elif out.num_rows == raw.num_rows:
        index = pa.array(range(raw.num_rows), pa.int64())
    elif raw.column(ROW_ERROR).null_count < raw.num_rows:
        raise RuntimeError(f"source {source.name}: keys() gave {out.num_rows} rows for {raw.num_rows} unparsed rows")
    else:  # rows made from raw rows in a way keys() does not say: no positions
        index = pa.nulls(out.num_rows, pa.int64())
    for name in extra:
        out = out.append_column(name, pc.take(raw.column(name), index))
    return out


def described(source: Source, rows: pa.Table) -> list[Row]:
    """`source.described(rows)`, with the rows that did not parse failed at `source` with their reason, and the
    duplicate rows (DUPLICATE_OF set by the resume filter, their id their own position) failed as duplicates."""
    from pipeline.sources.tables import FILE_COL, LINE_COL

    dups = {}
    if DUPLICATE_OF in rows.column_names:
        dups = {i: why for i, why in zip(rows.column("id").to_pylist(), rows.column(DUPLICATE_OF).to_pylist()) if why}
    out = _described(
        source, rows.drop_columns([c for c in (FILE_COL, LINE_COL, DUPLICATE_OF) if c in rows.column_names])
    )
    if not dups:
        return out
    return [fail(r, "source", dups[r["id"]]) if r["id"] in dups else r for r in out]


def _described(source: Source, rows: pa.Table) -> list[Row]:
    from pipeline.sources.tables import ROW_ERROR

    if ROW_ERROR not in rows.column_names:
        return source.described(rows)
    errors = rows.column(ROW_ERROR).to_pylist()
    rows = rows.drop_columns([ROW_ERROR])
    good = [i for i, e in enumerate(errors) if e is None]
    if len(good) == len(errors):
        return source.described(rows)
    out = source.described(rows.take(good)) if good else []
    ids, buckets = rows.column("id").to_pylist(), rows.column("bucket").to_pylist()
    modality = getattr(source.cfg, "modality", "auto")
    modality = modality if modality != "auto" else "3d" if tuple(source.branches) == ("3d",) else "video"
    bad = [
        (i, fail(new_row(ids[i], modality, source.name, uri="", bucket=buckets[i]), "source", e))
        for i, e in enumerate(errors)
        if e is not None
    ]
    if len(out) != len(good):  # a source that expands rows in describe: its rows first
        return out + [r for _, r in bad]
    merged: list[Row] = [None] * len(errors)  # type: ignore[list-item]
    for i, r in zip(good, out):
        merged[i] = r
    for i, r in bad:
        merged[i] = r
    return merged


DUPLICATE_OF = "_duplicate_of"  # set by the resume filter on a duplicate row: why it is failed (null otherwise)


def duplicate_keys(source: str, files: list, lines: list, ids: list, nth: list) -> list[str]:
    """The ledger key of each duplicate row: `<source>:<file>:<line>`, or `<source>:<id>#<n>` (its n-th repeat)
    where the read gives no position. A ':' is never part of a sample id (pipeline/sources/ids.py), so a
    duplicate's record never lands on the id its first occurrence owns, nor on any other sample's."""
    from pipeline.sources.ids import source_prefix

    prefix = source_prefix(source)
    return [
        f"{prefix}:{f}:{n}" if f is not None and n is not None else f"{prefix}:{i}#{k}"
        for f, n, i, k in zip(files, lines, ids, nth)
    ]


def iter_rows(source: Source) -> Iterator[Row]:
    """The source's descriptor rows in-process (no Ray, no resume filter): for tests and small tools."""
    from pipeline.sources.tables import read_local
    from pipeline.sources.ids import bucket_of

    seen = 0
    for raw in read_local(source):
        keys = keyed(source, raw)
        keys = keys.append_column("bucket", pa.array(bucket_of(keys.column("group"), 1), pa.int32()))
        for row in described(source, keys):
            if source.cfg.limit is not None and seen >= source.cfg.limit:
                return
            seen += 1
            yield row
