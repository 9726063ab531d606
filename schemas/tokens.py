"""The token shard format: the only definition of what a shard row holds.

One row per sample (image, video clip or 3D asset). Per-token columns are lists with one entry per token,
in the tokenizer's packing order. Hugging Face feature metadata is embedded so that
`datasets.load_dataset("parquet", ...)` restores typed columns (fp16 stays fp16 under `with_format("arrow")`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1.0"
MODALITIES = ("image", "video", "3d")
STATUSES = ("ok", "failed", "skipped")


@dataclass(frozen=True)
class TokenDims:
    """Widths that depend on the tokenizer: latent channels, FSQ groups, pooled embedding size."""
    latent: int = 48
    fsq_groups: int = 8
    embed: int = 1152


def token_schema(dims: TokenDims) -> pa.Schema:
    """Arrow schema of a token shard, with HF feature metadata and the format version."""
    f16, i16 = pa.float16(), pa.int16()
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("span_start", pa.float64()),          # seconds into the source video (Panda-70M clips)
        pa.field("span_end", pa.float64()),
        pa.field("width", pa.int32()),                 # decoded input size fed to the tokenizer
        pa.field("height", pa.int32()),
        pa.field("num_frames", pa.int32()),
        pa.field("fps", pa.float32()),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("num_voxels", pa.int32()),            # 3D only
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("coords", pa.list_(pa.list_(i16, 4))),            # per token (t, x, y, z)
        pa.field("latent", pa.list_(pa.list_(f16, dims.latent))),  # posterior mean
        pa.field("logvar", pa.list_(pa.list_(f16, dims.latent))),  # optional
        pa.field("fsq_indices", pa.list_(pa.list_(i16, dims.fsq_groups))),  # discrete tokenizers only
        pa.field("pooled", pa.list_(f16, dims.embed)),             # semantic embedding
        pa.field("meta", pa.string()),                 # JSON: source extras, render settings
        pa.field("tokenizer", pa.string(), nullable=False),
    ]
    return _with_hf_metadata(pa.schema(fields), {"schema_version": SCHEMA_VERSION, "dims": dims.__dict__})


def status_schema() -> pa.Schema:
    """Per-sample status table: one row per sample id and its final state."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("modality", pa.string()),
        pa.field("source", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),   # ok | failed | skipped
        pa.field("stage", pa.string()),                    # where it failed
        pa.field("reason", pa.string()),
        pa.field("shard", pa.string()),                    # shard holding an ok sample
    ]
    return _with_hf_metadata(pa.schema(fields), {"schema_version": SCHEMA_VERSION})


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
        n = int(len(r["coords"]))
        span = r.get("span") or (None, None)
        cols["id"].append(r["id"])
        cols["modality"].append(r["modality"])
        cols["source"].append(r.get("source"))
        cols["uri"].append(r.get("uri"))
        cols["caption"].append(r.get("caption"))
        cols["span_start"].append(span[0])
        cols["span_end"].append(span[1])
        for k in ("width", "height", "num_frames", "fps", "orig_width", "orig_height", "num_voxels"):
            cols[k].append(r.get(k))
        cols["num_tokens"].append(n)
        cols["meta"].append(r.get("meta"))
        cols["tokenizer"].append(r["tokenizer"])
    arrays = []
    for f in schema:
        if f.name in ("coords", "latent", "logvar", "fsq_indices"):
            arrays.append(_token_column(rows, f))
        elif f.name == "pooled":
            arrays.append(pa.array([None if r.get("pooled") is None else np.asarray(r["pooled"], np.float16)
                                    for r in rows], type=f.type))
        else:
            arrays.append(pa.array(cols[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


_TOKEN_KEYS = {"coords": ("coords", np.int16), "latent": ("mean", np.float16),
               "logvar": ("logvar", np.float16), "fsq_indices": ("indices", np.int16)}


def _token_column(rows: list[dict], field: pa.Field) -> pa.Array:
    key, dtype = _TOKEN_KEYS[field.name]
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


def status_table(records: list[dict]) -> pa.Table:
    schema = status_schema()
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in records], schema=schema)
