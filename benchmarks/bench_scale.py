"""Scale of the data plane, measured: the dry-run curve and the commit throughput of the writers.

1. Dry run (`python -m pipeline run JOB --dry-run`, a fresh process each): a synthetic WebVid-format CSV of N rows
   against a store that already holds N/2 done ids (one ledger level), for each N in --rows. Reports wall time,
   the driver's peak RSS, and the counts (which must be exact: N/2 to do, N/2 done).
2. Writers: synthetic token rows (--tokens per row, fp16 latents) through Ray Data into a store, written by 1, 2,
   4, 8 writer tasks on the workers (the driver only commits records), against one writer in the driver process
   (every row travels to it, as in the single-writer design), measured in the same run: rows/s and MB/s.
3. Per-commit cost on the driver as the store's history grows (commits 1-100 vs the last 100).

    python benchmarks/bench_scale.py --rows 100000,1000000,10000000 --writers 1,2,4,8 --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_webvid_csv(path: Path, n: int, chunk: int = 1_000_000) -> None:
    """videoid, contentUrl, duration, page_dir, name: vectorised, ~200 bytes a row."""
    schema = pa.schema([(c, pa.string()) for c in ("videoid", "contentUrl", "duration", "page_dir", "name")])
    with pacsv.CSVWriter(str(path), schema) as w:
        for s in range(0, n, chunk):
            vid = np.arange(s, min(n, s + chunk)) * 7 + 1_000_000
            ids = pa.array(vid.astype(str))
            w.write_table(
                pa.table(
                    {
                        "videoid": ids,
                        "contentUrl": pc.binary_join_element_wise(
                            "https://ak.picdn.net/shutterstock/videos/", ids, "/preview/stock-footage-synthetic.mp4", ""
                        ),
                        "duration": pa.array(np.char.add(np.char.add("PT00H00M", (vid % 50 + 5).astype(str)), "S")),
                        "page_dir": pa.array(np.char.add((vid // 50).astype(str), "_x")),
                        "name": pc.binary_join_element_wise("synthetic caption ", ids, " for a scale test", ""),
                    },
                    schema=schema,
                )
            )


def seed_store(out: Path, job, done: int) -> str:
    """A store whose ledger holds `done` ok ids (the first rows of the CSV), as one compacted level."""
    from pipeline.ledger import LEVELS, write_levels
    from pipeline.run import identities, version_name
    from pipeline.sources.ids import bucket_of, make_ids
    from pipeline.storage import Storage
    from pipeline.store import Store
    from schemas.tokens import ledger_schema

    tok, pre = identities(job)
    name = version_name(tok, pre)
    store = Store(Storage(str(out)).child(name))
    store.init({"name": name, "buckets": job.ray.buckets}, tok, pre)
    ids = make_ids("webvid", pa.array((np.arange(done) * 7 + 1_000_000).astype(str)))
    n = len(ids)
    table = pa.table(
        {
            "id": ids,
            "bucket": pa.array(bucket_of(ids, job.ray.buckets), pa.int32()),
            "status": pa.array(["ok"] * n),
            "stage": pa.array(["tokenize"] * n),
            "reason": pa.nulls(n, pa.string()),
            "modality": pa.array(["video"] * n),
            "source": pa.array(["webvid"] * n),
            "uri": pa.nulls(n, pa.string()),
            "seq": pa.array(np.zeros(n, np.int64)),
        }
    ).cast(ledger_schema())
    write_levels(
        store.storage,
        f"{LEVELS}/0000000000-0000000000-seed.parquet",
        table.sort_by([("bucket", "ascending"), ("id", "ascending")]),
    )
    return name


def dry_run_point(work: Path, n: int, cpus: int) -> dict:
    import yaml

    from pipeline.job import validate_job

    csv_path = work / f"webvid-{n}.csv"
    if not csv_path.exists():
        write_webvid_csv(csv_path, n)
    out = work / f"out-{n}"
    cfg = {
        "name": "scale",
        "out": str(out),
        "sources": [{"type": "webvid", "path": str(csv_path)}],
        "tokenize": {"config": "tiny-c"},
        "ray": {"num_cpus": cpus},
    }
    job_path = work / f"job-{n}.yaml"
    job_path.write_text(yaml.safe_dump(cfg))
    if not out.exists():
        seed_store(out, validate_job(cfg), n // 2)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PIPELINE_PROGRESS": "0"}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(job_path), "--dry-run"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=err,
            text=True,
        )
        peaks = sample_memory(proc)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        p = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    line = next(l for l in p.stdout.splitlines() if "source webvid" in l)
    rss = next(l for l in p.stdout.splitlines() if "driver peak RSS" in l)
    nums = [int(t) for t in line.replace(",", " ").replace(";", " ").split() if t.isdigit()]
    rows, todo, ok = nums[0], nums[1], nums[2]
    assert rows == n and todo == n - n // 2 and ok == n // 2, line
    return {
        "rows": n,
        "done_before": n // 2,
        "to_do": todo,
        "wall_s": round(wall, 1),
        "driver_peak_rss_mb": int(rss.split("driver peak RSS")[1].split()[0]),
        "driver_peak_private_mb": peaks.get("RssAnon"),
        "driver_peaks_mb": peaks,
        "line": line.strip(),
    }


def sample_memory(proc: subprocess.Popen, every_s: float = 0.05) -> dict:
    """Peak of each part of a process's resident memory (MB), sampled from /proc until it exits: RssAnon is its
    private memory; RssFile (mapped libraries) and RssShmem (shared object-store pages) are shared with others."""
    peaks: dict = {}
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                        peaks[key] = max(peaks.get(key, 0), int(rest.split()[0]) // 1024)
                    elif key == "Threads":
                        peaks[key] = max(peaks.get(key, 0), int(rest.split()[0]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(every_s)
    proc.wait()
    return peaks


# ---- writers -------------------------------------------------------------------------------------------------


def token_rows(batch: dict, tokens: int, dims) -> "pa.Table":
    from pipeline.ray_job import to_table

    rng = np.random.default_rng(int(batch["id"][0]))
    coords = np.zeros((tokens, 4), np.int16)

    def noise(*shape):  # random fp16 bits: as incompressible as real latents, and cheap to make
        return rng.integers(0, 1 << 15, shape, dtype=np.uint16).view(np.float16)

    rows = [
        {
            "id": f"bench-{int(i):09d}",
            "bucket": int(i) % 256,
            "modality": "video",
            "source": "bench",
            "uri": f"synthetic://{int(i)}",
            "caption": "a synthetic clip",
            "status": "ok",
            "stage": "tokenize",
            "reason": None,
            "meta": "{}",
            "coords": coords,
            "latent": noise(tokens, dims.latent),
            "logvar": None,
            "fsq_indices": None,
            "pooled": noise(dims.embed),
            "tokenizer": "bench",
            "preprocess": "bench",
            "width": 256,
            "height": 256,
            "num_frames": 16,
            "fps": 8.0,
        }
        for i in batch["id"]
    ]
    return to_table(rows)


def writer_point(ray, work: Path, mode: str, writers: int, rows: int, tokens: int, rows_per_write: int) -> dict:
    from pipeline.ray_job import _write_task, from_table
    from pipeline.storage import Storage
    from pipeline.store import Store
    from pipeline.writer import ShardWriter, WriteConfig
    from schemas.tokens import TokenDims

    dims = TokenDims(48, 8, 1152)
    out = work / f"writers-{mode}-{writers}"
    store = Store(Storage(str(out)))
    store.init({"name": "bench", "buckets": 256}, {"id": "bench", "dims": dims.__dict__}, {"id": "bench"})
    store.recover("bench")
    writer = ShardWriter(store.uri, {}, "bench", dims, WriteConfig(shard_bytes=256 << 20))
    ds = ray.data.range(rows, override_num_blocks=max(8, rows // 16)).map_batches(
        token_rows, fn_kwargs={"tokens": tokens, "dims": dims}, batch_size=16, batch_format="numpy", num_cpus=0.25
    )
    t0 = time.perf_counter()
    if mode == "workers":
        ds = ds.map_batches(
            _write_task,
            fn_kwargs={"writer": writer},
            batch_size=rows_per_write,
            batch_format="pyarrow",
            num_cpus=0.25,
            compute=ray.data.TaskPoolStrategy(size=writers),
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for rec in batch.column("record").to_pylist():
                store.commit(json.loads(rec), "bench")
    else:  # every row to the driver, which writes every shard itself
        buf = []
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            buf += from_table(batch)
            while len(buf) >= rows_per_write:
                store.commit(writer.write(buf[:rows_per_write]), "bench")
                buf = buf[rows_per_write:]
        if buf:
            store.commit(writer.write(buf), "bench")
    wall = time.perf_counter() - t0
    store.checkpoint()
    c = store.counts()["video"]
    assert c["rows"] == rows
    return {
        "mode": mode,
        "writers": writers,
        "rows": rows,
        "tokens_per_row": tokens,
        "shards": c["shards"],
        "MB": round(c["bytes"] / 1e6, 1),
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall, 1),
        "MB_per_s": round(c["bytes"] / 1e6 / wall, 1),
    }


def commit_cost(work: Path, commits: int) -> dict:
    """ms per commit on the driver for the first and the last 100 of `commits` small commits."""
    from pipeline.storage import Storage
    from pipeline.store import Store

    store = Store(Storage(str(work / "commit-cost")))
    store.init({"name": "bench", "buckets": 256}, {"id": "bench"}, {"id": "bench"})
    store.recover("bench")
    times = []
    for i in range(commits):
        staged = f"staging/bench/{i}.parquet"
        store.storage.write_bytes(staged, b"PAR1" + bytes(100) + b"PAR1", durable=False)
        rec = {
            "shards": [{"staging": staged, "modality": "video", "rows": 1, "bytes": 108, "sha256": "0" * 64}],
            "ledger": None,
            "counts": {"ok": 1},
        }
        t = time.perf_counter()
        store.commit(rec, "bench")
        times.append(time.perf_counter() - t)
    return {
        "commits": commits,
        "first_100_ms": round(1e3 * float(np.mean(times[:100])), 3),
        "last_100_ms": round(1e3 * float(np.mean(times[-100:])), 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="100000,1000000,10000000")
    p.add_argument("--writers", default="1,2,4,8")
    p.add_argument("--writer-rows", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rows-per-write", type=int, default=128)
    p.add_argument("--commits", type=int, default=2000)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: dry_run,writers,commit")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    result = {
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(sys.argv),
    }
    if "dry_run" not in skip:
        result["dry_run"] = []
        for n in (int(x) for x in args.rows.split(",")):
            point = dry_run_point(work, n, args.cpus)
            print(json.dumps(point), flush=True)
            result["dry_run"].append(point)
    if "commit" not in skip:
        result["commit_cost"] = commit_cost(work, args.commits)
        print(json.dumps(result["commit_cost"]), flush=True)
    if "writers" not in skip:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        result["writers"] = []
        for mode, k in [("driver", 1)] + [("workers", int(w)) for w in args.writers.split(",")]:
            point = writer_point(ray, work, mode, k, args.writer_rows, args.tokens, args.rows_per_write)
            print(json.dumps(point), flush=True)
            result["writers"].append(point)
        ray.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
