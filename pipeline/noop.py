"""Is a plain rerun a no-op? Decided on the driver without Ray or a model, so it returns in about a second.

A run that ends normally (not interrupted, not failed) records a fingerprint in `runs/<run>.json`: the job's
settings, what its sources list (table files by size and mtime; a folder source by its listing) taken before
the run read them, and the store's manifest, ledger and shard files after its last commit. When a later plain run
(no `--retry-failed`) computes the same fingerprint and no lock is held, every listed sample already has an
outcome: nothing is started. A source that cannot be fingerprinted cheaply (Objaverse, a folder of more than
`MAX_LISTED` files) never takes this path.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.job import JobConfig
from pipeline.lock import LOCK
from pipeline.sources import make_source
from pipeline.storage import Storage, filesystem

MAX_LISTED = 200_000  # files listed on the driver at most, over all folder sources
_NOT_SETTINGS = ("out", "ray", "progress", "qa")


def _source_part(source, budget: list[int]) -> list | None:
    plan = source.plan()
    if plan.format != "items":
        out = []
        for uri in plan.uris:
            fs, path = filesystem(uri, source.storage)
            info = fs.get_file_info(path)
            if info.mtime is None:
                return None
            out.append([uri, info.size, info.mtime.timestamp()])
        return out
    if type(source).__module__ != "pipeline.sources.folder":  # listing chunks that cost work of their own
        return None
    out = []
    for item in plan.items:
        listed = source.list_chunk(item)
        budget[0] -= len(listed)
        if budget[0] < 0:
            return None
        out.append([[r["rel"], r["size"]] for r in listed])
    return out


def sources_fingerprint(job: JobConfig) -> str | None:
    """The job's settings and its sources' listing, hashed; None when a source cannot be listed cheaply."""
    h = hashlib.sha256(
        json.dumps(
            {k: v for k, v in job.model_dump(mode="json").items() if k not in _NOT_SETTINGS},
            sort_keys=True,
            default=str,
        ).encode()
    )
    budget = [MAX_LISTED]
    for cfg in job.sources:
        part = _source_part(make_source(cfg, job.storage), budget)
        if part is None:
            return None
        h.update(json.dumps(part, default=str).encode())
    return h.hexdigest()


def store_fingerprint(storage: Storage) -> str:
    """The commit records, checkpoint, ledger and shard files by name and size: any commit, repair or
    compaction changes it, and so does a shard that is deleted, truncated or copied in (which a run repairs)."""
    files = [[e.path, e.size] for d in ("manifest", "ledger", "data") for e in storage.list(d, recursive=True)]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def last_run(storage: Storage) -> dict | None:
    """The newest run record (run ids start with their start time)."""
    runs = [e.path for e in storage.list("runs") if e.path.endswith(".json")]
    if not runs:
        return None
    try:
        return json.loads(storage.read_bytes(max(runs)))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def unchanged_since(storage: Storage, sources: str | None) -> dict | None:
    """The last run's record when a plain rerun has nothing to do: same sources and settings, the store as that
    run left it, and no run live or crashed (no lock file)."""
    if sources is None or not storage.exists("version.json") or storage.exists(LOCK):
        return None
    rec = last_run(storage)
    if not rec or not rec.get("fingerprint") or rec["fingerprint"].get("sources") != sources:
        return None
    return rec if rec["fingerprint"].get("store") == store_fingerprint(storage) else None
