"""Sources: each yields source-descriptor rows
`id, modality, source, uri, caption, span ([start_s, end_s] | None), meta (json str)` plus the row status fields.

Ids are `<source>-<key>`, deterministic (re-reading a source with appended rows gives old rows the same ids)
and safe as file names: only [A-Za-z0-9._-], never a path separator, never starting with a dot; a key that had
to be changed or shortened gets a hash suffix so that distinct keys never collide.
CSVs are read as UTF-8 with invalid bytes replaced by U+FFFD (one bad byte must not abort a whole source, and
Arrow strings cannot hold lone surrogates).
"""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.magic import classify
from pipeline.rows import fail, new_row, skip

MAX_KEY_CHARS = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def make_id(source: str, key: str) -> str:
    """`<source>-<sanitised key>`; a hash of the raw key is appended when sanitising changed it."""
    src = _UNSAFE.sub("_", source).strip("._-") or "src"
    safe = _UNSAFE.sub("_", key).lstrip(".")
    if safe != key or len(safe) > MAX_KEY_CHARS or not safe:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        safe = f"{safe[:MAX_KEY_CHARS]}-{digest}" if safe else digest
    return f"{src}-{safe}"


def descriptor(source: str, key: str, modality: str, uri: str, caption: str = "",
               span: list[float] | None = None, **meta) -> dict:
    return new_row(make_id(source, key), modality, source, uri=uri, caption=caption, span=span,
                   meta=json.dumps(meta, sort_keys=True, default=str))


# ---- local folders -------------------------------------------------------------------------------------------

def local_files(root: str | Path, source: str = "local") -> Iterator[dict]:
    """Every file under `root` (recursive, sorted), classified by content (extension only for OBJ/STL/glTF).
    Unrecognised or empty files come out as rows with status "skipped" and the reason."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"source folder {root} does not exist")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        try:
            fmt, modality, how = classify(path)
        except OSError as exc:
            fmt, modality, how = None, None, f"unreadable: {exc}"
        row = descriptor(source, rel, modality or "unknown", str(path.resolve()), format=fmt,
                         bytes=path.stat().st_size, classified_by=how if fmt else None)
        yield row if fmt else skip(row, "source", how)


# ---- WebVid --------------------------------------------------------------------------------------------------

_ISO_DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?"
                           r"(?:(\d+(?:\.\d+)?)S)?)?$")


def parse_iso_duration(text: str) -> float:
    """'PT00H00M17S' -> 17.0 (days, hours, minutes, seconds; fractional parts allowed)."""
    m = _ISO_DURATION.match(text.strip())
    if not m or text.strip() in ("P", "PT") or not any(m.groups()):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def webvid_csv(path: str | Path, source: str = "webvid") -> Iterator[dict]:
    """WebVid rows (any column order): videoid, name (caption), contentUrl, duration, optional page fields."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = {"videoid", "name", "contentUrl"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a WebVid CSV, missing columns {sorted(missing)}")
        for line, rec in enumerate(reader, start=2):
            vid = (rec.get("videoid") or "").strip()
            key = vid or f"line{line}"
            extra = {k: rec[k] for k in ("page_idx", "page_dir") if rec.get(k)}
            row = descriptor(source, key, "video", (rec.get("contentUrl") or "").strip(),
                             caption=(rec.get("name") or "").strip(), videoid=vid, line=line, **extra)
            try:
                if not vid:
                    raise ValueError("empty videoid")
                if not row["uri"]:
                    raise ValueError("empty contentUrl")
                duration = rec.get("duration")
                if duration:
                    meta = json.loads(row["meta"])
                    meta["duration"] = parse_iso_duration(duration)
                    row["meta"] = json.dumps(meta, sort_keys=True)
            except ValueError as exc:
                row = fail(row, "source", f"line {line}: {exc}")
            yield row


# ---- Panda-70M -----------------------------------------------------------------------------------------------

_TIMESTAMP = re.compile(r"^(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)$")


def parse_timestamp(text: str) -> float:
    """'0:01:20.880' -> 80.88 seconds."""
    m = _TIMESTAMP.match(str(text).strip())
    if not m:
        raise ValueError(f"bad timestamp {text!r} (want H:MM:SS.mmm)")
    return round(int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)), 6)


def _literal_list(cell: str | None, what: str) -> list:
    try:
        value = ast.literal_eval(cell or "")  # literal_eval only: never eval
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"column {what} is not a Python list literal ({type(exc).__name__})") from None
    if not isinstance(value, list):
        raise ValueError(f"column {what} is a {type(value).__name__}, not a list")
    return value


def _panda_clips(rec: dict) -> list[tuple[list[float], str, float]]:
    stamps = _literal_list(rec.get("timestamp"), "timestamp")
    captions = _literal_list(rec.get("caption"), "caption")
    scores = _literal_list(rec.get("matching_score"), "matching_score") if rec.get("matching_score") else None
    if len(captions) != len(stamps) or (scores is not None and len(scores) != len(stamps)):
        raise ValueError(f"{len(stamps)} timestamps, {len(captions)} captions, "
                         f"{len(scores) if scores is not None else 'no'} scores")
    clips = []
    for i, stamp in enumerate(stamps):
        if not (isinstance(stamp, (list, tuple)) and len(stamp) == 2):
            raise ValueError(f"clip {i}: timestamp {stamp!r} is not a [start, end] pair")
        start, end = parse_timestamp(stamp[0]), parse_timestamp(stamp[1])
        if not end > start:
            raise ValueError(f"clip {i}: end {stamp[1]} is not after start {stamp[0]}")
        if not isinstance(captions[i], str):
            raise ValueError(f"clip {i}: caption is not a string")
        score = float(scores[i]) if scores is not None else None
        clips.append(([start, end], captions[i], score))
    return clips


