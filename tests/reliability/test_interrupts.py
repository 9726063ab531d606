"""Graceful interrupts: SIGINT at random times during a real job (`python -m pipeline run` in its own process, with
its own Ray cluster), on local disk and on S3 (SeaweedFS, credentials in the AWS_* environment of the job).

Each trial sends one SIGINT after a seeded random delay: even trials from the start of the process (up to about
one whole run: most land in start-up and planning), odd trials from the moment the first commit is visible (so
they land among the commits, which take a few seconds with 21 samples), then expects exit 130 and exactly one `interrupted (SIGINT): ...` line, or exit 0 when the job finished
first; never a traceback. Between the interrupt and the rerun, what a reader sees is whole (pyarrow + HF datasets,
no duplicate id), `verify` is clean, no staging file and no lock are left. The rerun (in-process, the same
`run_job`) must end with every sample exactly once: the trial counts lost and duplicated samples.

Also: a second SIGINT shortly after the first aborts at once (exit 130, `aborted: ...`), and the rerun still loses
nothing; SIGTERM stops gracefully with exit 143; a second run on a live output is refused by the lock, naming its
holder's host and pid; a lock left by a kill -9'd run is taken over; the grace period expiring in the middle of a
(slow) commit loses nothing.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.job import validate_job
from pipeline.run import run_job
from pipeline.storage import Storage
from tests.reliability.conftest import (
    Target,
    count_lost_dup,
    expected_ids,
    finish,
    kill_session,
    reader_invariant,
    run_cli,
    shard_ids,
    start_cli,
    store_state,
    the_store,
    visible_shards,
)

TRIALS = 20  # per storage, in the full (slow) set
FAST = 2  # of which run in the fast set
DELAY_S = (0.3, 24.0)  # even trials: SIGINT this long after the process started (a run takes ~20-30 s)
AFTER_COMMIT_S = (0.0, 4.0)  # odd trials: this long after the first commit is visible (~4 s of commits)
IMAGES = ["camera.png", "coins.png", "hopper_gray.jpg", "text.png"]
COPIES = 5
VIDEO = "video_90.mov"  # 3 frames
LINE = re.compile(r"^interrupted \((SIGINT|SIGTERM)\)")
COMMITTED = re.compile(r"^interrupted \(\w+\)(?: before the run started)?: (\d+) samples? committed this run")


@pytest.fixture(scope="module")
def small(shared_data, tmp_path_factory) -> tuple[Path, set[str]]:
    """One small input folder for every trial: four images, each under COPIES names (the commits then take a few
    seconds instead of one: room for a signal to land among them; a run takes about as long either way), and
    one short video."""
    src = tmp_path_factory.mktemp("interrupts") / "in"
    src.mkdir()
    for k in range(COPIES):
        for name in IMAGES:
            shutil.copy(shared_data / "images" / name, src / f"{k}_{name}")
    shutil.copy(shared_data / "videos" / VIDEO, src / VIDEO)
    return src, expected_ids(src)


def interrupt_job(target: Target, tmp_path: Path, src: Path, **extra) -> tuple[Path, dict, dict]:
    """One row per prepare batch and per writer call (a commit per sample: many points for a signal to land)."""
    ray = {"num_cpus": 2, "prepare_batch_rows": 1, "interrupt_grace_s": 60, **extra.pop("ray", {})}
    return target.job(
        tmp_path, [{"type": "folder", "path": str(src), "name": "local"}], write={"rows_per_write": 1}, ray=ray, **extra
    )


def signal_lines(run) -> list[str]:
    return [l for l in (run.stdout + run.stderr).splitlines() if LINE.match(l)]


def committed_by(lines: list[str]) -> int | None:
    m = COMMITTED.match(lines[0]) if lines else None
    return int(m.group(1)) if m else None


def wait_for(cond, timeout: float, p: subprocess.Popen | None = None, what: str = "") -> bool:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if cond():
            return True
        if p is not None and p.poll() is not None:
            return False
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def check_between(target: Target, tmp_path: Path) -> tuple[int, dict]:
    """After the interrupt, before the rerun: readers see whole files and no duplicate; the store is consistent."""
    seen = reader_invariant(target.out, tmp_path / "hf", target.s3)
    st = store_state(the_store(target.out, target.options)) if _has_store(target) else None  # (an early stop
    if st is not None:  # makes none)
        assert st["problems"] == [], st["problems"]
        assert st["staging"] == [], f"staging left by a graceful stop: {st['staging']}"
        assert not st["lock"], "the interrupted run left its lock behind"
    return len(seen), st


def _has_store(target: Target) -> bool:
    from pipeline.store import versions

    return bool(versions(Storage(target.out, target.options)))


def rerun_and_count(target: Target, inproc: dict, expected: set[str]) -> dict:
    summary = run_job(validate_job(inproc))
    ids = shard_ids(target.out, target.options)
    st = store_state(the_store(target.out, target.options))
    lost, dups = count_lost_dup(expected, ids)
    return {
        "lost": len(lost),
        "duplicates": dups,
        "verify_problems": len(st["problems"]),
        "ok": st["ok"],
        "other": st["other"],
        "staging": st["staging"],
        "lock": st["lock"],
        "redone": summary.finished,
        "rerun_s": round(summary.wall_s, 1),
        "problems": st["problems"],
        "lost_ids": sorted(lost),
    }


def assert_complete(after: dict, expected: set[str]) -> None:
    assert after["lost"] == 0, f"lost samples: {after['lost_ids']}"
    assert after["duplicates"] == 0
    assert after["ok"] == expected and not after["other"], after["other"]
    assert after["problems"] == [] and after["staging"] == [] and not after["lock"]


TRIAL_PARAMS = [pytest.param(i, marks=() if i < FAST else pytest.mark.slow, id=f"trial{i:02d}") for i in range(TRIALS)]


@pytest.mark.parametrize("trial", TRIAL_PARAMS)
def test_sigint_at_a_random_time(trial, target, small, ray_local, tmp_path, figures):
    src, expected = small
    job, _, inproc = interrupt_job(target, tmp_path, src)
    rng = random.Random(f"sigint-{target.kind}-{trial}")
    anchor = "start" if trial % 2 == 0 else "first commit"  # odd trials: inside the short window of commits
    delay = round(rng.uniform(*DELAY_S) if anchor == "start" else rng.uniform(*AFTER_COMMIT_S), 2)
    print(f"{target.kind} trial {trial}: SIGINT {delay}s after the {anchor}")
    t0 = time.perf_counter()
    p = start_cli(job, target.out, env=target.env)
    if anchor == "first commit":
        wait_first_commit(target, p)
    time.sleep(delay)
    sent = p.poll() is None
    if sent:
        p.send_signal(signal.SIGINT)
    run = finish(p, t0, timeout=300)
    lines = signal_lines(run)
    assert "Traceback" not in run.stderr + run.stdout, run.stderr[-4000:]
    if run.rc == 130:
        assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT)"), (lines, run.stderr[-3000:])
    else:
        assert run.rc == 0 and not lines, f"rc {run.rc}, {lines}:\n{run.stderr[-3000:]}"
    committed, _ = check_between(target, tmp_path)
    after = rerun_and_count(target, inproc, expected)
    figures.setdefault("interrupts", []).append(
        {
            "storage": target.kind,
            "trial": trial,
            "signal": "SIGINT",
            "after": anchor,
            "delay_s": delay,
            "sent": sent,
            "rc": run.rc,
            "committed_by_run": committed_by(lines) if lines else (committed if run.rc == 0 else None),
            "visible_after_interrupt": committed,
            "redone_by_rerun": after["redone"],
            "lost": after["lost"],
            "duplicates": after["duplicates"],
            "verify_problems": after["verify_problems"],
            "interrupted_s": round(run.wall_s, 1),
            "rerun_s": after["rerun_s"],
        }
    )
    assert_complete(after, expected)
    if lines and committed_by(lines) is not None:
        assert committed_by(lines) == committed  # the line says what readers see


def wait_first_commit(target: Target, p: subprocess.Popen, timeout: float = 180) -> None:
    wait_for(lambda: bool(visible_shards(target.out, target.options)), timeout, p, "the first commit")


@pytest.mark.slow
def test_second_sigint_aborts_at_once(small, ray_local, tmp_path, figures):
    src, expected = small
    target = Target("local", str(tmp_path / "out"), {})
    job, _, inproc = interrupt_job(target, tmp_path, src)
    t0 = time.perf_counter()
    p = start_cli(job, target.out)
    wait_first_commit(target, p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    t1 = time.perf_counter()
    run = finish(p, t0)
    exit_after = time.perf_counter() - t1
    assert run.rc == 130, run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout, run.stderr[-4000:]
    aborted = [l for l in run.stderr.splitlines() if l.startswith("aborted: ")]
    assert len(aborted) == 1 and not signal_lines(run), run.stderr[-3000:]
    committed = len(reader_invariant(target.out, tmp_path / "hf"))
    after = rerun_and_count(target, inproc, expected)
    figures.setdefault("interrupts", []).append(
        {
            "storage": "local",
            "trial": "double",
            "signal": "SIGINT, SIGINT +0.5s",
            "delay_s": "first commit",
            "sent": True,
            "rc": run.rc,
            "committed_by_run": None,
            "visible_after_interrupt": committed,
            "redone_by_rerun": after["redone"],
            "lost": after["lost"],
            "duplicates": after["duplicates"],
            "verify_problems": after["verify_problems"],
            "interrupted_s": round(run.wall_s, 1),
            "rerun_s": after["rerun_s"],
            "exit_after_2nd_s": round(exit_after, 1),
        }
    )
    assert exit_after < 15, f"a second SIGINT should abort at once, took {exit_after:.1f}s"
    assert_complete(after, expected)


@pytest.mark.slow
def test_sigterm_stops_gracefully_with_143(small, ray_local, tmp_path, figures):
    src, expected = small
    target = Target("local", str(tmp_path / "out"), {})
    job, _, inproc = interrupt_job(target, tmp_path, src)
    t0 = time.perf_counter()
    p = start_cli(job, target.out)
    wait_first_commit(target, p)
    p.send_signal(signal.SIGTERM)
    run = finish(p, t0)
    lines = signal_lines(run)
    assert run.rc == 143, f"rc {run.rc}:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr + run.stdout
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGTERM)"), lines
    committed, _ = check_between(target, tmp_path)
    assert committed_by(lines) == committed >= 1
    after = rerun_and_count(target, inproc, expected)
    figures.setdefault("interrupts", []).append(
        {
            "storage": "local",
            "trial": "sigterm",
            "signal": "SIGTERM",
            "delay_s": "first commit",
            "sent": True,
            "rc": run.rc,
            "committed_by_run": committed_by(lines),
            "visible_after_interrupt": committed,
            "redone_by_rerun": after["redone"],
            "lost": after["lost"],
            "duplicates": after["duplicates"],
            "verify_problems": after["verify_problems"],
            "interrupted_s": round(run.wall_s, 1),
            "rerun_s": after["rerun_s"],
        }
    )
    assert_complete(after, expected)


@pytest.mark.slow
def test_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(small, ray_local, tmp_path, figures):
    src, expected = small
    target = Target("local", str(tmp_path / "out"), {})
    job, _, inproc = interrupt_job(target, tmp_path, src)
    t0 = time.perf_counter()
    first = start_cli(job, target.out)
    try:
        wait_for(lambda: bool(list(Path(target.out).glob("*/LOCK.json"))), 120, first, "the first run's lock")
        second = run_cli(job, target.out, timeout=120)
        alive = first.poll() is None
    finally:
        first.kill()  # kill -9 the driver (its Ray processes die with it): the lock stays behind
    crashed = finish(first, t0)
    kill_session(first)
    assert alive, "the first run ended before the second was refused: make the job longer"
    assert second.rc == 2, f"rc {second.rc}:\n{second.stderr[-3000:]}"
    errors = [l for l in second.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"host {socket.gethostname()}" in errors[0] and f"pid {first.pid}" in errors[0], errors
    assert crashed.rc == -9
    (lock,) = Path(target.out).glob("*/LOCK.json")
    committed = len(reader_invariant(target.out, tmp_path / "hf"))

    summary = run_job(validate_job(inproc))  # the next run takes the dead run's lock over
    took = [n for n in summary.notes if n.startswith("took over a stale lock")]
    assert len(took) == 1 and f"pid {first.pid}" in took[0], summary.notes
    ids = shard_ids(target.out)
    lost, dups = count_lost_dup(expected, ids)
    st = store_state(the_store(target.out))
    figures.setdefault("locks", []).extend(
        [
            {"case": "second run while one is live", "rc": second.rc, "result": errors[0][:160]},
            {
                "case": "lock of a kill -9'd run",
                "rc": 0,
                "result": f"{took[0][:120]}; {committed} committed before, {summary.finished} redone, "
                f"lost {len(lost)}, duplicates {dups}",
            },
        ]
    )
    assert not lost and dups == 0 and st["problems"] == [] and not st["lock"] and not lock.exists()


@pytest.mark.slow
def test_grace_expiring_during_a_slow_commit_loses_nothing(small, ray_local, tmp_path, figures):
    """The driver hangs in a commit after its moves (PIPELINE_FAULT=commit_moved:3:hang, as a commit of big shards
    to a slow object store would take long); a SIGINT then, with a 2 s grace period, ends the stream from inside
    that commit. What was moved must still count as committed."""
    src, expected = small
    target = Target("local", str(tmp_path / "out"), {})
    job, _, inproc = interrupt_job(target, tmp_path, src, ray={"interrupt_grace_s": 2})
    t0 = time.perf_counter()
    p = start_cli(job, target.out, fault="commit_moved:3:hang", fault_dir=tmp_path / "fault")
    wait_for(lambda: (tmp_path / "fault" / "fired").exists(), 180, p, "the hang in the first commit")
    p.send_signal(signal.SIGINT)
    run = finish(p, t0)
    lines = signal_lines(run)
    assert run.rc == 130 and len(lines) == 1, f"rc {run.rc} {lines}:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr + run.stdout
    assert "did not finish within 2s" in run.stdout
    committed, _ = check_between(target, tmp_path)
    after = rerun_and_count(target, inproc, expected)
    figures.setdefault("interrupts", []).append(
        {
            "storage": "local",
            "trial": "grace",
            "signal": "SIGINT during a hung commit, grace 2s",
            "delay_s": "commit 3",
            "sent": True,
            "rc": run.rc,
            "committed_by_run": committed_by(lines),
            "visible_after_interrupt": committed,
            "redone_by_rerun": after["redone"],
            "lost": after["lost"],
            "duplicates": after["duplicates"],
            "verify_problems": after["verify_problems"],
            "interrupted_s": round(run.wall_s, 1),
            "rerun_s": after["rerun_s"],
        }
    )
    assert_complete(after, expected)
