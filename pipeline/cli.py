"""`python -m pipeline run|demo|status|verify|submit`."""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

DEMO_JOB = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"


def cmd_run(args) -> int:
    from pipeline.job import load_job
    from pipeline.run import run_job

    job = load_job(args.job, out=args.out)
    if args.address:
        job.ray.address = args.address
    try:
        summary = run_job(job, retry_failed=args.retry_failed)
    except OSError as exc:  # disk full, read-only output, missing input folder: one clear line, no traceback
        print(f"error: {exc}. Committed shards are intact; rerun the same command to resume once this is fixed.",
              file=sys.stderr)
        return 1
    print(summary.render())
    return 0


def cmd_demo(args) -> int:
    from pipeline.demo_samples import make_demo_inputs
    from pipeline.job import load_job
    from pipeline.run import run_job

    out = Path(args.out)
    inputs = make_demo_inputs(out / "inputs")
    job = load_job(DEMO_JOB, out=str(out))
    job.sources[0].path = str(inputs)
    summary = run_job(job)
    print(summary.render())
    _show_loaded(Path(summary.store_dir))
    return 0


def _show_loaded(store_dir: Path) -> None:
    """Loads the shards back with Hugging Face datasets, as a downstream trainer would."""
    import datasets

    for mdir in sorted((store_dir / "data").iterdir()):
        ds = datasets.load_dataset("parquet", data_files=str(mdir / "*.parquet"), split="train")
        row = ds.with_format("arrow")[:1]
        print(f"loaded {mdir.name}: {len(ds)} rows; latent {row.column('latent').type}; "
              f"first id {row.column('id')[0]} with {row.column('num_tokens')[0]} tokens")
    print(f"shards: {store_dir / 'data'}   dataset card: {store_dir / 'README.md'}")


def cmd_status(args) -> int:
    from pipeline.store import load_state, open_versions

    versions = open_versions(Path(args.out))
    if not versions:
        print(f"no token store under {args.out}")
        return 1
    for vdir in versions:
        state = load_state(vdir)
        tok = json.loads((vdir / "tokenizer.json").read_text())
        by_mod = collections.Counter(p.split("/")[1] for p in state.ok.values())
        other = collections.Counter((r["status"], r.get("stage")) for r in state.other.values())
        print(f"{vdir.name} ({tok.get('config_name')}): {len(state.ok)} ok "
              f"({', '.join(f'{m} {n}' for m, n in sorted(by_mod.items()))}), "
              f"{len(state.shards)} shards, {sum(s['bytes'] for s in state.shards) / 1e6:.2f} MB")
        for (status, stage), n in sorted(other.items()):
            print(f"  {status} at {stage}: {n}")
    return 0


def cmd_verify(args) -> int:
    from pipeline.store import open_versions, verify

    versions = open_versions(Path(args.out))
    bad = 0
    for vdir in versions:
        problems = verify(vdir)
        bad += len(problems)
        print(f"{vdir.name}: " + ("ok" if not problems else f"{len(problems)} problems"))
        for p in problems:
            print(f"  {p}")
    if not versions:
        print(f"no token store under {args.out}")
    return 1 if bad or not versions else 0


def cmd_submit(args) -> int:
    """Submits `python -m pipeline run JOB` to a Ray cluster with this repository as the working dir."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.job import load_job

    job = load_job(args.job, out=args.out)
    out = str(Path(job.out).resolve())  # the job runs in a copy of the repo: write where the user expects
    root = Path(__file__).resolve().parents[1]
    client = JobSubmissionClient(args.address)
    entry = f"{sys.executable} -m pipeline run {Path(args.job).resolve()} --out {out}"
    sub_id = client.submit_job(
        entrypoint=entry,
        runtime_env={"working_dir": str(root),
                     "excludes": [".venv", ".git", "out", "runs", ".device", ".devdata", "*.parquet"],
                     "env_vars": {"RAY_AUTH_MODE": "disabled", "PIPELINE_PROGRESS": "0"}})
    print(f"submitted {sub_id} to {args.address}")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a job file")
    r.add_argument("job")
    r.add_argument("--out", help="output root (default: the job's `out`)")
    r.add_argument("--retry-failed", action="store_true", help="retry samples recorded as failed")
    r.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local cluster)")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("demo", help="make the embedded samples and run the demo job")
    d.add_argument("--out", default="out/demo")
    d.set_defaults(fn=cmd_demo)
    for name, fn, text in (("status", cmd_status, "summarise a job's output"),
                           ("verify", cmd_verify, "re-hash shards against the manifest")):
        s = sub.add_parser(name, help=text)
        s.add_argument("out")
        s.set_defaults(fn=fn)
    s = sub.add_parser("submit", help="submit a job to a Ray cluster (ray job submit)")
    s.add_argument("job")
    s.add_argument("--address", required=True)
    s.add_argument("--out")
    s.set_defaults(fn=cmd_submit)
    args = p.parse_args(argv)
    return args.fn(args)
