"""Fault injection for the reliability suite: kill, hang or fail a process at a named point of the pipeline.

Inactive unless PIPELINE_FAULT is set, as `<point>:<nth>:<action>`. The nth arrival at the point, counted across
processes through files in PIPELINE_FAULT_DIR, fires once; `<nth>+` fires at the nth and every later arrival
(a sample that kills its worker each time it is tried). Actions:
    self     kill -9 the process reaching the point (e.g. a Ray worker, or the isolated decode child)
    driver   kill -9 the job driver (its pid is in PIPELINE_DRIVER_PID)
    hang     sleep forever (a decoder stuck in C code; only a wall-clock limit gets out of it)
    enospc   raise OSError(ENOSPC), as a full disk would
"""

from __future__ import annotations

import errno
import os
import signal
import time

POINTS = (
    "fetch",
    "decode",
    "decode_child",
    "mesh",
    "tokenize",
    "shard_write",
    "shard_staged",
    "record_received",
    "commit_written",
    "commit_moved",
)
ACTIONS = ("self", "driver", "hang", "enospc")


def parse(spec: str) -> tuple[str, int, str, bool]:
    """(point, nth, action, every: fires at every arrival from the nth on)."""
    try:
        point, nth, action = spec.split(":")
        every = nth.endswith("+")
        nth = int(nth.rstrip("+"))
    except ValueError:
        raise ValueError(f"PIPELINE_FAULT={spec!r}: expected <point>:<nth>[+]:<action>") from None
    if point not in POINTS or action not in ACTIONS or nth < 1:
        raise ValueError(f"PIPELINE_FAULT={spec!r}: point in {POINTS}, nth >= 1, action in {ACTIONS}")
    return point, nth, action, every


def _claim(root: str, point: str, nth: int, every: bool = False) -> bool:
    """True for the process that makes the nth arrival at `point` (each arrival takes a number atomically), and
    with `every` for each later one too."""
    if every:
        k = 1
        while True:
            try:
                os.close(os.open(os.path.join(root, f"{point}-{k}"), os.O_CREAT | os.O_EXCL))
                return k >= nth
            except FileExistsError:
                k += 1
    if os.path.exists(os.path.join(root, "fired")):
        return False
    for k in range(1, nth + 1):
        try:
            os.close(os.open(os.path.join(root, f"{point}-{k}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        if k < nth:
            return False
        with open(os.path.join(root, "fired"), "w") as f:
            f.write(f"{point}:{nth} pid {os.getpid()} at {time.time():.3f}\n")
        return True
    return False


def maybe_fault(point: str) -> None:
    spec = os.environ.get("PIPELINE_FAULT")
    if not spec:
        return
    want, nth, action, every = parse(spec)
    if want != point or not _claim(os.environ["PIPELINE_FAULT_DIR"], point, nth, every):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
    if action == "hang":
        while True:
            time.sleep(3600)
    pid = int(os.environ["PIPELINE_DRIVER_PID"]) if action == "driver" else os.getpid()
    os.kill(pid, signal.SIGKILL)
