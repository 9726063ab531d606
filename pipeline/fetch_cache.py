"""The fetcher's optional download cache: content-addressed, atomic commits, a size cap with LRU eviction.

Layout under the cache root (the same as the old fetch cache, so an existing one keeps working):
    <sha256[:2]>/<sha256><ext>   the bytes
    index/<sha256(url)>          JSON {url, sha256, path, bytes}: a url seen before, found without a request
    tmp/                         downloads and uploads in flight (same filesystem, so a commit is a rename)
    used/<sha256>                object-store caches only: an empty marker rewritten on each hit (objects
                                 cannot be touched), so eviction sees the last use

`LocalCache` (cache: local) is a node-local folder whose entries are used in place: a hit or insert holds a
shared flock on the file until released, and eviction (in any process) skips files someone holds.
`SharedCache` (cache: <uri>) is a folder shared between nodes (s3://, gs://, or a path on NFS): hits are copied
into the caller's scratch folder and verified against the index (size + sha256); misses are uploaded after the
download (one upload on object stores, temp + rename on a file system).

A hit whose file vanished, changed size or (shared) changed content is a miss. The index entry is written
after the bytes, so a reader never finds an entry for bytes that are not all there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path, PurePosixPath

from pipeline.storage import Storage, StorageOptions

INDEX, TMP, USED = "index", "tmp", "used"
LOW_WATER = 0.9  # an eviction frees space down to this fraction of the cap
RESCAN_S = 60.0  # re-list the cache at least this often (other processes insert too)
STALE_TMP_S = 86400.0  # leftovers of a crashed process in tmp/ are removed after a day
ENTRY = re.compile(r"[0-9a-f]{2}/([0-9a-f]{64})(\.[a-z0-9]{1,8})?")


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def entry_path(sha: str, ext: str) -> str:
    return f"{sha[:2]}/{sha}{ext}"


class _Cache:
    """Index and size accounting over a `Storage`; subclasses say how bytes go in and out."""

    def __init__(self, storage: Storage, max_bytes: int, chunk_bytes: int = 1 << 20):
        self.storage, self.max_bytes, self.chunk_bytes = storage, max_bytes, chunk_bytes
        self._lock = threading.Lock()  # one eviction at a time; guards the estimate
        self._estimate: int | None = None  # bytes cached: the last listing plus our inserts since
        self._listed_at = 0.0

    def entry(self, url: str) -> dict | None:
        """The index entry for `url`, or None (absent, unreadable or not one of ours)."""
        try:
            e = json.loads(self.storage.read_bytes(f"{INDEX}/{url_key(url)}"))
            m = ENTRY.fullmatch(e["path"])
            if e["url"] != url or not m or m.group(1) != e["sha256"] or not isinstance(e["bytes"], int):
                return None
            return e
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_entry(self, url: str, sha: str, rel: str, size: int) -> None:
        body = json.dumps({"url": url, "sha256": sha, "path": rel, "bytes": size}).encode()
        self.storage.write_bytes(f"{INDEX}/{url_key(url)}", body, durable=False)

    # ---- size cap ------------------------------------------------------------------------------------------

    def _inserted(self, size: int) -> None:
        """Accounts for a new entry; evicts least recently used entries when over the cap."""
        with self._lock:
            if self._estimate is not None and time.monotonic() - self._listed_at < RESCAN_S:
                self._estimate += size
                if self._estimate <= self.max_bytes:
                    return
            entries = self._list()
            total = sum(size for _, size, _ in entries)
            if total > self.max_bytes:
                for rel, size, _ in sorted(entries, key=lambda e: (e[2], e[0])):
                    if total <= LOW_WATER * self.max_bytes:
                        break
                    if self._remove(rel):
                        total -= size
            self._estimate, self._listed_at = total, time.monotonic()

    def _list(self) -> list[tuple[str, int, float]]:
        """(path, size, last use) of every entry; files that are not ours are ignored (and never removed)."""
        used, data = {}, []
        for e in self.storage.list(recursive=True):
            if e.path.startswith(f"{USED}/"):
                used[e.path[len(USED) + 1 :]] = e.mtime or 0.0
            elif ENTRY.fullmatch(e.path):
                data.append(e)
        return [(e.path, e.size, max(e.mtime or 0.0, used.get(_sha_of(e.path), 0.0))) for e in data]

    def _remove(self, rel: str) -> bool:
        """Deletes one entry unless it is in use; True when its bytes no longer count."""
        raise NotImplementedError


def _sha_of(rel: str) -> str:
    return PurePosixPath(rel).name[:64]


# ---- node-local cache ----------------------------------------------------------------------------------------


def _lock_shared(path: Path) -> int | None:
    """An open fd holding a shared flock on the file now at `path`, or None when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an evictor is deleting this very file
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino  # not evicted or replaced meanwhile
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


