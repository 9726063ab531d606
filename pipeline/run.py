"""The driver: validated job -> locked store -> Ray Data job -> commits, with graceful interrupts.

The driver holds no sample list and no id set: sources are read on the workers, the resume filter runs there
against the ledger, writers on the workers write the shards, and the driver only commits their small records
(`pipeline/store.py`). The first SIGINT/SIGTERM stops new work, lets in-flight rows finish (up to
`ray.interrupt_grace_s`), commits them and ends with one line; a second one aborts at once (the commit protocol
keeps what was committed). An execution that fails for an infrastructure reason (a lost node) is started again,
up to `ray.restarts` times: the resume filter skips what was committed meanwhile.
"""

from __future__ import annotations

import collections
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from pipeline.faults import maybe_fault
from pipeline.job import JobConfig, preprocess_identity
from pipeline.lock import RunLock
from pipeline.sources.ids import ID_RULE, check_rule
from pipeline.storage import Storage
from pipeline.store import Store, versions, write_root_card

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class Summary:
    store_dir: str
    run_id: str = ""
    wall_s: float = 0.0
    resume: dict = field(default_factory=dict)  # source -> filter counts
    counts: dict = field(default_factory=collections.Counter)  # status -> n (this run)
    reasons: dict = field(default_factory=collections.Counter)  # (stage, reason) -> n
    by_source: dict = field(default_factory=collections.Counter)  # (source, status, reason kind) -> n
    stage_s: dict = field(default_factory=collections.Counter)  # stage -> summed seconds
    stage_n: dict = field(default_factory=collections.Counter)
    shards: list = field(default_factory=list)  # shards committed this run
    commits: int = 0
    commit_s: float = 0.0
    write_s: float = 0.0
    qa: dict = field(default_factory=dict)
    arrivals: dict = field(default_factory=collections.Counter)  # 0.1 s bin -> rows that finished tokenizing
    notes: list = field(default_factory=list)
    interrupted: int | None = None  # the signal that stopped the run
    dry_run: bool = False
    retry_failed: bool = False  # the earlier failures were part of this run's work
    ray_stats: str = ""

    @property
    def todo(self) -> int:
        return sum(c.get("todo", 0) for c in self.resume.values())

    @property
    def done_before(self) -> dict:
        out = collections.Counter()
        for c in self.resume.values():
            for k in ("ok", "failed", "skipped"):
                out[k] += c.get(k, 0)
        return out

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    def add_record(self, rec: dict, commit: dict, commit_s: float) -> None:
        self.commits += 1
        self.commit_s += commit_s
        self.write_s += rec.get("write_s", 0.0)
        self.shards += commit["shards"]
        for k, v in rec.get("counts", {}).items():
            self.counts[k] += v
        for stage, reason, n in rec.get("reasons", []):
            if len(self.reasons) < 1000 or (stage, reason) in self.reasons:
                self.reasons[(stage, reason)] += n
        for src, status, kind, n in rec.get("by_source", []):
            self.by_source[(src, status, kind)] += n
        for k, (s, n) in rec.get("timings", {}).items():
            self.stage_s[k] += s
            self.stage_n[k] += n
        self.arrivals.update(int(t * 10) for t in rec.get("done_at", []))  # bounded: one entry per 0.1 s

    def steady_rate(self, lo: float = 0.1, hi: float = 0.9) -> tuple[float, float, float] | None:
        """(samples/s, start, end) between the lo and hi quantiles of row finish times: startup and tail out."""
        n = sum(self.arrivals.values())
        if n < 10:
            return None
        a, b = int(n * lo), int(n * hi) - 1
        seen, t0, t1 = 0, None, None
        for tbin in sorted(self.arrivals):
            seen += self.arrivals[tbin]
            if t0 is None and seen > a:
                t0 = tbin / 10
            if seen > b:
                t1 = tbin / 10
                break
        return ((b - a) / (t1 - t0) if t1 > t0 else float("inf")), t0, t1

    def ratio_lines(self) -> list[str]:
        """Success ratio per source, and per reason kind (unavailable, bot-check, network, decode, ...)."""
        per: dict = collections.defaultdict(collections.Counter)
        kinds: dict = collections.defaultdict(collections.Counter)
        for (src, status, kind), n in self.by_source.items():
            per[src][status] += n
            if status != "ok":
                kinds[src][f"{status} {kind}"] += n
        lines = []
        for src, c in sorted(per.items()):
            total = sum(c.values())
            why = ", ".join(f"{k} {n} ({n / total:.0%})" for k, n in kinds[src].most_common(8))
            lines.append(
                f"  source {src}: ok {c['ok']} of {total} ({c['ok'] / max(total, 1):.1%})" + (f"; {why}" if why else "")
            )
        return lines

    def render(self) -> str:
        done = self.done_before
        lines = [f"run summary: {self.store_dir}" + (" (dry run: nothing fetched)" if self.dry_run else "")]
        for src, c in sorted(self.resume.items()):
            lines.append(
                f"  source {src}: {c.get('rows', 0)} rows, {c.get('todo', 0)} to do, already done: "
                f"ok {c.get('ok', 0)}, failed {c.get('failed', 0)}, skipped {c.get('skipped', 0)}"
                + (f"; {c['duplicate']} duplicate rows ignored" if c.get("duplicate") else "")
            )
        dup_failed = sum(c.get("failed_duplicate", 0) for c in self.resume.values())
        retriable = done.get("failed", 0) - dup_failed
        if retriable > 0 and not self.dry_run and not self.retry_failed:
            lines.append(
                f"  {retriable} samples failed in earlier runs and were not retried: "
                f"`python -m pipeline status {self.store_dir} --failed` lists them, rerun with "
                "--retry-failed to retry them"
            )
        if dup_failed and not self.dry_run:
            lines.append(
                f"  {dup_failed} duplicate rows are failed for good (they repeat an id; --retry-failed skips them)"
            )
        lines += [f"  note: {n}" for n in self.notes]
        if self.dry_run:
            return "\n".join(lines)
        lines.append(
            f"  this run: {self.finished} of {self.todo} finished"
            + "".join(f"; {k} {v}" if i == 0 else f", {k} {v}" for i, (k, v) in enumerate(sorted(self.counts.items())))
        )
        lines.append(f"  wall {self.wall_s:.1f}s, {self.finished / max(self.wall_s, 1e-9):.2f} samples/s")
        lines += self.ratio_lines()
        for k in self.stage_s:
            per = self.stage_s[k] / max(self.stage_n[k], 1)
            lines.append(
                f"  stage {k:9s} {self.stage_n[k]:6d} samples, {per * 1e3:8.1f} ms/sample/worker, "
                f"{1.0 / max(per, 1e-9):8.1f} samples/s/worker"
            )
        for (stage, reason), n in self.reasons.most_common(20):
            lines.append(f"  {n:5d} x {stage}: {reason}")
        if self.counts.get("failed"):
            lines.append(
                f"  {self.counts['failed']} samples failed this run: `python -m pipeline status "
                f"{self.store_dir} --failed` lists them, rerun with --retry-failed to retry them"
            )
        if self.shards:
            sizes = [s["bytes"] for s in self.shards]
            lines.append(
                f"  shards: {len(sizes)} in {self.commits} commits this run, {sum(sizes) / 1e6:.2f} MB, "
                f"{min(sizes) / 1e3:.1f}-{max(sizes) / 1e3:.1f} kB each; commits took "
                f"{self.commit_s * 1e3 / max(self.commits, 1):.1f} ms each on the driver"
            )
        for m, q in self.qa.items():
            lines.append(
                f"  qa {m}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in q.items())
            )
        if self.interrupted:
            left = f"{max(0, self.todo - self.finished)} left" if self.resume else "the rest not counted yet"
            lines.append(
                f"interrupted ({signal.Signals(self.interrupted).name}): {self.finished} samples committed "
                f"this run, {left}; rerun the same command to continue"
            )
        return "\n".join(lines)


