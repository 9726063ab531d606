"""A multi-node Ray cluster on one machine (a head and two worker nodes, each its own `ray start`, its own
scratch dir, no shared cache), a WebVid job read over loopback HTTP and written to a real S3 server:
- `make submit` (ray job submit) gives the same rows as a local run;
- losing a worker node in the middle of a job: the same submission completes, 0 lost, 0 duplicated."""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
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
    job = {"name": "cluster", "out": out, "sources": [{"type": "webvid", "path": str(csv_path)}],
           "fetch": {"schemes": ["http"], "retries": 1, "backoff_s": 0.05},
           "decode": {"fps": 4, "max_frames": 8, "buckets": {"area": 128 * 128, "min_side": 64, "max_side": 256}},
           "tokenize": {"config": "tiny", "device": "cpu", "batch_rows": 2},
           "write": {"rows_per_write": 2}, "qa": {"samples": 0}, "ray": {"prepare_actors": 2}}
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
    res = subprocess.run([sys.executable, "-m", "pipeline", "run", str(local_job)], cwd=REPO,
                         env=run_env(s3_server), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    job = write_job(tmp_path, srv, names, s3_server.uri("cluster-submit"))
    res = subprocess.run(["make", "-s", "submit", f"JOB={job}", f"RAY_ADDRESS={cluster.dashboard_url}"], cwd=REPO,
                         env=run_env(s3_server, cluster.env()), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "SUCCEEDED" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
    a, b = rows_at(s3_server.uri("cluster-local"), s3_server.options()), \
        rows_at(s3_server.uri("cluster-submit"), s3_server.options())
    assert [r["id"] for r in a] == [r["id"] for r in b] and {r["id"] for r in a} == expected
    for x, y in zip(a, b):
        assert x["coords"] == y["coords"] and x["num_tokens"] == y["num_tokens"] and x["width"] == y["width"]
        np.testing.assert_allclose(np.asarray(x["latent"], np.float32), np.asarray(y["latent"], np.float32),
                                   atol=2e-3)
    # both worker nodes did the work (the stage actors spread over them), and no downloaded file is left in a
    # node's scratch dir (PIPELINE_SCRATCH)
    from ray.util.state import list_actors
    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "MapWorker(MapBatches(StageActor))")],
                         detail=True, limit=1000)
    workers = set(cluster.node_ids())
    assert {a.node_id for a in actors} >= workers, f"stage actors ran on {[a.node_id for a in actors]}"
    for scratch in cluster.scratch_dirs:
        left = [p for d in Path(scratch).iterdir() if d.is_dir() and re.fullmatch(r"\d+-[0-9a-f]{8}", d.name)
                for p in d.rglob("*") if p.is_file()]
        assert not left, left

    # a lost node mid-run: the same submission completes, every clip exactly once
    job = write_job(tmp_path, srv, names, s3_server.uri("cluster-kill"))
    proc = subprocess.Popen(["make", "-s", "submit", f"JOB={job}", f"RAY_ADDRESS={cluster.dashboard_url}"],
                            cwd=REPO, env=run_env(s3_server, cluster.env()), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
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
