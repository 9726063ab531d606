"""Run a call in a child process under a wall-clock limit and a memory cap, so a hanging, crashing or
memory-hungry decoder costs one sample instead of the worker. `timeout_s=0` runs in-process (no isolation, no
overhead).

The child is long-lived: an `Isolator` (one per worker) reuses it from call to call and replaces it only after
it hung (killed) or died. Forking a big, threaded Ray worker for every sample costs ~0.5 s on a 16-core machine
(measured: benchmarks/README.md); a reused child costs about a millisecond a call.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
from typing import Any, Callable

_SHM = "/dev/shm"
_ENV_PREFIX = "PIPELINE_"
_PR_SET_PDEATHSIG = 1


class IsolateError(RuntimeError):
    """The isolated call timed out or its process died; the message says which."""


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this child when its parent dies (a kill -9 of a Ray worker included), so the
    child never outlives it holding copies of the parent's sockets, which would hide the parent's death."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed pipe still ends the loop below
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _serve(conn, parent_end, parent_pid: int) -> None:
    """Child loop: run each (fn, args, kwargs, out_path) task, write the result to out_path, answer on the pipe."""
    parent_end.close()  # the parent's end, inherited through fork: only the parent may hold it, so EOF is seen
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's (Ray's) handler: end quietly when reaped
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent went away
            return
        fn, args, kwargs, out_path, env, memory_bytes = task
        for k in [k for k in os.environ if k.startswith(_ENV_PREFIX) and k not in env]:
            del os.environ[k]
        os.environ.update(env)  # the parent's current pipeline settings (fault injection among them)
        previous = _cap_memory(memory_bytes)
        try:
            result = ("ok", fn(*args, **kwargs))
        except MemoryError:  # over the cap: allocations failed, the process is fine
            result = ("err", IsolateError(f"out of memory (over the {memory_bytes / 2**20:.0f} MiB cap)"))
        except BaseException as exc:  # report every failure to the parent
            result = ("err", exc)
        finally:
            _uncap_memory(previous)
        try:  # results go through a file (in /dev/shm when there is one): much faster than a pipe for big arrays
            with open(out_path, "wb") as f:
                pickle.dump(result, f, protocol=5)
        except Exception as exc:  # result or exception not picklable
            with open(out_path, "wb") as f:
                pickle.dump(("err", RuntimeError(f"{type(exc).__name__}: {exc}")), f)
        conn.send(True)


def _cap_memory(memory_bytes: int):
    """Linux: the address space this process may add from now on is `memory_bytes` (RLIMIT_AS above its current
    size, so what a forked worker already maps does not count); the previous soft limit, to restore."""
    if not memory_bytes:
        return None
    try:
        import resource

        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = size + memory_bytes if hard == resource.RLIM_INFINITY else min(hard, size + memory_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        return soft
    except (OSError, ValueError, ImportError):  # not Linux: the wall-clock limit still holds
        return None


def _uncap_memory(previous) -> None:
    if previous is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (previous, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "unknown"


class Isolated:
    """One child process that runs calls for its parent; `call` kills and forgets it on a timeout or crash."""

    def __init__(self, method: str = "fork"):
        ctx = mp.get_context(method)
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child, self.conn, os.getpid()), daemon=True)
        self.proc.start()
        child.close()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()

    def call(self, fn: Callable, args: tuple, kwargs: dict, timeout_s: float, label: str, memory_bytes: int = 0) -> Any:
        fd, out_path = tempfile.mkstemp(prefix="isolate-", suffix=".pkl", dir=_SHM if os.path.isdir(_SHM) else None)
        os.close(fd)
        try:
            try:
                env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIX)}
                self.conn.send((fn, args, kwargs, out_path, env, memory_bytes))
                if not self.conn.poll(timeout_s):
                    self.close()
                    raise IsolateError(f"{label} timed out after {timeout_s:g}s")
                self.conn.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError):  # the child died without answering
                self.proc.join(5)
                code = self.proc.exitcode
                self.close()
                if code is not None and code < 0:
                    raise IsolateError(f"{label} crashed (signal {-code}, {_signal_name(-code)})") from None
                raise IsolateError(f"{label} process exited with code {code} without a result") from None
            with open(out_path, "rb") as f:
                status, value = pickle.load(f)
        finally:
            os.unlink(out_path)
        if status == "err":
            if isinstance(value, IsolateError):  # out of memory in the child: the message gets the label
                self.close()  # (a fresh child next time: the old one's heap may be fragmented)
                raise IsolateError(f"{label}: {value}")
            raise value
        return value


class Isolator:
    """Owns one reusable child (started on first use, replaced after a timeout or crash). One per worker."""

    def __init__(self, method: str = "fork"):
        self.method = method
        self.child: Isolated | None = None

    def run(
        self, fn: Callable, *args: Any, timeout_s: float, label: str = "decode", memory_bytes: int = 0, **kwargs: Any
    ) -> Any:
        """fn(*args, **kwargs) in the child, killed after `timeout_s` seconds (0: in this process), with at most
        `memory_bytes` of address space added (0: no cap; Linux).

        Raises IsolateError("<label> timed out after Ns"), IsolateError("<label> crashed (signal N, NAME)") or
        IsolateError("<label>: out of memory (...)"); an exception raised by fn is re-raised here. fn and its
        arguments must be picklable."""
        if not timeout_s or timeout_s <= 0:
            return fn(*args, **kwargs)
        if self.child is None or not self.child.alive():
            self.child = Isolated(self.method)
        try:
            return self.child.call(fn, args, kwargs, timeout_s, label, memory_bytes)
        except IsolateError:
            self.child = None  # killed or dead: the next call starts a fresh child
            raise

    def close(self) -> None:
        if self.child is not None:
            self.child.close()
            self.child = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_with_timeout(
    fn: Callable, *args: Any, timeout_s: float, label: str = "decode", method: str = "fork", **kwargs: Any
) -> Any:
    """One isolated call in a fresh child (stages keep an Isolator instead, to reuse theirs)."""
    with Isolator(method) as iso:
        return iso.run(fn, *args, timeout_s=timeout_s, label=label, **kwargs)