class LocalCache(_Cache):
    """A node-local cache folder; entries are used in place until `release(path)`."""

    def __init__(self, root: str, max_bytes: int, chunk_bytes: int = 1 << 20):
        super().__init__(Storage(root), max_bytes, chunk_bytes)
        self.root = Path(self.storage.path())
        self.tmp_dir = self.root / TMP
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, list[int]] = {}  # path -> fds holding its shared lock
        self._held_lock = threading.Lock()
        for p in self.tmp_dir.iterdir():
            try:
                if time.time() - p.stat().st_mtime > STALE_TMP_S:
                    p.unlink()
            except OSError:
                pass

    def lookup(self, url: str) -> tuple[str, int] | None:
        """(path, bytes) of a hit, now held; None on a miss."""
        e = self.entry(url)
        if e is None:
            return None
        path = self.root / e["path"]
        fd = _lock_shared(path)
        if fd is None:
            return None
        if os.fstat(fd).st_size != e["bytes"]:
            os.close(fd)
            return None
        try:
            os.utime(path)  # LRU: a hit is a use
        except OSError:
            pass
        return self._hold(path, fd), e["bytes"]

    def insert(self, url: str, tmp: Path, sha: str, size: int, ext: str) -> str:
        """Moves a finished download (a file in `tmp_dir`) into the cache; returns its path, now held."""
        rel = entry_path(sha, ext)
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_shared(final)
        if fd is not None and os.fstat(fd).st_size == size:  # same bytes already there (content-addressed)
            tmp.unlink(missing_ok=True)
            try:
                os.utime(final)
            except OSError:
                pass
        else:
            if fd is not None:
                os.close(fd)
            fd = os.open(tmp, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)  # the lock moves with the file: nobody evicts it before we hold it
            os.replace(tmp, final)
        path = self._hold(final, fd)
        self._write_entry(url, sha, rel, size)
        self._inserted(size)
        return path

    def _hold(self, path: Path, fd: int) -> str:
        with self._held_lock:
            self._held.setdefault(str(path), []).append(fd)
        return str(path)

    def release(self, path: str) -> None:
        """Lets eviction have the entry again (once per lookup/insert that returned it)."""
        with self._held_lock:
            fds = self._held.get(path)
            fd = fds.pop() if fds else None
            if fds == []:
                del self._held[path]
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._held_lock:
            held, self._held = self._held, {}
        for fds in held.values():
            for fd in fds:
                os.close(fd)

    def _remove(self, rel: str) -> bool:
        path = self.root / rel
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True  # someone else evicted it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # in use, here or in another process
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
        return True


# ---- shared cache --------------------------------------------------------------------------------------------


class SharedCache(_Cache):
    """A cache folder shared between nodes (object store or network file system); hits are copied out."""

    def __init__(self, uri: str, max_bytes: int, options: StorageOptions | None = None, chunk_bytes: int = 1 << 20):
        super().__init__(Storage(uri, options), max_bytes, chunk_bytes)
        self._busy: Counter = Counter()  # sha256 -> copies out of the cache in progress (never evicted)
        self._busy_lock = threading.Lock()

    def lookup(self, url: str, into: Path) -> tuple[str, int] | None:
        """Copies a hit into the folder `into` (checking size and sha256): (path, bytes); None on a miss."""
        e = self.entry(url)
        if e is None:
            return None
        rel, sha = e["path"], e["sha256"]
        dest = into / f"{uuid.uuid4().hex}{PurePosixPath(rel).suffix}"
        self._use(sha, 1)
        ok = False
        try:
            digest, size = hashlib.sha256(), 0
            with self.storage.open_input(rel) as src, open(dest, "wb") as out:
                while chunk := src.read(self.chunk_bytes):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            ok = size == e["bytes"] and digest.hexdigest() == sha
            if not ok:  # the same path always holds the same bytes, so these are damaged: let a download repair
                self.storage.delete(rel)
        except FileNotFoundError:
            pass
        finally:
            self._use(sha, -1)
            if not ok:
                dest.unlink(missing_ok=True)
        if not ok:
            return None
        self._touch(rel, sha)
        return str(dest), size

    def insert(self, url: str, src: Path, sha: str, size: int, ext: str) -> None:
        """Uploads a finished download (left where it is), then its index entry."""
        rel = entry_path(sha, ext)
        if self.storage.size(rel) != size:  # else the same bytes are there already
            part = f"{TMP}/{uuid.uuid4().hex}.part" if self.storage.local else rel  # objects appear whole
            try:
                with open(src, "rb") as f, self.storage.open_output(part) as out:
                    shutil.copyfileobj(f, out, self.chunk_bytes)
                if part != rel:
                    self.storage.move(part, rel)
            finally:
                if part != rel:
                    self.storage.delete(part)
        self._write_entry(url, sha, rel, size)
        self._inserted(size)

    def _use(self, sha: str, n: int) -> None:
        with self._busy_lock:
            self._busy[sha] += n
            if self._busy[sha] <= 0:
                del self._busy[sha]

    def _touch(self, rel: str, sha: str) -> None:
        try:
            if self.storage.local:
                os.utime(self.storage.path(rel))
            else:
                self.storage.write_bytes(f"{USED}/{sha}", b"", durable=False)
        except OSError:
            pass  # recency is best effort

    def release(self, path: str) -> None:  # hits are copies: nothing held
        pass

    def close(self) -> None:
        pass

    def _remove(self, rel: str) -> bool:
        sha = _sha_of(rel)
        with self._busy_lock:
            if self._busy[sha]:
                return False
        self.storage.delete(rel)
        self.storage.delete(f"{USED}/{sha}")
        return True


__all__ = ["LocalCache", "SharedCache", "entry_path", "url_key"]
