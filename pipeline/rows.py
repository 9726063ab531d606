"""Rows: the typed dicts that travel from the source stage to the shard writer, one field name end to end.

Every row carries the status fields: `status` (ok | failed | skipped), `stage` (the last stage that touched it)
and `reason` (None unless failed or skipped). A stage never raises for bad input: it returns the row marked
failed with a readable reason, and later stages pass such rows through untouched. Field names are the shard's
column names (`schemas/tokens.py`); each stage adds its fields and drops the bulky ones it consumed.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
MAX_REASON_CHARS = 500


class Row(TypedDict, total=False):
    """A source descriptor: what every later row starts from."""

    id: str  # `<source>-<key>`, stable and path-safe (pipeline/sources/ids.py)
    bucket: int  # hash bucket of the id's group (resume and grouping)
    modality: str  # image | video | 3d (or "unknown" for a skipped file)
    source: str
    uri: str  # where the bytes are: a local path or a URI
    caption: str | None
    span_start: float | None  # seconds, for clips cut out of a longer video
    span_end: float | None
    meta: str  # JSON: source extras (and `metadata_errors`: optional metadata that did not parse)
    # typed source metadata (None where a source has none): Panda-70M, WebVid
    matching_score: float | None
    desirable_filtering: str | None
    shot_boundary_detection: list[list[float]] | None  # [start, end] seconds per shot, relative to the clip
    page_dir: str | None
    duration: float | None  # the duration the source's metadata states (not measured)
    licence: str | None  # the sample's licence or terms (pipeline/licences.py); set for every row
    status: str
    stage: str
    reason: str | None
    timings: dict[str, float]  # stage -> seconds spent on this row; "_done" = time.time() at the last stage


class Decoded(Row, total=False):
    """After fetch + decode (images, videos)."""

    pixels: np.ndarray  # uint8 [T, H, W, 3] (T = 1 for images)
    fps: float  # sampling rate (0.0 for images)
    num_frames: int
    orig_width: int  # after EXIF rotation
    orig_height: int
    upscaled: bool  # smaller than its bucket and upscaled (decode.upscale: true)
    window_start: float | None  # videos: the window actually tokenized (seconds of the file)
    window_end: float | None
    window_index: int | None  # 0, or k for the k-th window of decode.windows: all (id `<clip id>.w<k>`)
    span_clamped: bool | None  # the span ran past the file's end and was cut to it
    media_duration: float | None  # the file's length as decoded
    resize_to: tuple[int, int] | None  # pending (h, w): `pixels` are native frames the tokenizer resizes and crops
    # to this on its device (videos that upscale: pipeline/buckets.resize_crop_frames); None = pixels final


class Voxelized(Row, total=False):
    """After fetch + mesh render + voxelise (3D)."""

    voxel_feats: np.ndarray  # fp16 [M, 768] in [0, 1]
    voxel_coords: np.ndarray  # int16 [M, 3]
    num_voxels: int
    renderer: str  # the renderer that made the views


class Tokenized(Row, total=False):
    """After tokenize: the shard's columns."""

    width: int
    height: int
    num_frames: int
    fps: float
    orig_width: int
    orig_height: int
    num_voxels: int
    coords: np.ndarray  # int16 [n, 4]
    latent: np.ndarray  # fp16 [n, 48]
    logvar: np.ndarray | None
    fsq_indices: np.ndarray | None
    pooled: np.ndarray  # fp16 [D]
    tokenizer: str
    tokenizer_licence: str  # the weights' licence
    preprocess: str


def new_row(id: str, modality: str, source: str, **fields: Any) -> Row:
    return {
        "id": id,
        "modality": modality,
        "source": source,
        "status": OK,
        "stage": "source",
        "reason": None,
        "caption": None,
        "span_start": None,
        "span_end": None,
        "meta": "{}",
        **fields,
    }


def window_id(clip_id: str, index: int) -> str:
    """Window 0 keeps the clip's id (so resume finds it); window k of a clip is `<clip id>.w<k>`."""
    return clip_id if index == 0 else f"{clip_id}.w{index}"


def fail(row: Row, stage: str, reason: str) -> Row:
    """A copy of `row` marked failed at `stage` with a readable reason."""
    return {**row, "status": FAILED, "stage": stage, "reason": str(reason)[:MAX_REASON_CHARS]}


def skip(row: Row, stage: str, reason: str) -> Row:
    return {**row, "status": SKIPPED, "stage": stage, "reason": str(reason)[:MAX_REASON_CHARS]}


def is_ok(row: Row) -> bool:
    return row.get("status", OK) == OK


def describe(exc: BaseException) -> str:
    """'ValueError: message' (or just the type name when the message is empty)."""
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def outcome(row: Row) -> dict:
    """The ledger record of a finished row."""
    return {
        "id": row["id"],
        "bucket": int(row.get("bucket") or 0),
        "status": row.get("status", OK),
        "stage": row.get("stage"),
        "reason": row.get("reason"),
        "modality": row.get("modality"),
        "source": row.get("source"),
        "uri": row.get("uri"),
    }
