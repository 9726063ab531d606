"""The shard store on its own (no Ray): commits, crash recovery, verify, and loading with Hugging Face datasets."""
import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.store import MANIFEST, ShardStore, load_state, verify
from schemas.tokens import TokenDims, token_schema

DIMS = TokenDims(latent=48, fsq_groups=8, embed=16)
TOK = {"id": "tok-test", "config_name": "test"}


def row(i: int, modality: str = "image", n: int = 3, status: str = "ok") -> dict:
    rng = np.random.default_rng(i)
    r = {"id": f"s{i:03d}", "modality": modality, "source": "t", "uri": f"/x/{i}", "caption": f"cap {i} ✓\x07",
         "status": status, "stage": "tokenize" if status == "ok" else "decode",
         "error": None if status == "ok" else "bad frame", "tokenizer": TOK["id"]}
    if status == "ok":
        r.update(coords=rng.integers(0, 9, (n, 4)), mean=rng.normal(size=(n, 48)).astype(np.float16),
                 logvar=None, indices=rng.integers(0, 4096, (n, 8)), pooled=rng.normal(size=16), span=(1.5, 2.5))
    return r


def open_store(tmp_path, shard_rows=4):
    return ShardStore(tmp_path, TOK, DIMS, shard_rows=shard_rows)


def test_commit_load_and_status(tmp_path):
    store = open_store(tmp_path)
    for i in range(10):
        store.add(row(i, "video" if i % 3 == 0 else "image"))
    store.add(row(50, status="failed"))
    store.add(row(1))  # a repeat of an ok id is ignored
    store.close()
    state = load_state(store.dir)
    assert sorted(state.ok) == [f"s{i:03d}" for i in range(10)]
    assert state.other["s050"]["reason"] == "bad frame" and state.other["s050"]["stage"] == "decode"
    assert verify(store.dir) == []
    ds = datasets.load_dataset("parquet", data_files=str(store.dir / "data" / "image" / "*.parquet"), split="train")
    assert len(ds) == 6
    assert ds.features["latent"].feature.feature.dtype == "float16"
    got = ds.with_format("arrow")[:]
    assert str(got.column("latent").type) == "list<item: fixed_size_list<item: halffloat>[48]>"
    first = ds[0]
    src = row(int(first["id"][1:]))
    np.testing.assert_array_equal(np.asarray(first["latent"], np.float16), src["mean"])
    np.testing.assert_array_equal(np.asarray(first["fsq_indices"]), src["indices"])
    assert first["caption"] == src["caption"] and first["span_start"] == 1.5
    status = pq.read_table(store.dir / "status.parquet").to_pylist()
    assert {r["status"] for r in status} == {"ok", "failed"} and len(status) == 11
    card = (store.dir / "README.md").read_text()
    assert 'config_name: image' in card and 'data/video/*.parquet' in card


def test_schema_carries_hf_features():
    meta = token_schema(DIMS).metadata
    feats = json.loads(meta[b"huggingface"])["info"]["features"]
    assert feats["pooled"]["length"] == 16 and feats["latent"]["feature"]["length"] == 48


def test_torn_manifest_tail_is_dropped(tmp_path):
    store = open_store(tmp_path)
    for i in range(4):
        store.add(row(i))
    with open(store.dir / MANIFEST, "ab") as f:
        f.write(b'{"seq": 9, "shards": [{"path": "data/ima')  # a crash mid-append
    store2 = open_store(tmp_path)
    assert sorted(store2.state.ok) == [f"s{i:03d}" for i in range(4)]
    assert (store2.dir / MANIFEST).read_bytes().endswith(b"}\n")
    assert verify(store2.dir) == []


def test_renamed_but_uncommitted_shard_is_adopted_not_duplicated(tmp_path):
    store = open_store(tmp_path)
    for i in range(4):
        store.add(row(i))
    manifest = (store.dir / MANIFEST).read_text()
    (store.dir / MANIFEST).write_text("")  # as if the crash hit between rename and manifest commit
    assert "uncommitted shard" in " ".join(verify(store.dir))
    store2 = open_store(tmp_path)
    assert sorted(store2.done_ids()) == [f"s{i:03d}" for i in range(4)]
    store2.add(row(2))  # a rerun producing the same sample again is dropped
    store2.add(row(7))
    store2.close()
    assert verify(store2.dir) == []
    ids = [i for s in load_state(store2.dir).shards for i in s["ids"]]
    assert sorted(ids) == ["s000", "s001", "s002", "s003", "s007"]
    assert json.loads(manifest.splitlines()[0])["shards"][0]["path"] == load_state(store2.dir).shards[0]["path"]


def test_tmp_files_are_removed_and_never_visible(tmp_path):
    store = open_store(tmp_path)
    (store.dir / ".tmp" / "image-part-00000.parquet").write_bytes(b"PAR1 partial")
    store2 = open_store(tmp_path)
    assert list((store2.dir / ".tmp").iterdir()) == []
    assert not list(store2.dir.glob("data/*/*.parquet"))


def test_verify_detects_corruption(tmp_path):
    store = open_store(tmp_path)
    for i in range(4):
        store.add(row(i))
    shard = next(store.dir.glob("data/image/*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("hash mismatch" in p for p in verify(store.dir))


def test_retry_failed_reopens_only_failures(tmp_path):
    store = open_store(tmp_path)
    store.add(row(1))
    store.add(row(2, status="failed"))
    store.add({**row(3, status="failed"), "status": "skipped"})
    store.close()
    store2 = open_store(tmp_path)
    assert store2.done_ids() == {"s001", "s002", "s003"}
    assert store2.done_ids(retry_failed=True) == {"s001", "s003"}
    store2.add(row(2))  # the retry succeeds: status flips to ok
    store2.close()
    assert "s002" in load_state(store2.dir).ok and "s002" not in load_state(store2.dir).other


def test_unknown_modality_is_an_error(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        store.add({**row(1), "modality": "audio"})
