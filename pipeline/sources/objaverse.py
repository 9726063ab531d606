"""Objaverse 1.0 through the `objaverse` package against a local mirror laid out like
`~/.objaverse/hf-objaverse-v1` (object-paths.json.gz, metadata/000-XXX.json.gz, glbs/000-XXX/<uid>.glb).

Listed on the workers in `list_parts` chunks, split by metadata shard so each shard's annotations are read once.
Each object's `licence` is its own from the annotations (`by` -> `cc-by`, ...; pipeline/licences.py). A mirrored
object's uri is its GLB; a missing one becomes its Hugging Face URL when downloads are allowed (the
fetch stage downloads it with its retries and cache), else a failed sample. Optional Cap3D-style captions.
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.licences import normalise
from pipeline.rows import Row, fail, new_row
from pipeline.sources import Read, Source as BaseSource, SourceConfig, text_column, key_column
from pipeline.sources.ids import fnv1a64, make_ids
from pipeline.storage import open_uri

HF_OBJAVERSE = "https://huggingface.co/datasets/allenai/objaverse/resolve/main/"
_RAW = ("uid", "path", "mirrored", "known", "name", "license", "tags", "face_count", "caption", "caption_from")


class Config(SourceConfig):
    type: Literal["objaverse"] = "objaverse"
    mirror_dir: str  # plays the role of ~/.objaverse/hf-objaverse-v1
    uids: list[str] | None = None  # None: every uid in object-paths.json.gz
    captions_csv: str | None = None  # Cap3D-style `uid,caption` (header optional)
    allow_download: bool = False  # let objaverse fetch a missing index/metadata; missing GLBs get a URL
    list_parts: int = Field(16, ge=1)  # listing chunks


@contextmanager
def objaverse_at(mirror_dir: str):
    """The objaverse package pointed at a mirror for the duration of a call (it reads _VERSIONED_PATH at call
    time); the previous value is restored afterwards."""
    import objaverse

    old = objaverse._VERSIONED_PATH
    objaverse._VERSIONED_PATH = str(mirror_dir)
    try:
        yield objaverse
    finally:
        objaverse._VERSIONED_PATH = old


def read_captions(uri: str, storage=None) -> dict[str, str]:
    """`uid,caption` rows (pyarrow's reader: no field size limit); a row with more fields keeps its first two."""
    import pyarrow.csv as pacsv

    from pipeline.sources.tables import CSV_BLOCK_BYTES

    with open_uri(uri, storage) as f:
        data = f.read()
    extra: list[list[str]] = []

    def wide(row) -> str:  # unquoted commas in a caption: read that one line as the csv module would
        extra.extend(rec for rec in csv.reader(io.StringIO(row.text)) if len(rec) >= 2)
        return "skip"

    table = (
        pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(autogenerate_column_names=True, block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=wide),
            convert_options=pacsv.ConvertOptions(column_types={"f0": pa.binary(), "f1": pa.binary()}),
        )
        if data.strip()
        else None
    )
    rows = []
    if table is not None and table.num_columns >= 2:
        rows = zip(*(table.column(c).to_pylist() for c in ("f0", "f1")))
    recs = [(a.decode("utf-8", "replace"), b.decode("utf-8", "replace")) for a, b in rows] + [
        (r[0], r[1]) for r in extra
    ]
    return {a.strip(): b.strip() for a, b in recs if a != "uid"}


class Source(BaseSource):
    Config = Config
    branches = ("3d",)

    def plan(self) -> Read:
        paths_file = Path(self.cfg.mirror_dir) / "object-paths.json.gz"
        if not self.cfg.allow_download and not paths_file.exists():
            raise FileNotFoundError(f"{paths_file} missing and allow_download=False")
        return Read("items", items=[{"part": i, "of": self.cfg.list_parts} for i in range(self.cfg.list_parts)])

    def list_chunk(self, item: dict) -> list[dict]:
        cfg, mirror = self.cfg, Path(self.cfg.mirror_dir)
        captions = read_captions(cfg.captions_csv, self.storage) if cfg.captions_csv else {}
        with objaverse_at(cfg.mirror_dir) as objaverse:
            object_paths = objaverse._load_object_paths()
            uids = sorted(object_paths) if cfg.uids is None else list(dict.fromkeys(cfg.uids))
            mine = [u for u, part in zip(uids, _parts(uids, object_paths, item["of"])) if part == item["part"]]
            known = [u for u in mine if u in object_paths]
            wanted = [
                u
                for u in known
                if cfg.allow_download or (mirror / "metadata" / f"{object_paths[u].split('/')[1]}.json.gz").exists()
            ]
            annotations = objaverse.load_annotations(wanted) if wanted else {}
            local = objaverse.load_objects([u for u in known if (mirror / object_paths[u]).exists()])
        rows = []
        for uid in mine:
            ann = annotations.get(uid, {})
            rows.append(
                {
                    "uid": uid,
                    "path": str(Path(local[uid]).resolve()) if uid in local else object_paths.get(uid, ""),
                    "mirrored": uid in local,
                    "known": uid in object_paths,
                    "name": ann.get("name"),
                    "license": ann.get("license"),
                    "face_count": ann.get("faceCount"),
                    "tags": json.dumps([t.get("name") for t in ann.get("tags", []) if isinstance(t, dict)]),
                    "caption": captions.get(uid) or ann.get("name") or "",
                    "caption_from": "captions_csv" if uid in captions else ("name" if ann.get("name") else None),
                }
            )
        return rows

    def keys(self, raw: pa.Table) -> pa.Table:
        uid = text_column(raw, "uid")
        ids = make_ids(self.name, key_column(raw, "uid", self.id_rule), self.id_rule)
        return pa.table({"id": ids, "group": ids, "order": uid, **{c: raw.column(c) for c in _RAW}})

    def describe(self, rows: pa.Table) -> list[Row]:
        out = []
        for r in rows.select(["id", "bucket", *_RAW]).to_pylist():
            if r["mirrored"]:
                uri = r["path"]
            elif r["known"] and self.cfg.allow_download:
                uri = HF_OBJAVERSE + r["path"]
            else:
                uri = ""
            meta = {
                "uid": r["uid"],
                "name": r["name"],
                "license": r["license"],
                "tags": json.loads(r["tags"]),
                "face_count": r["face_count"],
                "caption_from": r["caption_from"],
            }
            row = new_row(
                r["id"],
                "3d",
                self.name,
                uri=uri,
                caption=r["caption"],
                bucket=r["bucket"],
                meta=json.dumps(meta, sort_keys=True, default=str),
                licence=normalise(r["license"]),
            )
            if not r["known"]:
                row = fail(row, "source", f"uid {r['uid']} not in object-paths.json.gz")
            elif not uri:
                row = fail(
                    row, "source", f"object {r['path']} not in mirror {self.cfg.mirror_dir} and downloads disabled"
                )
            out.append(row)
        return out


def _parts(uids: list[str], object_paths: dict, parts: int) -> list[int]:
    """Objects of one metadata shard (glbs/000-XXX) share a part; unknown uids go by their own hash."""
    keys = [object_paths[u].split("/")[1] if object_paths.get(u, "").count("/") >= 2 else u for u in uids]
    return (fnv1a64(pa.array(keys, pa.string())) % np.uint64(parts)).astype(int).tolist()
