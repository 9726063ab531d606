"""Panda-70M CSVs `videoID, url, timestamp, caption, matching_score[, desirable_filtering, shot_boundary_detection]`:
one row per source video, parallel Python-literal lists per clip (read with `ast.literal_eval`, never `eval`).

One sample per clip, id `<source>-<videoID>_<start_ms>_<end_ms>`; the clips of one video share a group (one
download). A malformed row gives one failed sample with the reason.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from typing import Literal

import pyarrow as pa
from pydantic import field_validator, model_validator

from pipeline.licences import NONE_GRANTED
from pipeline.rows import Row, fail, new_row, skip
from pipeline.sources import RAW_INDEX, Read, Source as BaseSource, SourceConfig, key_column, texts
from pipeline.sources.ids import key_bytes, make_id
from pipeline.sources.tables import Encoding, csv_header, detect_encoding, format_of, resolve_files
from pipeline.sources.webvid import check_template, mirror_uri

REQUIRED = ("videoID", "url", "timestamp", "caption")
EXTRA = ("matching_score", "desirable_filtering", "shot_boundary_detection")
_TIMESTAMP = re.compile(r"^(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)$")
_CLIP_COLUMNS = ("url", "videoid", "clip", "span_start", "span_end", "caption", "matching_score", "extra", "error")


class Config(SourceConfig):
    type: Literal["panda70m"] = "panda70m"
    path: str | list[str]
    encoding: Encoding = "auto"  # CSV/TSV text: auto (BOM, else UTF-8) or a codec (latin-1, utf-16, ...)
    base_dir: str | None = None  # resolves relative urls (a local or remote mirror)
    min_matching_score: float | None = None  # filter: clips scoring lower are skipped before any download
    path_template: str | None = None  # a mirror under base_dir, e.g. "{videoID}.mp4" (one file per video)
    url_rewrite: dict[str, str] = {}  # URL prefix -> mirror prefix (see pipeline/sources/webvid.py)

    @field_validator("path_template")
    @classmethod
    def _fields(cls, v: str | None) -> str | None:
        return check_template(v, ("videoID", "videoid"))

    @model_validator(mode="after")
    def _base(self):
        if self.path_template and not self.base_dir:
            raise ValueError("path_template needs base_dir (the mirror's root)")
        return self


def parse_timestamp(text: str) -> float:
    """'0:01:20.880' -> 80.88 seconds."""
    m = _TIMESTAMP.match(str(text).strip())
    if not m:
        raise ValueError(f"bad timestamp {text!r} (want H:MM:SS.mmm)")
    return round(int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)), 6)


def _literal_list(cell: str | None, what: str) -> list:
    try:
        value = ast.literal_eval(cell or "")
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as exc:
        raise ValueError(f"column {what} is not a Python list literal ({type(exc).__name__})") from None
    if not isinstance(value, list):
        raise ValueError(f"column {what} is a {type(value).__name__}, not a list")
    return value


def clips_of(rec: dict) -> list[tuple[float, float, str, float | None, dict]]:
    """(start_s, end_s, caption, matching_score, per-clip extras) for each clip of one CSV row. Timestamps and
    captions are required; the optional columns (matching_score, desirable_filtering, shot_boundary_detection)
    never fail a clip: a cell that does not parse, or a list of the wrong length, is left out and named in the
    clip's extras under `metadata_errors`."""
    stamps = _literal_list(rec.get("timestamp"), "timestamp")
    captions = _literal_list(rec.get("caption"), "caption")
    if len(captions) != len(stamps):
        raise ValueError(f"{len(stamps)} timestamps, {len(captions)} captions")
    lists, errors = {}, {}
    for k in EXTRA:
        if not rec.get(k):
            continue
        try:
            lists[k] = _literal_list(rec[k], k)
        except ValueError as exc:
            errors[k] = str(exc)
            continue
        if len(lists[k]) != len(stamps):
            errors[k] = f"{len(lists.pop(k))} values for {len(stamps)} clips"
    clips = []
    for i, stamp in enumerate(stamps):
        if not (isinstance(stamp, (list, tuple)) and len(stamp) == 2):
            raise ValueError(f"clip {i}: timestamp {stamp!r} is not a [start, end] pair")
        start, end = parse_timestamp(stamp[0]), parse_timestamp(stamp[1])
        if not end > start:
            raise ValueError(f"clip {i}: end {stamp[1]} is not after start {stamp[0]}")
        if not isinstance(captions[i], str):
            raise ValueError(f"clip {i}: caption is not a string")
        extra, errs = {k: v[i] for k, v in lists.items() if k != "matching_score"}, dict(errors)
        score = None
        if "matching_score" in lists:
            try:
                score = float(lists["matching_score"][i])
            except (TypeError, ValueError):
                errs["matching_score"] = f"not a number: {lists['matching_score'][i]!r}"
        if errs:
            extra["metadata_errors"] = errs
        clips.append((start, end, captions[i], score, extra))
    return clips


