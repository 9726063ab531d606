"""One live run per store: a lock file naming its holder (host, pid, run), refreshed by a heartbeat.

Local disk: written whole and hard-linked into place (exclusive, like O_EXCL); a lock whose holder is gone (same
host: the pid is dead; any host: no heartbeat for `stale_s`) is taken over by hard-linking it aside under a name
derived from its content first, which only one contender can do, so two contenders cannot both win. Object stores
have no exclusive create: the lock is written, left to settle, and read back; the holder is whoever's lock is there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import threading
import time
import uuid

from pipeline.storage import Storage

LOCK = "LOCK.json"


class LockedError(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link(src: str, dst: str) -> None:
    """os.link (exclusive: FileExistsError if dst exists); where the filesystem has no hard links (FUSE mounts of
    object stores), an O_EXCL create of dst with src's bytes, which is as exclusive but not written in one step."""
    try:
        os.link(src, dst)
        return
    except (FileExistsError, FileNotFoundError):
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    with open(src, "rb") as f:
        data = f.read()
    fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class RunLock:
    def __init__(
        self, storage: Storage, run_id: str, stale_s: float = 120.0, heartbeat_s: float = 20.0, settle_s: float = 2.0
    ):
        self.storage, self.run_id = storage, run_id
        self.stale_s, self.heartbeat_s, self.settle_s = stale_s, heartbeat_s, settle_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "run": run_id, "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread = None
        self.took_over: dict | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def holder(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(LOCK))
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    def stale(self, h: dict) -> bool:
        if h.get("host") == self.me["host"] and isinstance(h.get("pid"), int) and not _alive(h["pid"]):
            return True
        return time.time() - float(h.get("heartbeat", 0)) > self.stale_s

    def acquire(self) -> "RunLock":
        for _ in range(5):
            h = self.holder()
            if h is not None and not self.stale(h):
                raise LockedError(
                    f"{self.storage.root} is in use by run {h.get('run')} (host {h.get('host')}, "
                    f"pid {h.get('pid')}, heartbeat {time.time() - float(h.get('heartbeat', 0)):.0f}s "
                    f"ago); wait for it to finish, or stop it"
                )
            if self._claim(h):
                self.took_over = h
                self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat")
                self._thread.start()
                return self
        raise LockedError(f"{self.storage.root}: could not take the lock (contended)")

    def _claim(self, stale: dict | None) -> bool:
        st = self.storage
        if st.local:
            path = st.path(LOCK)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if stale is not None:
                # Exactly one contender takes over a given stale lock: a hard link named after it can be created
                # once (a rename aside could move a newer holder's lock, taken over meanwhile, out of the way).
                tag = hashlib.sha256(json.dumps(stale, sort_keys=True).encode()).hexdigest()[:16]
                aside = f"{path}.stale-{tag}"
                try:
                    _link(path, aside)
                except (FileExistsError, FileNotFoundError):
                    return False
                try:
                    with open(aside, "rb") as f:
                        still = json.loads(f.read()) == stale
                except (OSError, ValueError):
                    still = False
                if not still:  # the link caught a lock that came after the stale one: leave it be
                    os.unlink(aside)
                    return False
                os.unlink(path)
            tmp = f"{path}.new-{self.me['token']}"  # written whole, then linked in: never an empty LOCK.json
            with open(tmp, "wb") as f:
                f.write(self._body())
            try:
                _link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        st.write_bytes(LOCK, self._body())
        time.sleep(self.settle_s)
        return (self.holder() or {}).get("token") == self.me["token"]

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if (self.holder() or {}).get("token") == self.me["token"]:
                self.storage.write_bytes(LOCK, self._body(), durable=False)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if (self.holder() or {}).get("token") == self.me["token"]:
            self.storage.delete(LOCK)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
