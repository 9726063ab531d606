"""What a person sees: the driver's progress (bar on a terminal, plain lines in a log), a quiet log, `status`
(root or version folder, --failed/--stage/--reason/--json), a no-op rerun that starts nothing, and error tails
that say what to do. The jobs run through the real CLI (a subprocess: stdout is not a terminal) on a real local
Ray cluster with the embedded tiny-c model."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.progress import Progress

REPO = Path(__file__).resolve().parents[1]
IMAGES = ["astronaut.png", "portrait-orientation-6.jpg"]
BAD = "truncated.jpg"


def test_plain_lines_when_not_a_terminal():
    state = {"counts": {"ok": 3, "failed": 1}, "reasons": {("decode", "corrupt or truncated image"): 1}}
    out = io.StringIO()
    with Progress(lambda: (state["counts"], state["reasons"]), total=10, stream=out, every_s=0.2, refresh_s=0.05):
        time.sleep(0.6)
        state["counts"] = {"ok": 9, "failed": 1}
        time.sleep(0.4)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3, lines  # periodic, plus the last one at the end
    assert all(line.startswith("progress: ") for line in lines), lines
    assert "progress: 4/10 samples (40.0%)" in lines[0] and "ETA " in lines[0], lines
    assert "failed 1, ok 3" in lines[0] and "top failure (1x) decode: corrupt or truncated image" in lines[0]
    assert lines[-1].startswith("progress: 10/10 samples (100.0%)"), lines


def test_live_bar_on_a_terminal():
    out = io.StringIO()
    counts = {"ok": 0}
    with Progress(lambda: (counts, {}), total=8, stream=out, tty=True, refresh_s=0.05):
        for n in range(1, 5):
            counts["ok"] = n
            time.sleep(0.15)
    text = out.getvalue()
    assert "\r" in text and "4/8" in text and "sample/s" in text and "ok 4" in text, text
    assert "progress: " not in text  # the bar, not the plain lines


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _cli(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def done_job(shared_data, tmp_path_factory):
    """One job run through the CLI: two images and one truncated file (fails at decode)."""
    tmp = tmp_path_factory.mktemp("status")
    src = tmp / "in"
    src.mkdir()
    for name in IMAGES:
        shutil.copy(shared_data / "images" / name, src / name)
    shutil.copy(shared_data / "bad" / BAD, src / BAD)
    job = {
        "name": "t",
        "out": str(tmp / "out"),
        "sources": [{"type": "folder", "path": str(src), "name": "local"}],
        "decode": {
            "fps": 4,
            "max_frames": 8,
            "timeout_s": 30,
            "buckets": {"area": 128 * 128, "min_side": 64, "max_side": 256},
        },
        "tokenize": {"config": "tiny-c", "batch_tokens": 4096, "batch_rows": 1, "device": "cpu"},
        "write": {"rows_per_write": 1},
        "qa": {"samples": 1},
        "ray": {"num_cpus": 2},
        "progress": {"every_s": 1},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run = _cli("run", path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"job": path, "out": tmp / "out", "src": src, "run": run}


def test_run_prints_progress_lines_and_no_warnings(done_job):
    run = done_job["run"]
    progress = [l for l in run.stdout.splitlines() if l.startswith("progress: ")]
    assert progress and progress[-1].startswith("progress: 3/3 samples (100.0%)"), run.stdout
    assert "failed 1, ok 2" in progress[-1] and "top failure (1x) decode: " in progress[-1], progress[-1]
    log = run.stdout + run.stderr
    assert "Warning" not in log and "WARNING" not in log, log[-3000:]
    assert not [l for l in log.splitlines() if " E " in l], log[-3000:]  # Ray's E-level core_worker lines
    assert "logging_progress" not in log and "Running Dataset" not in log, log[-3000:]  # Ray's own progress
    version = next(Path(done_job["out"]).glob("*/version.json")).parent
    assert f"1 samples failed this run: `python -m pipeline status {version} --failed` lists them" in run.stdout


def _status(capsys, *args):
    from pipeline.cli import main

    capsys.readouterr()
    assert main(["status", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_status_on_root_and_version_dir(done_job, capsys):
    out = done_job["out"]
    version = next(out.glob("*/version.json")).parent
    for path in (out, version, version / "data"):
        text = _status(capsys, path)
        assert text.splitlines()[0] == str(version), text
        assert "(config tiny-c)" in text and "(None)" not in text, text
        assert "outcomes: failed 1, ok 2" in text and "by stage: failed at decode 1" in text, text
        assert "rerun the job with --retry-failed" in text, text
    card = (version / "README.md").read_text()
    assert "(config tiny-c," in card and "()" not in card, card


def test_status_failed_filters_and_json(done_job, capsys):
    out = done_job["out"]
    text = _status(capsys, out, "--failed")
    rows = [l.strip().split("\t") for l in text.splitlines() if "\t" in l]
    assert len(rows) == 1, text
    sample_id, uri, reason = rows[0]
    assert sample_id == f"local-{BAD}" and uri.endswith(BAD) and reason.startswith("decode: "), rows
    assert "failed samples: 1" in text
    word = reason.split(": ", 1)[1].split()[0]
    hit = _status(capsys, out, "--stage", "decode", "--reason", word.upper())
    assert f"local-{BAD}\t" in hit and "failed samples (filtered): 1" in hit, hit
    miss = _status(capsys, out, "--stage", "fetch")
    assert "failed samples (filtered): 0" in miss and f"local-{BAD}\t" not in miss, miss
    rep = json.loads(_status(capsys, out, "--json"))
    assert rep["tokenizer"]["config"] == "tiny-c" and rep["outcomes"] == {"failed": 1, "ok": 2}, rep
    assert [r["id"] for r in rep["failed"]] == [f"local-{BAD}"] and rep["failed"][0]["uri"].endswith(BAD)
    assert rep["modalities"]["image"]["rows"] == 2 and rep["by_stage"] == [
        {"status": "failed", "stage": "decode", "n": 1}
    ]


# the CLI in a subprocess, then which of the heavy packages that process had imported by the end
_PROBE = (
    "import json, sys\n"
    "from pipeline.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('imported: ' + json.dumps({m: m in sys.modules for m in ('torch', 'ray')}))\n"
    "sys.exit(rc)\n"
)


def _probe(*args):
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, *map(str, args)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("imported: ")]
    assert len(line) == 1, res.stdout
    return res.stdout, json.loads(line[0][len("imported: ") :])


def test_noop_rerun_starts_nothing_and_a_new_file_is_done(done_job, shared_data, monkeypatch):
    from pipeline import ray_job
    from pipeline.job import load_job
    from pipeline.run import run_job
    from pipeline.storage import Storage
    from pipeline.store import versions

    job = load_job(done_job["job"])
    storage = versions(Storage(str(done_job["out"])))[0]
    runs = sorted(e.path for e in storage.list("runs"))
    started = []  # Ray may already be up in this test process (other tests): watch this run's own start of it
    real_init = ray_job.init_ray
    monkeypatch.setattr(ray_job, "init_ray", lambda *a, **k: started.append(1) or real_init(*a, **k))
    summary = run_job(job)
    monkeypatch.undo()
    assert started == [], "a no-op rerun started Ray"
    assert any(n.startswith("nothing to do: ") for n in summary.notes), summary.notes
    assert summary.resume == {
        "local": {"rows": 3, "duplicate": 0, "ok": 2, "skipped": 0, "failed": 1, "failed_duplicate": 0, "todo": 0}
    }
    assert summary.qa == {} and sorted(e.path for e in storage.list("runs")) == runs  # no QA, nothing written
    text = summary.render()
    assert "1 samples failed in earlier runs and were not retried" in text and "--retry-failed" in text, text

    # the same through the CLI, in a fresh process: nothing to do, and neither torch (so no model) nor Ray imported
    out, imported = _probe("run", done_job["job"])
    assert "note: nothing to do: " in out and "this run: 0 of 0 finished" in out, out
    assert imported == {"torch": False, "ray": False}, out
    assert sorted(e.path for e in storage.list("runs")) == runs

    # a changed source: the same command does the new file, which needs Ray (and the tokenizer on its workers)
    shutil.copy(shared_data / "images" / "hopper_16bit.pgm", done_job["src"] / "hopper_16bit.pgm")
    out, imported = _probe("run", done_job["job"])
    assert "nothing to do" not in out and "this run: 1 of 1 finished; ok 1" in out, out
    assert imported["ray"], out
    assert len(list(storage.list("runs"))) == len(runs) + 1


def test_error_tails_are_specific(tmp_path):
    job = {
        "name": "t",
        "out": str(tmp_path / "out"),
        "sources": [{"type": "webvid", "path": str(tmp_path / "missing.csv")}],
        "tokenize": {"config": "atoken-soc", "checkpoint": "checkpoints/atoken-soc.pt"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = _cli("run", path, timeout=300)
    lines = [l for l in res.stderr.splitlines() if l.startswith("error: ")]
    assert res.returncode == 1 and len(lines) == 1, res.stderr[-3000:]
    assert "checkpoint not found: checkpoints/atoken-soc.pt" in lines[0] and "make checkpoints" in lines[0], lines
    assert "intact" not in res.stderr, res.stderr
    job["tokenize"] = {"config": "tiny-c"}
    path.write_text(yaml.safe_dump(job))
    res = _cli("run", path, timeout=300)
    lines = [l for l in res.stderr.splitlines() if l.startswith("error: ")]
    assert res.returncode in (1, 2) and len(lines) == 1 and "missing.csv" in lines[0], res.stderr[-3000:]
    assert "intact" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
