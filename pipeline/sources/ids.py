"""Sample ids and their hash buckets.

Ids are `<source>-<key>`: deterministic (re-reading a source with appended rows gives old rows the same ids) and
safe as file names (only [A-Za-z0-9._-], never a path separator, never starting with a dot). `make_ids` is the
vectorised form used on the workers; both give the same ids.

Id rules (a store records its rule in version.json as `id_rule`; a store without one uses rule 1):
- rule 2 (`ID_RULE`): the key's raw bytes (sources pass key columns undecoded) are kept as they are when they are
  already a clean key; otherwise the id is a readable cleaned part plus `-<16 hex of sha256(raw bytes)>`. A raw key
  that looks like a hashed id (ends in `-<16 hex>`) or a window id (ends in `.w<digits>`) is hashed too, so
  distinct keys never give one id.
- rule 1 (stores written before rule 2): keys decoded first (invalid UTF-8 -> U+FFFD), a 10-hex hash only for
  changed keys. Kept only so such stores resume with their ids.

Buckets: FNV-1a (64 bit) of the UTF-8 bytes, modulo the store's bucket count. They are stored in the ledger,
so the function must never change; `bucket_of` is plain numpy over the Arrow buffers.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_KEY_CHARS = 80
ID_RULE = 2  # the rule new stores get
ID_RULES = (1, 2)
_DIGEST = {1: 10, 2: 16}  # hex chars of the raw key's hash
_RESERVED = r"(?:^|-)[0-9a-f]{16}$|\.w[0-9]+$"  # rule 2: clean keys shaped like a hashed or a window id
_RESERVED_RE = re.compile(_RESERVED)
_UNSAFE = "[^A-Za-z0-9._-]+"
_UNSAFE_RE = re.compile(_UNSAFE)
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def key_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")


def source_prefix(source: str) -> str:
    return _UNSAFE_RE.sub("_", source).strip("._-") or "src"


def check_rule(rule: int) -> int:
    if rule not in ID_RULES:
        raise ValueError(f"unknown id rule {rule!r} (this version knows {list(ID_RULES)}): a newer version wrote it")
    return rule


def make_id(source: str, key: str | bytes, rule: int = ID_RULE) -> str:
    """`<source>-<cleaned key>`, plus a hash of the raw key unless the key was clean (see the module docstring)."""
    raw = key_bytes(key)
    if check_rule(rule) == 1:
        raw = raw.decode("utf-8", "replace").encode()  # what rule-1 sources passed: decoded text
    text = raw.decode("utf-8", "replace")
    safe = _UNSAFE_RE.sub("_", text).lstrip(".")
    if safe.encode() != raw or len(safe) > MAX_KEY_CHARS or not safe or (rule > 1 and _RESERVED_RE.search(safe)):
        digest = hashlib.sha256(raw).hexdigest()[: _DIGEST[rule]]
        safe = f"{safe[:MAX_KEY_CHARS]}-{digest}" if safe else digest
    return f"{source_prefix(source)}-{safe}"


def make_ids(source: str, keys: pa.Array | pa.ChunkedArray, rule: int = ID_RULE) -> pa.Array:
    """make_id over an Arrow string or binary array (nulls count as empty keys)."""
    keys = _combine(keys)
    if pa.types.is_large_string(keys.type):  # (Parquet written by polars, Ray Data blocks) no large kernels below
        keys = keys.cast(pa.string())
    if pa.types.is_binary(keys.type) or pa.types.is_large_binary(keys.type):
        try:
            text = keys.cast(pa.string())
        except pa.ArrowInvalid:  # invalid UTF-8 somewhere: those keys take the slow path below
            return pa.array([make_id(source, k or b"", rule) for k in keys.to_pylist()], pa.string())
    else:
        text = keys
    text = pc.fill_null(text, "")
    safe = pc.utf8_ltrim(pc.replace_substring_regex(text, _UNSAFE, "_"), ".")
    changed = pc.or_(
        pc.not_equal(safe, text),
        pc.or_(pc.greater(pc.utf8_length(safe), MAX_KEY_CHARS), pc.equal(pc.utf8_length(safe), 0)),
    )
    if check_rule(rule) > 1:
        changed = pc.or_(changed, pc.match_substring_regex(safe, _RESERVED))
    ids = pc.binary_join_element_wise(source_prefix(source) + "-", safe, "")
    if pc.any(changed).as_py():
        idx = np.flatnonzero(changed.to_numpy(zero_copy_only=False))
        fixed = ids.to_pylist()
        raw = text.to_pylist()
        for i in idx:
            fixed[i] = make_id(source, raw[i], rule)
        ids = pa.array(fixed, pa.string())
    return ids


def _combine(arr):
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def fnv1a64(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """FNV-1a 64-bit hash of each value's UTF-8 bytes (nulls hash as empty), vectorised over byte positions."""
    arr = _combine(values)
    if not (pa.types.is_binary(arr.type)):
        arr = arr.cast(pa.binary())
    arr = _combine(pc.fill_null(arr, b""))
    n = len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    offs = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, lens = offs[:-1], np.diff(offs)
    idx = np.arange(n)
    for k in range(int(lens.max(initial=0))):
        idx = idx[lens[idx] > k]
        h[idx] = (h[idx] ^ data[starts[idx] + k].astype(np.uint64)) * _FNV_PRIME
    return h


def bucket_of(values: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """The bucket (0..buckets-1) of each value, int32."""
    return (fnv1a64(values) % np.uint64(buckets)).astype(np.int32)
