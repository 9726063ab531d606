"""Inputs built by an adversary (issue 15): keys made to collide, CSVs with rows that do not parse, long fields and
other encodings, and (below) samples that would take all the memory. Real Ray, real files, real stores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.job import validate_job
from pipeline.run import run_job
from pipeline.sources.ids import bucket_of, make_id
from tests.reliability.conftest import final_state, job_dict, make_inputs, run_cli, write_job
from tests.test_ids import hostile_keys, write_hostile_csv

DUPES = 100


def seed_old_store(out: Path, cfg: dict, ids: list[str]) -> None:
    """A store as written before id rules were recorded (version.json without `id_rule`) whose ledger holds
    `ids` as ok."""
    from pipeline.ledger import LEVELS, write_levels
    from pipeline.run import identities, version_name
    from pipeline.storage import Storage
    from pipeline.store import Store
    from schemas.tokens import ledger_table

    job = validate_job(cfg)
    tok, pre = identities(job)
    name = version_name(tok, pre)
    store = Store(Storage(str(out)).child(name))
    store.init({"name": name, "buckets": job.ray.buckets}, tok, pre)
    assert "id_rule" not in store.read_json("version.json")
    buckets = bucket_of(pa.array(ids, pa.string()), job.ray.buckets)
    table = ledger_table(
        [
            {"id": i, "bucket": int(b), "status": "ok", "stage": "tokenize", "modality": "video", "source": "s"}
            for i, b in zip(ids, buckets)
        ]
    )
    write_levels(
        store.storage,
        f"{LEVELS}/0000000000-0000000000-seed.parquet",
        table.sort_by([("bucket", "ascending"), ("id", "ascending")]),
    )


def test_hostile_keys_lose_nothing_through_ray(ray_local, tmp_path, figures):
    """10k distinct raw keys built to collide (+ 100 exact duplicate rows), planned by Ray: every distinct key is
    a sample to do, only the exact duplicates are counted as duplicates (each one to do as well: its failure,
    recorded under its own line). Beside it, a Panda-70M row of 10k clips
    is read whole: 10k samples."""
    keys = hostile_keys()
    rows = write_hostile_csv(tmp_path / "k.csv", keys, dupes=DUPES)
    cfg = job_dict(
        tmp_path / "out", [{"type": "webvid", "name": "s", "path": str(tmp_path / "k.csv")}, panda_10k_clips(tmp_path)]
    )
    resume = run_job(validate_job(cfg), dry_run=True).resume
    assert resume["p"]["rows"] == resume["p"]["todo"] == 10_000 and resume["p"]["duplicate"] == 0
    counts = resume["s"]
    figures.setdefault("hostile_inputs", []).append(
        {
            "case": "10k hostile keys + 100 duplicate rows (Ray plan)",
            "trials": len(keys),
            "lost": len(keys) - (counts["todo"] - counts["duplicate"]),
            "duplicated": counts["duplicate"] - DUPES,
            "wrong data served": 0,
        }
    )
    assert counts["rows"] == rows and counts["duplicate"] == DUPES and counts["todo"] == len(keys) + DUPES, counts


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


# ---- samples that would take all the memory ----------------------------------------------------------------------


def big_png(path: Path, side: int = 10_000) -> Path:
    """A side x side 16-bit grey PNG (200 MB decoded for 10000), written row by row: a few hundred kB on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(6), b"\0" + bytes(range(256)) * (side * 2 // 256) + b"\0" * (side * 2 % 256)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
    return path


def big_glb(path: Path, subdivisions: int = 5) -> Path:
    """A real icosphere GLB (20k triangles for 5 subdivisions)."""
    import trimesh

    trimesh.creation.icosphere(subdivisions=subdivisions).export(str(path))
    return path


def lying_glb(path: Path, claimed: int = 3_000_000_000) -> Path:
    """A small, valid GLB container whose accessors claim `claimed` vertices and indices."""
    import struct

    gltf = {
        "asset": {"version": "2.0"},
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1}]}],
        "buffers": [{"byteLength": 48}],
        "bufferViews": [{"buffer": 0, "byteLength": 36}, {"buffer": 0, "byteOffset": 36, "byteLength": 12}],
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": claimed, "type": "VEC3"},
            {"bufferView": 1, "componentType": 5125, "count": claimed, "type": "SCALAR"},
        ],
    }
    js = json.dumps(gltf).encode()
    js += b" " * (-len(js) % 4)
    body = struct.pack("<II", len(js), 0x4E4F534A) + js + struct.pack("<II", 48, 0x004E4942) + b"\0" * 48
    path.write_bytes(struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body)
    return path


