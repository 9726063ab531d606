"""`python -m pipeline run|demo|status|verify|compact|export|submit|mesh`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_JOB = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"


def _job(args):
    from pipeline.job import load_job

    return load_job(**_job_source(args.job), out=args.out, overrides=args.set)


def _job_source(job: str) -> dict:
    """A job file, or `env:NAME`: the job `submit` sent in the environment variable NAME."""
    if job.startswith("env:"):
        from pipeline.submit import job_from_env

        return {"data": job_from_env(job[4:])}
    return {"path": job}


def _fail(msg: str, code: int = 1) -> int:
    for line in str(msg).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
    return code


def _os_error(exc: OSError) -> str:
    """`[Errno 28] No space left on device: 'path'`, without the retry advice Ray Data appends to a task's
    exception arguments (it lands in `filename`, several lines long)."""
    if exc.errno is None or exc.strerror is None:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    name = exc.filename if isinstance(exc.filename, str) and "\n" not in exc.filename else None
    return f"[Errno {exc.errno}] {exc.strerror}" + (f": {name!r}" if name else "")


def cmd_run(args) -> int:
    from pipeline.run import SIGNAL_EXIT, run_job
    from pipeline.store import DamagedFile

    job = _job(args)
    if args.address:
        job.ray.address = args.address
    if args.ray_progress:
        job.ray.progress_bars = True
    early = getattr(args, "early_signals", None)
    if early is not None and early.received:  # stopped while starting: nothing was done yet
        import signal

        name = signal.Signals(early.received[0]).name
        print(
            f"interrupted ({name}) before the run started: 0 samples committed this run; rerun the same command "
            "to continue"
        )
        return SIGNAL_EXIT[early.received[0]]
    t0 = time.perf_counter()
    try:
        summary = run_job(job, retry_failed=args.retry_failed, dry_run=args.dry_run)
    except KeyboardInterrupt:
        print("aborted: what was committed is kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except DamagedFile as exc:  # a committed file fails its checks: say which, and how to repair
        return _fail(
            f"{exc}\nrun `python -m pipeline verify {job.out} --repair` to un-commit it; the next run "
            "redoes its samples"
        )
    except OSError as exc:  # disk full, read-only output, missing input: one clear line, no traceback
        return _fail(_run_error(exc, job.out))
    print(summary.render())
    if args.dry_run:
        print(f"  dry run: {time.perf_counter() - t0:.1f}s, driver peak RSS {_peak_rss_mb():.0f} MB")
    return SIGNAL_EXIT.get(summary.interrupted, 0)


def _run_error(exc: OSError, out: str) -> str:
    """The error and what to do about this one (not a sentence every OSError gets)."""
    import errno

    msg = _os_error(exc)
    text = str(exc)
    if msg.startswith("checkpoint not found"):
        return msg if "make checkpoints" in msg else f"{msg}; run `make checkpoints`"
    if exc.errno == errno.ENOSPC:
        return (
            f"{msg}. Free space there (or set PIPELINE_SCRATCH / --out elsewhere), then rerun the same "
            "command: what was committed is kept and the rest is redone"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{msg}. The output or scratch folder is not writable: fix its permissions or pass another --out"
    if "Unexpected end of stream" in text or "magic bytes" in text or "corrupt" in text.lower():
        return (
            f"{msg}. A file in the store looks damaged: `python -m pipeline verify {out}` names the shard "
            "and what is wrong with it"
        )
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.errno == errno.ENOENT:
        return f"{msg}. Check the path in the job file (or CSV= / --set sources.N.path=...)"
    return msg


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM where there is /proc: getrusage's ru_maxrss also counts the image before
    exec, i.e. the RSS of the parent that started us (a test runner of several GB, say)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_demo(args) -> int:
    from pipeline.demo_samples import make_demo_inputs
    from pipeline.job import load_job
    from pipeline.run import run_job

    out = Path(args.out)
    inputs = make_demo_inputs(out.parent / f"{out.name}-inputs")
    job = load_job(
        DEMO_JOB,
        out=str(out),
        overrides=[
            f"sources.0.path={inputs}",
            *(args.set or []),
            *(["ray.progress_bars=true"] if args.ray_progress else []),
        ],
    )
    summary = run_job(job)
    print(summary.render())
    _show_loaded(summary.store_dir)
    return 0


def _show_loaded(store_dir: str) -> None:
    """Loads the shards back with Hugging Face datasets, as a downstream trainer would."""
    import datasets

    datasets.disable_progress_bars()  # its "Generating train split" bars, three per demo
    for mdir in sorted(p for p in (Path(store_dir) / "data").iterdir() if p.is_dir()):
        ds = datasets.load_dataset("parquet", data_files=str(mdir / "*.parquet"), split="train")
        row = ds.with_format("arrow")[:1]
        print(
            f"loaded {mdir.name}: {len(ds)} rows; latent {row.column('latent').type}; "
            f"first id {row.column('id')[0]} with {row.column('num_tokens')[0]} tokens"
        )
    print(f"shards: {store_dir}/data   dataset card: {store_dir}/README.md")


def _versions(out: str):
    """The version stores under OUT (or one level further down), or OUT itself when it is one."""
    import pyarrow.fs as pafs

    from pipeline.storage import Storage
    from pipeline.store import Store, versions

    root = Storage(out.rstrip("/") or out)
    if root.exists("version.json"):
        return [Store(root)]
    for up in (1, 2):  # a path inside a version folder (its data/ or data/<modality>/)
        parent = out.rstrip("/").rsplit("/", up)[0]
        if parent and parent != out and Storage(parent).exists("version.json"):
            return [Store(Storage(parent))]
    found = versions(root)
    if not found and root.is_dir():
        infos = root.fs.get_file_info(pafs.FileSelector(root.path(""), recursive=False))
        for info in sorted(infos, key=lambda i: i.base_name):
            if info.type == pafs.FileType.Directory:
                found += versions(root.child(info.base_name))
    return [Store(v) for v in found]


def cmd_status(args) -> int:
    from pipeline.status import render, report

    stores = _versions(args.out)
    if not stores:
        print(f"no token store under {args.out} (give a job's output root, e.g. out/demo, or one version folder)")
        return 1
    reps = [report(s, stage=args.stage, reason=args.reason, reasons=args.reasons) for s in stores]
    if args.json:
        print(json.dumps(reps if len(reps) > 1 else reps[0], indent=1, default=str))
        return 0
    print("\n".join(render(r, failed=args.failed or bool(args.stage or args.reason), limit=args.limit) for r in reps))
    return 0


def cmd_verify(args) -> int:
    import uuid

    from pipeline.lock import RunLock
    from pipeline.store import repair, verify

    stores = _versions(args.out)
    bad = 0
    for store in stores:
        if not args.repair:
            problems = verify(store.storage)
            bad += len(problems)
            print(f"{store.uri}: " + ("ok" if not problems else f"{len(problems)} problems"))
            for p in problems:
                print(f"  {p}")
            continue
        run_id = f"repair-{uuid.uuid4().hex[:8]}"
        with RunLock(store.storage, run_id):
            res = repair(store.storage, run_id)
        print(f"{store.uri}: {len(res['problems'])} problems found" if res["problems"] else f"{store.uri}: ok")
        for p in res["problems"]:
            print(f"  {p}")
        if res["drops"] or res["requeued"]:
            print(
                f"  repaired: {len(res['drops'])} shards un-committed, {res['requeued']} samples requeued "
                f"(record: {store.uri}/{res['quarantine']}); the next run redoes them"
            )
        for p in res["after"]:
            print(f"  still: {p}")
        bad += len(res["after"])
    if not stores:
        print(f"no token store under {args.out}")
    return 1 if bad or not stores else 0


def cmd_compact(args) -> int:
    import uuid

    from pipeline.compact import compact
    from pipeline.lock import LockedError, RunLock
    from pipeline.writer import WriteConfig

    cfg = WriteConfig(**({"shard_bytes": args.target_bytes} if args.target_bytes else {}))
    for store in _versions(args.out):
        run_id = f"compact-{uuid.uuid4().hex[:8]}"
        try:
            with RunLock(store.storage, run_id):
                store.recover(run_id)
                res = compact(store, run_id, cfg, args.small_bytes)
                store.drop_staging(run_id)
                store.write_card()
        except LockedError as exc:
            return _fail(exc)
        print(f"{store.uri}: merged {res['merged_shards']} shards into {res['groups']}")
        for p in res["problems"]:
            print(f"  {p}")
    return 0


def cmd_export(args) -> int:
    from pipeline.export import export

    res = export(args.out, args.format, dest=args.dest, bucket_by=args.bucket_by, version=args.version)
    print(
        f"{res['dest']}: exported {res['exported']} shards ({res['rows']} rows), {res['skipped']} already "
        f"there" + (f", {res['removed']} no longer in the store removed" if res["removed"] else "")
    )
    return 0


def cmd_submit(args) -> int:
    """`ray job submit` of the resolved job with this repository as the working dir (pipeline/submit.py)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.job import job_data
    from pipeline.submit import ENTRYPOINT, cluster_data, runtime_env

    data = cluster_data(job_data(**_job_source(args.job), out=args.out, overrides=args.set))
    client = JobSubmissionClient(args.address)
    sub_id = client.submit_job(entrypoint=ENTRYPOINT, runtime_env=runtime_env(data))
    print(f"submitted {sub_id} to {args.address}: {ENTRYPOINT}")
    for chunk in _tail(client, sub_id):
        print(chunk, end="", flush=True)
    status = client.get_job_status(sub_id)
    print(f"job {sub_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def _tail(client, sub_id):
    import asyncio

    async def gen():
        async for lines in client.tail_job_logs(sub_id):
            yield lines

    loop = asyncio.new_event_loop()
    agen = gen()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


class _EarlySignals:
    """For `run`, installed before anything is imported: a SIGINT/SIGTERM that comes before the run's own handler
    (pipeline/run.py, which adopts what is `received` here) is recorded, so the first one still means "stop
    gracefully". Without it a Ctrl-C during the first seconds printed a traceback, or was lost outright (Python
    prints and ignores a KeyboardInterrupt raised inside an import-lock callback), and SIGTERM killed the process
    without a word. A second signal here aborts."""

    def __init__(self):
        self.received: list[int] = []

    def __call__(self, signum, frame):
        self.received.append(signum)
        if len(self.received) > 1:
            raise KeyboardInterrupt


def _install_early_signals(argv: list[str]) -> _EarlySignals | None:
    import signal
    import threading

    if argv[:1] != ["run"] or threading.current_thread() is not threading.main_thread():
        return None
    early = _EarlySignals()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, early)
    return early


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    early = _install_early_signals(argv)
    from pipeline.config import ConfigError
    from pipeline.lock import LockedError
    from pipeline.mesh.cli import add_mesh_commands
    from pipeline.storage import StorageError
    from pipeline.store import DamagedFile

    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def job_args(s):
        s.add_argument("job")
        s.add_argument("--out", help="output root, a local path, s3://... or gs://... (default: the job's `out`)")
        s.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a job key, e.g. --set decode.fps=8 --set sources.0.path=x.csv",
        )

    r = sub.add_parser("run", help="run a job file (or env:NAME, the job `submit` sends)")
    job_args(r)
    r.add_argument("--retry-failed", action="store_true", help="retry samples recorded as failed")
    r.add_argument("--dry-run", action="store_true", help="plan only: counts per source, nothing fetched")
    r.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local cluster)")
    r.add_argument("--ray-progress", action="store_true", help="also show Ray Data's own progress output")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("demo", help="make the embedded samples and run the demo job")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.add_argument("--ray-progress", action="store_true", help="also show Ray Data's own progress output")
    d.set_defaults(fn=cmd_demo)
    s = sub.add_parser("status", help="summarise a job's output (a job's out, or one version folder)")
    s.add_argument("out")
    s.add_argument("--reasons", type=int, default=20, help="how many failure reasons to list")
    s.add_argument("--failed", action="store_true", help="list the failed samples: id, uri, stage and reason")
    s.add_argument("--stage", help="only samples that failed at this stage (fetch, decode, tokenize, ...)")
    s.add_argument("--reason", help="only samples whose reason contains this text (any case)")
    s.add_argument("--limit", type=int, default=0, help="list at most this many failed samples (0: all)")
    s.add_argument("--json", action="store_true", help="everything as JSON (the failed samples included)")
    s.set_defaults(fn=cmd_status)
    v = sub.add_parser("verify", help="re-hash shards against the manifest, check ids against the ledger")
    v.add_argument("out")
    v.add_argument(
        "--repair",
        action="store_true",
        help="un-commit damaged shards (kept in quarantine/) and "
        "requeue their samples for the next run; re-derive the index, the ledger level and the card",
    )
    v.set_defaults(fn=cmd_verify)
    c = sub.add_parser("compact", help="merge small shards (exactly-once, like a run)")
    c.add_argument("out")
    c.add_argument("--small-bytes", type=int, help="shards below this are merged (default: half the target)")
    c.add_argument("--target-bytes", type=int, help="merged shard size (default: write.shard_bytes default)")
    c.set_defaults(fn=cmd_compact)
    e = sub.add_parser("export", help="export the committed tokens to WebDataset tars or a Lance dataset")
    e.add_argument("out", help="a job's output root or one version folder")
    e.add_argument("--format", required=True, choices=["webdataset", "lance"])
    e.add_argument("--bucket-by", choices=["tokens"], help="group samples by token count (power-of-two buckets)")
    e.add_argument("--dest", help="destination (default: <version>/exports/<format>)")
    e.add_argument("--version", help="the version folder's name, when OUT holds several")
    e.set_defaults(fn=cmd_export)
    sm = sub.add_parser("submit", help="submit a job to a Ray cluster (ray job submit)")
    job_args(sm)
    sm.add_argument("--address", required=True)
    sm.set_defaults(fn=cmd_submit)
    add_mesh_commands(sub)
    args = p.parse_args(argv)
    args.early_signals = early
    try:
        return args.fn(args)
    except (ConfigError, StorageError, LockedError, DamagedFile) as exc:  # StoreDamaged: a StorageError
        return _fail(exc, 2)
    except (ValueError, FileNotFoundError) as exc:
        if args.cmd != "export":
            raise
        return _fail(exc, 2)
    except KeyboardInterrupt:  # a second signal before the run began
        print("aborted: nothing was started; rerun the same command", file=sys.stderr)
        return 130
