"""Sample ids (`make_id` / vectorised `make_ids`) and hash buckets (`bucket_of`): no Ray, no data files."""
import random
import re

import numpy as np
import pyarrow as pa
import pytest

from pipeline.sources.ids import MAX_KEY_CHARS, bucket_of, fnv1a64, make_id, make_ids

SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def varied_keys(n: int = 400, seed: int = 0) -> list[str]:
    """Clean keys, unsafe characters, very long keys, empty keys, dots, unicode: a few hundred of them."""
    rng = random.Random(seed)
    fixed = ["", ".", "..", "...", ".hidden", "..x", "a.", "a..b", "clip 1", "clip_1", "clip-1", "clip.1",
             "a/b", "a_b", "a b", "a\\b", "a?b", "../../etc/passwd", "/abs/path", "\x00nul", "tab\there",
             "line\nbreak", "名字 with spaces", "café", "cafe\u0301", "emoji 🎬 clip", "ÅÄÖ", "x" * 80, "x" * 81,
             "y" * 300, "é" * 100, "1053841541", "-1hTK0wGrTg_19227_28278", "A-Za-z0-9._-", "\ufffd", "%20"]
    alphabet = "abcXYZ019._- /\\:?#%é名🎬\t"
    out = list(fixed)
    while len(out) < n:
        k = "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 3, 8, 20, 79, 80, 81, 150])))
        out.append(k)
    return out


# ---- make_id -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["../../etc/passwd", "..", ".", "", "a/b", "a\\b", "/abs/path", "x" * 300,
                                 "名字 with spaces", "\x00nul", b"caf\xe9", b"\xff\xfe"])
def test_ids_are_safe_file_names(key):
    rid = make_id("csv", key)
    assert SAFE_ID.match(rid) and "/" not in rid and not rid.split("-", 1)[1].startswith(".")
    assert len(rid) < 120
    assert make_id("csv", key) == rid  # deterministic


def test_clean_keys_stay_readable():
    assert make_id("webvid", "1053841541") == "webvid-1053841541"
    assert make_id("panda70m", "-1hTK0wGrTg_19227_28278") == "panda70m--1hTK0wGrTg_19227_28278"
    assert make_id("folder", "top.png") == "folder-top.png"
    assert make_id("my source!", "k") == "my_source-k"  # the source prefix is sanitised too
    changed = make_id("s", "a b")
    assert re.fullmatch(r"s-a_b-[0-9a-f]{10}", changed)  # changed keys get a hash of the raw key
    assert len(make_id("s", "z" * 500)) == len("s-") + MAX_KEY_CHARS + 11


def test_distinct_raw_keys_never_collide():
    keys = varied_keys()
    assert len({make_id("s", k) for k in set(keys)}) == len(set(keys))
    pairs = [("clip 1", "clip_1"), ("a/b", "a_b"), ("a b", "a\\b"), (".x", "x"), ("x" * 81, "x" * 82),
             ("x" * 81 + "a", "x" * 81 + "b"), ("", "."), (b"caf\xe9", b"caf\xe8"), (b"caf\xe9", "café"),
             (b"caf\xe9", "caf\ufffd"), ("café", "cafe\u0301")]
    for a, b in pairs:
        assert make_id("s", a) != make_id("s", b), (a, b)
    assert make_id("s", "café") == make_id("s", "café".encode())  # str and its UTF-8 bytes are one key


# ---- make_ids (vectorised) == make_id --------------------------------------------------------------------

@pytest.mark.parametrize("source", ["webvid", "folder", "weird source/name"])
def test_make_ids_equals_make_id_on_strings(source):
    keys = varied_keys()
    got = make_ids(source, pa.array(keys, pa.string())).to_pylist()
    assert got == [make_id(source, k) for k in keys]
    # chunked arrays, large strings and slices give the same
    chunked = pa.chunked_array([pa.array(keys[:150]), pa.array(keys[150:])])
    assert make_ids(source, chunked).to_pylist() == got
    assert make_ids(source, pa.array(keys, pa.large_string())).to_pylist() == got
    assert make_ids(source, pa.array(keys)[7:50]).to_pylist() == got[7:50]


def test_make_ids_all_clean_fast_path():
    keys = [str(1_000_000 + i) for i in range(300)]
    assert make_ids("webvid", pa.array(keys)).to_pylist() == [f"webvid-{k}" for k in keys]


def test_make_ids_binary_with_invalid_utf8():
    keys = [k.encode() for k in varied_keys(200)] + [b"caf\xe9", b"caf\xe8", b"\xff", b"ok\x80\x81", b""]
    got = make_ids("s", pa.array(keys, pa.binary())).to_pylist()
    assert got == [make_id("s", k) for k in keys]
    assert got[-5] != got[-4] and all(SAFE_ID.match(i) for i in got)
    assert make_ids("s", pa.array(keys, pa.large_binary())).to_pylist() == got
    # a binary array that is valid UTF-8 gives the same ids as the strings
    valid = [k.encode() for k in varied_keys(200)]
    assert make_ids("s", pa.array(valid, pa.binary())).to_pylist() == [make_id("s", k) for k in varied_keys(200)]


def test_make_ids_nulls_are_empty_keys():
    got = make_ids("s", pa.array(["a", None, ""], pa.string())).to_pylist()
    assert got == [make_id("s", "a"), make_id("s", ""), make_id("s", "")]


# ---- buckets -------------------------------------------------------------------------------------------

def _fnv1a64_reference(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def test_bucket_of_is_stable():
    """Buckets are stored in ledgers: these values must never change."""
    values = pa.array(["", "a", "foobar", "webvid-1053841541", "folder-top.png"])
    assert [int(h) for h in fnv1a64(values)] == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8,
                                                 0x5204C37B7E1CBF63, 0x1946C67A29B756A]
    assert bucket_of(values, 256).tolist() == [37, 140, 232, 99, 106]
    assert bucket_of(values, 1000).tolist() == [37, 996, 968, 323, 450]
    assert bucket_of(values, 256).dtype == np.int32
    keys = varied_keys(100)
    assert [int(h) for h in fnv1a64(pa.array(keys))] == [_fnv1a64_reference(k.encode()) for k in keys]
    # chunked, binary, sliced and null inputs hash the same bytes
    assert bucket_of(pa.chunked_array([values[:2], values[2:]]), 256).tolist() == [37, 140, 232, 99, 106]
    assert bucket_of(values.cast(pa.binary()), 256).tolist() == [37, 140, 232, 99, 106]
    assert bucket_of(values[2:4], 256).tolist() == [232, 99]
    assert bucket_of(pa.array([None, "a"], pa.string()), 256).tolist() == [37, 140]
    assert bucket_of(pa.array([], pa.string()), 256).tolist() == []


def test_bucket_of_spreads_evenly():
    ids = make_ids("webvid", pa.array([str(i) for i in range(100_000)]))
    counts = np.bincount(bucket_of(ids, 256), minlength=256)
    assert len(counts) == 256 and counts.sum() == 100_000
    expected = 100_000 / 256  # ~390.6; binomial sd ~19.7
    assert counts.min() > expected * 0.75 and counts.max() < expected * 1.25, (counts.min(), counts.max())
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 400  # 255 degrees of freedom: ~255 expected, 400 is far in the tail
