"""A clean end for a local Ray cluster: when its driver dies (kill -9 included), what it started goes too.

Ray's raylet and GCS die with the driver, but its dashboard and runtime-env agents (children of the raylet) notice
only after 60-120 s. `start(pid)` spawns this module as a small process of its own session that snapshots the
driver's descendants every `PERIOD_S` (pid + start time, from /proc) and, once the driver is gone, SIGKILLs every
process of the last snapshot that is still the same process, and anything those started since. Linux only (no
/proc: `start` does nothing).

    python -m pipeline.reaper DRIVER_PID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

PERIOD_S = 0.5
_STARTED = "PIPELINE_REAPER_FOR"  # the driver pid a reaper already watches (several local clusters in one process)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `pipeline` imports from


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a live, non-zombie process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else (int(fields[1]), int(fields[19]))


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time) of every live process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of every process below `roots` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in found and c not in roots:
                found[c] = table[c][1]
                todo.append(c)
    return found


def reap(snapshot: dict[int, int], rounds: int = 20) -> int:
    """SIGKILLs the snapshot's processes that are still the same (start time) and whatever they started since.
    Returns how many it killed."""
    killed, me = 0, os.getpid()
    for _ in range(rounds):
        table = processes()
        live = {p for p, t in snapshot.items() if p in table and table[p][1] == t}
        victims = (live | set(descendants(live, table))) - {me}
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        snapshot = {p: table[p][1] for p in victims if p in table}
        time.sleep(0.1)
    return killed


def watch(driver: int) -> None:
    me = os.getpid()
    start = (_stat(driver) or (0, 0))[1]
    snapshot: dict[int, int] = {}
    while (st := _stat(driver)) is not None and st[1] == start:
        snapshot = {p: t for p, t in descendants({driver}, processes()).items() if p != me}
        time.sleep(PERIOD_S)
    reap(snapshot)


def start(driver: int | None = None) -> subprocess.Popen | None:
    """Starts the reaper for `driver` (default: this process), once per driver. It exits on its own after the
    driver."""
    driver = driver or os.getpid()
    if not os.path.isdir("/proc") or os.environ.get(_STARTED) == str(driver):
        return None
    os.environ[_STARTED] = str(driver)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.reaper", str(driver)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])},
    )


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is for the driver
    watch(int(sys.argv[1]))
