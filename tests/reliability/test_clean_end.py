"""A clean end: after kill -9 of a driver (`python -m pipeline run` with its own local Ray cluster), every process
it started (GCS, raylet, dashboard and runtime-env agents, workers) is gone within a few seconds. Processes are
found by the driver's own pids (psutil, its descendants while it lives), never by name."""

from __future__ import annotations

import shutil
import time


from tests.reliability.conftest import job_dict, kill_session, start_cli, visible_shards, write_job

GONE_WITHIN_S = 15  # a generous bound; Ray alone leaves its agents 60-120 s


def _psutil():
    import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
    import psutil

    return psutil


def test_kill_9_of_the_driver_takes_its_ray_processes_along(shared_data, tmp_path):
    psutil = _psutil()
    src = tmp_path / "in"
    src.mkdir()
    for k in range(6):
        for name in ("camera.png", "coins.png", "text.png"):
            shutil.copy(shared_data / "images" / name, src / f"{k}_{name}")
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        job_dict(out, [{"type": "folder", "path": str(src), "name": "local"}], write={"rows_per_write": 1}),
    )
    p = start_cli(job, out)
    try:
        deadline = time.monotonic() + 240
        while not visible_shards(out) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the first commit: the cluster and its workers are up
        assert p.poll() is None and visible_shards(out), "the job ended (or stalled) before the first commit"
        driver = psutil.Process(p.pid)
        started = driver.children(recursive=True)
        assert len(started) >= 4, f"expected Ray's processes below the driver, got {started}"
        p.kill()
        p.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < GONE_WITHIN_S:
            alive = [c for c in started if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            time.sleep(0.2)
        left = [f"{c.pid} {c.name()}" for c in alive if c.is_running()]
        assert not left, f"{len(left)} of {len(started)} processes alive {GONE_WITHIN_S}s after kill -9: {left}"
    finally:
        kill_session(p)
        for c in locals().get("started", []):  # the test never leaves them behind, even when it fails
            try:
                c.kill()
            except psutil.Error:
                pass
