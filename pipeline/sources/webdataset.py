"""WebDataset tars, as video2dataset / img2dataset write them (`00000.tar` holding `000000000.mp4`, `.txt`,
`.json` per sample), local or on any storage (`path`: a tar, a folder of tars, a glob, or a list).

Listed on the workers, one chunk per tar: the tar is read once in stream mode (`tarfile` `r|`, nothing unpacked
to disk), the small `.txt` (caption) and `.json` (metadata) members are read, and each media member is recorded
by its byte range. The prepare stage then copies just that range (`tar://<member>?offset=..&size=..::<tar>`, see
`pipeline/fetch.py`). Compressed tars have no byte ranges: they fail with a reason. Ids are `<source>-<key>`
(video2dataset's keys carry the shard number, so they are unique across tars).
"""

from __future__ import annotations

import json
import tarfile
from typing import Literal

import pyarrow as pa

from pipeline.fetch import tar_uri
from pipeline.magic import EXTENSIONS, MODALITY
from pipeline.rows import Row, fail, new_row
from pipeline.sources import Read, Source as BaseSource, SourceConfig, text_column, key_column
from pipeline.sources.ids import make_ids
from pipeline.sources.tables import resolve_files
from pipeline.storage import open_uri, split_uri

TEXT_BYTES = 1 << 20  # a caption or metadata member larger than this is not read
_COLUMNS = ("tar", "key", "member", "offset", "size", "caption", "json", "error")
_TAR_EXT = (".tar",)
_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


class Config(SourceConfig):
    type: Literal["webdataset"] = "webdataset"
    path: str | list[str]  # tar file(s), a folder of them (recursive) or a glob
    caption_ext: str = "txt"  # the member that holds the caption
    meta_ext: str = "json"  # the member that holds per-sample metadata (kept in `meta`)


def _tars(paths: str | list[str], options) -> list[str]:
    return resolve_files(
        paths,
        options,
        matches=lambda p: p.lower().endswith(_TAR_EXT + _COMPRESSED),
        one="webdataset tar",
        many="tar files",
    )


def _split(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name; the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_members(uri: str, options=None, caption_ext: str = "txt", meta_ext: str = "json") -> list[dict]:
    """One dict per sample of one tar: its media member's byte range, caption and metadata text."""
    if uri.lower().endswith(_COMPRESSED):
        return [_error_row(uri, "compressed tar: members have no byte ranges; recompress as plain .tar")]
    samples: dict[str, dict] = {}
    try:
        with open_uri(uri, options) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split(m.name)
                s = samples.setdefault(
                    key,
                    {
                        "tar": uri,
                        "key": key,
                        "member": None,
                        "offset": None,
                        "size": None,
                        "caption": None,
                        "json": None,
                        "error": None,
                        "media": [],
                    },
                )
                if ext in (caption_ext, meta_ext):
                    text = tar.extractfile(m).read(TEXT_BYTES + 1)
                    if len(text) > TEXT_BYTES:
                        s["error"] = f"member {m.name} is larger than {TEXT_BYTES} bytes"
                    s["caption" if ext == caption_ext else "json"] = text[:TEXT_BYTES].decode("utf-8", "replace")
                elif "." + ext.rsplit(".", 1)[-1] in EXTENSIONS:
                    s["media"].append((m.name, m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [_error_row(uri, f"unreadable tar: {type(exc).__name__}: {exc}"), *_finish(samples)]
    return _finish(samples)


def _finish(samples: dict[str, dict]) -> list[dict]:
    out = []
    for s in samples.values():
        media = s.pop("media")
        if len(media) == 1:
            s["member"], s["offset"], s["size"] = media[0]
        elif not s["error"]:
            s["error"] = (
                f"sample {s['key']} has no media member"
                if not media
                else f"sample {s['key']} has {len(media)} media members: {[m[0] for m in media]}"
            )
        out.append(s)
    return out


def _error_row(uri: str, error: str) -> dict:
    return {
        "tar": uri,
        "key": f"{split_uri(uri)[1]}-unreadable",
        "member": None,
        "offset": None,
        "size": None,
        "caption": None,
        "json": None,
        "error": error,
    }


class Source(BaseSource):
    Config = Config
    branches = ("media", "3d")

    def plan(self) -> Read:
        return Read("items", items=_tars(self.cfg.path, self.storage))

    def list_chunk(self, item: str) -> list[dict]:
        return read_members(item, self.storage, self.cfg.caption_ext, self.cfg.meta_ext)

    def keys(self, raw: pa.Table) -> pa.Table:
        ids = make_ids(self.name, key_column(raw, "key", self.id_rule), self.id_rule)
        cols = {c: text_column(raw, c) for c in _COLUMNS if c not in ("offset", "size")}
        ints = {
            c: raw.column(c).cast(pa.int64()) if c in raw.column_names else pa.nulls(raw.num_rows, pa.int64())
            for c in ("offset", "size")
        }
        return pa.table({"id": ids, "group": ids, "order": cols["tar"], **cols, **ints})

    def describe(self, rows: pa.Table) -> list[Row]:
        out = []
        for r in rows.select(["id", "bucket", *_COLUMNS]).to_pylist():
            fmt = EXTENSIONS.get("." + (r["member"] or "").rsplit(".", 1)[-1].lower()) if r["member"] else None
            uri = tar_uri(r["tar"], r["member"], r["offset"], r["size"]) if r["member"] else r["tar"]
            meta: dict = {"tar": r["tar"], "member": r["member"], "key": r["key"]}
            row = new_row(
                r["id"],
                MODALITY.get(fmt, "video") if fmt else "video",
                self.name,
                uri=uri,
                bucket=r["bucket"],
                caption=(r["caption"] or "").strip() or None,
            )
            error = r["error"]
            if r["json"]:
                try:
                    meta["source_meta"] = json.loads(r["json"])
                except ValueError as exc:  # metadata nothing needs: noted, never fatal
                    meta["source_meta_error"] = f"bad JSON in {r['key']}.json: {exc}"
            row["meta"] = json.dumps(meta, sort_keys=True, default=str)
            out.append(fail(row, "source", error) if error else row)
        return out
