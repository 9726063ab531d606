"""Exports of one store version to the formats trainers' loaders read, from the committed shards (never
re-tokenized): `python -m pipeline export OUT --format webdataset|lance [--bucket-by tokens]`.

- WebDataset (Megatron-Energon, Cosmos-Curate style): per committed shard, one tar (or one per token bucket);
  one sample per key, members `latent.npy`, `coords.npy`, `pooled.npy` (`fsq_indices.npy`, `logvar.npy` when
  present) and `json` with the other columns (`id` included). Keys are a hash of the id (ids may hold dots).
- Lance (pylance; read by `lance.dataset` and HF `datasets`): one dataset, the shard columns as they are.
With `--bucket-by tokens` every sample gets `token_bucket`, the power of two at or above its token count: tars go
to `<modality>/tokens-<bucket>/`, Lance rows get the column.

Exactly-once and resumable: `export.json` in the destination records each exported source shard (by path and
sha256) with its outputs. A rerun exports the shards committed since; an output written but not yet recorded
(a crash) has a name fixed by its source shard and is rewritten whole, never added twice. Lance appends are
commits of their own: the recorded Lance version is where a rerun starts (later ones are rolled back first).
A source shard that left the store (compaction) has its tars removed; Lance is then rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.reader import open_versions
from pipeline.storage import Storage
from pipeline.store import Store, read_parquet

FORMATS = ("webdataset", "lance")
MANIFEST = "export.json"
TOKEN_COLUMNS = ("latent", "coords", "pooled", "fsq_indices", "logvar")


def token_bucket(num_tokens: np.ndarray) -> np.ndarray:
    """The power of two at or above each token count (1 for 0 or 1)."""
    n = np.maximum(np.asarray(num_tokens, np.int64), 1)
    return (1 << np.ceil(np.log2(n)).astype(np.int64)).astype(np.int64)


def sample_key(sample_id: str) -> str:
    return hashlib.sha1(sample_id.encode()).hexdigest()[:20]


def _load_manifest(dest: Storage, fmt: str, bucket_by: str | None, version: str) -> dict:
    want = {"format": fmt, "bucket_by": bucket_by, "version": version}
    if not dest.exists(MANIFEST):
        return {**want, "sources": {}, "lance_version": None}
    man = json.loads(dest.read_bytes(MANIFEST))
    for k, v in want.items():
        if man.get(k) != v:
            raise ValueError(
                f"{dest.uri(MANIFEST)}: an export with {k}={man.get(k)!r} is there; this one has "
                f"{v!r} (use another --dest)"
            )
    return man


def _save_manifest(dest: Storage, man: dict) -> None:
    man["time"] = time.time()
    dest.write_bytes(MANIFEST, json.dumps(man, indent=1, sort_keys=True).encode())


def export(
    out: str,
    fmt: str,
    dest: str | None = None,
    bucket_by: str | None = None,
    version: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Exports the committed shards of one version; returns {exported, skipped, removed, rows, dest}."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if bucket_by not in (None, "tokens"):
        raise ValueError(f"--bucket-by: only 'tokens' is supported, got {bucket_by!r}")
    ((name, storage),) = open_versions(out, storage_options, version).items()
    store = Store(storage)
    store.load_whole()
    target = Storage(dest or storage.uri(f"exports/{fmt}" + ("-by-tokens" if bucket_by else "")), storage_options)
    man = _load_manifest(target, fmt, bucket_by, name)
    committed = dict(store.shards)
    gone = [p for p, rec in man["sources"].items() if p not in committed or committed[p].sha256 != rec["sha256"]]
    res = {"exported": 0, "skipped": 0, "removed": len(gone), "rows": 0, "dest": target.root}
    if fmt == "webdataset":
        for p in gone:
            for o in man["sources"].pop(p)["outputs"]:
                target.delete(o["path"])
        if gone:
            _save_manifest(target, man)
    elif gone:  # lance: rows cannot be told apart by source cheaply; start again
        man.update(sources={}, lance_version=None)
    lance_ds = _lance_start(target, man) if fmt == "lance" else None
    for path in sorted(committed):
        if path in man["sources"]:
            res["skipped"] += 1
            continue
        table = read_parquet(storage, path)  # page checksums verified: a damaged shard is an error naming it
        if bucket_by:
            table = table.append_column("token_bucket", pa.array(token_bucket(table.column("num_tokens"))))
        if fmt == "webdataset":
            outputs = _write_tars(target, path, table, bucket_by)
        else:
            lance_ds = _lance_append(target, table, lance_ds)
            man["lance_version"] = lance_ds.version
            outputs = [{"path": "data.lance", "rows": table.num_rows}]
        man["sources"][path] = {"sha256": committed[path].sha256, "rows": table.num_rows, "outputs": outputs}
        _save_manifest(target, man)  # the export's commit point for this shard
        res["exported"] += 1
        res["rows"] += table.num_rows
    if not target.exists(MANIFEST):
        _save_manifest(target, man)
    return res


# ---- WebDataset ------------------------------------------------------------------------------------------------
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _tokens(col: pa.ChunkedArray, i: int) -> np.ndarray | None:
    v = col[i]
    if not v.is_valid:
        return None
    flat = v.values  # list<fixed_size_list>: the row's tokens; fixed_size_list (pooled): the vector itself
    if pa.types.is_fixed_size_list(flat.type):
        return flat.flatten().to_numpy(zero_copy_only=False).reshape(len(flat), flat.type.list_size)
    return flat.to_numpy(zero_copy_only=False)


def _write_tars(target: Storage, source: str, table: pa.Table, bucket_by: str | None) -> list[dict]:
    import webdataset as wds

    modality = table.column("modality")[0].as_py()
    stem = source.rsplit("/", 1)[-1].removesuffix(".parquet")
    groups = {None: np.arange(table.num_rows)}
    if bucket_by:
        b = table.column("token_bucket").to_numpy()
        groups = {int(k): np.flatnonzero(b == k) for k in np.unique(b)}
    scalars = [c for c in table.column_names if c not in TOKEN_COLUMNS]
    outputs = []
    for bucket, rows in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        rel = f"{modality}/{stem}.tar" if bucket is None else f"{modality}/tokens-{bucket:06d}/{stem}.tar"
        part = table.take(pa.array(rows))
        meta = part.select(scalars).to_pylist()
        with target.open_output(rel) as f:  # appears under its name only when whole
            sink = wds.TarWriter(f, encoder=False)
            for i, m in enumerate(meta):
                sample = {"__key__": sample_key(m["id"]), "json": json.dumps(m, ensure_ascii=False).encode()}
                for c in TOKEN_COLUMNS:
                    if c in part.column_names and (v := _tokens(part.column(c), i)) is not None:
                        sample[f"{c}.npy"] = _npy(v)
                sink.write(sample)
            sink.close()
        outputs.append({"path": rel, "rows": part.num_rows, "bytes": target.size(rel)})
    return outputs


# ---- Lance -----------------------------------------------------------------------------------------------------
def _lance_uri(target: Storage) -> str:
    if not target.local:
        raise ValueError(
            "lance export: a local destination only here (--dest /path); pylance's own object store "
            "settings are not wired"
        )
    return target.path("data.lance")


def _lance_start(target: Storage, man: dict):
    """The Lance dataset at the recorded version (later, unrecorded appends of a crashed run rolled back)."""
    import lance

    uri = _lance_uri(target)
    if not target.exists("data.lance"):
        if man["lance_version"] is not None:
            raise ValueError(f"{uri} is gone but {target.uri(MANIFEST)} records version {man['lance_version']}")
        return None
    if man["lance_version"] is None:  # nothing recorded: whatever is there is an unrecorded first write
        import shutil

        shutil.rmtree(uri)
        return None
    ds = lance.dataset(uri)
    if ds.version != man["lance_version"]:
        lance.dataset(uri, version=man["lance_version"]).restore()
        ds = lance.dataset(uri)
    return ds


def _lance_append(target: Storage, table: pa.Table, ds):
    import lance

    return lance.write_dataset(table, _lance_uri(target), mode="create" if ds is None else "append")


def lance_rows(dest: str) -> pa.Table:
    """All rows of a Lance export, in id order (for checks)."""
    import lance

    t = lance.dataset(Storage(dest).path("data.lance")).to_table()
    return t.take(pc.sort_indices(t, [("id", "ascending")]))
