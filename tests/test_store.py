"""The token store on its own (no Ray), on local disk and on a real S3 server (SeaweedFS): commits, checkpoints,
the crash rules of the staged commit protocol, verify, the dataset card, loading with Hugging Face datasets, and
the cost of a commit as the history grows.

Writers produce staged records with `ShardWriter.write(rows)` and the driver commits them with
`Store.commit(record, run_id)`, as the real job does. After every step a reader that globs `data/**/*.parquet`
must see only whole files and no id twice (`reader_ids`).

The helpers at the top (`row`, `storage`, `open_store`, `writer`, `reader_ids`, ...) are shared with
tests/test_ledger.py, test_lock.py, test_writer.py and test_compact.py.
"""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.ledger import LOG, read_all
from pipeline.storage import Storage
from pipeline.store import MANIFEST, Store, verify
from pipeline.writer import ShardWriter, WriteConfig
from schemas.tokens import TokenDims

DIMS = TokenDims(latent=48, fsq_groups=8, embed=16)
TOK, PRE = "tok-test", "pp-test"
RUN = "run-1"
SMALL = WriteConfig(shard_bytes=1 << 16, shard_max_bytes=1 << 17, row_group_bytes=1 << 14)
SHARD_RE = re.compile(r"^data/(image|video|3d)/part-\d{6}-\d+\.parquet$")


# ---- shared helpers -----------------------------------------------------------------------------------------
def row(i: int, modality: str = "image", n: int = 3, status: str = "ok", buckets: int = 8, **extra) -> dict:
    """A finished row as the tokenize stage leaves it (ok), or a failed/skipped one (no token columns)."""
    rng = np.random.default_rng(i)
    r = {
        "id": f"t-s{i:05d}",
        "bucket": i % buckets,
        "modality": modality,
        "source": "t",
        "uri": f"/x/{i}",
        "caption": f"cap {i} ✓\x07",
        "span_start": None,
        "span_end": None,
        "meta": "{}",
        "status": status,
        "stage": "tokenize" if status == "ok" else "decode",
        "reason": None if status == "ok" else f"bad frame {i}",
        "tokenizer": TOK,
        "preprocess": PRE,
    }
    if status == "ok":
        r.update(
            coords=rng.integers(0, 9, (n, 4)).astype(np.int16),
            latent=rng.normal(size=(n, DIMS.latent)).astype(np.float16),
            logvar=None,
            fsq_indices=rng.integers(0, 4096, (n, DIMS.fsq_groups)).astype(np.int16),
            pooled=rng.normal(size=DIMS.embed).astype(np.float16),
            width=32,
            height=32,
            num_frames=1,
            fps=0.0,
            span_start=1.5,
            span_end=2.5,
        )
    r.update(extra)
    return r


def make_storage(request, tmp_path, name: str = "store") -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / name))
    srv = request.getfixturevalue("s3_server")
    return Storage(srv.uri(f"{request.getfixturevalue('s3_prefix')}/{name}"), srv.options())


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    """An empty store location: a folder under tmp_path, or a fresh prefix on the session's SeaweedFS server."""
    return make_storage(request, tmp_path)


def open_store(storage: Storage, run_id: str = RUN) -> Store:
    """What the driver does under the lock: init the identity files, then recover."""
    store = Store(storage)
    store.init(
        {"name": "v", "buckets": 8},
        {"id": TOK, "config": "test", "weights_sha256": "0" * 64},
        {"id": PRE, "settings": {}},
    )
    store.recover(run_id)
    return store


def writer(storage: Storage, run_id: str = RUN, cfg: WriteConfig = SMALL) -> ShardWriter:
    return ShardWriter(storage.root, storage.options.model_dump(), run_id, DIMS, cfg)


def commit_rows(store: Store, rows: list[dict], run_id: str = RUN, cfg: WriteConfig = SMALL) -> dict:
    return store.commit(writer(store.storage, run_id, cfg).write(rows), run_id)


