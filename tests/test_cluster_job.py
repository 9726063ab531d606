"""A multi-node Ray cluster on one machine (a head and two worker nodes, each its own `ray start`, its own
scratch dir, no shared cache), a WebVid job read over loopback HTTP and written to a real S3 server:
- `make submit` (ray job submit) gives the same rows as a local run;
- losing a worker node in the middle of a job: the same submission completes, 0 lost, 0 duplicated."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.storage import Storage
from pipeline.store import Store, verify, versions
from tests.http_server import FaultServer
from tests.ray_cluster import LocalCluster

REPO = Path(__file__).resolve().parents[1]
CLIPS = ["bbb_480p_vp9_opus_1second.webm", "video_90.mov", "chaplin.mp4", "stub_mp4v.mp4"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=2, cpus_per_node=2) as c:
        yield c


@pytest.fixture(scope="module")
def served(shared_data, tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    for i in range(12):  # 12 clips, 3 copies of each test video under their own names
        name = CLIPS[i % len(CLIPS)]
        shutil.copy(shared_data / "videos" / name, www / f"{i:02d}-{name}")
    with FaultServer(www) as srv:
        yield srv, sorted(p.name for p in www.iterdir())


def write_job(tmp: Path, srv, names: list[str], out: str) -> Path:
    csv_path = tmp / "webvid.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "name"])
        for i, n in enumerate(names):
            w.writerow([str(1000 + i), srv.url(n), "PT00H00M01S", f"clip {i}"])
    job = {
        "name": "cluster",
        "out": out,
        "sources": [{"type": "webvid", "path": str(csv_path)}],
        "fetch": {"schemes": ["http"], "retries": 1, "backoff_s": 0.05},
        "decode": {"fps": 4, "max_frames": 8, "buckets": {"area": 128 * 128, "min_side": 64, "max_side": 256}},
        "tokenize": {"config": "tiny", "device": "cpu", "batch_rows": 2},
        "write": {"rows_per_write": 2},
        "qa": {"samples": 0},
        "ray": {"prepare_actors": 2},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def rows_at(uri: str, options) -> list[dict]:
    found = versions(Storage(uri, options))
    assert len(found) == 1, found
    store = Store(found[0])
    store.load()
    assert verify(store.storage) == []
    rows = []
    for path in sorted(store.shards):
        with store.storage.open_input(path) as f:
            rows += pq.read_table(f).to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def run_env(s3, extra=None) -> dict:
    env = {**os.environ, **s3.env(), "RAY_AUTH_MODE": "disabled", "PIPELINE_PROGRESS": "0", **(extra or {})}
    env.pop("RAY_ADDRESS", None)
    return env


def test_submit_equals_local_and_survives_a_lost_node(cluster, served, s3_server, tmp_path):
    srv, names = served
    expected = {f"webvid-{1000 + i}" for i in range(len(names))}
    local_job = write_job(tmp_path, srv, names, s3_server.uri("cluster-local"))
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(local_job)],
        cwd=REPO,
        env=run_env(s3_server),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]

    job = write_job(tmp_path, srv, names, s3_server.uri("cluster-submit"))
    res = subprocess.run(
        ["make", "-s", "submit", f"JOB={job}", f"RAY_ADDRESS={cluster.dashboard_url}"],
        cwd=REPO,
        env=run_env(s3_server, cluster.env()),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and "SUCCEEDED" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
    a, b = (
        rows_at(s3_server.uri("cluster-local"), s3_server.options()),
        rows_at(s3_server.uri("cluster-submit"), s3_server.options()),
    )
    assert [r["id"] for r in a] == [r["id"] for r in b] and {r["id"] for r in a} == expected
    for x, y in zip(a, b):
        assert x["coords"] == y["coords"] and x["num_tokens"] == y["num_tokens"] and x["width"] == y["width"]
        np.testing.assert_allclose(np.asarray(x["latent"], np.float32), np.asarray(y["latent"], np.float32), atol=2e-3)
    # both worker nodes did the work (the stage actors spread over them), and no downloaded file is left in a
    # node's scratch dir (PIPELINE_SCRATCH)
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster.dashboard_url,
        filters=[("class_name", "=", "MapWorker(MapBatches(StageActor))")],
        detail=True,
        limit=1000,
    )
    workers = set(cluster.node_ids())
    assert {a.node_id for a in actors} >= workers, f"stage actors ran on {[a.node_id for a in actors]}"
    for scratch in cluster.scratch_dirs:
        left = [
            p
            for d in Path(scratch).iterdir()
            if d.is_dir() and re.fullmatch(r"\d+-[0-9a-f]{8}", d.name)
            for p in d.rglob("*")
            if p.is_file()
        ]
        assert not left, left

    # a lost node mid-run: the same submission completes, every clip exactly once
    job = write_job(tmp_path, srv, names, s3_server.uri("cluster-kill"))
    proc = subprocess.Popen(
        ["make", "-s", "submit", f"JOB={job}", f"RAY_ADDRESS={cluster.dashboard_url}"],
        cwd=REPO,
        env=run_env(s3_server, cluster.env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    kill_store = Storage(s3_server.uri("cluster-kill"), s3_server.options())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # the first commit: work is under way on both nodes
        if any("/manifest/" in e.path for e in kill_store.list("", recursive=True)):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the job ended before a node could be lost:\n" + proc.stdout.read()[-3000:]
    cluster.kill_worker(1, wait_dead=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "SUCCEEDED" in out, out[-4000:]
    ids = [r["id"] for r in rows_at(s3_server.uri("cluster-kill"), s3_server.options())]
    assert len(ids) == len(set(ids)), "duplicated rows after a lost node"
    assert set(ids) == expected, f"lost rows: {sorted(expected - set(ids))}"


def test_submit_runs_from_the_upload_on_a_head_elsewhere(shared_data, tmp_path):
    """A head started by `ray start --head` in a temp dir, without this repository on its PYTHONPATH and with its
    own `python` on PATH: the submitted entry point names no path of this machine, the job runs from the uploaded
    working dir, `checkpoints/` and outputs are not uploaded, and the checkpoint is the one the job file says is
    on the cluster (`ray.cluster_checkpoints`)."""
    from ray.job_submission import JobSubmissionClient

    from pipeline.submit import ENTRYPOINT

    src = tmp_path / "in"
    src.mkdir()
    for name in ("camera.png", "coins.png"):
        shutil.copy(shared_data / "images" / name, src / name)
    on_cluster = tmp_path / "cluster-checkpoints"
    on_cluster.mkdir()
    shutil.copy(REPO / "atoken" / "weights" / "tiny-c.safetensors", on_cluster / "tiny-c.safetensors")
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "elsewhere",
                "out": str(tmp_path / "out"),
                "sources": [{"type": "folder", "path": str(src)}],
                "decode": {"buckets": {"area": 64 * 64, "min_side": 32, "max_side": 128}},
                "tokenize": {"config": "tiny-c", "checkpoint": "checkpoints/tiny-c.safetensors", "device": "cpu"},
                "qa": {"samples": 0},
                "ray": {"cluster_checkpoints": str(on_cluster)},
            }
        )
    )
    made = [d for d in (REPO / "checkpoints", REPO / "out") if not d.exists()]
    markers = [REPO / "checkpoints" / "not-uploaded.pt", REPO / "out" / "not-uploaded.bin"]
    for m in markers:
        m.parent.mkdir(exist_ok=True)
        m.write_bytes(b"x" * 1024)
    head_env = {"PYTHONPATH": ""}  # the cluster's `python` is this venv's (LocalCluster puts it first on PATH)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="sub", dir="/tmp") as short,
            LocalCluster(short, workers=0, head_cpus=2, extra_env=head_env) as c,
        ):  # short: unix socket paths
            env = {k: v for k, v in c.env().items() if k != "PYTHONPATH"}
            res = subprocess.run(
                [sys.executable, "-m", "pipeline", "submit", str(job), "--address", c.dashboard_url],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert res.returncode == 0 and "SUCCEEDED" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
            sub_id = re.search(r"^submitted (\S+) to ", res.stdout, re.M).group(1)
            info = JobSubmissionClient(c.dashboard_url).get_job_info(sub_id)
            assert info.entrypoint == ENTRYPOINT == "python -m pipeline run env:PIPELINE_JOB"
            sent = yaml.safe_load(info.runtime_env["env_vars"]["PIPELINE_JOB"])
            assert sent["tokenize"]["checkpoint"] == str(on_cluster / "tiny-c.safetensors")
            uploads = [
                d for d in Path(c._ray_root).rglob("working_dir_files/*") if (d / "pipeline" / "cli.py").is_file()
            ]
            assert len(uploads) == 1, uploads
            assert not (uploads[0] / "checkpoints").exists() and not (uploads[0] / "out").exists()
            assert (
                not (uploads[0] / ".git").exists()
                and (uploads[0] / "atoken" / "weights" / "tiny-c.safetensors").is_file()
            )
    finally:
        for m in markers:
            m.unlink(missing_ok=True)
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
    rows = rows_at(str(tmp_path / "out"), None)
    assert len({r["id"] for r in rows}) == 2 and all(r["num_tokens"] > 0 for r in rows), rows
    tok = json.loads(next((tmp_path / "out").glob("*/tokenizer.json")).read_text())
    assert tok.get("checkpoint") == str(on_cluster / "tiny-c.safetensors"), tok
