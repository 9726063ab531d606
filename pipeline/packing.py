"""Batches for training from token shard rows: length bucketing, packing to a token budget, varlen or padded.

A `Chunk` holds the rows of one row group (after filters) as flat numpy views of the Arrow buffers: per-token
columns are one [total_tokens, C] array plus row offsets, so a batch costs one gather copy per column and fp16
stays fp16. `plan_batches` decides which rows go together (deterministic for a given order); `assemble` builds
the tensors:
- packed (default): `latent` [N, C] (or `fsq_indices`), `coords` [N, 5] = (b, t, x, y, z) int32, `cu_seqlens`
  [B+1] int32, `seqlens` [B];
- padded: `latent` [B, L, C], `coords` [B, L, 4], `mask` [B, L] bool.
Both carry `ids`, `num_tokens`, `pooled` [B, D] with `has_pooled` [B], and the selected scalar columns as lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

TOKEN_COLUMNS = ("coords", "latent", "logvar", "fsq_indices")


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values [total, width], offsets [rows+1]) of a list<fixed_size_list<T, width>> column, zero-copy."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    inner = arr.values  # the whole child (ignores the slice); offsets index into it
    width = inner.type.list_size
    values = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return values, offsets.astype(np.int64)


@dataclass
class Chunk:
    """The rows of one unit of work (one row group of one shard, filtered)."""

    unit: int  # index of the unit in the epoch's plan
    rows: np.ndarray  # row index inside the row group of each kept row (for resume references)
    ids: list
    num_tokens: np.ndarray
    tokens: dict  # column -> (values [total, C], offsets [rows+1]) or None when all null
    pooled: np.ndarray | None  # [rows, D] (zeros where missing)
    has_pooled: np.ndarray | None
    scalars: dict  # column -> python list

    @classmethod
    def from_table(
        cls, unit: int, table: pa.Table, rows: np.ndarray, token_cols: list[str], scalar_cols: list[str]
    ) -> "Chunk":
        tokens = {}
        for c in token_cols:
            col = table.column(c)
            tokens[c] = None if col.null_count == len(col) else _flat(col)
        pooled = has = None
        if "pooled" in table.column_names:
            col = table.column("pooled").combine_chunks()
            has = col.is_valid().to_numpy(zero_copy_only=False)
            width = col.type.list_size
            flat = col.flatten().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.float16)
            if has.all():
                pooled = flat.reshape(-1, width)
            else:  # nulls take no room in the flattened values: scatter them into place
                pooled = np.zeros((len(col), width), flat.dtype)
                pooled[has] = flat.reshape(-1, width)
        return cls(
            unit=unit,
            rows=rows,
            ids=table.column("id").to_pylist(),
            num_tokens=table.column("num_tokens").to_numpy().astype(np.int64),
            tokens=tokens,
            pooled=pooled,
            has_pooled=has,
            scalars={c: table.column(c).to_pylist() for c in scalar_cols},
        )

    def __len__(self) -> int:
        return len(self.ids)


def plan_batches(lengths: np.ndarray, max_tokens: int | None, batch_size: int | None, bucket: bool) -> list[list[int]]:
    """Groups positions 0..n-1 into batches. With `bucket`, positions are ordered by length first (stable), so
    a batch holds samples of similar length. A batch closes when the next sample would pass `max_tokens` or it
    has `batch_size` rows; a sample longer than `max_tokens` gets a batch of its own. The last batch may be
    partial: the caller carries it into the next buffer."""
    order = np.argsort(lengths, kind="stable") if bucket else np.arange(len(lengths))
    out, cur, acc = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and (
            (max_tokens is not None and acc + n > max_tokens) or (batch_size is not None and len(cur) >= batch_size)
        ):
            out.append(cur)
            cur, acc = [], 0
        cur.append(int(i))
        acc += n
    if cur:
        out.append(cur)
    return out


def assemble(
    refs: list[tuple[Chunk, int]], tokens: str, padded: bool, scalar_cols: list[str], with_logvar: bool = False
) -> dict:
    """One batch dict from (chunk, position) references, in that order."""
    lens = np.array([c.num_tokens[i] for c, i in refs], np.int64)
    out: dict = {"ids": [c.ids[i] for c, i in refs], "num_tokens": torch.from_numpy(lens.astype(np.int32))}
    cols = [tokens, "coords"] + (["logvar"] if with_logvar else [])
    gathered = {}
    for col in cols:
        parts = []
        for c, i in refs:
            entry = c.tokens.get(col)
            if entry is None:
                raise ValueError(f"row {c.ids[i]!r} has no {col!r} (select tokens='latent' or another column)")
            values, off = entry
            a, b = off[i], off[i + 1]
            if b - a != c.num_tokens[i]:
                raise ValueError(f"row {c.ids[i]!r}: {col} has {b - a} tokens, num_tokens says {c.num_tokens[i]}")
            parts.append(values[a:b])
        gathered[col] = np.concatenate(parts) if parts else np.zeros((0, 1))
    b = np.repeat(np.arange(len(refs), dtype=np.int32), lens)
    if padded:
        width = int(lens.max()) if len(lens) else 0
        mask = np.arange(width)[None, :] < lens[:, None]
        for col in cols:
            v = gathered[col]
            grid = np.zeros((len(refs), width, v.shape[1]), v.dtype)
            grid[mask] = v
            out[col] = torch.from_numpy(grid)
        out["mask"] = torch.from_numpy(mask)
    else:
        for col in cols:
            if col != "coords":
                out[col] = torch.from_numpy(np.ascontiguousarray(gathered[col]))
        c4 = gathered["coords"].astype(np.int32)
        out["coords"] = torch.from_numpy(np.concatenate([b[:, None], c4], axis=1))
        cu = np.zeros(len(refs) + 1, np.int32)
        np.cumsum(lens, out=cu[1:])
        out["cu_seqlens"] = torch.from_numpy(cu)
        out["max_seqlen"] = int(lens.max()) if len(lens) else 0
    if all(c.pooled is not None for c, _ in refs) and refs:
        out["pooled"] = torch.from_numpy(np.stack([c.pooled[i] for c, i in refs]))
        out["has_pooled"] = torch.from_numpy(np.array([bool(c.has_pooled[i]) for c, i in refs]))
    for col in scalar_cols:
        out[col] = [c.scalars[col][i] for c, i in refs]
    return out