def files(storage: Storage, rel: str = "") -> list[str]:
    return [e.path for e in storage.list(rel, recursive=True)]


def reader_ids(storage: Storage) -> list[str]:
    """What a reader that globs `data/**/*.parquet` sees, listed and read with plain pyarrow: every file there is a
    whole Parquet file, and no id appears twice. Returns the ids, sorted."""
    sel = pafs.FileSelector(storage.path("data"), recursive=True, allow_not_found=True)
    paths = sorted(i.path for i in storage.fs.get_file_info(sel) if i.type == pafs.FileType.File)
    ids: list[str] = []
    for p in paths:
        assert p.endswith(".parquet") and not os.path.basename(p).startswith("."), f"not a shard name: {p}"
        ids += pq.read_table(p, filesystem=storage.fs, columns=["id"]).column("id").to_pylist()  # whole, or raises
    dups = sorted({i for i in ids if ids.count(i) > 1})
    assert not dups, f"a reader sees ids twice: {dups[:5]}"
    return sorted(ids)


def ok_ids(rows: list[dict]) -> list[str]:
    return sorted(r["id"] for r in rows if r["status"] == "ok")


def ledger_status(storage: Storage) -> dict[str, str]:
    t = read_all(storage, ["id", "status"])
    return dict(zip(t.column("id").to_pylist(), t.column("status").to_pylist()))


def flip_byte(storage: Storage, rel: str, at: int | None = None) -> None:
    data = bytearray(storage.read_bytes(rel))
    at = len(data) // 2 if at is None else at
    data[at] ^= 0xFF
    storage.write_bytes(rel, bytes(data))


def fresh_state(storage: Storage) -> tuple[dict, dict, int]:
    s = Store(storage)
    s.load()
    return {p: vars(v) for p, v in s.shards.items()}, s.counts(), s.next_seq


# ---- commit and load ----------------------------------------------------------------------------------------
def test_commit_load_checkpoint_verify(storage):
    store = open_store(storage)
    batches = [
        [row(0), row(1, "video"), row(2, status="failed")],
        [row(3), row(4), row(5, "3d"), row(6, status="skipped")],
        [row(7, "video")],
    ]
    commits = [commit_rows(store, b) for b in batches]
    assert [c["seq"] for c in commits] == [0, 1, 2]
    everything = files(storage)
    shards = [p for p in everything if p.startswith("data/")]
    assert shards and all(SHARD_RE.match(p) for p in shards), shards
    assert all(p.startswith(("data/", f"{LOG}/")) for p in everything if p.endswith(".parquet"))
    assert set(everything) - set(shards) == {"version.json", "tokenizer.json", "preprocess.json"} | {
        p for p in everything if p.startswith((f"{MANIFEST}/", f"{LOG}/"))
    }
    for p in shards:  # each shard holds one modality, the one its folder names
        mods = set(pq.read_table(storage.path(p), filesystem=storage.fs, columns=["modality"]).column(0).to_pylist())
        assert mods == {p.split("/")[1]}
    assert [p for p in everything if p.startswith(f"{MANIFEST}/")] == [f"{MANIFEST}/{s:010d}.json" for s in range(3)]
    assert [p for p in everything if p.startswith("ledger/")] == [f"{LOG}/{s:010d}.parquet" for s in range(3)]
    assert not [p for p in everything if p.startswith("staging/")]
    rows = [r for b in batches for r in b]
    assert reader_ids(storage) == ok_ids(rows)
    counts = store.counts()
    assert {m: (c["rows"], c["shards"]) for m, c in counts.items()} == {"image": (3, 2), "video": (2, 2), "3d": (1, 1)}
    for m, c in counts.items():
        assert c["bytes"] == sum(storage.size(p) for p in shards if p.startswith(f"data/{m}/"))
    # a fresh object reproduces the state from the records alone
    state = fresh_state(storage)
    assert state == ({p: vars(s) for p, s in store.shards.items()}, store.counts(), 3)
    assert set(state[0]) == set(shards)
    # checkpoint: one index file, the records folded in and deleted, the same state after a reload
    store.checkpoint()
    assert files(storage, MANIFEST) == [f"{MANIFEST}/checkpoint-0000000002.parquet"]
    assert fresh_state(storage) == state
    # commits after a checkpoint continue the sequence; a second checkpoint replaces the first
    store2 = Store(storage)
    store2.load()
    c = commit_rows(store2, [row(8), row(9, status="failed")])
    assert c["seq"] == 3 and c["shards"][0]["path"] == "data/image/part-000003-0.parquet"
    assert Store(storage).load()[0]["seq"] == 3
    store2.checkpoint()
    assert files(storage, MANIFEST) == [f"{MANIFEST}/checkpoint-0000000003.parquet"]
    assert fresh_state(storage)[1]["image"]["rows"] == 4
    assert verify(storage) == []
    assert reader_ids(storage) == ok_ids(rows + [row(8)])
    assert ledger_status(storage) == {r["id"]: r["status"] for r in rows + [row(8), row(9, status="failed")]}


