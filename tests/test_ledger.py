"""The ledger (pipeline/ledger.py) on local disk and SeaweedFS: compaction keeps one row per id by priority
(ok > skipped > failed, then the latest commit), a bucket is read from the row groups that hold it, compaction is
crash-safe, and levels are merged when there are too many."""

from __future__ import annotations

import pickle

import pyarrow.parquet as pq
import pytest

import pipeline.ledger as ledger
from pipeline.ledger import LEVELS, LOG, Ledger, compact, fragment_path, read_all, read_bucket
from pipeline.storage import Storage
from schemas.tokens import ledger_schema, ledger_table
from tests.test_store import files, storage  # noqa: F401  (fixtures)


def outcome(i: int, status: str, bucket: int | None = None, reason: str | None = None) -> dict:
    return {
        "id": f"t-{i:05d}",
        "bucket": i % 10 if bucket is None else bucket,
        "status": status,
        "stage": None if status == "ok" else "decode",
        "reason": reason,
        "modality": "image",
        "source": "t",
        "uri": f"/x/{i}",
    }


def write_fragment(storage: Storage, seq: int, records: list[dict]) -> str:
    """A fragment as a commit leaves it: written by a writer (seq 0 inside), named by the commit's seq."""
    rel = fragment_path(seq)
    ledger.write_table(storage, rel, ledger_table(records))
    return rel


def statuses(storage: Storage, buckets=range(10)) -> dict[str, tuple[str, int]]:
    view = Ledger(storage).view()
    out = {}
    for b in buckets:
        t = view.statuses(b)
        for i, s in zip(t.column("id").to_pylist(), t.column("status").to_pylist()):
            assert i not in out, f"{i} twice"
            out[i] = s
    return out


def test_compact_keeps_one_row_per_id_by_priority_then_latest(storage):
    write_fragment(
        storage,
        1,
        [
            outcome(0, "failed", reason="r1"),
            outcome(1, "skipped"),
            outcome(2, "failed"),
            outcome(3, "ok"),
            outcome(4, "ok"),
        ],
    )
    write_fragment(storage, 2, [outcome(0, "ok"), outcome(1, "failed"), outcome(5, "skipped", reason="old")])
    write_fragment(
        storage,
        3,
        [
            outcome(0, "failed"),
            outcome(2, "failed", reason="r3"),
            outcome(3, "ok"),
            outcome(5, "skipped", reason="new"),
        ],
    )
    led = Ledger(storage)
    before = statuses(storage)
    out = compact(storage, led.fragments())
    assert led.fragments() == [] and led.levels() == [out] and out == f"{LEVELS}/0000000001-0000000003-000003.parquet"
    with storage.open_input(out) as f:
        t = pq.read_table(f)
    assert t.schema.equals(ledger_schema())
    rows = {r["id"]: r for r in t.to_pylist()}
    assert len(rows) == t.num_rows == 6  # one row per id
    assert (rows["t-00000"]["status"], rows["t-00000"]["seq"]) == ("ok", 2)  # ok beats later failures
    assert (rows["t-00001"]["status"], rows["t-00001"]["seq"]) == ("skipped", 1)  # skipped beats failed
    assert (rows["t-00002"]["status"], rows["t-00002"]["reason"]) == ("failed", "r3")  # same priority: latest
    assert rows["t-00003"]["seq"] == 3 and rows["t-00004"]["seq"] == 1
    assert rows["t-00005"]["reason"] == "new"
    keys = list(zip(t.column("bucket").to_pylist(), t.column("id").to_pylist()))
    assert keys == sorted(keys)  # sorted by (bucket, id)
    assert statuses(storage) == before
    assert {r["id"]: r["status"] for r in read_all(storage).to_pylist()} == before
    # a later fragment on top of the level: the same rules across levels and fragments
    write_fragment(storage, 4, [outcome(1, "ok"), outcome(4, "failed")])
    assert statuses(storage)["t-00001"] == "ok" and statuses(storage)["t-00004"] == "ok"


