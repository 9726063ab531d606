"""Reader throughput: tokens/s and rows/s over the demo's shards repeated to >= 1 GB, from local disk.

Measures the TokenReader alone, through a torch DataLoader with 1, 2 and 4 workers, and Hugging Face `datasets`
with the torch format and with the Arrow format. The repeated store is built with the store's own API: the demo's
committed rows, ids suffixed per copy, go through the writer's shard sizing (`write.*` defaults) and are
committed like a run's.

    python benchmarks/bench_reader.py --out benchmarks/results/reader.json [--gb 1.0] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.reader import TokenReader  # noqa: E402
from pipeline.storage import Storage  # noqa: E402
from pipeline.store import Store, versions  # noqa: E402
from pipeline.writer import ShardWriter, WriteConfig  # noqa: E402
from schemas.tokens import TokenDims  # noqa: E402


def demo_version(demo: Path) -> Storage:
    if not demo.exists():
        subprocess.run([sys.executable, "-m", "pipeline", "demo", "--out", str(demo)], check=True, cwd=REPO)
    (found,) = versions(Storage(str(demo)))
    return found


def build_repeated(src: Storage, dest: Path, target_bytes: int) -> Storage:
    """A store holding the demo's rows copied until its shards pass `target_bytes` (reused when present)."""
    storage = Storage(str(dest))
    store = Store(storage)
    if storage.exists("version.json"):
        store.load()
        if sum(s.bytes for s in store.shards.values()) >= target_bytes:
            return storage
        shutil.rmtree(dest)
    for name in ("version.json", "tokenizer.json", "preprocess.json"):
        storage.write_bytes(name, src.read_bytes(name))
    store.recover("bench")
    s = Store(src)
    s.load()
    tables = {}
    for path, shard in sorted(s.shards.items()):
        with src.open_input(path) as f:
            tables.setdefault(shard.modality, []).append(pq.read_table(f))
    tables = {m: pa.concat_tables(t) for m, t in tables.items()}
    dims = TokenDims(**json.loads(src.read_bytes("tokenizer.json"))["dims"])
    writer = ShardWriter(storage.root, {}, "bench", dims, WriteConfig())
    copies, written, seq = dict.fromkeys(tables, 0), 0, 0
    while written < target_bytes:
        recs = []
        for m, t in tables.items():  # one batch of copies per commit: shards of the writer's sizes
            reps = max(1, int(WriteConfig().shard_bytes // max(t.nbytes, 1)))
            parts = []
            for k in range(copies[m], copies[m] + reps):
                ids = pc.binary_join_element_wise(t.column("id"), pa.scalar(str(k)), "#r")
                parts.append(t.set_column(t.schema.get_field_index("id"), t.schema.field("id"), ids))
            copies[m] += reps
            recs += writer._shards(storage, f"staging/bench/{seq}", m, pa.concat_tables(parts))
        seq += 1
        rec = store.commit({"shards": recs, "counts": {}}, "bench")
        written += sum(x["bytes"] for x in rec["shards"])
        print(f"  store: {written / 1e9:.2f} GB", flush=True)
    store.checkpoint()
    return storage


def timed(batches, seconds: float) -> dict:
    """Rows and tokens per second over an iterator of batches, stopped after `seconds`."""
    rows = tokens = n = 0
    t0 = time.perf_counter()
    for b in batches:
        rows += len(b["ids"])
        tokens += int(b["num_tokens"].sum())
        n += 1
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    return {"rows_per_s": rows / dt, "tokens_per_s": tokens / dt, "rows": rows, "tokens": tokens, "s": dt}


def bench_datasets(storage: Storage, fmt: str, seconds: float, batch: int, cache: Path) -> dict:
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=storage.path("data") + "/*/*.parquet", split="train", cache_dir=str(cache)
    )  # its Arrow copy (~4 GB) stays out of ~/.cache
    ds = ds.with_format(fmt)
    rows = tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(ds), batch):
        b = ds[i : i + batch]
        nt = b["num_tokens"]
        if fmt == "arrow":  # touch the token values too, as a trainer would (zero-copy views)
            pc.list_flatten(pc.list_flatten(b.column("latent"))).to_numpy()
            tokens += pc.sum(nt).as_py()
        else:
            tokens += int(nt.sum())
        rows += len(nt)
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    return {
        "rows_per_s": rows / dt,
        "tokens_per_s": tokens / dt,
        "rows": rows,
        "tokens": tokens,
        "s": dt,
        "batch_rows": batch,
    }


def main() -> int:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/reader.json")
    p.add_argument("--work", default="out/bench-reader", help="demo run and the repeated store go here")
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=15.0, help="time budget of each measurement")
    p.add_argument("--max-tokens", type=int, default=65536)
    args = p.parse_args()
    work = Path(args.work)
    storage = build_repeated(demo_version(work / "demo"), work / "repeated", int(args.gb * 1e9))
    store = Store(storage)
    store.load()
    res = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "store": {
            "bytes": sum(s.bytes for s in store.shards.values()),
            "shards": len(store.shards),
            "row_groups": sum(s.row_groups for s in store.shards.values()),
            "counts": store.counts(),
        },
        "max_tokens": args.max_tokens,
    }
    print(json.dumps(res["store"]), flush=True)

    def make(**kw):
        return TokenReader(storage.root, max_tokens=args.max_tokens, shuffle_seed=0, **kw)

    res["reader"] = timed(make(), args.seconds)
    print("reader alone", res["reader"], flush=True)
    for threads in (0, 4):
        res[f"reader_threads_{threads}"] = timed(make(read_threads=threads), args.seconds)
        print(f"reader alone, {threads} read threads", res[f"reader_threads_{threads}"], flush=True)
    for w in (1, 2, 4):
        loader = torch.utils.data.DataLoader(make(), batch_size=None, num_workers=w)
        res[f"dataloader_{w}"] = timed(loader, args.seconds)
        print(f"dataloader {w} workers", res[f"dataloader_{w}"], flush=True)
    cache = work / "hf-cache"
    try:
        res["datasets_torch"] = bench_datasets(storage, "torch", args.seconds, 8, cache)
        print("datasets torch", res["datasets_torch"], flush=True)
        res["datasets_arrow"] = bench_datasets(storage, "arrow", args.seconds, 64, cache)
        print("datasets arrow", res["datasets_arrow"], flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    res["speedup_vs_datasets_torch"] = res["reader"]["tokens_per_s"] / res["datasets_torch"]["tokens_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(
        f"reader {res['reader']['tokens_per_s'] / 1e6:.2f} M tokens/s, "
        f"{res['speedup_vs_datasets_torch']:.0f}x datasets(torch); wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