def test_checkpoint_every_and_crash_inside_checkpoint(storage, monkeypatch):
    monkeypatch.setattr("pipeline.store.CHECKPOINT_EVERY", 3)
    store = open_store(storage)
    for i in range(4):
        commit_rows(store, [row(i)])
    assert files(storage, MANIFEST) == [f"{MANIFEST}/0000000003.json", f"{MANIFEST}/checkpoint-0000000002.parquet"]
    before = fresh_state(storage)
    assert before[2] == 4 and len(before[0]) == 4

    # a crash after the new checkpoint is written but before the records it folds are deleted
    real_delete = Storage.delete

    def crash(self, rel, missing_ok=True):
        if rel.startswith(f"{MANIFEST}/"):
            raise OSError("crash")
        return real_delete(self, rel, missing_ok)

    monkeypatch.setattr(Storage, "delete", crash)
    with pytest.raises(OSError):
        store.checkpoint()
    monkeypatch.setattr(Storage, "delete", real_delete)
    assert storage.exists(f"{MANIFEST}/checkpoint-0000000003.parquet")
    assert fresh_state(storage) == before  # the leftover record is already in the checkpoint: not applied twice
    store = open_store(storage, "run-2")
    assert commit_rows(store, [row(10)], "run-2")["seq"] == 4
    assert verify(storage) == [] and reader_ids(storage) == sorted(f"t-s{i:05d}" for i in (0, 1, 2, 3, 10))


def test_hf_datasets_loads_the_shards(storage, request, tmp_path):
    datasets = pytest.importorskip("datasets")
    store = open_store(storage)
    rows = [row(i, n=2 + i % 3) for i in range(6)] + [row(6, "video"), row(7, status="failed")]
    commit_rows(store, rows[:3])
    commit_rows(store, rows[3:])
    store.write_card()
    kw = {}
    if not storage.local:
        pytest.importorskip("s3fs")
        kw["storage_options"] = request.getfixturevalue("s3_server").storage_options()
    ds = datasets.load_dataset(
        "parquet", data_files=storage.uri("data/image/*.parquet"), split="train", cache_dir=str(tmp_path / "hf"), **kw
    )
    assert len(ds) == 6
    assert ds.features["latent"].feature.feature.dtype == "float16"
    table = ds.with_format("arrow")[:]
    assert str(table.column("latent").type) == "list<item: fixed_size_list<item: halffloat>[48]>"
    assert str(table.column("pooled").type) == "fixed_size_list<item: halffloat>[16]"
    by_id = {r["id"]: r for r in rows}
    for k, rid in enumerate(table.column("id").to_pylist()):
        src = by_id[rid]
        for col, dtype, width in (("latent", np.float16, 48), ("coords", np.int16, 4), ("fsq_indices", np.int16, 8)):
            got = table.column(col)[k].values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, src[col])
        np.testing.assert_array_equal(table.column("pooled")[k].values.to_numpy(zero_copy_only=False), src["pooled"])
        assert table.column("logvar")[k].as_py() is None
        assert table.column("caption")[k].as_py() == src["caption"]
        assert table.column("span_start")[k].as_py() == 1.5
        assert table.column("num_tokens")[k].as_py() == len(src["coords"])
    first = ds[0]
    np.testing.assert_array_equal(np.asarray(first["latent"], np.float16), by_id[first["id"]]["latent"])
    if storage.local:  # the folder itself is a dataset: the card's configs name the modalities
        vid = datasets.load_dataset(storage.root, "video", split="train", cache_dir=str(tmp_path / "hf2"))
        assert vid["id"] == ["t-s00006"]