def panda70m_csv(path: str | Path, source: str = "panda70m") -> Iterator[dict]:
    """Panda-70M rows `videoID,url,timestamp,caption,matching_score[,...]`: one sample per clip, id
    `<source>-<videoID>_<start_ms>_<end_ms>`. A malformed row gives one failed row (stage "source")."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = {"videoID", "url", "timestamp", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a Panda-70M CSV, missing columns {sorted(missing)}")
        for line, rec in enumerate(reader, start=2):
            vid, url = (rec.get("videoID") or "").strip(), (rec.get("url") or "").strip()
            try:
                if not vid or not url:
                    raise ValueError("empty videoID or url")
                clips = _panda_clips(rec)
            except (ValueError, TypeError) as exc:
                row = descriptor(source, f"{vid or 'row'}_line{line}", "video", url, videoid=vid, line=line)
                yield fail(row, "source", f"line {line}: {exc}")
                continue
            for i, (span, caption, score) in enumerate(clips):
                key = f"{vid}_{round(span[0] * 1000)}_{round(span[1] * 1000)}"
                yield descriptor(source, key, "video", url, caption=caption, span=span, videoid=vid, clip=i,
                                 line=line, matching_score=score, duration=round(span[1] - span[0], 6))


# ---- Objaverse -----------------------------------------------------------------------------------------------

HF_OBJAVERSE = "https://huggingface.co/datasets/allenai/objaverse/resolve/main/"


@dataclass
class ObjaverseConfig:
    mirror_dir: str                      # plays the role of ~/.objaverse/hf-objaverse-v1
    uids: tuple[str, ...] | None = None  # None: every uid in object-paths.json.gz
    captions_csv: str | None = None      # Cap3D-style `uid,caption` (header optional)
    allow_download: bool = False         # let objaverse fetch missing index/metadata; missing GLBs get an https uri
    source: str = "objaverse"


@contextmanager
def _objaverse_at(mirror_dir: str):
    """Point the objaverse package at a mirror for the duration of a call (it reads _VERSIONED_PATH at call
    time), restoring the previous value afterwards."""
    import objaverse
    old = objaverse._VERSIONED_PATH
    objaverse._VERSIONED_PATH = str(mirror_dir)
    try:
        yield objaverse
    finally:
        objaverse._VERSIONED_PATH = old


def read_captions(path: str | Path) -> dict[str, str]:
    out = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for rec in csv.reader(f):
            if len(rec) >= 2 and rec[0] != "uid":
                out[rec[0].strip()] = rec[1].strip()
    return out


def objaverse_objects(cfg: ObjaverseConfig) -> Iterator[dict]:
    """Objaverse 1.0 objects: uids and annotations through the `objaverse` package against `cfg.mirror_dir`.
    uri is the local GLB when mirrored; otherwise the Hugging Face URL (fetched by the fetch stage with its
    retries and cache) if downloads are allowed, else a failed row."""
    mirror = Path(cfg.mirror_dir)
    paths_file = mirror / "object-paths.json.gz"
    if not cfg.allow_download and not paths_file.exists():
        raise FileNotFoundError(f"{paths_file} missing and allow_download=False")
    captions = read_captions(cfg.captions_csv) if cfg.captions_csv else {}
    with _objaverse_at(cfg.mirror_dir) as objaverse:
        object_paths = objaverse._load_object_paths()
        uids = sorted(object_paths) if cfg.uids is None else list(cfg.uids)
        known = [u for u in uids if u in object_paths]
        # annotations: only for metadata shards present, unless downloads are allowed
        wanted = [u for u in known if cfg.allow_download
                  or (mirror / "metadata" / f"{object_paths[u].split('/')[1]}.json.gz").exists()]
        annotations = objaverse.load_annotations(wanted) if wanted else {}
        local = objaverse.load_objects([u for u in known if (mirror / object_paths[u]).exists()])
    for uid in uids:
        ann = annotations.get(uid, {})
        caption = captions.get(uid) or ann.get("name") or ""
        meta = {"uid": uid, "name": ann.get("name"), "license": ann.get("license"),
                "tags": [t.get("name") for t in ann.get("tags", []) if isinstance(t, dict)],
                "face_count": ann.get("faceCount"), "caption_from": "captions_csv" if uid in captions
                else ("name" if ann.get("name") else None)}
        if uid in local:
            uri = str(Path(local[uid]).resolve())
        elif uid in object_paths and cfg.allow_download:
            uri = HF_OBJAVERSE + object_paths[uid]
        else:
            uri = ""
        row = descriptor(cfg.source, uid, "3d", uri, caption=caption, **meta)
        if uid not in object_paths:
            row = fail(row, "source", f"uid {uid} not in object-paths.json.gz")
        elif not uri:
            row = fail(row, "source", f"object {object_paths[uid]} not in mirror {mirror} and downloads disabled")
        yield row

