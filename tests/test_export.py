"""Exports (pipeline/export.py): WebDataset tars loaded back with `webdataset`, a Lance dataset loaded back with
`lance`, every value compared with the committed Parquet rows; reruns export only what is new, and a crash between
an output and its record never leaves a row twice."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

import pipeline.export as ex
from pipeline.cli import main
from pipeline.storage import Storage
from tests.test_reader import expected, fill
from tests.test_store import open_store

TOKENS = ("latent", "coords", "pooled", "fsq_indices")


@pytest.fixture
def store_path(tmp_path) -> str:
    path = str(tmp_path / "v1")
    fill(open_store(Storage(path)), 0, 90)
    return path


def wds_samples(dest: str) -> list[dict]:
    import webdataset as wds

    man = json.loads(Storage(dest).read_bytes(ex.MANIFEST))
    urls = sorted(f"{dest}/{o['path']}" for s in man["sources"].values() for o in s["outputs"])
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())


def check_wds(dest: str, want: dict, bucketed: bool) -> None:
    got = wds_samples(dest)
    assert sorted(s["json"]["id"] for s in got) == sorted(want)  # every row once
    for s in got:
        r = want[s["json"]["id"]]
        assert s["__key__"] == ex.sample_key(r["id"])
        for c in TOKENS:
            a = s[f"{c}.npy"]
            assert a.dtype == (np.float16 if c in ("latent", "pooled") else np.int16)
            assert np.array_equal(a, np.asarray(r[c], a.dtype)), c
        meta = {k: v for k, v in s["json"].items() if k != "token_bucket"}
        assert meta == {k: v for k, v in r.items() if k not in TOKENS + ("logvar",)}
        if bucketed:
            b = s["json"]["token_bucket"]
            assert b >= r["num_tokens"] > b // 2 or b == 1
            assert f"/tokens-{b:06d}/" in s["__url__"]


@pytest.mark.parametrize("bucket_by", [None, "tokens"])
def test_webdataset_export_loads_back_equal(store_path, bucket_by):
    res = ex.export(store_path, "webdataset", bucket_by=bucket_by)
    assert res["exported"] > 1 and res["rows"] == 90
    check_wds(res["dest"], expected(store_path), bucket_by is not None)


def test_lance_export_loads_back_equal(store_path):
    res = ex.export(store_path, "lance", bucket_by="tokens")
    got = ex.lance_rows(res["dest"])
    want = expected(store_path)
    assert got.column("id").to_pylist() == sorted(want)
    assert got.schema.field("latent").type == pa.list_(pa.list_(pa.float16(), 48))
    for r in got.to_pylist():
        w = want[r["id"]]
        assert r.pop("token_bucket") >= w["num_tokens"]
        for c in TOKENS:
            assert np.array_equal(np.asarray(r[c], np.float64), np.asarray(w[c], np.float64)), c
        assert {k: v for k, v in r.items() if k not in TOKENS} == {k: v for k, v in w.items() if k not in TOKENS}


@pytest.mark.parametrize("fmt", ["webdataset", "lance"])
def test_export_resumes_exactly_once_after_a_crash(store_path, fmt, monkeypatch, tmp_path):
    dest = str(tmp_path / f"exp-{fmt}")
    first = ex.export(store_path, fmt, dest=dest)
    fill(open_store(Storage(store_path)), 500, 60)  # a later run commits more shards
    real, calls = ex._save_manifest, []

    def crash_on_second(target, man):
        calls.append(1)
        if len(calls) == 2:  # the second new shard's output is written, its record is not
            raise KeyboardInterrupt("killed")
        real(target, man)

    monkeypatch.setattr(ex, "_save_manifest", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ex.export(store_path, fmt, dest=dest)
    monkeypatch.undo()
    again = ex.export(store_path, fmt, dest=dest)
    assert again["skipped"] == first["exported"] + 1 and again["exported"] >= 1
    want = expected(store_path)
    ids = (
        [s["json"]["id"] for s in wds_samples(dest)]
        if fmt == "webdataset"
        else ex.lance_rows(dest).column("id").to_pylist()
    )
    assert sorted(ids) == sorted(want) and len(ids) == 150  # nothing twice, nothing missing
    assert ex.export(store_path, fmt, dest=dest)["exported"] == 0


def test_export_cli(store_path, capsys):
    assert main(["export", store_path, "--format", "webdataset"]) == 0
    assert "exported" in capsys.readouterr().out
    assert (
        main(
            [
                "export",
                store_path,
                "--format",
                "webdataset",
                "--bucket-by",
                "tokens",
                "--dest",
                f"{store_path}/exports/webdataset",
            ]
        )
        == 2
    )  # a different export is there
    assert "bucket_by" in capsys.readouterr().err
