"""The store's file formats: the only definition of what a token shard, a ledger file and a shard index hold.

Token shards: one row per sample (image, video clip or 3D asset). Per-token columns are lists with one entry per
token, in the tokenizer's packing order. Hugging Face feature metadata is embedded so that
`datasets.load_dataset("parquet", ...)` restores typed columns (fp16 stays fp16 under `with_format("arrow")`).
Row field names are the column names, from the source stage to the shard (`pipeline/rows.py`).

Ledger files: one row per sample outcome (ok, failed, skipped) with the reason; resume reads them.
Shard index: one row per committed shard (the manifest checkpoint).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1.3"  # 1.1: `preprocess` column; ledger and shard index. 1.2: the tokenized window, clamping,
# upscaling, and typed source metadata (Panda-70M, WebVid). 1.3: licence, tokenizer_licence,
# renderer (older shards lack them; readers treat them as not recorded)
MODALITIES = ("image", "video", "3d")
REQUEUED = "requeued"  # ledger only: its shard was damaged and un-committed (verify --repair); the next run redoes it
STATUSES = ("ok", "failed", "skipped", REQUEUED)


@dataclass(frozen=True)
class TokenDims:
    """Widths that depend on the tokenizer: latent channels, FSQ groups, pooled embedding size."""

    latent: int = 48
    fsq_groups: int = 8
    embed: int = 1152


@functools.lru_cache(maxsize=8)
def token_schema(dims: TokenDims) -> pa.Schema:
    """Arrow schema of a token shard, with HF feature metadata and the format version."""
    f16, i16 = pa.float16(), pa.int16()
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("span_start", pa.float64()),  # seconds into the source video (Panda-70M clips)
        pa.field("span_end", pa.float64()),  # (the source's span, as its metadata gives it)
        pa.field("window_start", pa.float64()),  # videos: the window actually tokenized, seconds of the file
        pa.field("window_end", pa.float64()),  # (= window_start + num_frames / fps, within the span)
        pa.field("window_index", pa.int32()),  # which window of the clip (decode.windows: all gives several)
        pa.field("span_clamped", pa.bool_()),  # the span ran past the file's end and was cut to it
        pa.field("media_duration", pa.float64()),  # the file's length in seconds, as decoded
        pa.field("upscaled", pa.bool_()),  # the source was smaller than its bucket and upscaled
        pa.field("matching_score", pa.float64()),  # Panda-70M: caption-clip matching score
        pa.field("desirable_filtering", pa.string()),  # Panda-70M: e.g. "desirable", "1_still_foreground_image"
        pa.field("shot_boundary_detection", pa.list_(pa.list_(pa.float64(), 2))),  # Panda-70M: shots [start, end]
        pa.field("page_dir", pa.string()),  # WebVid: the page folder of its downloaders' layout
        pa.field("duration", pa.float64()),  # WebVid: the duration its metadata states (seconds)
        pa.field("width", pa.int32()),  # decoded input size fed to the tokenizer
        pa.field("height", pa.int32()),
        pa.field("num_frames", pa.int32()),
        pa.field("fps", pa.float32()),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("num_voxels", pa.int32()),  # 3D only
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("coords", pa.list_(pa.list_(i16, 4))),  # per token (t, x, y, z)
        pa.field("latent", pa.list_(pa.list_(f16, dims.latent))),  # posterior mean
        pa.field("logvar", pa.list_(pa.list_(f16, dims.latent))),  # optional
        pa.field("fsq_indices", pa.list_(pa.list_(i16, dims.fsq_groups))),  # discrete tokenizers only
        pa.field("pooled", pa.list_(f16, dims.embed)),  # semantic embedding
        pa.field("meta", pa.string()),  # JSON: source extras, render settings
        pa.field("licence", pa.string()),  # the sample's licence or terms (pipeline/licences.py ids)
        pa.field("renderer", pa.string()),  # 3D: the renderer that made the views
        pa.field("tokenizer", pa.string(), nullable=False),
        pa.field("tokenizer_licence", pa.string()),  # the tokenizer weights' licence
        pa.field("preprocess", pa.string(), nullable=False),  # preprocessing identity (decode/mesh settings)
    ]
    return _with_hf_metadata(pa.schema(fields), {"schema_version": SCHEMA_VERSION, "dims": dims.__dict__})


@functools.lru_cache(maxsize=1)
def ledger_schema() -> pa.Schema:
    """One sample outcome: the ledger's rows (`ledger/**/*.parquet`). `seq` is the commit that recorded it."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("bucket", pa.int32(), nullable=False),  # hash bucket of the id (resume reads one bucket at a time)
        pa.field("status", pa.string(), nullable=False),  # ok | failed | skipped | requeued
        pa.field("stage", pa.string()),  # the stage that decided it (failed/skipped)
        pa.field("reason", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("source", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("seq", pa.int64(), nullable=False),
    ]
    return _with_hf_metadata(pa.schema(fields), {"schema_version": SCHEMA_VERSION})


def shard_index_schema() -> pa.Schema:
    """One committed shard (the manifest checkpoint)."""
    fields = [
        pa.field("path", pa.string(), nullable=False),  # relative to the version directory
        pa.field("modality", pa.string(), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("row_groups", pa.int32()),
        pa.field("seq", pa.int64(), nullable=False),
    ]
    return pa.schema(fields, metadata={b"atoken_cache": json.dumps({"schema_version": SCHEMA_VERSION}).encode()})


def _with_hf_metadata(schema: pa.Schema, extra: dict) -> pa.Schema:
    import datasets  # HF feature metadata comes from datasets itself, so the two always agree

    hf = datasets.Features.from_arrow_schema(schema).arrow_schema.metadata
    meta = dict(hf or {})
    meta[b"atoken_cache"] = json.dumps(extra).encode()
    return schema.with_metadata(meta)


def _per_token(values: np.ndarray | None, dtype, width: int) -> pa.Array | None:
    if values is None:
        return None
    arr = np.ascontiguousarray(values, dtype=dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr), width)


def rows_to_table(rows: list[dict], dims: TokenDims) -> pa.Table:
    """Builds a shard table from tokenized rows (numpy arrays per sample) with explicit Arrow types."""
    schema = token_schema(dims)
    cols: dict[str, list] = {f.name: [] for f in schema}
    for r in rows:
        for k in _SCALARS:
            cols[k].append(r.get(k))
        cols["num_tokens"].append(int(len(r["coords"])))
    arrays = []
    for f in schema:
        if f.name in ("coords", "latent", "logvar", "fsq_indices"):
            arrays.append(_token_column(rows, f))
        elif f.name == "pooled":
            arrays.append(
                pa.array(
                    [None if r.get("pooled") is None else np.asarray(r["pooled"], np.float16) for r in rows],
                    type=f.type,
                )
            )
        else:
            arrays.append(pa.array(cols[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


_SCALARS = (
    "id",
    "modality",
    "source",
    "uri",
    "caption",
    "span_start",
    "span_end",
    "window_start",
    "window_end",
    "window_index",
    "span_clamped",
    "media_duration",
    "upscaled",
    "matching_score",
    "desirable_filtering",
    "shot_boundary_detection",
    "page_dir",
    "duration",
    "width",
    "height",
    "num_frames",
    "fps",
    "orig_width",
    "orig_height",
    "num_voxels",
    "meta",
    "licence",
    "renderer",
    "tokenizer",
    "tokenizer_licence",
    "preprocess",
)
_TOKEN_DTYPES = {"coords": np.int16, "latent": np.float16, "logvar": np.float16, "fsq_indices": np.int16}


def _token_column(rows: list[dict], field: pa.Field) -> pa.Array:
    key, dtype = field.name, _TOKEN_DTYPES[field.name]
    width = field.type.value_type.list_size
    offsets, values, valid = [0], [], []
    for r in rows:
        v = r.get(key)
        valid.append(v is not None)
        if v is not None:
            values.append(np.asarray(v, dtype).reshape(-1, width))
        offsets.append(offsets[-1] + (0 if v is None else len(values[-1])))
    flat = np.concatenate(values) if values else np.zeros((0, width), dtype)
    inner = _per_token(flat, dtype, width)
    mask = pa.array([not ok for ok in valid])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), inner, type=field.type, mask=mask)


def ledger_table(records: list[dict], seq: int = 0) -> pa.Table:
    """Ledger rows from outcome records (`id, bucket, status, stage, reason, modality, source, uri`)."""
    schema = ledger_schema()
    cols = {f.name: [r.get(f.name) for r in records] for f in schema if f.name != "seq"}
    cols["seq"] = [seq] * len(records)
    return pa.Table.from_pydict(cols, schema=schema)
