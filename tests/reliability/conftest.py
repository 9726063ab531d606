"""Reliability suite helpers: jobs run as real `python -m pipeline run` subprocesses (so kill -9 and SIGINT really
reach a driver with its own local Ray cluster), an in-process Ray cluster for the jobs that need no kill, store
checks (local disk or S3), and the figures collected for the report."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.ledger import read_all
from pipeline.sources import iter_rows, make_source, source_config
from pipeline.storage import Storage
from pipeline.store import Store, verify, versions

REPO = Path(__file__).resolve().parents[2]
REPORT_DIR = REPO / "out" / "reliability"
FIGURES = pytest.StashKey[dict]()

# small real inputs: a crash lands between shards, a run stays short on 2 cores
IMAGES = [
    "camera.png",
    "cell.png",
    "coins.png",
    "hopper_gray.jpg",
    "text.png",
    "brick.png",
    "logo.png",
    "rocket.jpg",
    "retina.jpg",
    "clock_motion.png",
]
VIDEOS = ["video_90.mov", "bbb_480p_vp9_opus_1second.webm"]
MESHES = ["BoxVertexColors.glb"]


def ray_env(extra: dict | None = None) -> dict:
    env = dict(
        os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PIPELINE_PROGRESS="0", PYTHONPATH=str(REPO)
    )
    for k in [k for k in env if k.startswith(("PIPELINE_FAULT", "AWS_"))] + ["RAY_ADDRESS"]:
        env.pop(k, None)
    env.update(extra or {})
    return env


def job_dict(out, sources: list[dict], **extra) -> dict:
    """A small CPU job: tiny tokenizer, small buckets, 2 rows per writer call (each call commits its shards),
    one row per prepare batch (so the fetch/decode fault points count rows), short timeouts."""
    cfg = {
        "name": "rel",
        "out": str(out),
        "sources": sources,
        "decode": {
            "fps": 4,
            "max_frames": 8,
            "timeout_s": 30,
            "buckets": {"area": 64 * 64, "min_side": 32, "max_side": 128},
        },
        "fetch": {"retries": 1, "backoff_s": 0.05, "read_timeout_s": 1.0, "deadline_s": 4.0},
        "mesh": {"views": 8, "backend": "cpu"},
        "tokenize": {"config": "tiny", "batch_rows": 2, "device": "cpu"},
        "write": {"rows_per_write": 2},
        "qa": {"samples": 0},
        "ray": {"num_cpus": 2, "prepare_batch_rows": 1},
    }
    for k, v in extra.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def write_job(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    wall_s: float


def _child_setup() -> None:
    """Runs in the job's process before exec: default SIGINT (a shell without job control starts background
    commands with SIGINT ignored, and that disposition is inherited), and a session of its own (so a timed-out
    job is killed with everything it started)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()


def cli_cmd(job: Path, out, retry_failed: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "run", str(job), "--out", str(out)]
    return cmd + (["--retry-failed"] if retry_failed else [])


def start_cli(
    job: Path,
    out,
    env: dict | None = None,
    fault: str | None = None,
    fault_dir: Path | None = None,
    retry_failed: bool = False,
) -> subprocess.Popen:
    """`python -m pipeline run JOB --out OUT` started in the background (stdout/stderr piped, text)."""
    env = ray_env(env)
    if fault:
        fault_dir.mkdir(parents=True, exist_ok=True)
        env.update(PIPELINE_FAULT=fault, PIPELINE_FAULT_DIR=str(fault_dir))
    return subprocess.Popen(
        cli_cmd(job, out, retry_failed),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_child_setup,
    )


def finish(p: subprocess.Popen, t0: float, timeout: float = 300) -> Run:
    """Waits for a started job; past `timeout` its whole session is killed and the test fails."""
    try:
        out, err = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        kill_session(p)
        out, err = p.communicate()
        pytest.fail(f"job did not end within {timeout:.0f}s:\n{err[-3000:]}")
    return Run(p.returncode, out, err, time.perf_counter() - t0)


def kill_session(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_cli(
    job: Path,
    out,
    fault: str | None = None,
    fault_dir: Path | None = None,
    retry_failed: bool = False,
    timeout: float = 300,
    env: dict | None = None,
) -> Run:
    """`python -m pipeline run JOB --out OUT` in a subprocess, with an optional PIPELINE_FAULT."""
    t0 = time.perf_counter()
    p = start_cli(job, out, env, fault, fault_dir, retry_failed)
    try:
        return finish(p, t0, timeout)
    finally:
        if p.returncode is not None and p.returncode < 0:  # a killed driver's Ray processes die with it; be sure
            kill_session(p)


@dataclass
class Target:
    """Where a job writes: local disk, or S3 (SeaweedFS; the CLI gets its credentials from the AWS_* environment,
    in-process reruns from the job's `storage` options)."""

    kind: str  # local | s3
    out: str
    env: dict
    s3: object = None

    @property
    def options(self):
        return self.s3.options() if self.s3 else None

    def job(self, tmp_path: Path, sources: list[dict], **extra) -> tuple[Path, dict, dict]:
        """(job file for the CLI, the same job as a dict, and with S3 credentials in the job for in-process reruns)"""
        cfg = job_dict(self.out, sources, **extra)
        inproc = dict(cfg)
        if self.s3:
            inproc["storage"] = self.s3.options().model_dump(exclude_none=True)
        return write_job(tmp_path / "job.yaml", cfg), cfg, inproc


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path) -> Target:
    if request.param == "local":
        return Target("local", str(tmp_path / "out"), {})
    srv = request.getfixturevalue("s3_server")
    prefix = request.getfixturevalue("s3_prefix")
    return Target("s3", srv.uri(prefix), srv.env(), srv)