def prepare_rows(paths: list[Path], **decode) -> list[dict]:
    from pipeline.decode import DecodeConfig
    from pipeline.fetch import FetchConfig
    from pipeline.mesh.stage import MeshConfig
    from pipeline.prepare import Prepare
    from pipeline.rows import new_row

    stage = Prepare(
        FetchConfig(retries=0),
        DecodeConfig(**{"timeout_s": 60, **decode}),
        MeshConfig(views=4, resolution=64, backend="cpu", max_faces=1000),
    )
    try:
        return stage([new_row(p.name, "3d" if p.suffix == ".glb" else "image", "t", uri=str(p)) for p in paths])
    finally:
        stage.teardown()


def test_image_budget_from_the_header(shared_data, tmp_path, scratch):
    """A 10000² 16-bit PNG is refused from its header (decoded bytes over the budget) before any decoding."""
    bad = big_png(tmp_path / "big.png")
    good = [shared_data / "images" / n for n in ("coffee.png", "hopper_16bit.pgm")]
    t0 = time.perf_counter()
    rows = {r["id"]: r for r in prepare_rows([good[0], bad, good[1]], max_image_bytes=64 << 20)}
    assert time.perf_counter() - t0 < 60
    assert rows["big.png"]["status"] == "failed" and rows["big.png"]["stage"] == "decode"
    assert "10000x10000 I;16 needs 191 MiB > max_image_bytes=64 MiB" in rows["big.png"]["reason"]
    assert [rows[p.name]["status"] for p in good] == ["ok", "ok"]


def test_memory_cap_in_the_decode_child(shared_data, tmp_path, scratch):
    """Past the header check, the decode child's RLIMIT_AS stops the same image: a MemoryError there is that
    sample's failure; the small images decode under the same cap, in the same (replaced) child."""
    bad = big_png(tmp_path / "big.png")
    good = [shared_data / "images" / n for n in ("coffee.png", "camera.png")]
    rows = {r["id"]: r for r in prepare_rows([good[0], bad, good[1]], memory_mb=120)}
    assert rows["big.png"]["status"] == "failed"
    assert rows["big.png"]["reason"] == "decode: out of memory (over the 120 MiB cap)"
    assert [rows[p.name]["status"] for p in good] == ["ok", "ok"]


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _prepare_in_a_process(paths: list[Path], out: Path, limit_mb: float = 400) -> int:
    """Runs the stage over `paths` in a forked process (images decoded in that process: timeout_s=0), watched as
    Ray's memory monitor would: kill -9 once it holds `limit_mb` more than at its start. Returns the exit code."""
    import multiprocessing as mp
    import os
    import pickle
    import signal

    def target():
        rows = prepare_rows(paths, timeout_s=0)
        out.write_bytes(pickle.dumps([{k: r[k] for k in ("id", "status", "stage", "reason")} for r in rows]))

    base = _rss_mb(os.getpid())
    p = mp.get_context("fork").Process(target=target)
    p.start()
    deadline = time.monotonic() + 120
    while p.is_alive() and time.monotonic() < deadline:
        if _rss_mb(p.pid) > base + limit_mb:
            os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.01)
    p.join(10)
    return p.exitcode


def test_a_sample_killed_twice_is_failed(shared_data, tmp_path, scratch):
    """The 10000² 16-bit PNG decoded in the worker itself (no child, default budgets), under a memory monitor that
    kills the worker: after two kills, the third try records that sample `failed` with the reason and keeps
    the rest of its batch."""
    import pickle

    images = shared_data / "images"
    paths = [images / "coffee.png", big_png(tmp_path / "big.png"), images / "camera.png"]
    out = tmp_path / "rows.pkl"
    for k in range(2):
        assert _prepare_in_a_process(paths, out) == -9
        assert not out.exists()
    assert _prepare_in_a_process(paths, out) == 0
    rows = {r["id"]: r for r in pickle.loads(out.read_bytes())}
    assert rows["big.png"]["status"] == "failed", rows
    assert rows["big.png"]["reason"] == (
        "its worker died 2 times while preparing it (killed for memory?); not tried again"
    )
    assert rows["coffee.png"]["status"] == rows["camera.png"]["status"] == "ok"
    assert not (scratch / "attempts").exists()  # the attempt files are gone with their samples


