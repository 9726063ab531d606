"""The shard writer (pipeline/writer.py) on local disk and SeaweedFS: shards cut by bytes, row groups near
row_group_bytes, page checksums, records that match the staged files, outcomes in the ledger fragment only,
one modality per shard, and the run summary figures."""

from __future__ import annotations

import hashlib
import pickle
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.writer import ShardWriter, WriteConfig, cut, row_sizes, summarize
from schemas.tokens import rows_to_table, token_schema
from tests.test_store import DIMS, RUN, files, row, storage, writer  # noqa: F401

KB = 1 << 10
CFG = WriteConfig(shard_bytes=64 * KB, shard_max_bytes=96 * KB, row_group_bytes=16 * KB, compression="none")


def read_table(storage, rel, **kw):
    with storage.open_input(rel) as f:
        return pq.read_table(f, **kw)


def test_cut_reaches_target_and_respects_cap():
    rng = np.random.default_rng(0)
    for trial in range(200):
        sizes = rng.integers(1, 60, rng.integers(0, 80))
        if trial % 3 == 0 and len(sizes):
            sizes[rng.integers(len(sizes))] = 500  # one row bigger than the cap
        target = int(rng.integers(20, 100))
        cap = target + int(rng.integers(0, 100))
        ranges = cut(sizes, target, cap)
        assert [i for a, b in ranges for i in range(a, b)] == list(range(len(sizes)))  # a partition, in order
        for k, (a, b) in enumerate(ranges):
            total = int(sizes[a:b].sum())
            assert b > a
            assert total <= cap or b - a == 1, (sizes[a:b], cap)
            if k < len(ranges) - 1:  # every range but the last closed for a reason
                assert total >= target or total + int(sizes[b]) > cap
            if b - a > 1:
                assert int(sizes[a : b - 1].sum()) < target  # closed as soon as the target was reached
    assert cut(np.array([], np.int64), 10, 20) == []


def test_shards_cut_by_bytes_and_row_groups_by_row_group_bytes(storage):
    rows = [row(i, n=int(n)) for i, n in enumerate(np.random.default_rng(1).integers(20, 140, 40))]
    rows.insert(17, row(999, n=1200))  # ~150 kB: above the cap, gets a shard of its own
    rec = writer(storage, cfg=CFG).write(rows)
    sizes = row_sizes(rows_to_table(rows, DIMS))
    assert sizes[17] > CFG.shard_max_bytes
    ranges = cut(sizes, CFG.shard_bytes, CFG.shard_max_bytes)
    assert [s["rows"] for s in rec["shards"]] == [b - a for a, b in ranges] and len(ranges) >= 5
    assert [b - a for a, b in ranges if a <= 17 < b] == [1]
    ids = [r["id"] for r in rows]
    for k, (s, (a, b)) in enumerate(zip(rec["shards"], ranges)):
        est = int(sizes[a:b].sum())
        assert est <= CFG.shard_max_bytes or b - a == 1
        if k < len(ranges) - 1:
            assert est >= CFG.shard_bytes or est + int(sizes[b]) > CFG.shard_max_bytes
        # sizes are Arrow bytes; uncompressed Parquet is bigger (int16 stored as INT32, nested levels), not wildly
        assert 0.8 * est < s["bytes"] < 2 * est + 16 * KB  # + a footer that grows with the column count
        with storage.open_input(s["staging"]) as f:
            pf = pq.ParquetFile(f)
            assert pf.read(columns=["id"]).column("id").to_pylist() == ids[a:b]
            groups = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        gr = cut(sizes[a:b], CFG.row_group_bytes, CFG.row_group_bytes)
        assert groups == [gb - ga for ga, gb in gr] and s["row_groups"] == len(groups)
        for j, (ga, gb) in enumerate(gr):
            g = sizes[a:b][ga:gb]
            assert int(g.sum()) <= CFG.row_group_bytes or len(g) == 1
            if j < len(gr) - 1:  # near the target: the next row would have gone over
                assert int(g.sum()) + int(sizes[a:b][gb]) > CFG.row_group_bytes


def test_record_matches_the_staged_files_and_checksums_are_on(storage):
    rows = [row(i, n=40) for i in range(12)]
    rec = writer(storage, cfg=CFG).write(rows)
    attempt = rec["shards"][0]["staging"].split("/")[2]
    assert all(p.startswith(f"staging/{RUN}/{attempt}/") for p in files(storage))
    assert set(files(storage)) == {s["staging"] for s in rec["shards"]} | {rec["ledger"]}
    for s in rec["shards"]:
        data = storage.read_bytes(s["staging"])
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data) == storage.size(s["staging"])
        with storage.open_input(s["staging"]) as f:
            pf = pq.ParquetFile(f)
            assert pf.metadata.num_rows == s["rows"] and pf.num_row_groups == s["row_groups"]
            assert pf.schema_arrow.equals(token_schema(DIMS))  # list children read back as "element"
            assert pf.schema_arrow.metadata == token_schema(DIMS).metadata  # HF features and the format version
    assert rec["bytes"] == sum(s["bytes"] for s in rec["shards"])
    # page checksums: a flipped byte inside a page of the (uncompressed) latent column is detected on read
    s = rec["shards"][0]
    with storage.open_input(s["staging"]) as f:
        chunk = pq.ParquetFile(f).metadata.row_group(0).column(token_schema(DIMS).get_field_index("latent"))
    assert "latent" in chunk.path_in_schema
    data = bytearray(storage.read_bytes(s["staging"]))
    read_table(storage, s["staging"], page_checksum_verification=True)  # intact: fine
    data[chunk.data_page_offset + chunk.total_compressed_size - 3] ^= 0x55
    storage.write_bytes("flipped.parquet", bytes(data))
    read_table(storage, "flipped.parquet")  # without verification the damage goes unnoticed...
    with pytest.raises(OSError, match="(?i)crc|checksum"):
        read_table(storage, "flipped.parquet", page_checksum_verification=True)  # ...with it, it is an error


