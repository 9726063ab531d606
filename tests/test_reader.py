"""The training-side reader (pipeline/reader.py, pipeline/packing.py) over real stores written by the real writer and
commit protocol: resume exactness with torchdata's StatefulDataLoader (1 and 4 workers) and 2 ranks, determinism,
packing invariants, fp16 end to end, filters, the epoch snapshot, corrupt shards, S3 (SeaweedFS), and decoding a
real image back to pixels with the tokenizer that made it."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from pipeline.packing import plan_batches
from pipeline.reader import ShardError, TokenReader, voxel_grid
from pipeline.storage import Storage
from pipeline.store import Store
from pipeline.writer import ShardWriter, WriteConfig
from schemas.tokens import TokenDims
from tests.test_store import commit_rows, flip_byte, open_store, row

CFG = WriteConfig(shard_bytes=1 << 16, shard_max_bytes=1 << 17, row_group_bytes=1 << 14)
MODS = ("image", "video", "3d")


def sample(i: int) -> dict:
    m = MODS[i % 3]
    n = 4 + (i * 37) % 60
    extra = {"caption": None} if i % 5 == 0 else {}
    return row(i, m, n=n, source=f"src{i % 2}", **extra)


def fill(store: Store, first: int, count: int, per_commit: int = 40) -> None:
    for a in range(first, first + count, per_commit):
        commit_rows(store, [sample(i) for i in range(a, min(a + per_commit, first + count))], cfg=CFG)
    store.checkpoint()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> str:
    """~240 rows in a few dozen small row groups, three modalities, some without a caption."""
    path = str(tmp_path_factory.mktemp("reader") / "v1")
    fill(open_store(Storage(path)), 0, 240)
    return path


def expected(path: str) -> dict[str, dict]:
    """Every committed row, read with plain pyarrow: id -> row."""
    store = Store(Storage(path))
    store.load()
    out = {}
    for rel in store.shards:
        for r in pq.read_table(store.storage.path(rel)).to_pylist():
            out[r["id"]] = r
    return out


def ids_of(batches) -> list[str]:
    return [i for b in batches for i in (b["ids"] if isinstance(b, dict) else b)]


def test_one_pass_reads_every_committed_row_once(store_dir):
    want = expected(store_dir)
    got = ids_of(TokenReader(store_dir, max_tokens=300, shuffle_seed=3))
    assert sorted(got) == sorted(want) and len(got) == len(set(got)) == 240


@pytest.mark.parametrize("workers", [1, 4])
def test_resume_exact_with_stateful_dataloader(store_dir, workers):
    def loader():
        reader = TokenReader(store_dir, max_tokens=256, shuffle_seed=7, buffer_units=2)
        return StatefulDataLoader(reader, batch_size=None, num_workers=workers)

    full = [b["ids"] for b in loader()]
    assert len(full) > 12 and sorted(ids_of(full)) == sorted(expected(store_dir))
    for k in random.Random(workers).sample(range(1, len(full) - 1), 2):
        first = loader()
        it = iter(first)
        head = [next(it)["ids"] for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))  # survives a trip through a checkpoint file
        del it
        second = loader()
        second.load_state_dict(state)
        tail = [b["ids"] for b in second]
        assert head + tail == full, f"resume at step {k} with {workers} workers differs from one run"
        got = ids_of(head + tail)
        assert len(got) == len(set(got)) == 240


def test_resume_two_ranks_with_own_loop(store_dir):
    union = []
    for rank in (0, 1):
        make = lambda: TokenReader(store_dir, batch_size=7, shuffle_seed=11, rank=rank, world_size=2)  # noqa: E731
        full = ids_of(make())
        reader = make()
        it = iter(reader)
        k = 3 + rank
        head = [next(it) for _ in range(k)]
        state = reader.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        got = ids_of(head) + ids_of(resumed)
        assert got == full and len(set(got)) == len(got)
        union += got
    assert sorted(union) == sorted(expected(store_dir))  # the ranks split one pass, none twice


def test_state_after_a_whole_epoch_resumes_to_nothing(store_dir):
    reader = TokenReader(store_dir, batch_size=16, shuffle_seed=9)
    assert len(ids_of(reader)) == 240
    resumed = TokenReader(store_dir, batch_size=16, shuffle_seed=9)
    resumed.load_state_dict(reader.state_dict())
    assert list(resumed) == []
    resumed.set_epoch(1)
    assert len(ids_of(resumed)) == 240


def test_resume_refuses_another_seed_or_rank(store_dir):
    reader = TokenReader(store_dir, batch_size=5, shuffle_seed=1)
    it = iter(reader)
    next(it)
    state = reader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenReader(store_dir, batch_size=5, shuffle_seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        TokenReader(store_dir, batch_size=5, shuffle_seed=1, rank=1, world_size=2).load_state_dict(state)


def test_plan_batches_budget_and_oversized_samples():
    lengths = np.array([30, 500, 10, 60, 40, 5])
    batches = plan_batches(lengths, max_tokens=100, batch_size=None, bucket=True)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert [1] in batches  # longer than the budget: a batch of its own
    assert all(lengths[b].sum() <= 100 for b in batches if b != [1])
    assert [int(lengths[b].max()) for b in batches] == sorted(int(lengths[b].max()) for b in batches)
    assert plan_batches(lengths, None, 4, False) == [[0, 1, 2, 3], [4, 5]]


def test_one_shard_feeds_four_workers_by_row_group(tmp_path):
    path = str(tmp_path / "v1")
    one_shard = WriteConfig(shard_bytes=1 << 22, shard_max_bytes=1 << 23, row_group_bytes=1 << 14)
    commit_rows(open_store(Storage(path)), [sample(i) for i in range(60)], cfg=one_shard)
    reader = TokenReader(path, batch_size=4, modality="image")
    assert len(reader.shards) == 1 and reader.shards[0].row_groups >= 4
    per_rank = [ids_of(TokenReader(path, batch_size=4, modality="image", rank=r, world_size=4)) for r in range(4)]
    assert all(per_rank) and sorted(sum(per_rank, [])) == sorted(ids_of(reader))  # every consumer has work
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=4)
    assert sorted(ids_of(loader)) == sorted(ids_of(reader)) == sorted(sample(i)["id"] for i in range(0, 60, 3))


def test_seeded_order_is_deterministic(store_dir):
    a = [b["ids"] for b in TokenReader(store_dir, max_tokens=200, shuffle_seed=5)]
    b = [b["ids"] for b in TokenReader(store_dir, max_tokens=200, shuffle_seed=5)]
    c = [b["ids"] for b in TokenReader(store_dir, max_tokens=200, shuffle_seed=6)]
    r = TokenReader(store_dir, max_tokens=200, shuffle_seed=5)
    r.set_epoch(1)
    d = [b["ids"] for b in r]
    assert a == b
    assert a != c and a != d and sorted(ids_of(a)) == sorted(ids_of(c)) == sorted(ids_of(d))
    plain = ids_of(TokenReader(store_dir, batch_size=10))
    assert plain == ids_of(TokenReader(store_dir, batch_size=10))


@pytest.mark.parametrize("padded", [False, True])
def test_packing_budget_and_layout(store_dir, padded):
    want = expected(store_dir)
    budget = 256
    seen = []
    for b in TokenReader(store_dir, max_tokens=budget, shuffle_seed=2, padded=padded):
        lens = b["num_tokens"].tolist()
        assert sum(lens) <= budget or len(lens) == 1
        assert b["latent"].dtype == torch.float16 and b["pooled"].dtype == torch.float16
        for k, i in enumerate(b["ids"]):
            r = want[i]
            assert lens[k] == r["num_tokens"] == len(r["latent"])  # a sample is never split
            if padded:
                m = b["mask"][k]
                assert int(m.sum()) == lens[k]
                lat, crd = b["latent"][k][m], b["coords"][k][m]
            else:
                cu = b["cu_seqlens"].tolist()
                assert cu[0] == 0 and cu[-1] == len(b["latent"]) == len(b["coords"])
                lat, crd = b["latent"][cu[k] : cu[k + 1]], b["coords"][cu[k] : cu[k + 1]]
                assert (crd[:, 0] == k).all()
                crd = crd[:, 1:]
            assert np.array_equal(lat.numpy(), np.asarray(r["latent"], np.float16))
            assert np.array_equal(crd.numpy(), np.asarray(r["coords"], np.int32))
            assert np.array_equal(b["pooled"][k].numpy(), np.asarray(r["pooled"], np.float16))
            assert b["caption"][k] == r["caption"] and b["modality"][k] == r["modality"]
        seen += b["ids"]
    assert sorted(seen) == sorted(want)


def test_length_bucketing_groups_similar_lengths(store_dir):
    def spread(bucket):
        out = []
        for b in TokenReader(store_dir, max_tokens=300, shuffle_seed=4, buffer_units=64, bucket=bucket):
            lens = b["num_tokens"].float()
            if len(lens) > 1:
                out.append(float(lens.max() - lens.min()))
        return np.mean(out)

    assert spread(True) < spread(False) / 2


def test_fsq_tokens_and_filters(store_dir):
    want = expected(store_dir)
    kept = ids_of(
        TokenReader(
            store_dir,
            modality=["image", "3d"],
            batch_size=16,
            tokens="fsq_indices",
            sources=["src0"],
            has_caption=True,
            min_tokens=10,
            max_sample_tokens=50,
            where=pc.field("modality") != "3d",
        )
    )
    ref = sorted(
        i
        for i, r in want.items()
        if r["modality"] == "image" and r["source"] == "src0" and r["caption"] and 10 <= r["num_tokens"] <= 50
    )
    assert ref and sorted(kept) == ref
    b = next(iter(TokenReader(store_dir, batch_size=4, tokens="fsq_indices", columns=["source", "uri"])))
    assert b["fsq_indices"].dtype == torch.int16 and b["fsq_indices"].shape[1] == 8
    assert b["source"] == [want[i]["source"] for i in b["ids"]] and "latent" not in b


def test_a_shard_committed_mid_epoch_waits_for_the_next_epoch(tmp_path):
    path = str(tmp_path / "v1")
    store = open_store(Storage(path))
    fill(store, 0, 120)
    reader = TokenReader(path, batch_size=8, shuffle_seed=0)
    it = iter(reader)
    got = ids_of([next(it) for _ in range(3)])
    fill(store, 1000, 40)  # a concurrent run commits more shards
    got += ids_of(it)
    assert sorted(got) == sorted(r["id"] for r in map(sample, range(120)))
    reader.set_epoch(1)
    assert len(ids_of(reader)) == 160


def test_a_corrupt_shard_is_named_or_skipped_never_wrong(tmp_path):
    path = str(tmp_path / "v1")
    fill(open_store(Storage(path)), 0, 120)
    want = expected(path)
    store = Store(Storage(path))
    store.load()
    bad = sorted(store.shards)[1]
    flip_byte(store.storage, bad, at=store.shards[bad].bytes // 3)
    with pytest.raises(ShardError, match=bad.replace("/", ".")):
        for _ in TokenReader(path, batch_size=8):
            pass
    reader = TokenReader(path, batch_size=8, on_error="skip")
    with pytest.warns(UserWarning, match="skipping"):
        batches = list(reader)
    assert reader.errors and all(bad in e for e in reader.errors)
    got = ids_of(batches)
    assert len(got) == len(set(got)) and 0 < len(got) < 120
    for b in batches:  # what is yielded is exactly what was committed
        cu = b["cu_seqlens"].tolist()
        for k, i in enumerate(b["ids"]):
            assert np.array_equal(b["latent"][cu[k] : cu[k + 1]].numpy(), np.asarray(want[i]["latent"], np.float16))
    with pytest.raises(ShardError, match="sha256"):
        list(TokenReader(path, batch_size=8, verify_sha256=True))


def test_versions_are_never_mixed_unless_asked(tmp_path):
    root = tmp_path / "out"
    for name, first in (("tok-a-ppx", 0), ("tok-b-ppx", 500)):
        fill(open_store(Storage(str(root / name))), first, 30)
    with pytest.raises(ValueError, match="2 versions"):
        TokenReader(str(root))
    assert len(ids_of(TokenReader(str(root), version="tok-a-ppx", batch_size=8))) == 30
    assert len(ids_of(TokenReader(str(root), version=["tok-a-ppx", "tok-b-ppx"], batch_size=8))) == 60


def test_reads_from_s3(s3_server, s3_prefix, store_dir):
    storage = Storage(s3_server.uri(f"{s3_prefix}/reader/v1"), s3_server.options())
    fill(open_store(storage), 0, 60)
    reader = TokenReader(storage.root, storage_options=s3_server.options().model_dump(), max_tokens=256, shuffle_seed=1)
    got = list(StatefulDataLoader(reader, batch_size=None, num_workers=2))
    local = expected(store_dir)
    assert sorted(ids_of(got)) == sorted(r["id"] for r in map(sample, range(60)))
    b = got[0]
    cu = b["cu_seqlens"].tolist()
    assert np.array_equal(b["latent"][cu[0] : cu[1]].numpy(), np.asarray(local[b["ids"][0]]["latent"], np.float16))


def test_decode_a_real_image_with_the_recorded_tokenizer(tmp_path, shared_data):
    from PIL import Image

    from atoken.sparse import image_to_tokens, tokens_to_image
    from atoken.tokenizer import Tokenizer, tokenizer_identity

    img = np.asarray(Image.open(shared_data / "images" / "astronaut.png").convert("RGB").resize((64, 64)))
    tok = Tokenizer.from_files("tiny-c", device="cpu")
    rec = tok.encode([image_to_tokens(torch.from_numpy(img))])[0]
    ident = tokenizer_identity("tiny-c")
    storage = Storage(str(tmp_path / "v1"))
    store = Store(storage)
    store.init({"name": "v", "buckets": 8}, ident, {"id": "pp", "settings": {}})
    store.recover("run-1")
    dims = TokenDims(**ident["dims"])  # the model's widths (the other tests' rows use a 16-wide pooled)
    r = {
        **row(0),
        "coords": rec["coords"],
        "latent": rec["latent"],
        "fsq_indices": None,
        "pooled": rec["pooled"],
        "tokenizer": ident["id"],
    }
    store.commit(ShardWriter(storage.root, {}, "run-1", dims, CFG).write([r]), "run-1")
    reader = TokenReader(storage.root, batch_size=1)
    batch = next(iter(reader))
    out = reader.decode(batch)[0]
    direct = tok.decode([(rec["latent"].astype(np.float32), rec["coords"].astype(np.int64))])[0]
    want = ((tokens_to_image(torch.from_numpy(direct), torch.as_tensor(rec["coords"])).numpy() + 1) / 2).clip(0, 1)
    assert out.shape == (64, 64, 3) and np.allclose(out, want, atol=1e-5)
    mse = float(((out - img / 255.0) ** 2).mean())
    assert 10 * np.log10(1 / mse) > 15  # a real reconstruction of this image, not noise
    # the same row loaded by `datasets`-style dicts decodes the same
    table = pq.read_table(storage.path(sorted(store.shards)[0])).to_pylist()[0]
    assert np.allclose(reader.decode(table)[0], out, atol=1e-5)


def test_voxel_grid_places_tokens():
    coords = np.array([[1, 0, 1, 2], [1, 63, 63, 63]], np.int16)
    vals = np.arange(6, dtype=np.float16).reshape(2, 3)
    g = voxel_grid(coords, vals)
    assert g.shape == (64, 64, 64, 3) and g.dtype == np.float16
    assert np.array_equal(g[0, 1, 2], vals[0]) and np.array_equal(g[63, 63, 63], vals[1]) and g.sum() == vals.sum()
