"""Shard compaction (pipeline/compact.py) on local disk and SeaweedFS: small shards merged into few under the
commit protocol; the same rows afterwards, readers never see one twice, damaged shards are left alone, and a crash
in the middle is rolled forward by `recover`."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.compact import compact, plan
from pipeline.storage import Storage
from pipeline.store import MANIFEST, Store, verify
from pipeline.writer import WriteConfig
from schemas.tokens import token_schema
from tests.test_store import storage  # noqa: F401  (fixtures)
from tests.test_store import DIMS, commit_rows, flip_byte, fresh_state, open_store, reader_ids, row

KB = 1 << 10
CFG = WriteConfig(shard_bytes=64 * KB, shard_max_bytes=128 * KB, row_group_bytes=16 * KB)


def small_store(storage: Storage, images: int = 24, videos: int = 5) -> Store:
    """One commit per small shard, as many short incremental runs leave them (about 4 fit in a target shard)."""
    store = open_store(storage)
    for i in range(images):
        commit_rows(
            store, [row(i, n=24), row(1000 + i, n=24)] + ([row(2000 + i, status="failed")] if i % 4 == 0 else [])
        )
    for i in range(videos):
        commit_rows(store, [row(3000 + i, "video", n=30)])
    store.checkpoint()
    return store


def all_rows(storage: Storage) -> pa.Table:
    ts = []
    for e in storage.list("data", recursive=True):
        with storage.open_input(e.path) as f:
            ts.append(pq.read_table(f))
    return pa.concat_tables(ts).sort_by("id")


def watch_data(storage: Storage, monkeypatch) -> list[tuple[str, str]]:
    """Checks the reader invariant after every delete and move that touches data/; returns the events."""
    events = []
    for name in ("delete", "move"):
        real = getattr(Storage, name)

        def op(self, *a, _real=real, _name=name, **kw):
            out = _real(self, *a, **kw)
            if any(str(x).startswith("data/") for x in a):
                events.append((_name, a[-1]))
                reader_ids(self)
            return out

        monkeypatch.setattr(Storage, name, op)
    return events


def test_small_shards_are_merged(storage, monkeypatch):
    images = 24 if storage.local else 12  # a reader checks every step: fewer steps on S3
    store = small_store(storage, images=images)
    before, ids, counts = all_rows(storage), reader_ids(storage), store.counts()
    small = {p for p, s in store.shards.items() if s.bytes < CFG.shard_bytes // 2}
    assert len(small) == images + 5
    events, commits, real_commit = watch_data(storage, monkeypatch), [], Store.commit
    monkeypatch.setattr(
        Store, "commit", lambda self, rec, run: commits.append(real_commit(self, rec, run)) or commits[-1]
    )
    res = compact(store, "compact-1", CFG)
    monkeypatch.undo()
    assert res["problems"] == [] and res["groups"] >= 2 and res["merged_shards"] >= images
    after = store.counts()
    assert after["image"]["rows"] == counts["image"]["rows"] == 2 * images and after["video"]["rows"] == 5
    assert after["image"]["shards"] + after["video"]["shards"] == len(small) - res["merged_shards"] + res["groups"]
    assert after["image"]["shards"] < counts["image"]["shards"] // 3
    assert reader_ids(storage) == ids and all_rows(storage).equals(before)  # the same rows, values and all
    assert verify(storage) == []
    assert fresh_state(storage)[1] == after
    # every group's old shards were gone before its new shard appeared, and readers never saw an id twice
    assert len(commits) == res["groups"] and all(c["op"] == "compact" for c in commits)
    for c in commits:
        (shard,) = c["shards"]
        appear = events.index(("move", shard["path"]))
        assert all(events.index(("delete", old)) < appear for old in c["removes"])
    new = [p for p in store.shards if p not in small]
    assert sum(store.shards[p].row_groups > 1 for p in new) >= 2  # the merged image shards are re-cut
    for p in new:
        s = store.shards[p]
        with storage.open_input(p) as f:
            pf = pq.ParquetFile(f)
            assert pf.num_row_groups == s.row_groups and pf.metadata.num_rows == s.rows
            assert pf.schema_arrow.metadata == token_schema(DIMS).metadata  # HF features survive the merge
            sizes = [pf.read_row_group(g).nbytes for g in range(pf.num_row_groups)]
        # re-cut into row groups of about row_group_bytes (a group smaller than that is one row group)
        assert (len(sizes) > 1 or sum(sizes) <= CFG.row_group_bytes) and max(sizes) <= CFG.row_group_bytes + 8 * KB
    store.write_card()
    card = storage.read_bytes("README.md").decode()
    assert f"- image: {2 * images} samples in {after['image']['shards']} shards" in card
    assert "- video: 5 samples in" in card
    again = compact(store, "compact-2", CFG)
    assert again["groups"] <= 1  # what is left is (nearly) all big shards now
    assert verify(storage) == [] and reader_ids(storage) == ids


def test_a_damaged_small_shard_is_left_alone_and_reported(storage):
    store = small_store(storage, images=6, videos=4)
    video = sorted(p for p, s in store.shards.items() if s.modality == "video")
    with storage.open_input(video[1]) as f:  # a byte in the middle of the latent values, not in the footer
        chunk = pq.ParquetFile(f).metadata.row_group(0).column(token_schema(DIMS).get_field_index("latent"))
    flip_byte(storage, video[1], at=chunk.data_page_offset + chunk.total_compressed_size // 2)
    res = compact(store, "compact-1", CFG)
    assert len(res["problems"]) == 1 and res["problems"][0].startswith("not merged (hash mismatch): ")
    assert video[1] in res["problems"][0]
    assert sorted(p for p, s in store.shards.items() if s.modality == "video") == video  # untouched
    assert all(storage.exists(p) for p in video)
    assert store.counts()["image"]["shards"] < 6 and store.counts()["image"]["rows"] == 12  # the rest merged
    assert verify(storage) == [f"hash mismatch {video[1]}"]


@pytest.mark.parametrize("crash", ["after_record", "after_removes"])
def test_crash_inside_a_compaction_is_rolled_forward(storage, monkeypatch, tmp_path, crash):
    store = small_store(storage, images=8, videos=0)
    before, ids = all_rows(storage), reader_ids(storage)
    if crash == "after_record":  # the driver died right after the commit record (the fault point)
        (tmp_path / "faults").mkdir()
        monkeypatch.setenv("PIPELINE_FAULT", "commit_written:1:enospc")
        monkeypatch.setenv("PIPELINE_FAULT_DIR", str(tmp_path / "faults"))
    else:  # ... or after the old shards were removed, before the new one was moved in

        def boom(self, moves):
            raise OSError("driver died")

        monkeypatch.setattr(Store, "_move_all", boom)
    with pytest.raises(OSError):
        compact(store, "compact-1", CFG)
    monkeypatch.undo()
    record = json.loads(storage.read_bytes([e.path for e in storage.list(MANIFEST) if e.path.endswith(".json")][-1]))
    assert record["op"] == "compact" and len(record["removes"]) > 1
    seen = reader_ids(storage)  # readers may miss rows meanwhile, never see one twice
    if crash == "after_record":
        assert seen == ids
    else:
        assert set(seen) < set(ids) and not any(storage.exists(p) for p in record["removes"])
    assert storage.list("staging", recursive=True)  # the merged shard waits in staging
    out = Store(storage).recover("run-2")
    assert out.rolled_forward == 1 and out.problems == [] and out.quarantined == []
    assert storage.list("staging", recursive=True) == []
    assert reader_ids(storage) == ids and all_rows(storage).equals(before)
    state = fresh_state(storage)
    assert state[1]["image"]["rows"] == 16 and state[1]["image"]["shards"] == 8 - len(record["removes"]) + 1
    assert verify(storage) == []
    again = Store(storage).recover("run-3")
    assert (again.rolled_forward, again.problems, again.quarantined) == (0, [], [])
    assert fresh_state(storage) == state


def test_plan_groups_small_shards_of_one_modality(tmp_path):
    store = small_store(Storage(str(tmp_path / "s")), images=10, videos=3)
    groups = plan(
        store, small_bytes=CFG.shard_bytes // 2, target_bytes=3 * store.shards[next(iter(store.shards))].bytes
    )
    assert groups and all(len(g) > 1 for g in groups)
    for g in groups:
        assert len({store.shards[p].modality for p in g}) == 1
        seqs = [int(re.search(r"part-(\d+)-", p).group(1)) for p in g]
        assert seqs == sorted(seqs)  # commit order
    assert plan(store, small_bytes=1, target_bytes=CFG.shard_bytes) == []  # nothing is small
