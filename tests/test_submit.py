"""A real Ray head (`ray start --head` on 127.0.0.1) takes a job through `make submit` (ray job submit);
its shards equal those of a local run."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
         "--include-dashboard", "true", "--temp-dir", temp],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            from ray.job_submission import JobSubmissionClient
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            assert head.poll() is None, "ray head exited"
            time.sleep(1)
    else:
        pytest.fail("ray head did not come up")
    yield address
    os.killpg(head.pid, 15)
    head.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


def write_job(path: Path, inputs: Path, out: Path) -> Path:
    job = {"out": str(out), "sources": [{"type": "folder", "path": str(inputs), "name": "sub"}],
           "decode": {"fps": 4, "max_frames": 8, "buckets": {"area": 128 * 128, "min_side": 64, "max_side": 256}},
           "tokenize": {"config": "tiny", "device": "cpu", "batch_rows": 2},
           "write": {"shard_rows": 2}, "qa": {"samples": 0}}
    path.write_text(yaml.safe_dump(job))
    return path


def rows(out: Path) -> list[dict]:
    files = sorted(out.glob("*/data/*/*.parquet"))
    return sorted((r for f in files for r in pq.read_table(f).to_pylist()), key=lambda r: r["id"])


def test_make_submit_equals_local_run(ray_head, shared_data, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("astronaut.png", "coffee.png", "rocket.jpg"):
        shutil.copy(shared_data / "images" / name, inputs / name)
    shutil.copy(shared_data / "videos" / "bbb_480p_vp9_opus_1second.webm", inputs / "clip.webm")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PIPELINE_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)

    submitted = write_job(tmp_path / "submit.yaml", inputs, tmp_path / "out-submit")
    res = subprocess.run(["make", "-s", "submit", f"JOB={submitted}", f"RAY_ADDRESS={ray_head}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SUCCEEDED" in res.stdout

    local = write_job(tmp_path / "local.yaml", inputs, tmp_path / "out-local")
    res = subprocess.run([sys.executable, "-m", "pipeline", "run", str(local)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    a, b = rows(tmp_path / "out-submit"), rows(tmp_path / "out-local")
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 4
    assert {p.parent.name for p in (tmp_path / "out-submit").glob("*/tokenizer.json")} == \
           {p.parent.name for p in (tmp_path / "out-local").glob("*/tokenizer.json")}
    for x, y in zip(a, b):
        assert x["coords"] == y["coords"] and x["num_tokens"] == y["num_tokens"] and x["width"] == y["width"]
        np.testing.assert_allclose(np.asarray(x["latent"], np.float32), np.asarray(y["latent"], np.float32),
                                   atol=2e-3)
        np.testing.assert_allclose(np.asarray(x["pooled"], np.float32), np.asarray(y["pooled"], np.float32),
                                   atol=2e-3)
