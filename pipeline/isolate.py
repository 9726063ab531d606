"""Run a call in a child process under a wall-clock limit and a memory cap, so a hanging, crashing or
memory-hungry decoder costs one sample instead of the worker. `timeout_s=0` runs in-process (no isolation, no
overhead).

The child is long-lived: an `Isolator` (one per worker) reuses it from call to call and replaces it only after
it hung (killed) or died. Forking a big, threaded Ray worker for every sample costs ~0.5 s on a 16-core machine
(measured: benchmarks/README.md); a reused child costs about a millisecond a call. `Isolator.run_many` sends a
batch of calls in one task: each call still gets its own wall-clock limit and memory cap, a call that hangs,
crashes or runs out of memory fails alone, and the calls after it run in a fresh child.
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
        fn, args, kwargs, out_path, env, memory_bytes, many = task
        for k in [k for k in os.environ if k.startswith(_ENV_PREFIX) and k not in env]:
            del os.environ[k]
        os.environ.update(env)  # the parent's current pipeline settings (fault injection among them)
        if not many:
            result = _run_one(fn, args, kwargs, memory_bytes)
            try:  # results go through a file (in /dev/shm when there is one): much faster than a pipe for big arrays
                with open(out_path, "wb") as f:
                    pickle.dump(result, f, protocol=5)
            except Exception as exc:  # result or exception not picklable
                with open(out_path, "wb") as f:
                    pickle.dump(("err", RuntimeError(f"{type(exc).__name__}: {exc}")), f)
            conn.send(True)
            continue
        with open(out_path, "wb") as f:  # a batch: one result after another in one file, each announced
            for i, one in enumerate(args):
                result = _run_one(fn, one, kwargs, memory_bytes)
                at = f.tell()
                try:
                    pickle.dump(result, f, protocol=5)
                except Exception as exc:  # result or exception not picklable: what was written goes
                    f.seek(at)
                    f.truncate()
                    pickle.dump(("err", RuntimeError(f"{type(exc).__name__}: {exc}")), f)
                f.flush()
                conn.send(i)
                if result[0] == "err" and isinstance(result[1], IsolateError):
                    break  # out of memory: the parent replaces this child (its heap may be fragmented)


def _run_one(fn, args, kwargs, memory_bytes: int) -> tuple[str, Any]:
    previous = _cap_memory(memory_bytes)
    try:
        return ("ok", fn(*args, **kwargs))
    except MemoryError:  # over the cap: allocations failed, the process is fine
        return ("err", IsolateError(f"out of memory (over the {memory_bytes / 2**20:.0f} MiB cap)"))
    except BaseException as exc:  # report every failure to the parent
        return ("err", exc)
    finally:
        _uncap_memory(previous)


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
                self.conn.send((fn, args, kwargs, out_path, env_now(), memory_bytes, False))
                if not self.conn.poll(timeout_s):
                    self.close()
                    raise IsolateError(f"{label} timed out after {timeout_s:g}s")
                self.conn.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError):  # the child died without answering
                raise self._died(label) from None
            with open(out_path, "rb") as f:
                status, value = pickle.load(f)
        finally:
            os.unlink(out_path)
        if status == "err":
            raise self._failed(value, label)
        return value

    def call_many(
        self, fn: Callable, calls: list[tuple], kwargs: dict, timeout_s: float, label: str, memory_bytes: int = 0
    ) -> list[tuple[str, Any] | None]:
        """fn(*args, **kwargs) for each args of `calls`, in order, in one task: ("ok", value) or ("err", exception)
        per call, each under `timeout_s` from the end of the one before. At a call that times out, crashes the
        child or runs out of memory, the child is gone (killed or closed): that call gets its IsolateError and
        the calls after it None (not run)."""
        out: list[tuple[str, Any] | None] = [None] * len(calls)
        fd, out_path = tempfile.mkstemp(prefix="isolate-", suffix=".pkl", dir=_SHM if os.path.isdir(_SHM) else None)
        os.close(fd)
        i = 0  # the call the child is on (a send to a child that just died fails the first: progress is made)
        try:
            with open(out_path, "rb") as f:
                try:
                    self.conn.send((fn, calls, kwargs, out_path, env_now(), memory_bytes, True))
                    for i in range(len(calls)):
                        if not self.conn.poll(timeout_s):
                            self.close()
                            out[i] = ("err", IsolateError(f"{label} timed out after {timeout_s:g}s"))
                            break
                        self.conn.recv()
                        status, value = pickle.load(f)
                        if status == "err" and isinstance(value, IsolateError):
                            out[i] = ("err", self._failed(value, label))  # closes this child
                            break
                        out[i] = (status, value)
                except (EOFError, BrokenPipeError, ConnectionResetError):  # the child died on call i
                    out[i] = ("err", self._died(label))
        finally:
            os.unlink(out_path)
        return out

    def _died(self, label: str) -> IsolateError:
        """The child died without answering: reaped, and the reason."""
        self.proc.join(5)
        code = self.proc.exitcode
        self.close()
        if code is not None and code < 0:
            return IsolateError(f"{label} crashed (signal {-code}, {_signal_name(-code)})")
        return IsolateError(f"{label} process exited with code {code} without a result")

    def _failed(self, value: BaseException, label: str) -> BaseException:
        """The exception to raise for an ("err", value) result."""
        if isinstance(value, IsolateError):  # out of memory in the child: the message gets the label
            self.close()  # (a fresh child next time: the old one's heap may be fragmented)
            return IsolateError(f"{label}: {value}")
        return value


def env_now() -> dict:
    """The parent's current pipeline settings, sent with each task."""
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIX)}


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

    def run_many(
        self,
        fn: Callable,
        calls: list[tuple],
        *,
        timeout_s: float,
        label: str = "decode",
        memory_bytes: int = 0,
        **kwargs: Any,
    ) -> list[tuple[str, Any]]:
        """fn(*args, **kwargs) for each args of `calls`: ("ok", value) or ("err", exception) per call, in order.
        One round trip to the child for the batch, each call under its own `timeout_s` and `memory_bytes` (as
        `run`); a call that hangs, crashes or runs out of memory gets its IsolateError and the rest go on in a
        fresh child. `timeout_s` 0: in this process."""
        if not timeout_s or timeout_s <= 0:
            return [_run_here(fn, args, kwargs) for args in calls]
        out: list[tuple[str, Any] | None] = [None] * len(calls)
        at = 0
        while at < len(calls):
            if self.child is None or not self.child.alive():
                self.child = Isolated(self.method)
            got = self.child.call_many(fn, calls[at:], kwargs, timeout_s, label, memory_bytes)
            done = next((k for k, g in enumerate(got) if g is None), len(got))
            out[at : at + done] = got[:done]
            at += done
            if done < len(got) or not self.child.alive():
                self.child = None  # killed or closed: the rest in a fresh child
        return out

    def close(self) -> None:
        if self.child is not None:
            self.child.close()
            self.child = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _run_here(fn: Callable, args: tuple, kwargs: dict) -> tuple[str, Any]:
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:
        return ("err", exc)


def run_with_timeout(
    fn: Callable, *args: Any, timeout_s: float, label: str = "decode", method: str = "fork", **kwargs: Any
) -> Any:
    """One isolated call in a fresh child (stages keep an Isolator instead, to reuse theirs)."""
    with Isolator(method) as iso:
        return iso.run(fn, *args, timeout_s=timeout_s, label=label, **kwargs)
