"""Fetch stage: http(s), file:// and local paths into a content-addressed cache.

Cache layout (`cfg.cache_dir`):
    <sha256[:2]>/<sha256><ext>      the bytes, written tmp + os.replace (a crash never leaves a partial file)
    index/<sha256(url)>            small JSON {url, sha256, path, bytes}: a rerun finds it and makes no request
    tmp/                           in-flight downloads

HTTP goes through `http.client` (the layer under urllib) so that connect and read timeouts, a total deadline per
attempt (a slow-drip body cannot stall forever), the Content-Length check and redirects are all explicit.
Retries with exponential backoff + jitter on 5xx, 408, 429, connection errors, timeouts and truncated bodies;
no retry on other 4xx, size or content errors.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import socket
import ssl
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.magic import CANONICAL_EXT, EXTENSIONS, HEAD_BYTES, check_modality, sniff_bytes
from pipeline.rows import fail, is_ok

STAGE = "fetch"


@dataclass
class FetchConfig:
    cache_dir: str
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0        # longest silence on the socket
    deadline_s: float = 600.0           # wall-clock limit for one download attempt
    retries: int = 3                    # extra attempts after the first
    backoff_s: float = 1.0              # first backoff; doubles each retry
    backoff_max_s: float = 30.0
    jitter: float = 0.5                 # backoff *= 1 + U(0, jitter)
    max_bytes: int = 2 << 30
    schemes: tuple[str, ...] = ("http", "https", "file")
    max_redirects: int = 5
    check_magic: bool = True
    copy_local: bool = False            # local/file:// inputs: copy into the cache (else use them in place)
    user_agent: str = "atoken-cache/0.1"
    chunk_bytes: int = 1 << 20


class FetchError(Exception):
    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.retry = retry


# ---- cache ---------------------------------------------------------------------------------------------------

def _index_path(cfg: FetchConfig, url: str) -> Path:
    return Path(cfg.cache_dir) / "index" / hashlib.sha256(url.encode()).hexdigest()


def cached(cfg: FetchConfig, url: str) -> str | None:
    """Local path of a previously fetched url, or None (also when the cached file went missing or changed size)."""
    try:
        entry = json.loads(_index_path(cfg, url).read_text())
        path = Path(cfg.cache_dir) / entry["path"]
        return str(path) if path.stat().st_size == entry["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _commit(cfg: FetchConfig, url: str, tmp: Path, sha: str, size: int, ext: str) -> str:
    rel = f"{sha[:2]}/{sha}{ext}"
    final = Path(cfg.cache_dir) / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)  # same bytes under the same name: concurrent writers are harmless
    _atomic_write_text(_index_path(cfg, url), json.dumps({"url": url, "sha256": sha, "path": rel, "bytes": size}))
    return str(final)


def _ext_for(url_path: str, head: bytes) -> str:
    ext = Path(urllib.parse.unquote(url_path)).suffix.lower()
    if ext in EXTENSIONS:
        return ext
    fmt = sniff_bytes(head)
    return CANONICAL_EXT.get(fmt, "") if fmt else (ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else "")


# ---- HTTP ----------------------------------------------------------------------------------------------------

def _open(cfg: FetchConfig, url: str, deadline: float):
    """Follow redirects (capped, loops detected) and return (response, connection, socket, final url)."""
    seen = []
    for _ in range(cfg.max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.scheme not in cfg.schemes:
            raise FetchError(f"scheme {parts.scheme!r} not allowed" + (" (redirect)" if seen else ""))
        if not parts.hostname:
            raise FetchError(f"no host in url {url!r}")
        seen.append(url)
        timeout = min(cfg.connect_timeout_s, max(0.01, deadline - time.monotonic()))
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.connect()
        except socket.timeout:
            raise FetchError(f"connect timeout after {timeout:g}s", retry=True) from None
        sock = conn.sock
        sock.settimeout(min(cfg.read_timeout_s, max(0.01, deadline - time.monotonic())))
        path = parts.path or "/"
        conn.request("GET", path + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": cfg.user_agent, "Accept-Encoding": "identity"})
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.getheader("Location")
            conn.close()
            if not location:
                raise FetchError(f"http {resp.status} without Location")
            url = urllib.parse.urljoin(url, location)
            if url in seen:
                raise FetchError(f"redirect loop ({len(seen)} hops back to {url})")
            continue
        return resp, conn, sock, url
    raise FetchError(f"too many redirects (> {cfg.max_redirects})")


def _download(cfg: FetchConfig, url: str, modality: str) -> str:
    """One attempt: stream the body to cache_dir/tmp while hashing, check it, commit it."""
    start = time.monotonic()
    deadline = start + cfg.deadline_s
    tmp_dir = Path(cfg.cache_dir) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    conn = None
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            resp, conn, sock, final_url = _open(cfg, url, deadline)
            if resp.status != 200:
                transient = resp.status >= 500 or resp.status in (408, 429)
                raise FetchError(f"http {resp.status} {resp.reason}".strip(), retry=transient)
            length = resp.getheader("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            if expected is not None and expected > cfg.max_bytes:
                raise FetchError(f"exceeds max_bytes ({expected} > {cfg.max_bytes} bytes, Content-Length)")
            sha, got, head = hashlib.sha256(), 0, b""
            with os.fdopen(fd, "wb") as out:
                fd = None
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise FetchError(f"deadline exceeded: {cfg.deadline_s:g}s for the whole download "
                                         f"({got} bytes received)", retry=True)
                    sock.settimeout(min(cfg.read_timeout_s, left))
                    chunk = resp.read1(cfg.chunk_bytes)
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > cfg.max_bytes:
                        raise FetchError(f"exceeds max_bytes (> {cfg.max_bytes} bytes)")
                    if len(head) < HEAD_BYTES:
                        head += chunk[:HEAD_BYTES - len(head)]
                    sha.update(chunk)
                    out.write(chunk)
            if expected is not None and got != expected:
                raise FetchError(f"truncated body: got {got} of {expected} bytes", retry=True)
        except socket.timeout:
            if time.monotonic() >= deadline - 0.05:  # the socket timeout was cut short by the deadline
                raise FetchError(f"deadline exceeded: {cfg.deadline_s:g}s for the whole download", retry=True) \
                    from None
            raise FetchError(f"timeout after {cfg.read_timeout_s:g}s without data", retry=True) from None
        except http.client.IncompleteRead as exc:
            raise FetchError(f"truncated body: got {len(exc.partial)} bytes of a chunk", retry=True) from None
        except (http.client.HTTPException, OSError) as exc:  # resets, refused, DNS, TLS
            raise FetchError(f"connection error: {type(exc).__name__}: {exc}", retry=True) from None
        if cfg.check_magic:
            reason = check_modality(head, modality, Path(urllib.parse.urlsplit(final_url).path).suffix)
            if reason:
                raise FetchError(reason)
        return _commit(cfg, url, tmp, sha.hexdigest(), got, _ext_for(urllib.parse.urlsplit(final_url).path, head))
    finally:
        if fd is not None:
            os.close(fd)
        if conn is not None:
            conn.close()
        tmp.unlink(missing_ok=True)


def backoff(cfg: FetchConfig, attempt: int, rng: random.Random) -> float:
    return min(cfg.backoff_max_s, cfg.backoff_s * 2 ** attempt) * (1 + rng.uniform(0, cfg.jitter))


def fetch_url(cfg: FetchConfig, url: str, modality: str, rng: random.Random | None = None) -> str:
    """Local path for an http(s) url: from the cache, or downloaded with retries. Raises FetchError."""
    hit = cached(cfg, url)
    if hit:
        return hit
    rng = rng or random.Random()
    for attempt in range(cfg.retries + 1):
        try:
            return _download(cfg, url, modality)
        except FetchError as exc:
            if not exc.retry or attempt == cfg.retries:
                if exc.retry and cfg.retries:
                    raise FetchError(f"{exc} (after {attempt + 1} attempts)") from None
                raise
        time.sleep(backoff(cfg, attempt, rng))
    raise AssertionError("unreachable")


# ---- local files ---------------------------------------------------------------------------------------------

def fetch_local(cfg: FetchConfig, path: Path, modality: str) -> str:
    if not path.is_file():
        raise FetchError(f"no such file: {path}")
    size = path.stat().st_size
    if size > cfg.max_bytes:
        raise FetchError(f"exceeds max_bytes ({size} > {cfg.max_bytes} bytes)")
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    if cfg.check_magic:
        reason = check_modality(head, modality, path.suffix)
        if reason:
            raise FetchError(reason)
    if not cfg.copy_local:
        return str(path.resolve())
    key = path.resolve().as_uri()
    hit = cached(cfg, key)
    if hit:
        return hit
    sha = hashlib.sha256()
    tmp_dir = Path(cfg.cache_dir) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(cfg.chunk_bytes):
                sha.update(chunk)
                out.write(chunk)
        return _commit(cfg, key, Path(tmp), sha.hexdigest(), size, _ext_for(path.name, head))
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---- stage ---------------------------------------------------------------------------------------------------

def fetch(cfg: FetchConfig, uri: str, modality: str, rng: random.Random | None = None) -> str:
    """Local path for `uri` (http(s) url, file:// url or local path). Raises FetchError with a readable reason."""
    if not uri:
        raise FetchError("empty uri")
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if len(scheme) == 1 or not scheme:  # a local path (a one-letter "scheme" is a Windows drive)
        scheme, path = "file", Path(uri)
    elif scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"file url with a remote host {parts.netloc!r}")
        path = Path(urllib.request.url2pathname(parts.path))
    else:
        path = None
    if scheme not in cfg.schemes:
        raise FetchError(f"scheme {scheme!r} not allowed")
    if path is not None:
        return fetch_local(cfg, path, modality)
    if scheme not in ("http", "https"):
        raise FetchError(f"scheme {scheme!r} not supported")
    return fetch_url(cfg, uri, modality, rng)


def fetch_row(row: dict, cfg: FetchConfig) -> dict:
    """Adds `path`, or returns the row failed at stage "fetch" with the reason."""
    if not is_ok(row):
        return row
    try:
        path = fetch(cfg, row.get("uri") or "", row.get("modality", ""))
    except FetchError as exc:
        return fail(row, STAGE, str(exc))
    except Exception as exc:  # never crash the pipeline on one sample
        return fail(row, STAGE, f"{type(exc).__name__}: {exc}")
    return {**row, "path": path, "stage": STAGE}


__all__ = ["FetchConfig", "FetchError", "fetch", "fetch_row", "fetch_url", "cached"]
