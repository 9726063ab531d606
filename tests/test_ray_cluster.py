"""The LocalCluster fixture is a real multi-node cluster: work spreads over the worker nodes, each node's tasks see
that node's environment and write only into its scratch dir, `ray job submit` works through the dashboard, and a
task-only Ray Data pipeline survives losing a worker node with every row delivered exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.ray_cluster import LocalCluster

ray = pytest.importorskip("ray")

NO_PROGRESS = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=2, cpus_per_node=1) as c:
        yield c


@pytest.fixture
def driver(cluster):
    """This process as a driver of `cluster`, with a fresh DataContext."""
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield cluster
    finally:
        ray.shutdown()


def _where(batch):
    """A task on some node: report the node and its env, write one file into the node-local temp dir."""
    import ray as _ray

    time.sleep(0.3)  # long enough that both single-CPU workers get tasks
    node = _ray.get_runtime_context().get_node_id()
    fd, path = tempfile.mkstemp(prefix="task-")  # TMPDIR, i.e. this node's scratch dir
    with os.fdopen(fd, "w") as f:
        f.write(node)
    n = len(batch["id"])
    return {
        "id": batch["id"],
        "node": [node] * n,
        "scratch": [os.environ.get("PIPELINE_SCRATCH")] * n,
        "file": [path] * n,
    }


def test_data_job_spreads_over_worker_nodes_with_node_local_scratch(driver):
    c = driver
    rows = ray.data.range(64, override_num_blocks=8).map_batches(_where, batch_size=None).take_all()
    assert sorted(r["id"] for r in rows) == list(range(64))
    workers = c.node_ids()
    by_node = {}
    for r in rows:
        by_node.setdefault(r["node"], set()).add((r["scratch"], r["file"]))
    assert set(by_node) == set(workers), f"tasks ran on {set(by_node)}, workers are {workers}"  # never the head
    for i, node in enumerate(workers):
        scratch = str(c.scratch_dirs[i])
        assert {s for s, _ in by_node[node]} == {scratch}  # the node's env, not the head's or the driver's
        assert all(Path(f).parent == c.scratch_dirs[i] for _, f in by_node[node])
        written = list(c.scratch_dirs[i].glob("task-*"))
        assert written and all(p.read_text() == node for p in written)  # only this node's tasks wrote here
    assert not list(c.head_scratch.glob("task-*"))
    assert os.environ.get("PIPELINE_SCRATCH") not in {str(p) for p in c.scratch_dirs}


def test_job_submit_through_dashboard(cluster, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import os, ray\n"
        "ray.init()\n"
        "@ray.remote\n"
        "def f():\n"
        "    return os.environ['PIPELINE_SCRATCH']\n"
        "print('JOB-OK', ray.get(f.options(resources={'node_w1': 0.01}).remote()))\n"
    )
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("ray")),
            "job",
            "submit",
            "--address",
            cluster.dashboard_url,
            "--",
            sys.executable,
            str(script),
        ],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"JOB-OK {cluster.scratch_dirs[1]}" in r.stdout, r.stdout[-3000:]
    assert "succeeded" in r.stdout.lower()


def _slow_ident(batch):
    path = os.path.join(tempfile.gettempdir(), f"started-{int(batch['id'][0])}")
    open(path, "w").close()  # shows the test which node is busy with which block
    time.sleep(0.3)
    return {"id": batch["id"], "node": [ray.get_runtime_context().get_node_id()] * len(batch["id"])}


def _plus_one(batch):
    return {"id": batch["id"], "node": batch["node"], "x": batch["id"] + 1}


def test_task_pipeline_survives_losing_a_worker_node(driver):
    c = driver
    n, blocks = 240, 24
    ds = (
        ray.data.range(n, override_num_blocks=blocks)
        .map_batches(_slow_ident, batch_size=None)
        .map_batches(_plus_one, batch_size=None)
    )
    surv, lost = c.node_ids()
    rows, killed = [], {}

    def killer():  # lose worker 1 once it has started its second block
        deadline = time.monotonic() + 60
        while len(list(c.scratch_dirs[1].glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        killed["at_rows"] = len(rows)
        killed["dead_after_s"] = c.kill_worker(1, wait_dead=True)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        for row in ds.iter_rows():
            rows.append(row)
        t.join(60)
        assert "dead_after_s" in killed, "worker 1 was never killed"
        assert killed["at_rows"] < n, "the pipeline had already finished when the node died"
        assert lost not in c.alive_node_ids() and not c.pids("w1")  # every process of the node is gone
        ids = sorted(r["id"] for r in rows)
        assert ids == list(range(n)), f"{len(ids)} rows, {len(set(ids))} distinct"  # each row exactly once
        assert all(r["x"] == r["id"] + 1 for r in rows)
        print(
            f"killed at {killed['at_rows']}/{n} rows; GCS saw the node dead {killed['dead_after_s']:.1f}s after "
            f"the kill; rows computed on the survivor {sum(r['node'] == surv for r in rows)}, "
            f"on the lost node {sum(r['node'] == lost for r in rows)}"
        )
    finally:
        t.join(60)
        c.restart_worker(1)  # leave the module's cluster whole
