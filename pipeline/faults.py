"""Fault injection for the reliability suite: kill -9 a process at a named point of the pipeline.

Inactive unless PIPELINE_FAULT is set, as `<point>:<nth>:<victim>` with victim `self` (the process reaching the
point, e.g. a Ray worker) or `driver` (the job driver, whose pid is in PIPELINE_DRIVER_PID). The nth arrival at
the point, counted across processes through files in PIPELINE_FAULT_DIR, fires once.
"""
from __future__ import annotations

import os
import signal

POINTS = ("fetch", "decode", "mesh", "tokenize", "shard_tmp_written", "shard_renamed", "manifest_appended",
          "status_written")


def maybe_fault(point: str) -> None:
    spec = os.environ.get("PIPELINE_FAULT")
    if not spec:
        return
    want, nth, victim = spec.split(":")
    if want != point:
        return
    root = os.environ["PIPELINE_FAULT_DIR"]
    if os.path.exists(os.path.join(root, "fired")):
        return
    for k in range(1, int(nth) + 1):  # claim the next free arrival number atomically
        try:
            os.close(os.open(os.path.join(root, f"{point}-{k}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        if k < int(nth):
            return
        open(os.path.join(root, "fired"), "w").close()
        pid = int(os.environ["PIPELINE_DRIVER_PID"]) if victim == "driver" else os.getpid()
        os.kill(pid, signal.SIGKILL)
        return
