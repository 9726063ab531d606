"""A generic list of URLs (as img2dataset / video2dataset take): CSV, TSV, Parquet or JSON lines, local or remote,
with named url, caption, key and span columns; the other columns are kept in `meta` (all of them, or a list).

`modality: auto` picks by the URL's extension (mesh formats -> 3d, image formats -> image, else video).
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import model_validator

from pipeline.magic import EXTENSIONS, MODALITY
from pipeline.rows import Row, fail, new_row
from pipeline.sources import Read, Source as BaseSource, SourceConfig, text_column, key_column
from pipeline.sources.ids import make_ids
from pipeline.sources.tables import Encoding, detect_encoding, format_of, resolve_files, table_columns
from pipeline.sources.webvid import resolve

_STD = ("id", "group", "order", "bucket")


class Config(SourceConfig):
    type: Literal["url_list"] = "url_list"
    path: str | list[str]
    encoding: Encoding = "auto"  # CSV/TSV text: auto (BOM, else UTF-8) or a codec (latin-1, utf-16, ...)
    url_col: str = "url"
    caption_col: str | None = "caption"
    key_col: str | None = None  # the id key (default: the url)
    span_cols: tuple[str, str] | None = None  # start and end seconds of a clip
    modality: Literal["auto", "image", "video", "3d"] = "auto"
    extra_columns: list[str] | Literal["all"] = "all"
    base_dir: str | None = None

    @model_validator(mode="after")
    def _distinct(self):
        named = [c for c in (self.url_col, self.caption_col, self.key_col, *(self.span_cols or ())) if c]
        if len(set(named)) != len(named):
            raise ValueError(f"url_col, caption_col, key_col and span_cols must differ: {named}")
        return self


def _seconds(col: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"span column {col!r}: got {text!r}, not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"span column {col!r}: got {text!r}, not a finite number")
    return value


def modality_of(uri: str) -> str:
    fmt = EXTENSIONS.get(PurePosixPath(urlsplit(uri).path).suffix.lower())
    return MODALITY[fmt] if fmt else "video"


class Source(BaseSource):
    Config = Config
    extra: list[str] = []

    @property
    def branches(self) -> tuple[str, ...]:
        return {"auto": ("media", "3d"), "3d": ("3d",)}.get(self.cfg.modality, ("media",))

    def plan(self) -> Read:
        cfg = self.cfg
        uris = resolve_files(cfg.path, self.storage)
        fmt = {format_of(u) for u in uris}
        if len(fmt) != 1 or None in fmt:
            raise ValueError(f"url_list source {self.name}: mixed or unknown file types in {uris[:5]}")
        fmt = fmt.pop()
        encodings = {u: detect_encoding(u, self.storage, cfg.encoding) for u in uris} if fmt == "csv" else {}
        columns = table_columns(uris[0], fmt, self.storage, encodings.get(uris[0]))
        if cfg.url_col not in columns:
            raise ValueError(f"{uris[0]}: no url column {cfg.url_col!r} (columns: {columns})")
        for what, col in (("key", cfg.key_col), *(("span", c) for c in cfg.span_cols or ())):
            if col and col not in columns:  # a missing key column would give every row the same id
                raise ValueError(f"{uris[0]}: no {what} column {col!r} (columns: {columns})")
        extra = columns if cfg.extra_columns == "all" else cfg.extra_columns
        self.extra = [c for c in extra if c not in self._named() and c not in _STD]  # fixed: blocks share a schema
        return Read(fmt, uris=uris, columns=columns if fmt == "csv" else None, encodings=encodings)

    def _named(self) -> list[str]:
        cfg = self.cfg
        return [c for c in (cfg.url_col, cfg.caption_col, cfg.key_col, *(cfg.span_cols or ())) if c]

    def keys(self, raw: pa.Table) -> pa.Table:
        cfg = self.cfg
        url = text_column(raw, cfg.url_col)
        ids = make_ids(self.name, key_column(raw, cfg.key_col or cfg.url_col, self.id_rule), self.id_rule)
        kept = {f"x:{c}": text_column(raw, c) for c in self.extra}
        named = {f"n:{c}": text_column(raw, c) for c in self._named()}
        return pa.table({"id": ids, "group": ids, "order": url, **named, **kept})

    def describe(self, rows: pa.Table) -> list[Row]:
        cfg = self.cfg
        recs = rows.to_pylist()
        out = []
        for r in recs:
            uri = resolve((r.get(f"n:{cfg.url_col}") or "").strip(), cfg.base_dir)
            modality = modality_of(uri) if cfg.modality == "auto" else cfg.modality
            meta = {k[2:]: v for k, v in r.items() if k.startswith("x:")}
            row = new_row(
                r["id"],
                modality,
                self.name,
                uri=uri,
                bucket=r["bucket"],
                caption=(r.get(f"n:{cfg.caption_col}") or "") if cfg.caption_col else "",
                meta=json.dumps(meta, sort_keys=True, default=str),
            )
            try:
                if not uri:
                    raise ValueError(f"empty {cfg.url_col}")
                cells = [(c, (r.get(f"n:{c}") or "").strip()) for c in cfg.span_cols or ()]
                if any(v for _, v in cells):  # both cells empty: no span (a whole video, an image)
                    start, end = (_seconds(c, v) for c, v in cells)
                    if not end > start >= 0:
                        raise ValueError(f"bad span [{start}, {end}]")
                    row.update(span_start=start, span_end=end)
            except (TypeError, ValueError) as exc:
                row = fail(row, "source", str(exc))
            out.append(row)
        return out
