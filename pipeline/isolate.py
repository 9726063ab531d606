"""Run a call in a forked child process under a wall-clock limit, so a hanging or crashing decoder costs one
sample instead of the worker. `timeout_s=0` runs in-process (no isolation, no overhead)."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import signal
from typing import Any, Callable


_SHM = "/dev/shm"


class IsolateError(RuntimeError):
    """The isolated call timed out or its process died; the message says which."""


def _child(conn, out_path, fn, args, kwargs) -> None:
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # report every failure to the parent
        result = ("err", exc)
    try:  # results go through a file (in /dev/shm when there is one): much faster than a pipe for big arrays
        with open(out_path, "wb") as f:
            pickle.dump(result, f, protocol=5)
    except Exception as exc:  # result or exception not picklable
        with open(out_path, "wb") as f:
            pickle.dump(("err", RuntimeError(f"{type(exc).__name__}: {exc}")), f)
    conn.send(True)
    conn.close()


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "unknown"


def run_with_timeout(fn: Callable, *args: Any, timeout_s: float, label: str = "decode",
                     method: str = "fork", **kwargs: Any) -> Any:
    """Return fn(*args, **kwargs), computed in a child process killed after `timeout_s` seconds.

    Raises IsolateError("<label> timed out after Ns") or IsolateError("<label> crashed (signal N, NAME)");
    an exception raised by fn is re-raised here. `method` is a multiprocessing start method ('fork' is fastest;
    'forkserver' is safer in heavily threaded parents, but then fn and its args must be picklable)."""
    if not timeout_s or timeout_s <= 0:
        return fn(*args, **kwargs)
    ctx = mp.get_context(method)
    parent, child = ctx.Pipe(duplex=False)
    fd, out_path = tempfile.mkstemp(prefix="isolate-", suffix=".pkl", dir=_SHM if os.path.isdir(_SHM) else None)
    os.close(fd)
    proc = ctx.Process(target=_child, args=(child, out_path, fn, args, kwargs), daemon=True)
    try:
        proc.start()
        child.close()  # so that the child's death shows as EOF here
        if not parent.poll(timeout_s):
            raise IsolateError(f"{label} timed out after {timeout_s:g}s")
        try:
            parent.recv()
        except EOFError:  # the child died without answering
            proc.join(5)
            code = proc.exitcode
            if code is not None and code < 0:
                raise IsolateError(f"{label} crashed (signal {-code}, {_signal_name(-code)})") from None
            raise IsolateError(f"{label} process exited with code {code} without a result") from None
        with open(out_path, "rb") as f:
            status, value = pickle.load(f)
    finally:
        parent.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
        os.unlink(out_path)
    if status == "err":
        raise value
    return value
