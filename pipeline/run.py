"""Wires the stages into a Ray Data job: sources -> fetch -> decode | mesh -> tokenize (actors) -> store.

This is the only module that imports Ray. Rows travel between Ray operators as one pickled `payload` column
(plus `id`), so ragged arrays and failed rows never fight Ray's Arrow tensor types; the stages themselves see
plain dicts. The driver is the single writer: it streams results into the ShardStore, which makes every
sample land exactly once across crashes and reruns.
"""
from __future__ import annotations

import collections
import os
import pickle
import time
from dataclasses import dataclass, field

from pipeline.faults import maybe_fault
from pipeline.job import JobConfig, iter_descriptors
from pipeline.rows import OK, fail, is_ok
from pipeline.store import ShardStore
from pipeline.tokenize import Tokenize


@dataclass
class Summary:
    store_dir: str
    wall_s: float = 0.0
    todo: int = 0
    skipped_done: int = 0
    counts: dict = field(default_factory=collections.Counter)       # status -> n
    reasons: dict = field(default_factory=collections.Counter)      # (stage, reason) -> n
    stage_s: dict = field(default_factory=collections.Counter)      # stage -> summed seconds
    stage_n: dict = field(default_factory=collections.Counter)
    shards: list = field(default_factory=list)
    qa: dict = field(default_factory=dict)
    arrivals: list = field(default_factory=list)                    # time.time() of each finished row

    def steady_rate(self, lo: float = 0.1, hi: float = 0.9) -> tuple[float, float, float] | None:
        """(samples/s, start, end) between the lo and hi quantiles of row arrivals: startup and tail excluded."""
        n = len(self.arrivals)
        if len(set(self.arrivals)) < 10:  # rows arrive in blocks: too few blocks for a rate
            return None
        a, b = int(n * lo), int(n * hi) - 1
        t0, t1 = self.arrivals[a], self.arrivals[b]
        return ((b - a) / (t1 - t0) if t1 > t0 else float("inf")), t0, t1

    def add(self, row: dict) -> None:
        self.counts[row.get("status", OK)] += 1
        if not is_ok(row):
            self.reasons[(row.get("stage"), _short(row.get("error")))] += 1
        for k, v in (row.get("timings") or {}).items():
            self.stage_s[k] += v
            self.stage_n[k] += 1

    def render(self) -> str:
        lines = [f"run summary: {self.store_dir}",
                 f"  samples: {self.todo} to do, {self.skipped_done} already done; "
                 + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())),
                 f"  wall {self.wall_s:.1f}s, {sum(self.counts.values()) / max(self.wall_s, 1e-9):.2f} samples/s"]
        for k in self.stage_s:
            per = self.stage_s[k] / max(self.stage_n[k], 1)
            lines.append(f"  stage {k:9s} {self.stage_n[k]:6d} samples, {per * 1e3:8.1f} ms/sample/worker, "
                         f"{1.0 / max(per, 1e-9):8.1f} samples/s/worker")
        for (stage, reason), n in self.reasons.most_common(20):
            lines.append(f"  {n:5d} x {stage}: {reason}")
        if self.shards:
            sizes = [s["bytes"] for s in self.shards]
            lines.append(f"  shards: {len(sizes)} written this run, {sum(sizes) / 1e6:.2f} MB, "
                         f"{min(sizes) / 1e3:.1f}-{max(sizes) / 1e3:.1f} kB each")
        for m, q in self.qa.items():
            lines.append(f"  qa {m}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in q.items()))
        return "\n".join(lines)


def _short(reason: str | None, n: int = 120) -> str:
    return (reason or "").splitlines()[0][:n] if reason else ""


# ---- stage adapters: payload in, payload out, timings recorded -----------------------------------------
def _timed(stage_name: str, fn, row: dict, *args) -> dict:
    maybe_fault(stage_name)
    t0 = time.perf_counter()
    out = fn(row, *args) if is_ok(row) else row
    if is_ok(row):
        out.setdefault("timings", {})[stage_name] = time.perf_counter() - t0
    return out


def _fetch(item: dict, cfg) -> dict:
    from pipeline.fetch import fetch_row

    return {"id": item["id"], "payload": pickle.dumps(_timed("fetch", fetch_row, pickle.loads(item["payload"]), cfg))}


def _prepare(item: dict, decode_cfg, mesh_cfg) -> dict:
    """Decode images/videos, or render + voxelise 3D assets (CPU backend)."""
    row = pickle.loads(item["payload"])
    if row["modality"] == "3d":
        from pipeline.mesh.stage import mesh_to_voxels
        row = _timed("mesh", mesh_to_voxels, row, mesh_cfg)
    else:
        from pipeline.decode import decode_row
        row = _timed("decode", decode_row, row, decode_cfg)
    return {"id": item["id"], "payload": pickle.dumps(row)}


class TokenizeActor:
    """Ray actor around the plain Tokenize stage: one model per actor."""

    def __init__(self, cfg):
        self.stage = Tokenize(cfg)

    def __call__(self, batch: dict) -> dict:
        rows = [pickle.loads(p) for p in batch["payload"]]
        maybe_fault("tokenize")
        t0 = time.perf_counter()
        out = self.stage(rows)
        dt = (time.perf_counter() - t0) / max(len(rows), 1)
        for r in out:
            if is_ok(r):
                r.setdefault("timings", {})["tokenize"] = dt
        return {"id": [r["id"] for r in out], "payload": [pickle.dumps(r) for r in out]}


# ---- the job -------------------------------------------------------------------------------------------
def init_ray(job: JobConfig):
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")  # under `ray job submit`: merge with the job's env
    os.environ["PIPELINE_DRIVER_PID"] = str(os.getpid())
    env = {k: v for k, v in os.environ.items() if k.startswith("PIPELINE_") or k == "RAY_AUTH_MODE"}
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env})
    else:
        # "local": always a fresh cluster; without it Ray joins any cluster it finds running on this machine
        ray.init(address="local", num_cpus=job.ray.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(os.environ.get("PIPELINE_PROGRESS", "1") == "1")
    return ray


def open_store(job: JobConfig) -> ShardStore:
    from atoken.tokenizer import tokenizer_identity

    ident = tokenizer_identity(job.tokenize.config, job.tokenize.checkpoint)
    from schemas.tokens import TokenDims
    return ShardStore(job.out, ident, TokenDims(**ident["dims"]), job.write.shard_rows, job.write.compression)


def collect(job: JobConfig, store: ShardStore, retry_failed: bool) -> tuple[list[dict], list[dict], int]:
    """(descriptors still to do, rows already finished at the source stage, ids skipped as done before)."""
    done = store.done_ids(retry_failed)
    todo, finished, seen, skipped = [], [], set(), 0
    for src in job.sources:
        for row in iter_descriptors(src):
            if row["id"] in done:
                skipped += 1
                continue
            if row["id"] in seen:
                finished.append(fail(row, "source", f"duplicate sample id {row['id']!r} in the sources"))
                continue
            seen.add(row["id"])
            (todo if is_ok(row) else finished).append(row)
    return todo, finished, skipped


def run_job(job: JobConfig, retry_failed: bool = False) -> Summary:
    t0 = time.perf_counter()
    store = open_store(job)
    todo, finished, skipped = collect(job, store, retry_failed)
    summary = Summary(store_dir=str(store.dir), todo=len(todo) + len(finished), skipped_done=skipped)
    for row in finished:  # source-level failures and skips (bad CSV rows, unknown files)
        summary.add(row)
        store.add(row)
    shards_before = len(store.state.shards)
    if todo:
        for row in stream(job, todo):
            summary.arrivals.append(time.time())
            summary.add(row)
            row.pop("timings", None)
            store.add(row)
    store.close()
    summary.shards = store.state.shards[shards_before:]
    if job.qa.samples > 0:
        from pipeline.qa import run_qa
        summary.qa = run_qa(store, job)
    summary.wall_s = time.perf_counter() - t0
    return summary


def stream(job: JobConfig, todo: list[dict]):
    """Runs the Ray Data pipeline over `todo` and yields finished rows as they arrive."""
    ray = init_ray(job)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and job.tokenize.device != "cpu"
    cpus = int(ray.cluster_resources().get("CPU", 1))
    items = [{"id": r["id"], "payload": pickle.dumps(r)} for r in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 8 * cpus)))
    retries = {"max_retries": job.ray.max_task_retries}
    ds = ds.map(_fetch, fn_kwargs={"cfg": job.fetch}, num_cpus=job.ray.fetch_cpus, **retries)
    ds = ds.map(_prepare, fn_kwargs={"decode_cfg": job.decode, "mesh_cfg": job.mesh},
                num_cpus=job.ray.decode_cpus, **retries)
    if use_gpu:
        n = max(1, gpus * job.tokenize.actors_per_gpu)
        actor = dict(compute=ray.data.ActorPoolStrategy(size=min(n, max(1, len(items)))),
                     num_gpus=1.0 / job.tokenize.actors_per_gpu)
    else:
        actor = dict(compute=ray.data.ActorPoolStrategy(size=max(1, job.tokenize.actors)), num_cpus=1)
    ds = ds.map_batches(TokenizeActor, fn_constructor_kwargs={"cfg": job.tokenize},
                        batch_size=job.tokenize.batch_rows, batch_format="numpy", **actor)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for payload in batch["payload"]:
            yield pickle.loads(payload)