@pytest.mark.slow  # its own `python -m pipeline run` with its own Ray cluster, whose workers are killed
def test_a_task_killed_every_time_ends_the_job(shared_data, tmp_path, figures):
    """Ray Data retries a task whose worker died without end by default; the job's tasks get
    `ray.max_task_retries` (and Ray's memory-monitor retries the same bound). The writer task killed (kill -9)
    on every try: the job ends with an error after 1 + retries tries, instead of trying forever."""
    src = make_inputs(shared_data, tmp_path / "in", images=["camera.png"], videos=[], meshes=[])
    out = tmp_path / "out"
    cfg = job_dict(str(out), [{"type": "folder", "path": str(src)}], ray={"max_task_retries": 1, "restarts": 0})
    t0 = time.perf_counter()
    run = run_cli(write_job(tmp_path / "job.yaml", cfg), out, "shard_write:1+:self", tmp_path / "fault", timeout=400)
    tries = len(list((tmp_path / "fault").glob("shard_write-*")))
    figures.setdefault("hostile_inputs", []).append(
        {
            "case": "writer task killed on every try, max_task_retries=1 (bounded: the job ends)",
            "trials": tries,
            "lost": 0,
            "duplicated": 0,
            "wrong data served": 0,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    )
    assert run.rc not in (0, -9) and tries == 2, (run.rc, tries, run.stderr[-2000:])
    assert final_state(out)["ok"] == set() and final_state(out)["problems"] == []


def test_mesh_budget_before_loading(tmp_path, scratch):
    """Meshes over the face/vertex budget fail from their header or glTF accessors, without a full load."""
    from pipeline.mesh.load import MeshBudget, MeshError, load_mesh

    liar = lying_glb(tmp_path / "liar.glb")
    t0 = time.perf_counter()
    with pytest.raises(MeshError, match=r"liar.glb: 1000000000 triangles exceeds max_faces=1000 \(from the file"):
        load_mesh(liar, MeshBudget(max_faces=1000))
    with pytest.raises(MeshError, match="3000000000 vertices exceeds max_vertices=10"):
        load_mesh(liar, MeshBudget(max_vertices=10))
    with pytest.raises(MeshError, match="exceeds max_bytes=0 MiB"):
        load_mesh(liar, MeshBudget(max_bytes=100))
    assert time.perf_counter() - t0 < 5
    sphere = big_glb(tmp_path / "sphere.glb")
    rows = {r["id"]: r for r in prepare_rows([sphere, liar])}
    assert rows["sphere.glb"]["status"] == rows["liar.glb"]["status"] == "failed"
    assert "20480 triangles exceeds max_faces=1000" in rows["sphere.glb"]["reason"]
    assert load_mesh(sphere, MeshBudget(max_faces=20480, max_vertices=10242)).num_faces == 20480


def hostile_tables(tmp: Path) -> list[dict]:
    """Table sources that fight back: a 1 MB caption and rows with too many / too few fields (webvid `w`), a UTF-16
    file (`u`)."""
    (tmp / "w.csv").write_text(
        'videoid,name,contentUrl\n1,"' + "x" * (1 << 20) + '",missing/1.mp4\n'
        "2,b,missing/2.mp4,x,y\n3,c\n4,d,missing/4.mp4\n"
    )
    (tmp / "u16.csv").write_bytes("videoid,name,contentUrl\n5,café,missing/5.mp4\n".encode("utf-16"))
    return [
        {"type": "webvid", "name": "w", "path": str(tmp / "w.csv")},
        {"type": "webvid", "name": "u", "path": str(tmp / "u16.csv")},
    ]


def panda_10k_clips(tmp: Path) -> dict:
    """A Panda-70M row of 10k clips (its list cells are ~0.5 MB)."""
    t = [f"{i // 3600}:{i // 60 % 60:02d}:{i % 60:02d}" for i in range(10_000)]
    stamps = "[" + ", ".join(f"['{s}.000', '{s}.500']" for s in t) + "]"
    caps = "[" + ", ".join(f"'clip {i}'" for i in range(10_000)) + "]"
    (tmp / "p.csv").write_text(f'videoID,url,timestamp,caption\nv,http://h/v,"{stamps}","{caps}"\n')
    return {"type": "panda70m", "name": "p", "path": str(tmp / "p.csv")}


def test_hostile_inputs_in_one_job(ray_local, shared_data, tmp_path, figures):
    """One Ray job over everything above: the 10000² 16-bit PNG and an oversized mesh among good images (tight
    budgets), and the table sources that fight back. Nothing aborts: the bad ones are `failed` with their
    reasons, the good images committed, the job ends well within the bound, and the new store records its id
    rule."""
    src = tmp_path / "in"
    src.mkdir()
    big_png(src / "big.png")
    big_glb(src / "sphere.glb")
    good = ("coffee.png", "camera.png", "coins.png")
    for n in good:
        (src / n).write_bytes((shared_data / "images" / n).read_bytes())
    cfg = job_dict(
        tmp_path / "out",
        [{"type": "folder", "path": str(src)}] + hostile_tables(tmp_path),
        decode={"max_image_bytes": 64 << 20, "memory_mb": 1024},
        mesh={"max_faces": 1000},
    )
    t0 = time.perf_counter()
    summary = run_job(validate_job(cfg))
    wall = time.perf_counter() - t0
    assert wall < 600
    state = final_state(tmp_path / "out")
    other = state["other"]
    assert state["problems"] == [] and state["ok"] == {f"folder-{n}" for n in good}
    assert "max_image_bytes=64 MiB" in other["folder-big.png"]["reason"]
    assert "exceeds max_faces=1000" in other["folder-sphere.glb"]["reason"]
    assert {k: other[k]["stage"] for k in ("w-1", "w-4", "u-5")} == {"w-1": "fetch", "w-4": "fetch", "u-5": "fetch"}
    unparsed = sorted(r["reason"] for k, r in other.items() if k.startswith("w-") and r["stage"] == "source")
    assert len(unparsed) == 2 and unparsed[0].startswith("unparsable line 3 of w.csv: expected 3 fields, got 5")
    assert unparsed[1].startswith("unparsable line 4 of w.csv: expected 3 fields, got 2")
    assert len(other) == 2 + 3 + 2 and summary.counts["failed"] == 7
    assert state["store"].read_json("version.json")["id_rule"] == 2
    figures.setdefault("hostile_inputs", []).append(
        {
            "case": "10000² 16-bit PNG + 20k-face mesh among 3 good images, CSVs that fight back (one Ray job)",
            "trials": 1,
            "lost": len({f"folder-{n}" for n in good} - state["ok"]),
            "duplicated": 0,
            "wrong data served": 0,
            "wall_s": round(wall, 1),
        }
    )


def table_sources(tmp: Path, a: Path, b: Path) -> list[dict]:
    """The same five rows as CSV, JSON lines and Parquet: a good row, a row that does not parse (CSV: a field too
    many; JSON: a torn line, then a line that is not an object), a good row, and line 5 repeating line 2's url.
    (Parquet rows always parse: its duplicate is row 3.)"""
    (tmp / "t.csv").write_text(f"url,caption\n{a},first\n{b},second,extra\n{b},second\n{a},again\n")
    torn = json.dumps({"url": str(b), "caption": "second"})[:-9]
    lines = [{"url": str(a), "caption": "first"}, None, [1], {"url": str(b), "caption": "second"}]
    text = [torn if r is None else json.dumps(r) for r in lines] + [json.dumps({"url": str(a), "caption": "again"})]
    (tmp / "t.jsonl").write_text("\n".join(text) + "\n")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"url": [str(a), str(b), str(a)], "caption": ["first", "second", "again"]}), tmp / "t.parquet"
    )
    return [
        {"type": "url_list", "name": "c", "path": str(tmp / "t.csv")},
        {"type": "url_list", "name": "j", "path": str(tmp / "t.jsonl")},
        {"type": "url_list", "name": "q", "path": str(tmp / "t.parquet")},
    ]


