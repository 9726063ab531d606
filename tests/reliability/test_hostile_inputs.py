"""Inputs built by an adversary (issue 15): keys made to collide, CSVs with rows that do not parse, long fields and
other encodings, and (below) samples that would take all the memory. Real Ray, real files, real stores."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.job import validate_job
from pipeline.run import run_job
from pipeline.sources.ids import bucket_of, make_id
from tests.reliability.conftest import final_state, job_dict
from tests.test_ids import hostile_keys, write_hostile_csv

DUPES = 100


def seed_old_store(out: Path, cfg: dict, ids: list[str]) -> None:
    """A store as written before id rules were recorded (version.json without `id_rule`) whose ledger holds
    `ids` as ok."""
    from pipeline.ledger import LEVELS, write_levels
    from pipeline.run import identities, version_name
    from pipeline.storage import Storage
    from pipeline.store import Store
    from schemas.tokens import ledger_schema

    job = validate_job(cfg)
    tok, pre = identities(job)
    name = version_name(tok, pre)
    store = Store(Storage(str(out)).child(name))
    store.init({"name": name, "buckets": job.ray.buckets}, tok, pre)
    assert "id_rule" not in store.read_json("version.json")
    n, arr = len(ids), pa.array(ids, pa.string())
    table = pa.table({"id": arr, "bucket": pa.array(bucket_of(arr, job.ray.buckets), pa.int32()),
                      "status": pa.array(["ok"] * n), "stage": pa.array(["tokenize"] * n),
                      "reason": pa.nulls(n, pa.string()), "modality": pa.array(["video"] * n),
                      "source": pa.array(["s"] * n), "uri": pa.nulls(n, pa.string()),
                      "seq": pa.array(np.zeros(n, np.int64))}).cast(ledger_schema())
    write_levels(store.storage, f"{LEVELS}/0000000000-0000000000-seed.parquet",
                 table.sort_by([("bucket", "ascending"), ("id", "ascending")]))


def test_hostile_keys_lose_nothing_through_ray(ray_local, tmp_path, figures):
    """10k distinct raw keys built to collide (+ 100 exact duplicate rows), planned by Ray: every distinct key is
    a sample to do, only the exact duplicates are counted as duplicates."""
    keys = hostile_keys()
    rows = write_hostile_csv(tmp_path / "k.csv", keys, dupes=DUPES)
    cfg = job_dict(tmp_path / "out", [{"type": "webvid", "name": "s", "path": str(tmp_path / "k.csv")}])
    counts = run_job(validate_job(cfg), dry_run=True).resume["s"]
    figures.setdefault("hostile_inputs", []).append(
        {"case": "10k hostile keys + 100 duplicate rows (Ray plan)", "trials": len(keys),
         "lost": len(keys) - counts["todo"],
         "duplicated": counts["duplicate"] - DUPES, "wrong data served": 0})
    assert counts["rows"] == rows and counts["duplicate"] == DUPES and counts["todo"] == len(keys), counts


def test_old_store_resumes_with_its_id_rule(ray_local, tmp_path):
    """A store without `id_rule` keeps rule 1: the samples it holds are found done, under their old ids."""
    keys = ["clip 1", "a/b", "x" * 100, "1053841541", "caf\u00e9"]
    path = tmp_path / "k.csv"
    write_hostile_csv(path, [k.encode() for k in keys])
    cfg = job_dict(tmp_path / "out", [{"type": "webvid", "name": "s", "path": str(path)}])
    seed_old_store(tmp_path / "out", cfg, [make_id("s", k, rule=1) for k in keys])
    counts = run_job(validate_job(cfg), dry_run=True).resume["s"]
    assert counts["ok"] == len(keys) and counts["todo"] == 0, counts
    # the same store under rule 2 would redo the changed keys: the rule matters
    assert {make_id("s", k, rule=1) for k in keys} != {make_id("s", k) for k in keys}


def test_csv_that_fights_back_through_a_job(ray_local, tmp_path):
    """One job, real Ray: a 1 MB caption, rows with too many / too few fields, a UTF-16 file and a Panda-70M row of
    10k clips. Nothing aborts: each bad row is its own `failed` sample with the reason, the rest is recorded, and
    the new store records its id rule."""
    (tmp_path / "w.csv").write_text(
        'videoid,name,contentUrl\n1,"' + "x" * (1 << 20) + '",missing/1.mp4\n2,b,missing/2.mp4,x,y\n3,c\n'
        "4,d,missing/4.mp4\n")
    (tmp_path / "u16.csv").write_bytes("videoid,name,contentUrl\n5,café,missing/5.mp4\n".encode("utf-16"))
    n = 10_000
    t = [f"{i // 3600}:{i // 60 % 60:02d}:{i % 60:02d}" for i in range(n)]
    stamps = "[" + ", ".join(f"['{s}.000', '{s}.500']" for s in t) + "]"
    caps = "[" + ", ".join(f"'clip {i}'" for i in range(n)) + "]"
    (tmp_path / "p.csv").write_text(f'videoID,url,timestamp,caption\nv,http://h/v,"{stamps}","{caps}"\n')
    sources = [{"type": "webvid", "name": "w", "path": str(tmp_path / "w.csv")},
               {"type": "webvid", "name": "u", "path": str(tmp_path / "u16.csv")},
               {"type": "panda70m", "name": "p", "path": str(tmp_path / "p.csv"), "min_matching_score": 0.5}]
    cfg = job_dict(tmp_path / "out", sources)
    t0 = time.perf_counter()
    summary = run_job(validate_job(cfg))
    assert time.perf_counter() - t0 < 600
    state = final_state(tmp_path / "out")
    other = state["other"]
    assert state["ok"] == set() and state["problems"] == []
    assert {k: other[k]["stage"] for k in ("w-1", "w-4", "u-5")} == {"w-1": "fetch", "w-4": "fetch", "u-5": "fetch"}
    unparsed = sorted(r["reason"] for k, r in other.items() if k.startswith("w-") and r["stage"] == "source")
    assert len(unparsed) == 2 and unparsed[0].startswith("unparsable row in w.csv: expected 3 fields, got 2")
    clips = [r for k, r in other.items() if k.startswith("p-")]
    assert len(clips) == n and {r["status"] for r in clips} == {"skipped"}  # filtered before any download
    assert len(other) == 3 + 2 + n and summary.counts["failed"] == 5
    store = state["store"]
    assert store.read_json("version.json")["id_rule"] == 2