def make_inputs(shared: Path, dest: Path, images=IMAGES, videos=VIDEOS, meshes=MESHES) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for sub, names in (("images", images), ("videos", videos), ("meshes", meshes)):
        for name in names:
            shutil.copy(shared / sub / name, dest / name)
    return dest


def expected_ids(src, name: str = "local") -> set[str]:
    """The ids a folder source gives its files (the same code as the job, without Ray)."""
    return {r["id"] for r in iter_rows(make_source(source_config({"type": "folder", "path": str(src), "name": name})))}


# ---- the store and what readers see -------------------------------------------------------------------------


def the_store(out, options=None) -> Store:
    found = versions(Storage(str(out), options))
    assert len(found) == 1, f"expected one tokenizer version under {out}, got {found}"
    store = Store(found[0])
    store.load()
    return store


def visible_shards(out, options=None) -> list[tuple[pafs.FileSystem, str, str]]:
    """(filesystem, path, path relative to OUT) of every file a reader globbing OUT/*/data/**/*.parquet sees."""
    root = Storage(str(out), options)
    sel = pafs.FileSelector(root.path(""), recursive=True, allow_not_found=True)
    base = root.path("").rstrip("/")
    found = []
    for info in root.fs.get_file_info(sel):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base) :].lstrip("/").replace(os.sep, "/")
        parts = rel.split("/")
        if len(parts) >= 4 and parts[1] == "data" and parts[-1].endswith(".parquet"):
            found.append((root.fs, info.path, rel))
    return sorted(found, key=lambda f: f[2])


def shard_ids(out, options=None) -> collections.Counter:
    """Every id in every visible shard. pyarrow reads each file whole (footer, pages, checksums): a partial or
    torn file fails here."""
    ids = collections.Counter()
    for fs, path, _ in visible_shards(out, options):
        ids.update(pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist())
    return ids


def load_with_datasets(out, cache: Path, s3=None) -> int:
    """Loads every visible shard with Hugging Face datasets, per modality folder; returns the row count."""
    import datasets

    by_dir = collections.defaultdict(list)
    for _, _, rel in visible_shards(out, s3.options() if s3 else None):
        by_dir[rel.rsplit("/", 1)[0]].append(rel)
    n = 0
    for folder in sorted(by_dir):
        pattern = f"{str(out).rstrip('/')}/{folder}/*.parquet"
        kw = {"storage_options": s3.storage_options()} if s3 else {}
        ds = datasets.load_dataset("parquet", data_files=pattern, split="train", cache_dir=str(cache), **kw)
        n += len(ds)
    return n


def reader_invariant(out, cache: Path, s3=None) -> collections.Counter:
    """What a reader sees right now (e.g. between a crash and the rerun): every visible shard reads whole with
    pyarrow, no id appears twice, and HF datasets loads the same rows. Returns the ids seen."""
    ids = shard_ids(out, s3.options() if s3 else None)
    dups = sorted(i for i, c in ids.items() if c > 1)
    assert not dups, f"duplicate ids visible to readers: {dups[:10]}"
    assert load_with_datasets(out, cache, s3) == sum(ids.values())
    return ids


def final_state(out, options=None) -> dict:
    """Per-id outcomes from the ledger, verify problems and leftover staging files of the one store under OUT."""
    return store_state(the_store(out, options))


def store_state(store: Store | str, options=None) -> dict:
    """The same for one version store (a Store, or its URI: `Summary.store_dir`)."""
    if not isinstance(store, Store):
        store = Store(Storage(store, options))
        store.load()
    table = read_all(store.storage, ["id", "status", "stage", "reason"])
    ok = set(table.filter(pc.equal(table.column("status"), "ok")).column("id").to_pylist())
    other = {r["id"]: r for r in table.filter(pc.not_equal(table.column("status"), "ok")).to_pylist()}
    return {
        "ok": ok,
        "other": other,
        "problems": verify(store.storage),
        "store": store,
        "staging": [e.path for e in store.storage.list("staging", recursive=True)],
        "lock": store.storage.exists("LOCK.json"),
    }


def outcomes_by_key(out, options=None) -> dict[str, dict]:
    """`<id without the source prefix>` -> {status, stage, reason} for every recorded sample."""
    store = the_store(out, options)
    table = read_all(store.storage, ["id", "status", "stage", "reason"])
    return {r["id"].split("-", 1)[1]: r for r in table.to_pylist()}


def count_lost_dup(expected: set[str], ids: collections.Counter) -> tuple[set, int]:
    return expected - set(ids), sum(c - 1 for c in ids.values())


# ---- an in-process Ray cluster for jobs that need no kill ------------------------------------------------------


@pytest.fixture(scope="package")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# ---- figures for the report ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def figures(request) -> dict:
    """Section -> figures; written to out/reliability/report.{md,json} at the end of the session."""
    return request.config.stash.setdefault(FIGURES, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figs = config.stash.get(FIGURES, None)
    if not figs:
        return
    from tests.reliability.report import write_report

    md = write_report(figs, REPORT_DIR)
    terminalreporter.section("reliability report")
    terminalreporter.write_line(md.read_text())
    terminalreporter.write_line(f"written to {md} and {md.with_suffix('.json')}")