# ---- crash rules ------------------------------------------------------------------------------------------------
def test_staged_but_never_committed_is_collected(storage):
    """(1) A writer wrote its staging, the driver died before committing: the next open removes the staging; nothing
    reached data/ or the ledger."""
    store = open_store(storage)
    commit_rows(store, [row(0)])
    rec = writer(storage).write([row(1), row(2, "video"), row(3, status="failed")])
    assert len(files(storage, "staging")) == 3 and all(storage.exists(s["staging"]) for s in rec["shards"])
    assert reader_ids(storage) == ["t-s00000"]  # staged files are invisible to readers
    own = Store(storage).recover(RUN)  # the same (live) run keeps its own staging
    assert own.staging_removed == 0 and len(files(storage, "staging")) == 3
    out = Store(storage).recover("run-2")
    assert out.staging_removed == 3 and out.rolled_forward == 0 and not out.quarantined and not out.problems
    assert files(storage, "staging") == []
    assert reader_ids(storage) == ["t-s00000"]
    assert set(ledger_status(storage)) == {"t-s00000"}
    assert verify(storage) == []


def test_commit_record_written_moves_never_done(storage, monkeypatch, tmp_path):
    """(2) The driver died right after writing the commit record (the fault point `commit_written`): the next open
    rolls the commit forward, exactly once; a second recover changes nothing."""
    store = open_store(storage)
    commit_rows(store, [row(0)])
    rows = [row(1), row(2, "video"), row(3, status="failed")]
    rec = writer(storage).write(rows)
    (tmp_path / "faults").mkdir()
    monkeypatch.setenv("PIPELINE_FAULT", "commit_written:1:enospc")
    monkeypatch.setenv("PIPELINE_FAULT_DIR", str(tmp_path / "faults"))
    with pytest.raises(OSError, match="injected at commit_written"):
        store.commit(rec, RUN)
    monkeypatch.delenv("PIPELINE_FAULT")
    record = json.loads(storage.read_bytes(f"{MANIFEST}/0000000001.json"))
    assert len(record["moves"]) == 3 and record["moves"][-1][1] == f"{LOG}/0000000001.parquet"
    assert reader_ids(storage) == ["t-s00000"]  # committed but not yet moved: readers see the state before it
    assert verify(storage)  # and verify says the commit is incomplete
    out = Store(storage).recover("run-2")
    assert out.rolled_forward == 3 and not out.problems and not out.quarantined
    assert reader_ids(storage) == ["t-s00000", "t-s00001", "t-s00002"]
    assert ledger_status(storage) == {"t-s00000": "ok", "t-s00001": "ok", "t-s00002": "ok", "t-s00003": "failed"}
    assert verify(storage) == [] and files(storage, "staging") == []
    state = fresh_state(storage)
    again = Store(storage).recover("run-3")
    assert (again.rolled_forward, again.quarantined, again.problems, again.staging_removed) == (0, [], [], 0)
    assert fresh_state(storage) == state and reader_ids(storage) == ["t-s00000", "t-s00001", "t-s00002"]
    # the store goes on from there: the next commit takes the next number
    store = open_store(storage, "run-4")
    assert commit_rows(store, [row(4)], "run-4")["seq"] == 2 and verify(storage) == []