def test_outcomes_go_to_the_ledger_and_modalities_to_their_own_shards(storage):
    rows = [
        row(0),
        row(1, "video"),
        row(2, status="failed"),
        row(3, "3d"),
        row(4, status="skipped"),
        row(5),
        row(6, "video", status="failed"),
        row(7, "3d"),
    ]
    rec = writer(storage, cfg=CFG).write(rows)
    by_mod = {}
    for s in rec["shards"]:
        t = read_table(storage, s["staging"])
        assert set(t.column("modality").to_pylist()) == {s["modality"]} and s["staging"].endswith(
            f"/{s['modality']}-0.parquet"
        )
        by_mod[s["modality"]] = t.column("id").to_pylist()
    assert by_mod == {"image": ["t-s00000", "t-s00005"], "video": ["t-s00001"], "3d": ["t-s00003", "t-s00007"]}
    led = read_table(storage, rec["ledger"]).to_pylist()
    assert [r["id"] for r in led] == [r["id"] for r in rows]  # every outcome, in order, once
    got = {r["id"]: (r["status"], r["stage"], r["reason"], r["bucket"], r["modality"]) for r in led}
    assert got["t-s00002"] == ("failed", "decode", "bad frame 2", 2, "image")
    assert got["t-s00004"][0] == "skipped" and got["t-s00006"][:2] == ("failed", "decode")
    assert got["t-s00001"] == ("ok", "tokenize", None, 1, "video")
    assert rec["counts"] == {"ok": 5, "failed": 2, "skipped": 1} and rec["rows"] == 8
    # only failures: no shard, a ledger fragment; nothing at all: no files
    only_bad = writer(storage, cfg=CFG).write([row(10, status="failed")])
    assert only_bad["shards"] == [] and storage.exists(only_bad["ledger"])
    nothing = writer(storage, cfg=CFG).write([])
    assert nothing["shards"] == [] and nothing["ledger"] is None and nothing["rows"] == 0


def test_summarize_counts_reasons_and_timings():
    rows = [
        row(0, timings={"decode": 0.5, "tokenize": 0.25, "_done": 100.0}),
        row(1, timings={"decode": 1.5, "tokenize": 0.75, "_done": 101.0}),
        row(2, status="failed", reason="DecodeError: bad frame\nTraceback ...", timings={"decode": 2.0}),
        row(3, status="failed", reason="DecodeError: bad frame\nother"),
        row(4, status="skipped", stage="source", reason="x" * 400),
    ]
    s = summarize(rows)
    assert s["rows"] == 5 and s["counts"] == {"ok": 2, "failed": 2, "skipped": 1}
    assert sorted(map(tuple, s["reasons"])) == [("decode", "DecodeError: bad frame", 2), ("source", "x" * 160, 1)]
    assert s["timings"] == {"decode": [4.0, 3], "tokenize": [1.0, 2]}
    assert s["done_at"] == [100.0, 101.0]
    rec = ShardWriter("/nonexistent-never-written", {}, RUN, DIMS, CFG).write([])
    assert rec["write_s"] >= 0 and rec["timings"] == {}


def test_writer_is_small_and_picklable_and_attempts_are_separate(storage):
    w = writer(storage, cfg=CFG)
    w2 = pickle.loads(pickle.dumps(w))
    a, b = w.write([row(0)]), w2.write([row(0)])
    pa_, pb = a["shards"][0]["staging"], b["shards"][0]["staging"]
    assert re.match(rf"staging/{RUN}/[0-9a-f]{{16}}/image-0\.parquet$", pa_) and pa_.split("/")[2] != pb.split("/")[2]
    assert len(pickle.dumps(a)) < 4 * KB  # the record travels to the driver, the shard bytes do not


def test_write_config_sizes():
    with pytest.raises(ValidationError, match="row_group_bytes <= shard_bytes <= shard_max_bytes"):
        WriteConfig(shard_bytes=1 << 20, shard_max_bytes=1 << 19)
    with pytest.raises(ValidationError):
        WriteConfig(shard_bytes=1 << 20, shard_bytz=1)
    assert WriteConfig().compression == "zstd"
