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
from pipeline.rows import Row
from pipeline.storage import StorageOptions

BRANCHES = ("media", "3d")
_TYPE = re.compile(r"^[a-z][a-z0-9_]*$")


class SourceConfig(Config):
    type: str
    name: str | None = None                        # name in ids and shards (default: the type)
    limit: int | None = Field(None, ge=1)          # at most N samples (a sample of the source, not "the first N")
    licence: str | None = None                     # its samples' licence where they state none (pipeline/licences.py)

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
    columns: list[str] | None = None               # csv: header names, all read as binary (decoded on workers)


class Source:
    Config: ClassVar[type[SourceConfig]] = SourceConfig
    branches: ClassVar[tuple[str, ...]] = ("media",)  # what it can yield: media (images, videos) and/or 3d
    licence: ClassVar[str] = "unknown"  # the dataset's licence or terms, for rows that state none of their own

    def __init__(self, cfg: SourceConfig, storage: StorageOptions | None = None,
                 require_licence: frozenset[str] | None = None):
        self.cfg = cfg
        self.storage = storage or StorageOptions()
        self.require_licence = require_licence

    def described(self, rows: pa.Table) -> list[Row]:
        """`describe`, then every row's `licence` (its own, the job's `licence:`, else the dataset's) and the job's
        `require_licence` (a row whose licence is not allowed is skipped). What the wiring calls."""
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
    return sorted(m.name for m in pkgutil.iter_modules(here) if not m.name.startswith("_") and m.name != "ids"
                  and m.name != "tables")


def source_config(data: dict, index: int = 0) -> SourceConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"sources.{index}: expected a mapping, got {data!r}")
    mod = source_module(data.get("type", ""), f"sources.{index}.type")
    return validate(mod.Source.Config, data, prefix=f"sources.{index}")


def make_source(cfg: SourceConfig, storage: StorageOptions | None = None,
                require_licence: frozenset[str] | None = None) -> Source:
    return source_module(cfg.type).Source(cfg, storage, require_licence)


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
            return pa.array([None if v is None else v.decode("utf-8", "replace") for v in col.to_pylist()],
                            pa.string())
    if pa.types.is_nested(col.type):  # lists, structs, maps (Parquet, JSON lines) have no cast: JSON text
        import json
        return pa.array([None if v is None else json.dumps(v, sort_keys=True, default=str)
                         for v in col.to_pylist()], pa.string())
    return pc.cast(col, pa.string())


def texts(table: pa.Table, name: str) -> list[str]:
    """A column as stripped Python strings ('' for nulls)."""
    return [(v or "").strip() for v in text_column(table, name).to_pylist()]


def iter_rows(source: Source) -> Iterator[Row]:
    """The source's descriptor rows in-process (no Ray, no resume filter): for tests and small tools."""
    from pipeline.sources.tables import read_local
    from pipeline.sources.ids import bucket_of

    seen = 0
    for raw in read_local(source):
        keyed = source.keys(raw)
        keyed = keyed.append_column("bucket", pa.array(bucket_of(keyed.column("group"), 1), pa.int32()))
        for row in source.described(keyed):
            if source.cfg.limit is not None and seen >= source.cfg.limit:
                return
            seen += 1
            yield row