def test_unparsable_rows_and_duplicates_in_every_table_format(ray_local, shared_data, tmp_path, figures):
    """Issue 15 items 3 and 6 through one Ray job, for each table format: a row that does not parse is that row's
    failure, naming its file and line, and the rows around it are committed; a repeated row is a failure
    recorded under its own file and line, naming the id it repeats, and the id stays ok."""
    from pipeline.sources import iter_rows, make_source, source_config

    a, b = shared_data / "images" / "camera.png", shared_data / "images" / "coins.png"
    sources = table_sources(tmp_path, a, b)
    good = {
        s["name"]: [r["id"] for r in iter_rows(make_source(source_config(s))) if r["status"] == "ok"] for s in sources
    }
    run_job(validate_job(job_dict(tmp_path / "out", sources)))
    state = final_state(tmp_path / "out")
    other = {k: r["reason"] for k, r in state["other"].items()}
    ids = {n: sorted(set(v)) for n, v in good.items()}
    assert state["problems"] == [] and state["ok"] == {i for v in ids.values() for i in v}, state
    assert all(len(v) == 2 for v in ids.values()), ids
    for name, file, last in (("c", "t.csv", 5), ("j", "t.jsonl", 5), ("q", "t.parquet", 3)):
        first = make_id(name, str(a))
        assert other.pop(f"{name}:{file}:{last}").startswith(f"duplicate of {first} (its row: {file}:"), name
    unparsed = sorted(other.values())
    assert len(unparsed) == 3, other
    assert unparsed[0].startswith("unparsable line 2 of t.jsonl: JSONDecodeError")
    assert unparsed[1].startswith("unparsable line 3 of t.csv: expected 2 fields, got 3")
    assert unparsed[2].startswith("unparsable line 3 of t.jsonl: not a JSON object: list")
    figures.setdefault("hostile_inputs", []).append(
        {
            "case": "CSV, JSON lines, Parquet: unparsable rows and a duplicate in each (one Ray job)",
            "trials": 3,
            "lost": sum(len(v) for v in ids.values()) - len(state["ok"]),
            "duplicated": 0,
            "wrong data served": 0,
        }
    )
