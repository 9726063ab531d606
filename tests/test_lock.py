"""The run lock (pipeline/lock.py): one live run per store, on local disk and SeaweedFS; stale locks (a dead pid on
this host, or no heartbeat for `stale_s`) are taken over, by exactly one of several contenders."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import subprocess
import time

import pytest

from pipeline.lock import LOCK, LockedError, RunLock
from pipeline.storage import Storage
from tests.test_store import files, storage  # noqa: F401  (fixtures)

SETTLE = 0.05  # object stores: how long a written lock is left to settle before it is read back


def lock(storage: Storage, run: str, **kw) -> RunLock:
    kw.setdefault("settle_s", SETTLE)
    return RunLock(storage, run, **kw)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def plant(storage: Storage, **holder) -> dict:
    """A lock file as another run left it."""
    h = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "run": "old-run",
        "token": os.urandom(8).hex(),
        "heartbeat": time.time(),
        **holder,
    }
    storage.write_bytes(LOCK, json.dumps(h).encode())
    return h


def test_second_lock_is_refused_naming_the_holder(storage):
    a = lock(storage, "run-a").acquire()
    try:
        held = json.loads(storage.read_bytes(LOCK))
        assert (held["host"], held["pid"], held["run"]) == (socket.gethostname(), os.getpid(), "run-a")
        with pytest.raises(LockedError) as exc:
            lock(storage, "run-b").acquire()
        msg = str(exc.value)
        assert "run run-a" in msg and f"host {socket.gethostname()}" in msg and f"pid {os.getpid()}" in msg
        assert a.took_over is None
    finally:
        a.release()
    assert not storage.exists(LOCK)
    with lock(storage, "run-b") as b:  # free again; the context manager releases
        assert b.holder()["run"] == "run-b"
    assert not storage.exists(LOCK)
    if storage.local:
        assert files(storage) == []  # no temp or aside files left by a plain acquire/release


def test_lock_of_a_dead_pid_on_this_host_is_taken_over(storage):
    h = plant(storage, pid=dead_pid())  # a fresh heartbeat, but its process is gone
    with lock(storage, "run-new") as new:
        assert new.took_over == h
        assert new.holder()["run"] == "run-new" and new.holder()["token"] == new.me["token"]
    if storage.local:
        assert [p for p in files(storage) if p.startswith(f"{LOCK}.stale-")]  # the old lock, set aside


def test_lock_without_heartbeat_for_stale_s_is_taken_over(storage):
    plant(storage, host="elsewhere", pid=1, heartbeat=time.time() - 5)  # another host: pid says nothing
    with pytest.raises(LockedError, match="run old-run .*host elsewhere, pid 1"):
        lock(storage, "run-new", stale_s=60).acquire()
    h = plant(storage, host="elsewhere", pid=1, heartbeat=time.time() - 120)
    with lock(storage, "run-new", stale_s=60) as new:
        assert new.took_over == h
    h = plant(storage, heartbeat=time.time() - 120)  # this host, a live pid (ours), but silent for too long
    with lock(storage, "run-new", stale_s=60) as new:
        assert new.took_over == h


def test_heartbeat_refreshes_and_release_leaves_a_successors_lock(storage):
    a = lock(storage, "run-a", heartbeat_s=0.4).acquire()

    def next_beat(after: float) -> float:
        deadline = time.time() + 5
        while (hb := json.loads(storage.read_bytes(LOCK))["heartbeat"]) == after and time.time() < deadline:
            time.sleep(0.02)
        return hb

    first = json.loads(storage.read_bytes(LOCK))["heartbeat"]
    assert next_beat(first) > first  # refreshed
    # taken over right after a beat (a stale-lock takeover by another driver; between a beat's read of the lock
    # and its write there is a window this test stays out of)
    other = plant(storage, run="run-b")
    time.sleep(1.0)  # two more beats
    assert json.loads(storage.read_bytes(LOCK)) == other  # the old holder's heartbeat does not write over it
    a.release()
    assert json.loads(storage.read_bytes(LOCK)) == other  # nor does its release delete it


def test_takeover_after_another_contender_won_is_refused(tmp_path):
    """B read the stale lock, then A took it over; B's late claim must not move A's fresh lock aside."""
    storage = Storage(str(tmp_path / "store"))
    plant(storage, host="elsewhere", pid=1, heartbeat=time.time() - 1000)
    a, b = lock(storage, "A", stale_s=60), lock(storage, "B", stale_s=60)
    seen_by_b = b.holder()
    a.acquire()
    try:
        assert b._claim(seen_by_b) is False
        assert a.holder()["token"] == a.me["token"]
        with pytest.raises(LockedError, match="run A"):
            b.acquire()
    finally:
        a.release()


def test_filesystem_without_hard_links(tmp_path, monkeypatch):
    """FUSE mounts of object stores refuse hard links: the lock falls back to exclusive creates, same rules."""

    def no_links(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    storage = Storage(str(tmp_path / "store"))
    with lock(storage, "run-a") as a:
        with pytest.raises(LockedError, match="run run-a"):
            lock(storage, "run-b").acquire()
        assert a.holder()["run"] == "run-a"
    plant(storage, host="elsewhere", pid=1, heartbeat=time.time() - 1000)
    b, c = lock(storage, "B", stale_s=60), lock(storage, "C", stale_s=60)
    seen_by_c = c.holder()
    b.acquire()
    try:
        assert b.took_over["run"] == "old-run" and c._claim(seen_by_c) is False
        assert b.holder()["token"] == b.me["token"]
    finally:
        b.release()


def _contend(root: str, run: str, barrier, results, hold) -> None:
    try:
        lk = RunLock(Storage(root), run, stale_s=60, heartbeat_s=3600)
        barrier.wait(10)
        try:
            lk.acquire()
        except LockedError:
            results.put((run, False))
            return
        results.put((run, True))
        hold.wait(30)  # keep it while the others try
        lk.release()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((run, repr(exc)))


def test_processes_racing_for_a_stale_lock_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the children only touch local files
    root = str(tmp_path / "store")
    storage = Storage(root)
    n = 4
    for rnd in range(6):
        if storage.exists(LOCK):
            storage.delete(LOCK)
        plant(storage, host="elsewhere", pid=1, heartbeat=time.time() - 1000, run=f"dead-{rnd}")
        barrier, results, hold = ctx.Barrier(n), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_contend, args=(root, f"r{rnd}-{k}", barrier, results, hold)) for k in range(n)]
        for p in procs:
            p.start()
        try:
            got = [results.get(timeout=30) for _ in range(n)]
        finally:
            hold.set()
            for p in procs:
                p.join(30)
        assert all(isinstance(ok, bool) for _, ok in got), got
        winners = [run for run, ok in got if ok]
        assert len(winners) == 1, f"round {rnd}: {got}"
        assert not [p for p in files(storage) if ".new-" in p]


def test_s3_lock_contenders_settle_on_one(s3_server, s3_prefix):
    """Object stores have no exclusive create: the lock is written, left to settle and read back; of contenders
    that write within the settle time, the last writer holds it and the others are refused."""
    import threading

    storage = Storage(s3_server.uri(s3_prefix), s3_server.options())
    locks = [lock(storage, f"run-{k}", settle_s=0.5) for k in range(3)]
    results, go = {}, threading.Barrier(3)

    def contend(lk):
        go.wait()
        try:
            lk.acquire()
            results[lk.run_id] = True
        except LockedError:
            results[lk.run_id] = False

    threads = [threading.Thread(target=contend, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r, ok in results.items() if ok]
    assert len(results) == 3 and len(winners) == 1, results
    assert storage.read_bytes(LOCK) and json.loads(storage.read_bytes(LOCK))["run"] == winners[0]
    for lk in locks:
        lk.release()
    assert not storage.exists(LOCK)
