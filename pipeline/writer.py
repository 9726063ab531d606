"""Shard writer: runs on the workers, so no output byte travels to the driver.

A writer call takes finished rows, writes the ok ones as Parquet shards (per modality, sized by bytes, row groups
of `row_group_bytes`, page checksums on) and every row's outcome as a ledger fragment, all under
`staging/<run>/<attempt>/` of the store, and returns a small record (paths, rows, bytes, sha256, counts) for the
driver to commit (`pipeline/store.py`). A retried attempt writes under a new attempt id; only the attempt whose
record reaches the driver is committed, the others are garbage that the next open removes.
"""

from __future__ import annotations

import collections
import hashlib
import time
import uuid
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from pipeline.config import Config
from pipeline.faults import maybe_fault
from pipeline.rows import OK, Row, outcome
from pipeline.storage import Storage
from pipeline.ytdlp import reason_kind
from schemas.tokens import MODALITIES, TokenDims, ledger_table, rows_to_table

MB = 1 << 20
TOKEN_COLUMNS = ("coords", "latent", "logvar", "fsq_indices")


class WriteConfig(Config):
    shard_bytes: int = Field(256 * MB, ge=1 << 16)  # target shard size (Arrow bytes, before compression)
    shard_max_bytes: int = Field(1024 * MB, ge=1 << 16)  # never more than this (a single larger row gets its own)
    row_group_bytes: int = Field(96 * MB, ge=1 << 14)  # 64-128 MB suits streaming readers
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"
    rows_per_write: int | None = Field(None, ge=1)  # rows per writer call (default: from shard_bytes)

    @model_validator(mode="after")
    def _sizes(self):
        if not self.row_group_bytes <= self.shard_bytes <= self.shard_max_bytes:
            raise ValueError("need row_group_bytes <= shard_bytes <= shard_max_bytes")
        return self


class _Hashing:
    """A write-only file that hashes what passes through (so a shard is never read back to be hashed)."""

    def __init__(self, f):
        self.f, self.h, self.n, self.closed = f, hashlib.sha256(), 0, False

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        self.f.write(b)
        return len(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        if not self.closed:
            self.f.close()
            self.closed = True


def cut(sizes: np.ndarray, target: int, cap: int) -> list[tuple[int, int]]:
    """[start, end) ranges over rows of the given byte sizes: each closes once it reaches `target`, and never
    exceeds `cap` unless a single row does."""
    out, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        if acc and acc + s > cap:
            out.append((start, i))
            start, acc = i, 0
        acc += int(s)
        if acc >= target:
            out.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def row_sizes(table: pa.Table) -> np.ndarray:
    """Approximate Arrow bytes of each row: its share of the token columns by token count, plus the rest evenly."""
    n = table.num_rows
    tokens = table.column("num_tokens").to_numpy().astype(np.float64)
    token_bytes = sum(table.column(c).nbytes for c in TOKEN_COLUMNS if c in table.column_names)
    rest = table.nbytes - token_bytes
    share = tokens / tokens.sum() if tokens.sum() > 0 else np.full(n, 1.0 / max(n, 1))
    return np.ceil(share * token_bytes + rest / max(n, 1)).astype(np.int64)


class ShardWriter:
    """`write(rows) -> record`. Construct once per worker; it holds no connection, only settings."""

    name = "write"

    def __init__(self, store_uri: str, storage_options: dict, run_id: str, dims: TokenDims, cfg: WriteConfig):
        self.store_uri, self.options, self.run_id, self.dims, self.cfg = store_uri, storage_options, run_id, dims, cfg

    def write(self, rows: list[Row]) -> dict:
        t0 = time.perf_counter()
        storage = Storage(self.store_uri, self.options)
        attempt = uuid.uuid4().hex[:16]
        base = f"staging/{self.run_id}/{attempt}"
        maybe_fault("shard_write")
        shards = []
        for modality in MODALITIES:
            ok = [r for r in rows if r.get("status", OK) == OK and r.get("modality") == modality]
            if ok:
                shards += self._shards(storage, base, modality, rows_to_table(ok, self.dims))
        ledger = None
        if rows:
            ledger = f"{base}/ledger.parquet"
            buf = pa.BufferOutputStream()
            pq.write_table(ledger_table([outcome(r) for r in rows]), buf, compression="zstd", write_page_checksum=True)
            storage.write_bytes(ledger, buf.getvalue().to_pybytes())
        maybe_fault("shard_staged")
        return {
            "shards": shards,
            "ledger": ledger,
            **summarize(rows),
            "write_s": time.perf_counter() - t0,
            "bytes": sum(s["bytes"] for s in shards),
        }

    def _shards(self, storage: Storage, base: str, modality: str, table: pa.Table) -> list[dict]:
        cfg = self.cfg
        sizes = row_sizes(table)
        out = []
        for k, (a, b) in enumerate(cut(sizes, cfg.shard_bytes, cfg.shard_max_bytes)):
            rel = f"{base}/{modality}-{k}.parquet"
            part = table.slice(a, b - a)
            groups = cut(sizes[a:b], cfg.row_group_bytes, cfg.row_group_bytes)
            sink = _Hashing(storage.open_output(rel))
            with pq.ParquetWriter(
                sink,
                part.schema,
                compression=None if cfg.compression == "none" else cfg.compression,
                write_page_checksum=True,
                use_dictionary=["modality", "source", "tokenizer", "preprocess"],
            ) as w:
                for ga, gb in groups:
                    w.write_table(part.slice(ga, gb - ga), row_group_size=gb - ga)
            sink.close()
            storage.sync(rel)
            out.append(
                {
                    "staging": rel,
                    "modality": modality,
                    "rows": part.num_rows,
                    "bytes": sink.n,
                    "sha256": sink.h.hexdigest(),
                    "row_groups": len(groups),
                }
            )
        return out


def summarize(rows: list[Row]) -> dict:
    """Counts, top failure reasons, stage timings and per-row finish times, for the run summary."""
    counts = collections.Counter(r.get("status", OK) for r in rows)
    reasons = collections.Counter(
        (r.get("stage"), (r.get("reason") or "").splitlines()[0][:160] if r.get("reason") else "")
        for r in rows
        if r.get("status", OK) != OK
    )
    timings: dict[str, list[float]] = {}
    done = []
    for r in rows:
        for k, v in (r.get("timings") or {}).items():
            if k == "_done":
                done.append(v)
                continue
            t = timings.setdefault(k, [0.0, 0])
            t[0] += v
            t[1] += 1
    by_source = collections.Counter(
        (
            r.get("source") or "",
            r.get("status", OK),
            "" if r.get("status", OK) == OK else reason_kind(r.get("stage"), r.get("reason")),
        )
        for r in rows
    )
    return {
        "rows": len(rows),
        "counts": dict(counts),
        "reasons": [[s, m, n] for (s, m), n in reasons.items()],
        "timings": timings,
        "done_at": done,
        "by_source": [[*k, n] for k, n in by_source.items()],
    }
