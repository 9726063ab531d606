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

from pipeline.rows import Row, fail, new_row
from pipeline.sources import Read, Source as BaseSource, SourceConfig, text_column, texts
from pipeline.sources.ids import make_id
from pipeline.sources.tables import csv_header, format_of, resolve_files
from pipeline.sources.webvid import resolve

REQUIRED = ("videoID", "url", "timestamp", "caption")
EXTRA = ("matching_score", "desirable_filtering", "shot_boundary_detection")
_TIMESTAMP = re.compile(r"^(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)$")
_CLIP_COLUMNS = ("url", "videoid", "clip", "span_start", "span_end", "caption", "matching_score", "extra", "error")


class Config(SourceConfig):
    type: Literal["panda70m"] = "panda70m"
    path: str | list[str]
    base_dir: str | None = None            # resolves relative urls (a local or remote mirror)


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
    """(start_s, end_s, caption, matching_score, per-clip extras) for each clip of one CSV row."""
    stamps = _literal_list(rec.get("timestamp"), "timestamp")
    captions = _literal_list(rec.get("caption"), "caption")
    lists = {k: _literal_list(rec[k], k) for k in EXTRA if rec.get(k)}
    bad = {k: len(v) for k, v in lists.items() if len(v) != len(stamps)}
    if len(captions) != len(stamps) or "matching_score" in bad:
        raise ValueError(f"{len(stamps)} timestamps, {len(captions)} captions, "
                         f"{len(lists['matching_score']) if 'matching_score' in lists else 'no'} scores")
    clips = []
    for i, stamp in enumerate(stamps):
        if not (isinstance(stamp, (list, tuple)) and len(stamp) == 2):
            raise ValueError(f"clip {i}: timestamp {stamp!r} is not a [start, end] pair")
        start, end = parse_timestamp(stamp[0]), parse_timestamp(stamp[1])
        if not end > start:
            raise ValueError(f"clip {i}: end {stamp[1]} is not after start {stamp[0]}")
        if not isinstance(captions[i], str):
            raise ValueError(f"clip {i}: caption is not a string")
        score = float(lists["matching_score"][i]) if "matching_score" in lists else None
        extra = {k: v[i] for k, v in lists.items() if k != "matching_score" and k not in bad}
        clips.append((start, end, captions[i], score, extra))
    return clips


class Source(BaseSource):
    Config = Config
    branches = ("media",)

    def plan(self) -> Read:
        uris = resolve_files(self.cfg.path, self.storage)
        fmt = {format_of(u) for u in uris}
        if len(fmt) != 1 or None in fmt:
            raise ValueError(f"panda70m source {self.name}: mixed or unknown file types in {uris[:5]}")
        fmt = fmt.pop()
        if fmt == "csv":
            for u in uris:
                missing = set(REQUIRED) - set(csv_header(u, self.storage))
                if missing:
                    raise ValueError(f"{u}: not a Panda-70M CSV, missing columns {sorted(missing)}")
        return Read(fmt, uris=uris, columns=list(REQUIRED + EXTRA))

    def keys(self, raw: pa.Table) -> pa.Table:
        cols = {c: texts(raw, c) for c in REQUIRED + EXTRA}
        out = {k: [] for k in ("id", "group", "order", *_CLIP_COLUMNS)}
        for i in range(raw.num_rows):
            rec = {c: cols[c][i] for c in cols}
            vid, url = rec["videoID"], rec["url"]
            try:
                if not vid or not url:
                    raise ValueError("empty videoID or url")
                clips = clips_of(rec)
            except (ValueError, TypeError) as exc:
                digest = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:10]
                clips, error = [(None, None, "", None, {})], f"videoID {vid!r}: {exc}"
                keys = [f"{vid or 'row'}_bad-{digest}"]
            else:
                error = None
                keys = [f"{vid}_{round(s * 1000)}_{round(e * 1000)}" for s, e, *_ in clips]
            group = make_id(self.name, vid or keys[0])
            for k, (key, (start, end, caption, score, extra)) in enumerate(zip(keys, clips)):
                for name, value in (("id", make_id(self.name, key)), ("group", group), ("order", url),
                                    ("url", url), ("videoid", vid), ("clip", k), ("span_start", start),
                                    ("span_end", end), ("caption", caption), ("matching_score", score),
                                    ("extra", json.dumps(extra, sort_keys=True, default=str)), ("error", error)):
                    out[name].append(value)
        types = {"clip": pa.int32(), "span_start": pa.float64(), "span_end": pa.float64(),
                 "matching_score": pa.float64()}
        table = pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in out.items()})
        return table

    def describe(self, rows: pa.Table) -> list[Row]:
        recs = rows.select([c for c in ("id", "bucket", *_CLIP_COLUMNS)]).to_pylist()
        out = []
        for r in recs:
            row = new_row(r["id"], "video", self.name, uri=resolve(r["url"], self.cfg.base_dir), bucket=r["bucket"],
                          caption=r["caption"], span_start=r["span_start"], span_end=r["span_end"])
            meta = {"videoid": r["videoid"], "clip": r["clip"], "matching_score": r["matching_score"],
                    **json.loads(r["extra"] or "{}")}
            if r["span_start"] is not None:
                meta["duration"] = round(r["span_end"] - r["span_start"], 6)
            row["meta"] = json.dumps(meta, sort_keys=True, default=str)
            out.append(fail(row, "source", r["error"]) if r["error"] else row)
        return out