def test_commit_record_written_by_hand_is_rolled_forward(storage, monkeypatch):
    """(2) The same with the moves suppressed (Store._move_all raising): nothing moved, all rolled forward."""
    store = open_store(storage)
    rec = writer(storage).write([row(1), row(2)])

    def boom(self, moves):
        raise OSError("driver died")

    monkeypatch.setattr(Store, "_move_all", boom)
    with pytest.raises(OSError):
        store.commit(rec, RUN)
    monkeypatch.undo()
    assert reader_ids(storage) == [] and ledger_status(storage) == {}
    out = Store(storage).recover("run-2")
    assert out.rolled_forward == 2 and not out.problems
    assert reader_ids(storage) == ["t-s00001", "t-s00002"] and verify(storage) == []


def test_moves_half_done_are_rolled_forward(storage, monkeypatch):
    """(3) The driver died in the middle of the moves: the rest are done on the next open."""
    store = open_store(storage)
    rows = [row(1), row(2, "video"), row(3, "3d"), row(4, status="skipped")]
    rec = writer(storage).write(rows)
    assert len(rec["shards"]) == 3
    real_move, calls = Storage.move, []

    def move(self, src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("driver died mid-move")
        return real_move(self, src, dst)

    monkeypatch.setattr(Storage, "move", move)
    with pytest.raises(OSError):
        store.commit(rec, RUN)
    monkeypatch.undo()
    seen = reader_ids(storage)  # some of the commit's shards may be visible already; whole, no duplicates
    assert 1 <= len(seen) <= 2 and not storage.exists(f"{LOG}/0000000000.parquet")
    out = Store(storage).recover("run-2")
    assert out.rolled_forward == 4 - len(seen) and not out.problems
    assert reader_ids(storage) == ok_ids(rows)
    assert ledger_status(storage)["t-s00004"] == "skipped"
    assert verify(storage) == [] and files(storage, "staging") == []


def test_retried_write_is_committed_once(storage):
    """(4) A writer task ran twice (a retry after a lost worker): both attempts staged the same rows, the driver
    committed one record. After recover the other attempt's staging is gone and no id is in data/ twice."""
    store = open_store(storage)
    rows = [row(i) for i in range(5)] + [row(5, status="failed")]
    first, second = writer(storage).write(rows), writer(storage).write(rows)
    assert first["shards"][0]["staging"] != second["shards"][0]["staging"]
    assert first["shards"][0]["sha256"] == second["shards"][0]["sha256"]
    store.commit(second, RUN)
    assert reader_ids(storage) == ok_ids(rows)
    assert len(files(storage, "staging")) == 2  # the orphan attempt: its shard and its ledger fragment
    out = Store(storage).recover("run-2")
    assert out.staging_removed == 2 and files(storage, "staging") == []
    assert reader_ids(storage) == ok_ids(rows) and verify(storage) == []
    assert len(read_all(storage)) == 6


def test_foreign_files_in_data_are_quarantined(storage):
    """(5) A copied shard and a foreign Parquet file dropped into data/ are moved to quarantine/, not adopted."""
    store = open_store(storage)
    commit_rows(store, [row(0), row(1)])
    shard = next(iter(store.shards))
    storage.copy(shard, "data/image/part-000000-0 (copy).parquet")
    with storage.open_output("data/video/foreign.parquet") as f:
        pq.write_table(pa.table({"id": ["x-1", "x-2"]}), f)
    storage.write_bytes("data/image/notes.txt", b"hello")
    problems = verify(storage)
    assert sum("uncommitted file" in p for p in problems) == 3
    with pytest.raises(AssertionError, match="twice|not a shard"):  # what a reader would suffer meanwhile
        reader_ids(storage)
    out = Store(storage).recover("run-2")
    assert sorted(out.quarantined) == [
        "data/image/notes.txt",
        "data/image/part-000000-0 (copy).parquet",
        "data/video/foreign.parquet",
    ]
    q = files(storage, "quarantine")
    assert len(q) == 3 and all(re.match(r"quarantine/\d+/data/", p) for p in q)
    assert reader_ids(storage) == ["t-s00000", "t-s00001"]
    assert verify(storage) == []
    assert fresh_state(storage)[1]["image"]["rows"] == 2  # not adopted


def test_verify_reports_damage(storage):
    """(6) A deleted shard, a flipped byte, a damaged commit record: verify names each."""
    store = open_store(storage)
    commit_rows(store, [row(0), row(1)])
    commit_rows(store, [row(2, "video")])
    commit_rows(store, [row(3)])
    assert verify(storage) == []
    paths = sorted(store.shards)
    flip_byte(storage, paths[0])  # data/image/part-000000-0
    storage.delete(paths[1])  # data/image/part-000002-0
    problems = verify(storage)
    assert f"hash mismatch {paths[0]}" in problems
    assert f"missing shard {paths[1]}" in problems
    assert any("ledger and shards disagree" in p for p in problems)
    storage.write_bytes(f"{MANIFEST}/0000000003.json", b'{"seq": 3, "shards": [{"pa')
    assert any("0000000003.json" in p for p in verify(storage))


def test_damaged_commit_record_is_reported_and_its_number_not_reused(storage):
    """A damaged last record whose commit moved nothing in is a torn write: dropped (kept in quarantine/)."""
    store = open_store(storage)
    commit_rows(store, [row(0)])
    storage.write_bytes(f"{MANIFEST}/0000000001.json", b"\x00garbage")
    out = Store(storage).recover("run-2")
    assert any("0000000001.json" in p for p in out.problems)
    store = open_store(storage, "run-3")
    assert commit_rows(store, [row(1)], "run-3")["seq"] == 2
    # a torn last record (nothing of it moved in) is set aside, the evidence kept under quarantine/
    kept = [p for p in files(storage, "quarantine") if p.endswith(f"{MANIFEST}/0000000001.json")]
    assert len(kept) == 1 and storage.read_bytes(kept[0]) == b"\x00garbage"


def test_recover_after_ledger_compaction_reports_no_false_problems(storage):
    """Records that outlive a ledger compaction (a crash before the run's checkpoint) still name fragments that
    are now in a level: that is not a missing file."""
    from pipeline.ledger import compact

    store = open_store(storage)
    for i in range(3):
        commit_rows(store, [row(i)])
    compact(storage, store.ledger.fragments())  # as run.py does after recover and on restarts
    out = Store(storage).recover("run-2")
    assert out.problems == [] and out.rolled_forward == 0
    assert verify(storage) == [] and len(ledger_status(storage)) == 3


# ---- outcomes and the card --------------------------------------------------------------------------------------
def test_outcomes_and_commit_counts(storage):
    store = open_store(storage)
    rows = [row(0), row(1, status="failed"), row(2, status="skipped", stage="source", reason="not media")]
    c = commit_rows(store, rows)
    assert c["counts"] == {"ok": 1, "failed": 1, "skipped": 1}
    t = {r["id"]: r for r in read_all(storage).to_pylist()}
    assert t["t-s00001"]["status"] == "failed" and t["t-s00001"]["stage"] == "decode"
    assert t["t-s00001"]["reason"] == "bad frame 1" and t["t-s00001"]["seq"] == 0
    assert t["t-s00002"]["stage"] == "source" and t["t-s00002"]["reason"] == "not media"
    assert t["t-s00001"]["bucket"] == 1 and t["t-s00001"]["uri"] == "/x/1" and t["t-s00001"]["modality"] == "image"
    c2 = commit_rows(store, [row(1)])  # --retry-failed: the failure is redone and succeeds
    assert c2["counts"] == {"ok": 1}
    assert ledger_status(storage) == {"t-s00000": "ok", "t-s00001": "ok", "t-s00002": "skipped"}
    assert verify(storage) == []


def test_card_lists_modalities_and_is_rewritten_only_on_change(storage, monkeypatch):
    store = open_store(storage)
    commit_rows(store, [row(0), row(1), row(2, "video"), row(3, status="failed")])
    commit_rows(store, [row(4)])
    writes = []
    real = Storage.write_bytes

    def spy(self, rel, data, durable=True):
        writes.append(rel)
        return real(self, rel, data, durable)

    monkeypatch.setattr(Storage, "write_bytes", spy)
    store.write_card()
    card = storage.read_bytes("README.md").decode()
    head = card.split("---")[1]
    assert re.findall(r"config_name: (\S+)", head) == ["image", "video"]
    assert 'data_files: "data/image/*.parquet"' in head and 'data_files: "data/video/*.parquet"' in head
    assert "- image: 3 samples in 2 shards" in card and "- video: 1 samples in 1 shards" in card
    assert "`tok-test`" in card and "`pp-test`" in card
    assert writes == ["README.md"]
    store.write_card()
    fresh = Store(storage)
    fresh.load()
    fresh.write_card()
    assert writes == ["README.md"]  # same content: not rewritten
    commit_rows(fresh, [row(5, "3d")])
    fresh.write_card()
    assert writes.count("README.md") == 2
    assert re.findall(r"config_name: (\S+)", storage.read_bytes("README.md").decode()) == ["image", "video", "3d"]


# ---- cost of a commit as the history grows ----------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["local", "s3"], indirect=True)
def test_commit_cost_does_not_grow_with_history(storage, monkeypatch):
    """Each commit writes one new small record and moves its own files: no file is rewritten per commit, nothing
    is listed or read back, so the last commits cost what the first did (a behaviour check, not a benchmark)."""
    n = 500 if storage.local else 60  # S3: each commit is a few requests; the structure is what counts
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # disk-sync latency is constant but noisy on a shared box
    store = open_store(storage)
    w = writer(storage)
    records = [w.write([row(i, n=1)]) for i in range(n)]
    calls: dict[str, list[str]] = {
        k: [] for k in ("write_bytes", "open_output", "list", "read_bytes", "open_input", "copy")
    }
    for name in calls:
        real = getattr(Storage, name)

        def spy(self, rel="", *a, _real=real, _name=name, **kw):
            calls[_name].append(rel)
            return _real(self, rel, *a, **kw)

        monkeypatch.setattr(Storage, name, spy)
    times = []
    for rec in records:
        t = time.perf_counter()
        store.commit(rec, RUN)
        times.append(time.perf_counter() - t)
    monkeypatch.undo()
    checkpoints = [p for p in calls["write_bytes"] if "checkpoint-" in p]
    assert len(checkpoints) == n // 256
    records_written = [p for p in calls["write_bytes"] if p not in checkpoints]
    assert records_written == [f"{MANIFEST}/{s:010d}.json" for s in range(n)]  # one new file per commit, no rewrite
    assert not calls["open_output"] and not calls["read_bytes"] and not calls["open_input"] and not calls["copy"]
    assert len(calls["list"]) == len(checkpoints)  # only a checkpoint lists (its own folder)
    if storage.local:
        first, last = sum(times[:100]), sum(times[-100:])
        assert last <= 3 * first + 0.05, f"first 100 commits {first:.3f}s, last 100 {last:.3f}s"
    assert fresh_state(storage)[1]["image"]["rows"] == n
    assert len(reader_ids(storage)) == n
