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
    fixed = [
        "",
        ".",
        "..",
        "...",
        ".hidden",
        "..x",
        "a.",
        "a..b",
        "clip 1",
        "clip_1",
        "clip-1",
        "clip.1",
        "a/b",
        "a_b",
        "a b",
        "a\\b",
        "a?b",
        "../../etc/passwd",
        "/abs/path",
        "\x00nul",
        "tab\there",
        "line\nbreak",
        "名字 with spaces",
        "café",
        "cafe\u0301",
        "emoji 🎬 clip",
        "ÅÄÖ",
        "x" * 80,
        "x" * 81,
        "y" * 300,
        "é" * 100,
        "1053841541",
        "-1hTK0wGrTg_19227_28278",
        "A-Za-z0-9._-",
        "\ufffd",
        "%20",
    ]
    alphabet = "abcXYZ019._- /\\:?#%é名🎬\t"
    out = list(fixed)
    while len(out) < n:
        k = "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 3, 8, 20, 79, 80, 81, 150])))
        out.append(k)
    return out


# ---- make_id -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "..",
        ".",
        "",
        "a/b",
        "a\\b",
        "/abs/path",
        "x" * 300,
        "名字 with spaces",
        "\x00nul",
        b"caf\xe9",
        b"\xff\xfe",
    ],
)
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
    assert re.fullmatch(r"s-a_b-[0-9a-f]{16}", changed)  # changed keys get a hash of the raw key
    assert len(make_id("s", "z" * 500)) == len("s-") + MAX_KEY_CHARS + 17
    assert re.fullmatch(r"s-a_b-[0-9a-f]{10}", make_id("s", "a b", rule=1))  # rule 1 (older stores): 10 hex


def test_distinct_raw_keys_never_collide():
    keys = varied_keys()
    assert len({make_id("s", k) for k in set(keys)}) == len(set(keys))
    pairs = [
        ("clip 1", "clip_1"),
        ("a/b", "a_b"),
        ("a b", "a\\b"),
        (".x", "x"),
        ("x" * 81, "x" * 82),
        ("x" * 81 + "a", "x" * 81 + "b"),
        ("", "."),
        (b"caf\xe9", b"caf\xe8"),
        (b"caf\xe9", "café"),
        (b"caf\xe9", "caf\ufffd"),
        ("café", "cafe\u0301"),
    ]
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
    assert [int(h) for h in fnv1a64(values)] == [
        0xCBF29CE484222325,
        0xAF63DC4C8601EC8C,
        0x85944171F73967E8,
        0x5204C37B7E1CBF63,
        0x1946C67A29B756A,
    ]
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


# ---- hostile keys (issue 15: ids that never collide) ------------------------------------------------------


def hostile_keys(n: int = 10_000, seed: int = 1) -> list[bytes]:
    """Distinct raw keys built to collide under cleaning: invalid UTF-8, whitespace/case variants, unicode
    normalisation forms, U+FFFD itself, window-shaped keys, and keys equal to another key's cleaned form + hash
    (under both id rules)."""
    import unicodedata

    rng = random.Random(seed)
    keys: dict[bytes, None] = {}

    def add(k):
        if len(keys) < n:
            keys.setdefault(k if isinstance(k, bytes) else k.encode("utf-8"), None)

    i = 0
    while len(keys) < n:
        i += 1
        base = "".join(rng.choice("abcXYZ019") for _ in range(rng.choice([1, 3, 6]))) + str(i)
        for k in (
            base,
            f" {base}",
            f"{base} ",
            f"{base}\t",
            f" {base} ",
            base.upper(),
            base.lower(),
            f"{base} x",
            f"{base}_x",
            f"{base}/x",
            f"{base}.w1",
            f"{base}.w{i}",
        ):
            add(k)
        accent = f"caf\u00e9{i}"
        for form in ("NFC", "NFD", "NFKC", "NFKD"):
            add(unicodedata.normalize(form, accent + "\u212b"))  # Angstrom sign: its NFC is U+00C5
        add(f"caf\ufffd{i}")
        for bad in (b"\xe9", b"\xe8", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80\x81"):
            add(b"caf" + bad + str(i).encode())
        for rule in (1, 2):  # another key's cleaned form + its hash, as a key of its own
            add(make_id("s", f"{base} x", rule).split("-", 1)[1])
            add(make_id("s", b"caf\xe9" + str(i).encode(), rule).split("-", 1)[1])
        add("x" * (MAX_KEY_CHARS + 1) + str(i))
        add("x" * (MAX_KEY_CHARS + 1) + str(i) + "y")
    return list(keys)


def test_hostile_keys_give_distinct_ids():
    keys = hostile_keys()
    assert len(set(keys)) == len(keys) == 10_000
    ids = make_ids("s", pa.array(keys, pa.binary())).to_pylist()
    assert len(set(ids)) == len(keys)  # zero lost distinct keys
    assert ids == [make_id("s", k) for k in keys] and all(SAFE_ID.match(i) for i in ids)
    # windows of a clip never take another key's id
    assert not {f"{i}.w1" for i in ids} & set(ids)
    # rule 1 (older stores) is the old rule: it loses keys (U+FFFD before hashing, key == cleaned + hash)
    old = make_ids("s", pa.array(keys, pa.binary()), rule=1).to_pylist()
    assert len(set(old)) < len(keys)


def test_rule_2_reserved_shapes_are_hashed():
    digest = make_id("s", "clip 1").rsplit("-", 1)[1]
    assert make_id("s", f"clip_1-{digest}") != make_id("s", "clip 1")
    assert re.fullmatch(r"s-clip_1-[0-9a-f]{16}-[0-9a-f]{16}", make_id("s", f"clip_1-{digest}"))
    assert make_id("s", "clip.w3") != "s-clip.w3" and make_id("s", "clip.w3").startswith("s-clip.w3-")
    assert make_id("s", digest) != f"s-{digest}"
    assert make_id("s", "clip_1-95f9540953") == "s-clip_1-95f9540953"  # 10 hex: a clean key under rule 2
    assert make_id("s", b"caf\xe9") != make_id("s", b"caf\xe8")


def test_rule_1_ids_are_unchanged():
    """Ids of stores written before rule 2 (values from the code before it): they must resume as they are."""
    assert make_id("s", "clip 1", 1) == "s-clip_1-95f9540953"
    assert make_id("s", "clip_1-95f9540953", 1) == "s-clip_1-95f9540953"  # the collision rule 2 removes
    assert make_id("s", b"caf\xe9", 1) == make_id("s", b"caf\xe8", 1) == make_id("s", "caf\ufffd", 1)
    assert make_id("s", "1053841541", 1) == make_id("s", "1053841541") == "s-1053841541"
    keys = varied_keys()
    assert make_ids("s", pa.array(keys), rule=1).to_pylist() == [make_id("s", k, 1) for k in keys]
    with pytest.raises(ValueError, match="unknown id rule 3"):
        make_id("s", "k", 3)


def write_hostile_csv(path, keys: list[bytes], dupes: int = 0) -> int:
    """A url_list/webvid-shaped CSV (`videoid,name,contentUrl`) of the keys, every field quoted; the first `dupes`
    keys appear twice (exact duplicates, which must still be counted as such). Returns the rows written."""

    def q(b: bytes) -> bytes:
        return b'"' + b.replace(b'"', b'""') + b'"'

    lines = [b"videoid,name,contentUrl"]
    for i, k in enumerate(keys + keys[:dupes]):
        lines.append(b",".join((q(k), q(b"caption %d" % i), q(b"http://h/%d.mp4" % i))))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(keys) + dupes
