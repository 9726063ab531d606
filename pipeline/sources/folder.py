"""A folder of files, local or on object storage (`path: /data/x` or `s3://bucket/x`), recursive.

Listed on the workers in chunks (one per top-level sub-folder, and the top-level files in groups), so the driver
never holds the file list. Files are classified by content (magic bytes; extension only for OBJ/STL/glTF);
unrecognised or empty files become `skipped` samples with the reason. Ids are `<source>-<relative path>`.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import pyarrow as pa

from pipeline.magic import HEAD_BYTES, classify
from pipeline.rows import Row, new_row, skip
from pipeline.sources import Read, Source as BaseSource, SourceConfig, text_column, key_column
from pipeline.sources.ids import make_ids
from pipeline.storage import Storage

FILES_PER_CHUNK = 2000


class Config(SourceConfig):
    type: Literal["folder"] = "folder"
    path: str


class Source(BaseSource):
    Config = Config
    branches = ("media", "3d")

    def _root(self) -> Storage:
        return Storage(self.cfg.path, self.storage)

    def plan(self) -> Read:
        root = self._root()
        if not root.is_dir():
            raise NotADirectoryError(f"source folder {self.cfg.path} does not exist")
        import pyarrow.fs as pafs

        infos = root.fs.get_file_info(pafs.FileSelector(root.path(""), recursive=False))
        dirs = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
        files = sorted((i.base_name, i.size) for i in infos if i.type == pafs.FileType.File)
        items = [{"dir": d} for d in dirs]
        items += [{"files": files[i : i + FILES_PER_CHUNK]} for i in range(0, len(files), FILES_PER_CHUNK)]
        return Read("items", items=items)

    def list_chunk(self, item: dict) -> list[dict]:
        root = self._root()
        if "dir" in item:
            return [{"rel": e.path, "size": e.size} for e in root.list(item["dir"], recursive=True)]
        return [{"rel": name, "size": size} for name, size in item["files"]]

    def keys(self, raw: pa.Table) -> pa.Table:
        rel = text_column(raw, "rel")
        ids = make_ids(self.name, key_column(raw, "rel", self.id_rule), self.id_rule)
        return pa.table(
            {"id": ids, "group": ids, "order": rel, "rel": rel, "size": raw.column("size").cast(pa.int64())}
        )

    def describe(self, rows: pa.Table) -> list[Row]:
        root = self._root()
        out = []
        for rid, bucket, rel, size in zip(*(rows.column(c).to_pylist() for c in ("id", "bucket", "rel", "size"))):
            uri = os.path.realpath(root.path(rel)) if root.local else root.uri(rel)
            try:
                with root.open_input(rel) as f:
                    head = f.read(HEAD_BYTES)
                fmt, modality, how = classify(uri if root.local else rel, head)  # local: a PyAV probe can open it
            except OSError as exc:
                fmt, modality, how = None, None, f"unreadable: {exc}"
            meta = {"format": fmt, "bytes": size, "classified_by": how if fmt else None}
            row = new_row(
                rid, modality or "unknown", self.name, uri=uri, bucket=bucket, meta=json.dumps(meta, sort_keys=True)
            )
            out.append(row if fmt else skip(row, "source", how))
        return out
