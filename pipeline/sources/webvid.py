"""WebVid-10M / 2M CSVs (any column order): `videoid, name (caption), contentUrl, duration, page_idx, page_dir`.

The original URLs are gone (403), so WebVid is read from a mirror, in one of three ways (the first that is set):
- `path_template` under `base_dir`: `base_dir: s3://bucket/webvid/videos`, `path_template: "{page_dir}/{videoid}.mp4"`
  (any column name in braces), the layout most WebVid downloaders write;
- `url_template`: the same as one full template, e.g. `s3://bucket/webvid/videos/{page_dir}/{videoid}.mp4`;
- `url_rewrite`: URL prefixes mapped onto a mirror's (`{"https://ak.picdn.net/shutterstock/videos/":
  "/data/webvid/"}`; the longest matching prefix wins; a URL that no prefix matches is kept);
and `base_dir` alone resolves relative `contentUrl`s.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
from pydantic import field_validator, model_validator

from pipeline.licences import WITHDRAWN
from pipeline.rows import Row, fail, new_row
from pipeline.sources import Read, Source as BaseSource, SourceConfig, text_column, texts, key_column
from pipeline.sources.ids import make_ids
from pipeline.sources.tables import Encoding, csv_header, detect_encoding, format_of, resolve_files
from typing import Literal

COLUMNS = ("videoid", "name", "contentUrl", "duration", "page_idx", "page_dir")
REQUIRED = ("videoid", "name", "contentUrl")
_ISO_DURATION = re.compile(
    r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?"
    r"(?:(\d+(?:\.\d+)?)S)?)?$"
)
_FIELD = re.compile(r"\{(\w+)\}")


class Config(SourceConfig):
    type: Literal["webvid"] = "webvid"
    path: str | list[str]  # CSV/Parquet file(s), a folder of them or a glob; local or remote
    encoding: Encoding = "auto"  # CSV/TSV text: auto (BOM, else UTF-8) or a codec (latin-1, utf-16, ...)
    base_dir: str | None = None  # resolves relative contentUrls (a local or remote mirror)
    url_template: str | None = None  # e.g. "s3://bucket/videos/{page_dir}/{videoid}.mp4"
    path_template: str | None = None  # under base_dir, e.g. "{page_dir}/{videoid}.mp4"
    url_rewrite: dict[str, str] = {}  # URL prefix -> mirror prefix (local path, s3://, https://)

    @field_validator("url_template", "path_template")
    @classmethod
    def _fields(cls, v: str | None) -> str | None:
        return check_template(v, COLUMNS)

    @model_validator(mode="after")
    def _base(self):
        if self.path_template and not self.base_dir:
            raise ValueError("path_template needs base_dir (the mirror's root)")
        return self


def check_template(template: str | None, known) -> str | None:
    unknown = sorted(set(_FIELD.findall(template or "")) - set(known))
    if unknown:
        raise ValueError(f"unknown fields {unknown} in the template; known: {list(known)}")
    return template


def fill(template: str, rec: dict) -> str:
    """'{page_dir}/{videoid}.mp4' with the row's values; '' when a field is empty (the row then fails)."""
    values = {name: (rec.get(name) or "") for name in _FIELD.findall(template)}
    if not all(values.values()):
        return ""
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def rewrite(url: str, mapping: dict[str, str]) -> str:
    """`url` with its longest matching prefix in `mapping` replaced (unchanged when none matches)."""
    for prefix in sorted(mapping, key=len, reverse=True):
        if url.startswith(prefix):
            return mapping[prefix] + url[len(prefix) :]
    return url


def mirror_uri(url: str, rec: dict, cfg) -> str:
    """Where a row's file is read from, per the source's mirror settings (see the module docstring)."""
    if getattr(cfg, "path_template", None):
        rel = fill(cfg.path_template, rec)
        return f"{cfg.base_dir.rstrip('/')}/{rel}" if rel else ""
    if getattr(cfg, "url_template", None):
        return fill(cfg.url_template, rec)
    if cfg.url_rewrite:
        rewritten = rewrite(url, cfg.url_rewrite)
        if rewritten != url:
            return rewritten
    return resolve(url, cfg.base_dir)


def parse_iso_duration(text: str) -> float:
    """'PT00H00M17S' -> 17.0 (days, hours, minutes, seconds; fractional parts allowed)."""
    m = _ISO_DURATION.match(text.strip())
    if not m or text.strip() in ("P", "PT") or not any(m.groups()):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def resolve(uri: str, base_dir: str | None) -> str:
    if base_dir and uri and "://" not in uri and not uri.startswith("/"):
        return f"{base_dir.rstrip('/')}/{uri}"
    return uri


class Source(BaseSource):
    Config = Config
    licence = WITHDRAWN  # WebVid-10M was withdrawn (Shutterstock previews): no licence to use it
    branches = ("media",)

    def plan(self) -> Read:
        uris = resolve_files(self.cfg.path, self.storage)
        fmt = {format_of(u) for u in uris}
        if len(fmt) != 1 or None in fmt:
            raise ValueError(f"webvid source {self.name}: mixed or unknown file types in {uris[:5]}")
        fmt = fmt.pop()
        encodings = {}
        if fmt == "csv":
            for u in uris:
                encodings[u] = detect_encoding(u, self.storage, self.cfg.encoding)
                missing = set(REQUIRED) - set(csv_header(u, self.storage, encodings[u]))
                if missing:
                    raise ValueError(f"{u}: not a WebVid CSV, missing columns {sorted(missing)}")
        return Read(fmt, uris=uris, columns=list(COLUMNS), encodings=encodings)

    def keys(self, raw: pa.Table) -> pa.Table:
        cols = {c: text_column(raw, c) for c in COLUMNS}
        ids = make_ids(self.name, key_column(raw, "videoid", self.id_rule), self.id_rule)
        return pa.table({"id": ids, "group": ids, "order": cols["contentUrl"], **cols})

    def describe(self, rows: pa.Table) -> list[Row]:
        cols = {c: texts(rows, c) for c in COLUMNS}
        out = []
        for i, rid in enumerate(rows.column("id").to_pylist()):
            rec = {c: cols[c][i] for c in COLUMNS}
            uri = self._uri(rec)
            meta = {"videoid": rec["videoid"], **{k: rec[k] for k in ("page_idx", "page_dir") if rec[k]}}
            row = new_row(
                rid, "video", self.name, uri=uri, caption=rec["name"], bucket=rows.column("bucket")[i].as_py()
            )
            try:
                if not rec["videoid"]:
                    raise ValueError("empty videoid")
                if not uri:
                    raise ValueError(
                        "empty contentUrl" if not rec["contentUrl"] else "a field of the mirror template is empty"
                    )
                row.update(page_dir=rec["page_dir"] or None, duration=None)  # typed shard columns
                if rec["duration"]:
                    try:
                        meta["duration"] = row["duration"] = parse_iso_duration(rec["duration"])
                    except ValueError as exc:  # metadata nothing needs: kept raw, noted, never fatal
                        meta.update(
                            duration_raw=rec["duration"],
                            duration_error=str(exc),
                            metadata_errors={"duration": str(exc)},
                        )
            except ValueError as exc:
                row = fail(row, "source", f"videoid {rec['videoid']!r}: {exc}")
            row["meta"] = json.dumps(meta, sort_keys=True)
            out.append(row)
        return out

    def _uri(self, rec: dict) -> str:
        return mirror_uri(rec["contentUrl"], rec, self.cfg)