# ---- identity and the version directory ---------------------------------------------------------------------


def version_name(tokenizer: dict, preprocess: dict) -> str:
    return f"{tokenizer['id']}-pp{preprocess['id']}"


def identities(job: JobConfig) -> tuple[dict, dict]:
    from pipeline.tokenizers import backend

    return backend(job.tokenize.backend).identity(job.tokenize), preprocess_identity(job)


def changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


def version_notes(root: Storage, tokenizer: dict, preprocess: dict, name: str) -> list[str]:
    """A line when this job's settings differ from an existing version of the same tokenizer."""
    notes = []
    for v in versions(root):
        if v.root.rsplit("/", 1)[-1] == name or not v.exists("preprocess.json"):
            continue
        tok = Store(v).read_json("tokenizer.json")
        if tok.get("id") != tokenizer["id"]:
            continue
        diff = changed_settings(Store(v).read_json("preprocess.json").get("settings", {}), preprocess["settings"])
        notes.append(
            f"settings differ from {v.root.rsplit('/', 1)[-1]} ({'; '.join(diff[:6])}): writing a new version {name}"
        )
    return notes


# ---- the run ---------------------------------------------------------------------------------------------------


class _Signals:
    """First SIGINT/SIGTERM: request a stop and arm the grace timer; second: abort (KeyboardInterrupt).

    Installed for the whole run (lock, recovery, Ray start, stream, final commit), and again after `ray.init`,
    which replaces the SIGTERM handler with its own `sys.exit`. A signal that arrived before (recorded by the
    CLI's early handler, which has a `received` list) counts as the first one."""

    def __init__(self, grace_s: float):
        self.grace_s, self.signum, self.expired, self.control = grace_s, None, False, None
        self.old, self.timer = {}, None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNAL_EXIT:
            old = signal.signal(s, self._handle)
            self.old.setdefault(s, old)  # what to restore: the handler from before the run
            for pending in getattr(old, "received", ())[:1]:
                if self.signum is None:
                    self._first(pending)

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        if self.timer is not None:
            self.timer.cancel()
        for s, h in self.old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self._first(signum)

    def _first(self, signum) -> None:
        self.signum = signum
        print(
            f"{signal.Signals(signum).name}: no new work; finishing in-flight samples (up to "
            f"{self.grace_s:.0f}s), then committing. Press Ctrl-C again to abort.",
            file=sys.stderr,
            flush=True,
        )
        if self.control is not None:
            self.control.request_stop.remote()
        self.timer = threading.Timer(self.grace_s, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def stream_ended(self) -> None:
        """The stream is over: the grace timer must not interrupt the final commit and clean-up."""
        if self.timer is not None:
            self.timer.cancel()

    def _expire(self):
        self.expired = True
        # a real signal: _thread.interrupt_main() only sets a flag, which a main thread blocked in a system call
        # (a long object-store copy in a commit, a sleep) would not see until that call returned, if ever
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def id_rule_of(version: dict) -> int:
    """The store's id rule (pipeline/sources/ids.py): stores written before rules were recorded use rule 1."""
    return check_rule(version.get("id_rule", 1))


def run_job(job: JobConfig, retry_failed: bool = False, dry_run: bool = False) -> Summary:
    t0 = time.perf_counter()
    tok, pre = identities(job)
    root = Storage(job.out, job.storage)
    name = version_name(tok, pre)
    store = Store(root.child(name))
    summary = Summary(store_dir=store.uri, dry_run=dry_run, retry_failed=retry_failed)
    if dry_run:
        from pipeline import ray_job

        version = (
            store.read_json("version.json")
            if store.storage.exists("version.json")
            else {"buckets": job.ray.buckets, "id_rule": ID_RULE}
        )
        summary.resume = ray_job.dry_run_counts(job, store.ledger.view(), version["buckets"], id_rule_of(version))
        summary.notes += version_notes(root, tok, pre, name)
        summary.wall_s = time.perf_counter() - t0
        return summary
    from pipeline.noop import sources_fingerprint, unchanged_since

    sources_fp = sources_fingerprint(job)  # before anything reads the sources: what this run will have seen
    last = None if retry_failed else unchanged_since(store.storage, sources_fp)
    if last is not None:  # nothing to do: no lock, no Ray, no tokenizer, no QA
        summary.resume = {src: {**c, "todo": 0} for src, c in (last.get("sources") or {}).items()}
        summary.notes.append(
            f"nothing to do: the sources and the store are as run {last['run']} left them "
            "(checked without starting Ray or the tokenizer)"
        )
        summary.wall_s = time.perf_counter() - t0
        return summary
    from pipeline import ray_job  # Ray, and through the stages torch: only now that there is work

    root.makedirs()
    summary.notes += version_notes(root, tok, pre, name)
    run_id = summary.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with _Signals(job.ray.interrupt_grace_s) as sig, RunLock(store.storage, run_id) as lock:
        if lock.took_over:
            summary.notes.append(
                f"took over a stale lock of run {lock.took_over.get('run')} "
                f"(host {lock.took_over.get('host')}, pid {lock.took_over.get('pid')})"
            )
        store.init({"name": name, "buckets": job.ray.buckets, "id_rule": ID_RULE}, tok, pre)
        rec = store.recover(run_id)
        if rec.rolled_forward:
            summary.notes.append(f"completed {rec.rolled_forward} moves of commits interrupted by a crash")
        if rec.quarantined:
            summary.notes.append(
                f"{len(rec.quarantined)} files in data/ that no commit names were moved to "
                f"quarantine/ (e.g. {rec.quarantined[0]})"
            )
        summary.notes += rec.problems
        ray = ray_job.init_ray(job.ray)
        sig.install()  # ray.init replaced the SIGTERM handler
        _compact_ledger(ray, store)
        cut = False
        try:
            _stream(job, store, run_id, retry_failed, ray, sig, summary)
        except KeyboardInterrupt:
            if not sig.expired:  # a second Ctrl-C: abort now; what was committed stays, the rest is redone
                summary.interrupted = sig.signum or signal.SIGINT
                raise
            summary.notes.append(
                f"in-flight samples did not finish within {job.ray.interrupt_grace_s:.0f}s; "
                "they are redone on the next run"
            )
            cut = True  # possibly inside a commit: the in-memory state may lag what is stored
        sig.stream_ended()
        summary.interrupted = sig.signum
        complete = not cut and not summary.interrupted
        _finish(
            store,
            run_id,
            summary,
            ray,
            reload=cut,
            sources_fp=sources_fp if complete else None,
            retry_failed=retry_failed,
        )
        if not write_root_card(root, name):
            summary.notes.append(
                f"{root.uri('README.md')} is not ours: left as it is (load_dataset(OUT) needs "
                "data_files=...; each version folder has its own card)"
            )
    if job.qa.samples > 0 and not summary.interrupted and summary.shards:  # only when this run added shards
        from pipeline.qa import run_qa

        summary.qa = run_qa(store, job)
        summary.notes += [
            f"qa skipped a damaged shard ({d}); `python -m pipeline verify {store.uri} --repair` un-commits it"
            for d in summary.qa.pop("damaged_shards", [])
        ]
        summary.notes.append(f"qa pictures and numbers: {summary.qa.pop('page')}")
    summary.wall_s = time.perf_counter() - t0
    return summary


def _stream(job, store, run_id, retry_failed, ray, sig, summary) -> None:
    from pipeline import ray_job

    for attempt in range(job.ray.restarts + 1):
        control = sig.control = ray_job.make_control(ray)
        if sig.signum is not None:  # a stop requested while restarting
            return
        version = store.read_json("version.json")
        ds = ray_job.build(
            job,
            make_stages(job, store, run_id, pre_id(store), ray),
            store.ledger.view(),
            version["buckets"],
            retry_failed,
            control,
            ray,
            id_rule_of(version),
        )
        if sig.signum is not None:  # stopped while planning: nothing is in flight, start no actor pool
            summary.resume = ray.get(control.get_counts.remote())
            return
        try:
            with _progress(job, ray, control, ds):
                for rec in ray_job.records(ds):
                    maybe_fault("record_received")
                    t = time.perf_counter()
                    commit = store.commit(rec, run_id)
                    summary.add_record(rec, commit, time.perf_counter() - t)
            if attempt == 0 or not summary.resume:
                summary.resume = ray.get(control.get_counts.remote())
            if ds:
                summary.ray_stats = ds.stats()  # per-operator time and throughput (benchmarks print it)
            return
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            cause = root_cause(exc)
            if not infrastructure(exc) or attempt == job.ray.restarts:
                raise cause from None
            if not summary.resume:
                try:
                    summary.resume = ray.get(control.get_counts.remote(), timeout=30)
                except Exception:  # noqa: BLE001 - the counts are lost with it; the next attempt counts again
                    pass
            summary.notes.append(
                f"the execution failed ({type(cause).__name__}: {str(cause)[:200]}); "
                f"started again ({attempt + 1}/{job.ray.restarts})"
            )
            _compact_ledger(ray, store)


def _progress(job, ray, control, ds):
    """The driver's bar (or plain lines) over the rows leaving the tokenizer, once the plan knows the total."""
    import contextlib

    from pipeline.progress import Progress

    if not ds:
        return contextlib.nullcontext()
    total = sum(c.get("todo", 0) for c in ray.get(control.get_counts.remote()).values())
    return Progress(
        lambda: ray.get(control.get_progress.remote(), timeout=5),
        total=total,
        bar=job.progress.bar,
        every_s=job.progress.every_s,
    )


def infrastructure(exc: BaseException) -> bool:
    """A lost node, worker or object (worth running again), as opposed to an error in our code or storage."""
    import ray.exceptions as rex

    lost = (
        rex.NodeDiedError,
        rex.ObjectLostError,
        rex.ActorDiedError,
        rex.WorkerCrashedError,
        rex.ActorUnavailableError,
        rex.OwnerDiedError,
        rex.RaySystemError,
    )
    seen = exc
    for _ in range(10):
        if isinstance(seen, lost):
            return True
        if isinstance(seen, (rex.UserCodeException, OSError)):
            return False
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if not isinstance(nxt, BaseException):
            break
        seen = nxt
    return isinstance(exc, rex.RayError) and not isinstance(exc, rex.UserCodeException)


def root_cause(exc: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers (a task's OSError, say)."""
    outer, seen = exc, set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if isinstance(inner, BaseException):
            exc = inner
            continue
        break
    if type(exc).__name__ == "UserCodeException":  # Ray Data's wrapper: its __cause__ (the task's own exception)
        found = _ERRNO_LINE.findall(str(outer))  # is lost on the way to the driver; the worker's traceback
        if found:  # text still ends with it
            return OSError(int(found[-1][0]), found[-1][1])
    return exc


_ERRNO_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception): \[Errno (\d+)\] (.+?)\s*$", re.M)


def pre_id(store: Store) -> str:
    return store.read_json("preprocess.json")["id"]


def mesh_reserve(ray_cfg, mesh_gpus: float) -> float:
    """The share of each GPU kept for 3D workers (validated < 1), so that Ray can place them beside the tokenizer
    actors, which would otherwise book whole GPUs between them and leave the 3D pool waiting."""
    return mesh_gpus * ray_cfg.mesh_workers_per_gpu if mesh_gpus > 0 else 0.0


def make_stages(job: JobConfig, store: Store, run_id: str, preprocess: str, ray) -> dict:
    from pipeline.decode import for_tokenizer
    from pipeline.prepare import Prepare
    from pipeline.ray_job import cluster
    from pipeline.tokenize import Tokenize
    from pipeline.writer import ShardWriter
    from schemas.tokens import TokenDims

    cpus, gpus = cluster(ray)
    use_gpu = gpus > 0 and job.tokenize.device != "cpu"
    tok_actors = max(1, gpus * job.tokenize.actors_per_gpu) if use_gpu else job.tokenize.actors
    mesh_gpus = job.ray.mesh_gpus if gpus > 0 and job.mesh.backend != "cpu" else 0.0
    tok_share = (1.0 - mesh_reserve(job.ray, mesh_gpus)) / job.tokenize.actors_per_gpu if use_gpu else 0.0
    tokenize = Tokenize(job.tokenize, preprocess, gpus=tok_share)
    # small machines: leave a CPU for the source, filter and writer tasks beside the actor pools
    prep_cpus = job.ray.prepare_cpus or (0.5 if cpus <= 4 else 1.0)
    free = max(1, int((cpus - tok_actors * tokenize.resources().cpus - 1) / prep_cpus))
    dims = TokenDims(**store.read_json("tokenizer.json")["dims"])
    decode = for_tokenizer(job.decode, gpu=use_gpu)  # where videos that upscale are resized
    common = dict(fetch=job.fetch, decode=decode, mesh=job.mesh, storage=job.storage, cpus=prep_cpus, run_id=run_id)
    return {
        "media": Prepare(**common, branch="media", batch_size=job.ray.prepare_batch_rows),
        "media_actors": job.ray.prepare_actors or (1, free),
        "3d": Prepare(**common, branch="3d", gpus=mesh_gpus, batch_size=1),
        "3d_actors": job.ray.mesh_actors or (1, max(1, min(free, int(gpus * job.ray.mesh_workers_per_gpu) or free))),
        "tokenize": tokenize,
        "tokenize_actors": tok_actors,
        "writer": ShardWriter(store.uri, job.storage.model_dump(), run_id, dims, job.write),
    }


def _compact_ledger(ray, store: Store) -> None:
    from pipeline.ray_job import remote_compact

    for files in store.ledger.plan_compaction():
        remote_compact(ray, store.storage, files)


def end_state(summary: Summary, retry_failed: bool) -> dict:
    """Per source after this run: rows, duplicates and outcomes (what a no-op rerun reports as already done)."""
    out = {}
    for src, c in summary.resume.items():
        out[src] = {
            "rows": c.get("rows", 0),
            "duplicate": c.get("duplicate", 0),
            "ok": c.get("ok", 0),
            "skipped": c.get("skipped", 0),
            "failed": c.get("failed_duplicate", 0) if retry_failed else c.get("failed", 0),  # duplicates stay
            "failed_duplicate": c.get("failed_duplicate", 0),
        }
    for (src, status, _kind), n in summary.by_source.items():
        c = out.setdefault(src, {"rows": 0, "duplicate": 0, "ok": 0, "skipped": 0, "failed": 0, "failed_duplicate": 0})
        c[status] = c.get(status, 0) + n
    return out


def _finish(
    store: Store,
    run_id: str,
    summary: Summary,
    ray,
    reload: bool = False,
    sources_fp: str | None = None,
    retry_failed: bool = False,
) -> None:
    """Folds this run's commits into the checkpoint, the ledger into a level, and updates the card. `reload`:
    the stream was cut by the grace timer, perhaps between a commit record and the store's in-memory update;
    the checkpoint is then built from what is stored (rolling that commit forward), not from memory."""
    import json

    if reload:
        store.recover(run_id)
    else:
        store.checkpoint()
    _compact_ledger(ray, store)
    store.write_card()
    record = {
        "run": run_id,
        "time": time.time(),
        "interrupted": summary.interrupted,
        "counts": dict(summary.counts),
        "resume": summary.resume,
        "commits": summary.commits,
        "notes": summary.notes,
        "reasons": [[s, r, n] for (s, r), n in summary.reasons.most_common(100)],
        "sources": end_state(summary, retry_failed),
    }
    if sources_fp is not None:  # a complete run: a plain rerun with the same fingerprint has nothing to do
        from pipeline.noop import store_fingerprint

        record["fingerprint"] = {"sources": sources_fp, "store": store_fingerprint(store.storage)}
    store.storage.write_bytes(f"runs/{run_id}.json", json.dumps(record, indent=1, default=str).encode())
    store.drop_staging()  # all of it: ours, and any a killed run's orphaned workers wrote since we started