def test_bucket_reads_only_its_row_groups(storage, monkeypatch):
    monkeypatch.setattr(ledger, "ROW_GROUP_ROWS", 25)
    recs = [outcome(i, ("ok", "failed", "skipped")[i % 3], bucket=i % 16) for i in range(480)]  # 30 ids per bucket
    for k in range(4):
        write_fragment(storage, k, recs[k::4])
    level = compact(storage, Ledger(storage).fragments())
    with storage.open_input(level) as f:
        md = pq.ParquetFile(f).metadata
    col = ledger_schema().get_field_index("bucket")
    ranges = [
        (md.row_group(i).column(col).statistics.min, md.row_group(i).column(col).statistics.max)
        for i in range(md.num_row_groups)
    ]
    assert md.num_row_groups == 16 and ranges == [(b, b) for b in range(16)]  # cut only at bucket boundaries
    write_fragment(storage, 9, [outcome(1000, "ok", bucket=5)])  # and one fragment on top
    read = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *a, **kw):
        read.append((self.metadata.num_row_groups, list(row_groups)))
        return real(self, row_groups, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    view = Ledger(storage).view()
    view = pickle.loads(pickle.dumps(view))  # as the workers get it
    for b in (0, 5, 15):
        read.clear()
        t = view.statuses(b)
        want = {r["id"] for r in recs if r["bucket"] == b} | ({"t-01000"} if b == 5 else set())
        assert set(t.column("id").to_pylist()) == want and t.num_rows == len(want)
        assert t.column_names == ["id", "status"]
        assert (16, [b]) in read  # from the level: only the row group of that bucket
        assert all(len(groups) == 1 for _, groups in read)
    read.clear()
    assert view.statuses(99).num_rows == 0 and read == []  # no file has that bucket: nothing is read
    assert read_bucket(storage, level, 3, ("id", "status", "seq", "bucket")).column("bucket").to_pylist() == [3] * 30


def test_compaction_is_crash_safe(storage, monkeypatch):
    frags = [
        write_fragment(storage, k, [outcome(i, "failed" if (i + k) % 3 else "ok") for i in range(k, k + 20)])
        for k in range(5)
    ]
    before = statuses(storage)
    # a crash while the level is being written: nothing appears, the fragments stay
    real_write = ledger.write_levels

    def dies(st, rel, table):
        with st.open_output(rel) as f:
            f.write(b"PAR1 half a level")
            raise OSError("died mid-write")

    monkeypatch.setattr(ledger, "write_levels", dies)
    with pytest.raises(OSError):
        compact(storage, frags)
    monkeypatch.setattr(ledger, "write_levels", real_write)
    assert Ledger(storage).levels() == [] and Ledger(storage).fragments() == frags
    # a crash after the level is written, before (all) its inputs are deleted: the same outcomes, twice, harmless
    real_delete, deleted = Storage.delete, []

    def delete(self, rel, missing_ok=True):
        if len(deleted) == 2:
            raise OSError("died mid-delete")
        deleted.append(rel)
        return real_delete(self, rel, missing_ok)

    monkeypatch.setattr(Storage, "delete", delete)
    with pytest.raises(OSError):
        compact(storage, frags)
    monkeypatch.setattr(Storage, "delete", real_delete)
    led = Ledger(storage)
    assert len(led.levels()) == 1 and led.fragments() == frags[2:]
    assert statuses(storage) == before
    assert {r["id"]: r["status"] for r in read_all(storage).to_pylist()} == before
    # compacting the level with its leftover fragments again gives one level and the same outcomes
    out = compact(storage, led.plan_compaction()[0] + led.levels())
    assert led.levels() == [out] and led.fragments() == [] and statuses(storage) == before
    with storage.open_input(out) as f:
        assert pq.read_table(f).num_rows == len(before)


def test_plan_compaction_merges_levels_beyond_max(storage, monkeypatch):
    monkeypatch.setattr(ledger, "MAX_LEVELS", 3)
    led = Ledger(storage)
    assert led.plan_compaction() == [] and compact(storage, []) is None
    assert Ledger(storage).view().statuses(0).num_rows == 0
    for k in range(3):  # three rounds of (fragments -> one level)
        write_fragment(storage, 2 * k, [outcome(i, "failed") for i in range(k * 5, k * 5 + 5)])
        write_fragment(storage, 2 * k + 1, [outcome(i, "ok") for i in range(k * 5, k * 5 + 3)])
        plan = led.plan_compaction()
        assert plan == [led.fragments()]
        compact(storage, plan[0])
    assert len(led.levels()) == 3
    write_fragment(storage, 6, [outcome(100, "ok")])
    before = statuses(storage)
    plan = led.plan_compaction()
    assert plan == [led.levels() + led.fragments()]  # 3 levels + 1 new one > MAX_LEVELS: everything into one
    out = compact(storage, plan[0])
    assert led.levels() == [out] and led.fragments() == [] and out.startswith(f"{LEVELS}/0000000000-0000000006-")
    assert statuses(storage) == before and list(before.values()).count("ok") == 10
    assert led.covers(0) and led.covers(6) and not led.covers(7)
    assert files(storage, LOG) == []
