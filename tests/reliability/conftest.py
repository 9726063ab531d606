"""Reliability suite helpers: jobs run as real `python -m pipeline run` subprocesses (so kill -9 really kills),
an in-process Ray cluster for the jobs that need no kill, store checks, and the figures collected for the report."""
from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.store import load_state, open_versions, verify

REPO = Path(__file__).resolve().parents[2]
REPORT_DIR = REPO / "out" / "reliability"
FIGURES = pytest.StashKey[dict]()

# small real inputs: a crash lands between shards, a run stays short on 2 cores
IMAGES = ["camera.png", "cell.png", "coins.png", "hopper_gray.jpg", "text.png", "brick.png", "logo.png",
          "rocket.jpg", "retina.jpg", "clock_motion.png"]
VIDEOS = ["video_90.mov", "bbb_480p_vp9_opus_1second.webm"]
MESHES = ["BoxVertexColors.glb"]


def ray_env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PIPELINE_PROGRESS="0",
               PYTHONPATH=str(REPO))
    for k in [k for k in env if k.startswith("PIPELINE_FAULT")] + ["RAY_ADDRESS"]:
        env.pop(k, None)
    return env


def job_dict(out: Path, sources: list[dict], **extra) -> dict:
    """A small CPU job: tiny tokenizer, small buckets, 2-row shards, short timeouts."""
    cfg = {"name": "rel", "out": str(out), "sources": sources,
           "decode": {"fps": 4, "max_frames": 8, "timeout_s": 30,
                      "buckets": {"area": 64 * 64, "min_side": 32, "max_side": 128}},
           "fetch": {"retries": 1, "backoff_s": 0.05, "read_timeout_s": 1.0, "deadline_s": 4.0},
           "mesh": {"views": 8, "backend": "cpu"},
           "tokenize": {"config": "tiny", "batch_rows": 2, "device": "cpu"},
           "write": {"shard_rows": 2}, "qa": {"samples": 0}, "ray": {"num_cpus": 2}}
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


def run_cli(job: Path, out: Path, fault: str | None = None, fault_dir: Path | None = None,
            retry_failed: bool = False, timeout: float = 300, preexec=None) -> Run:
    """`python -m pipeline run JOB --out OUT` in a subprocess, with an optional PIPELINE_FAULT."""
    env = ray_env()
    if fault:
        fault_dir.mkdir(parents=True, exist_ok=True)
        env.update(PIPELINE_FAULT=fault, PIPELINE_FAULT_DIR=str(fault_dir))
    cmd = [sys.executable, "-m", "pipeline", "run", str(job), "--out", str(out)]
    if retry_failed:
        cmd.append("--retry-failed")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                       preexec_fn=preexec)
    return Run(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def make_inputs(shared: Path, dest: Path, images=IMAGES, videos=VIDEOS, meshes=MESHES) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for sub, names in (("images", images), ("videos", videos), ("meshes", meshes)):
        for name in names:
            shutil.copy(shared / sub / name, dest / name)
    return dest


def store_dir(out: Path) -> Path:
    versions = open_versions(out)
    assert len(versions) == 1, f"expected one tokenizer version under {out}, got {versions}"
    return versions[0]


def shard_ids(out: Path) -> collections.Counter:
    """Every id in every visible shard (pyarrow read: a partial file fails here)."""
    ids = collections.Counter()
    for path in sorted(Path(out).glob("*/data/*/*.parquet")):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def load_with_datasets(out: Path, cache: Path) -> int:
    """Loads every visible shard with Hugging Face datasets, per modality; returns the row count."""
    import datasets

    n = 0
    for mdir in sorted(Path(out).glob("*/data/*")):
        if any(mdir.glob("*.parquet")):
            ds = datasets.load_dataset("parquet", data_files=str(mdir / "*.parquet"), split="train",
                                       cache_dir=str(cache))
            n += len(ds)
    return n


def final_state(out: Path) -> dict:
    """ok / other statuses from the manifest plus verify problems of the one store under `out`."""
    sdir = store_dir(out)
    state = load_state(sdir)
    return {"ok": set(state.ok), "other": dict(state.other), "problems": verify(sdir), "dir": sdir}


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