def typed_metadata(score: float | None, extra: dict) -> dict:
    """The shard's typed Panda-70M columns; `extra` keeps what did not parse (in `metadata_errors`)."""
    out = {"matching_score": score, "desirable_filtering": None, "shot_boundary_detection": None}
    errors = extra.setdefault("metadata_errors", {})
    if (d := extra.pop("desirable_filtering", None)) is not None:
        out["desirable_filtering"] = str(d)
    if (shots := extra.pop("shot_boundary_detection", None)) is not None:
        try:
            out["shot_boundary_detection"] = [[parse_timestamp(a), parse_timestamp(b)] for a, b in shots]
        except (TypeError, ValueError) as exc:
            errors["shot_boundary_detection"] = f"not a list of [start, end] timestamps: {exc}"
    if not errors:
        extra.pop("metadata_errors")
    return out


class Source(BaseSource):
    Config = Config
    licence = NONE_GRANTED  # Panda-70M grants no licence: the YouTube videos keep their owners' terms
    branches = ("media",)

    def plan(self) -> Read:
        uris = resolve_files(self.cfg.path, self.storage)
        fmt = {format_of(u) for u in uris}
        if len(fmt) != 1 or None in fmt:
            raise ValueError(f"panda70m source {self.name}: mixed or unknown file types in {uris[:5]}")
        fmt = fmt.pop()
        encodings = {}
        if fmt == "csv":
            for u in uris:
                encodings[u] = detect_encoding(u, self.storage, self.cfg.encoding)
                missing = set(REQUIRED) - set(csv_header(u, self.storage, encodings[u]))
                if missing:
                    raise ValueError(f"{u}: not a Panda-70M CSV, missing columns {sorted(missing)}")
        return Read(fmt, uris=uris, columns=list(REQUIRED + EXTRA), encodings=encodings)

    def keys(self, raw: pa.Table) -> pa.Table:
        cols = {c: texts(raw, c) for c in REQUIRED + EXTRA}
        rule = self.id_rule
        raw_vids = key_column(raw, "videoID", rule).to_pylist()  # rule 2: the raw bytes make the id
        out = {k: [] for k in ("id", "group", "order", *_CLIP_COLUMNS, RAW_INDEX)}
        for i in range(raw.num_rows):
            rec = {c: cols[c][i] for c in cols}
            vid, url = rec["videoID"], rec["url"]
            kvid = key_bytes(raw_vids[i] or "") if rule > 1 else vid.encode()
            try:
                if not vid or not url:
                    raise ValueError("empty videoID or url")
                clips = clips_of(rec)
            except (ValueError, TypeError) as exc:
                whole = (
                    repr([raw.column(c)[i].as_py() for c in raw.column_names])
                    if rule > 1
                    else json.dumps(rec, sort_keys=True)
                )
                digest = hashlib.sha256(whole.encode("utf-8", "surrogateescape")).hexdigest()[:10]
                clips, error = [(None, None, "", None, {})], f"videoID {vid!r}: {exc}"
                keys = [(kvid if vid else b"row") + f"_bad-{digest}".encode()]
            else:
                error = None
                keys = [kvid + f"_{round(s * 1000)}_{round(e * 1000)}".encode() for s, e, *_ in clips]
            group = make_id(self.name, kvid if vid else keys[0], rule)
            for k, (key, (start, end, caption, score, extra)) in enumerate(zip(keys, clips)):
                for name, value in (
                    ("id", make_id(self.name, key, rule)),
                    ("group", group),
                    ("order", url),
                    ("url", url),
                    ("videoid", vid),
                    ("clip", k),
                    ("span_start", start),
                    ("span_end", end),
                    ("caption", caption),
                    ("matching_score", score),
                    ("extra", json.dumps(extra, sort_keys=True, default=str)),
                    ("error", error),
                    (RAW_INDEX, i),  # the CSV row it came from (its position, for duplicates)
                ):
                    out[name].append(value)
        types = {
            "clip": pa.int32(),
            "span_start": pa.float64(),
            "span_end": pa.float64(),
            "matching_score": pa.float64(),
            RAW_INDEX: pa.int64(),
        }
        table = pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in out.items()})
        return table

    def describe(self, rows: pa.Table) -> list[Row]:
        recs = rows.select([c for c in ("id", "bucket", *_CLIP_COLUMNS)]).to_pylist()
        out = []
        for r in recs:
            uri = mirror_uri(r["url"], {"videoID": r["videoid"], "videoid": r["videoid"]}, self.cfg)
            row = new_row(
                r["id"],
                "video",
                self.name,
                uri=uri,
                bucket=r["bucket"],
                caption=r["caption"],
                span_start=r["span_start"],
                span_end=r["span_end"],
            )
            extra = json.loads(r["extra"] or "{}")
            row.update(typed_metadata(r["matching_score"], extra))
            meta = {"videoid": r["videoid"], "clip": r["clip"], **extra}
            if r["span_start"] is not None:
                meta["duration"] = round(r["span_end"] - r["span_start"], 6)
            row["meta"] = json.dumps(meta, sort_keys=True, default=str)
            low, score = self.cfg.min_matching_score, r["matching_score"]
            if r["error"]:
                row = fail(row, "source", r["error"])
            elif low is not None and (score is None or score < low):
                got = "missing" if score is None else f"{score:.4f}"
                row = skip(row, "source", f"filter min_matching_score={low:g}: the clip's score is {got}")
            out.append(row)
        return out
