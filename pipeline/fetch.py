"""Fetch: gets a sample's bytes onto local disk for the decode and mesh stages, several downloads at a time.

    with Fetcher(cfg, scratch_dir) as fetcher:
        for key, got in fetcher.fetch_all([(row_id, uri, modality), ...]):
            if isinstance(got, FetchError):
                ...                      # fail the row with str(got)
            else:
                decode(got.path)
                fetcher.release(got)     # deletes a scratch file, lets the cache evict an entry

By URI:
- local paths and file:// urls are checked in place (exists, size, magic bytes), never copied;
- http(s) goes through one pooled httpx.Client per Fetcher (keep-alive, redirects followed by hand so the scheme
  allow-list applies to every hop) and is streamed into a scratch file while hashing;
- s3://, gs://, hf:// are read through `pipeline.storage.open_uri` into a scratch file;
- http(s) pages that are not direct media files (YouTube, the sites yt-dlp supports) go to yt-dlp
  (`pipeline/ytdlp.py`; `downloader: http | ytdlp` forces either), with its own format, cookies, proxy, per-host
  rate limit and retries (`fetch.ytdlp`);
- `tar://<member>?offset=<o>&size=<n>::<tar uri>` (a WebDataset member) is a byte range of the tar, copied out.
With `cache: local` downloads land in a node-local cache folder and are used from there; with a shared cache URI
hits are copied into scratch and misses uploaded (pipeline/fetch_cache.py).

Every attempt has connect and read timeouts and a wall-clock deadline (checked between reads, so a slow-drip
body cannot stall forever). Retries with exponential backoff + jitter on 5xx, 408, 429, connection errors,
timeouts and truncated bodies; none on other 4xx, size or content errors. A failed attempt leaves no file.
"""

from __future__ import annotations

import hashlib
import http.cookiejar
import itertools
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Literal

import httpx
from pydantic import Field, field_validator

from pipeline.config import Config
from pipeline.fetch_cache import LocalCache, SharedCache
from pipeline.magic import CANONICAL_EXT, EXTENSIONS, HEAD_BYTES, check_modality, read_head, sniff_bytes
from pipeline.storage import StorageError, StorageOptions, check_uri, open_uri, scheme_of
from pipeline.ytdlp import Downloader, YtdlpConfig, YtdlpDownloader, YtdlpError, route

log = logging.getLogger(__name__)

Scheme = Literal["http", "https", "file", "s3", "gs", "hf", "tar"]
HTTP = ("http", "https")
OBJECT_STORES = ("s3", "gs", "hf")
REDIRECTS = (301, 302, 303, 307, 308)


class FetchConfig(Config):
    IDENTITY: ClassVar[tuple[str, ...]] = ()  # fetch settings never change the tokens

    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)  # longest silence on the socket
    deadline_s: float = Field(600.0, gt=0)  # wall-clock cap on one attempt
    retries: int = Field(3, ge=0)  # extra attempts after the first
    backoff_s: float = Field(1.0, ge=0)  # first backoff; doubles each retry
    backoff_max_s: float = Field(30.0, ge=0)
    jitter: float = Field(0.5, ge=0)  # backoff *= 1 + U(0, jitter)
    max_bytes: int = Field(2 << 30, gt=0)
    schemes: tuple[Scheme, ...] = ("http", "https", "file", "s3", "gs", "hf", "tar")  # allowed URI schemes
    max_redirects: int = Field(5, ge=0)
    check_magic: bool = True
    user_agent: str = Field("atoken-cache/0.2", min_length=1)
    chunk_bytes: int = Field(1 << 20, gt=0)  # read size for object stores and cache copies
    concurrency: int = Field(8, ge=1)  # downloads in flight per Fetcher
    cache: str = "none"  # none | local | a shared folder URI (s3://, gs://, /nfs/...)
    cache_dir: str | None = None  # for cache: local; default <tmp>/atoken-fetch-cache
    cache_max_bytes: int = Field(50 << 30, gt=0)  # LRU eviction above this
    downloader: Downloader = "auto"  # http(s): auto (media files -> http, pages -> ytdlp) | http | ytdlp
    ytdlp: YtdlpConfig = YtdlpConfig()

    @field_validator("cache")
    @classmethod
    def _cache_location(cls, v: str) -> str:
        if v not in ("none", "local"):
            check_uri(v, writable=True)  # a StorageError (ValueError) names what is allowed
        return v


class FetchError(Exception):
    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


@dataclass
class Fetched:
    path: str  # a local file to read
    temporary: bool  # a scratch file: deleted by release() / close()
    bytes: int
    from_cache: bool  # served from the cache without downloading


class Fetcher:
    """Fetches URIs to local files. Thread-safe: `fetch` may be called from several threads at once."""

    def __init__(
        self,
        cfg: FetchConfig,
        scratch_dir: str,
        storage_options: StorageOptions | dict | None = None,
        rng: random.Random | None = None,
    ):
        self.cfg = cfg
        self.storage_options = (
            storage_options
            if isinstance(storage_options, StorageOptions)
            else StorageOptions.model_validate(storage_options or {})
        )
        self.rng = rng or random.Random()
        self._closed = threading.Event()
        self.cache: LocalCache | SharedCache | None = None
        if cfg.cache == "local":
            root = cfg.cache_dir or os.path.join(tempfile.gettempdir(), "atoken-fetch-cache")
            self.cache = LocalCache(root, cfg.cache_max_bytes, cfg.chunk_bytes)
        elif cfg.cache != "none":
            self.cache = SharedCache(cfg.cache, cfg.cache_max_bytes, self.storage_options, cfg.chunk_bytes)
        os.makedirs(scratch_dir, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="fetch-", dir=scratch_dir))  # this fetcher's files only
        self._ytdlp: YtdlpDownloader | None = None
        self._ytdlp_lock = threading.Lock()
        self.client = httpx.Client(
            headers={"User-Agent": cfg.user_agent, "Accept-Encoding": "identity"},
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
            follow_redirects=False,
            cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),  # stateless
        )

    # ---- public ----------------------------------------------------------------------------------------------

    def fetch(self, uri: str, modality: str) -> Fetched:
        """A local file with the bytes of `uri`. Raises FetchError with a readable reason."""
        try:
            return self._fetch(uri, modality)
        except FetchError:
            raise
        except Exception as exc:  # a bug or an odd input must fail one sample, not the task
            raise FetchError(f"{type(exc).__name__}: {exc}") from exc

    def fetch_all(self, items: Iterable[tuple[Any, str, str]]) -> Iterator[tuple[Any, Fetched | FetchError]]:
        """(key, Fetched or FetchError) for each (key, uri, modality), as each completes, cfg.concurrency at a
        time. If the caller stops early, downloads in flight are finished and their files released."""
        items = iter(items)
        pending: dict = {}
        pool = ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="fetch")
        try:
            while True:
                for key, uri, modality in itertools.islice(items, self.cfg.concurrency - len(pending)):
                    pending[pool.submit(self._fetch_or_error, uri, modality)] = key
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield pending.pop(fut), fut.result()
        finally:
            for fut in pending:
                if isinstance(got := fut.result(), Fetched):
                    self.release(got)
            pool.shutdown()

    def release(self, fetched: Fetched) -> None:
        """Done with a file: deletes it if temporary, else lets the cache evict it again. Call it once per
        Fetched (repeating it for a scratch file is harmless)."""
        path = Path(fetched.path)
        if fetched.temporary:
            if path.parent == self.scratch:  # never delete anything that is not ours
                path.unlink(missing_ok=True)
        elif self.cache is not None:
            self.cache.release(fetched.path)

    def close(self) -> None:
        """Closes the connections and removes this fetcher's scratch files (call after fetch_all is done)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.client.close()
        if self._ytdlp is not None:
            self._ytdlp.close()
        if self.cache is not None:
            self.cache.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- dispatch --------------------------------------------------------------------------------------------

    def _fetch_or_error(self, uri: str, modality: str) -> Fetched | FetchError:
        try:
            return self.fetch(uri, modality)
        except FetchError as exc:
            return exc

    def _fetch(self, uri: str, modality: str) -> Fetched:
        if self._closed.is_set():
            raise FetchError("fetcher is closed")
        if not uri:
            raise FetchError("empty uri")
        scheme = scheme_of(uri)
        if scheme not in self.cfg.schemes:
            raise FetchError(f"scheme {scheme!r} not allowed")
        if scheme == "file":
            return self._local(_local_path(uri), modality)
        if scheme not in HTTP + OBJECT_STORES + ("tar",):
            raise FetchError(f"scheme {scheme!r} not supported")
        hit = self._cache_hit(uri, modality)
        if hit is not None:
            return hit
        if scheme in HTTP and route(uri, self.cfg.downloader) == "ytdlp":
            return self._via_ytdlp(uri, modality)  # (yt-dlp retries by its own rules)
        for attempt in range(self.cfg.retries + 1):
            try:
                return self._attempt(uri, modality, scheme)
            except FetchError as exc:
                if not exc.retry or attempt == self.cfg.retries:
                    if exc.retry and self.cfg.retries:
                        raise FetchError(f"{exc} (after {attempt + 1} attempts)") from None
                    raise
            if self._closed.wait(self._backoff(attempt)):
                raise FetchError("fetcher is closed")
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        cfg = self.cfg
        return min(cfg.backoff_max_s, cfg.backoff_s * 2**attempt) * (1 + self.rng.uniform(0, cfg.jitter))

    def _check(self, head: bytes, modality: str, ext: str, path: str | Path | None = None) -> None:
        # with `path`, unrecognised bytes in a file named like a video container are probed with PyAV
        if self.cfg.check_magic and (reason := check_modality(head, modality, ext, path)):
            raise FetchError(reason)

    def _local(self, path: Path, modality: str) -> Fetched:
        if not path.is_file():
            raise FetchError(f"no such file: {path}")
        size = path.stat().st_size
        if size > self.cfg.max_bytes:
            raise FetchError(f"exceeds max_bytes ({size} > {self.cfg.max_bytes} bytes)")
        self._check(read_head(path), modality, path.suffix, path)
        return Fetched(str(path.resolve()), temporary=False, bytes=size, from_cache=False)

    # ---- cache -----------------------------------------------------------------------------------------------

    def _cache_hit(self, uri: str, modality: str) -> Fetched | None:
        if self.cache is None:
            return None
        try:
            if isinstance(self.cache, LocalCache):
                hit, temporary = self.cache.lookup(uri), False
            else:
                hit, temporary = self.cache.lookup(uri, self.scratch), True
        except Exception as exc:  # the cache is an optimisation: a broken one is a miss
            log.warning("fetch cache lookup failed for %s: %s: %s", uri, type(exc).__name__, exc)
            return None
        if hit is None:
            return None
        got = Fetched(hit[0], temporary=temporary, bytes=hit[1], from_cache=True)
        try:  # the entry may have been cached for another modality
            self._check(read_head(got.path), modality, Path(got.path).suffix, got.path)
        except BaseException:
            self.release(got)
            raise
        return got

    def _commit(self, uri: str, part: "_Part", ext: str) -> Fetched:
        sha = part.sha.hexdigest()
        if isinstance(self.cache, LocalCache):
            path = self.cache.insert(uri, part.path, sha, part.size, ext)
            return Fetched(path, temporary=False, bytes=part.size, from_cache=False)
        path = self.scratch / f"{uuid.uuid4().hex}{ext}"
        os.replace(part.path, path)
        got = Fetched(str(path), temporary=True, bytes=part.size, from_cache=False)
        if self.cache is not None:
            try:
                self.cache.insert(uri, path, sha, part.size, ext)
            except Exception as exc:  # the download itself is fine
                log.warning("fetch cache upload failed for %s: %s: %s", uri, type(exc).__name__, exc)
        return got

    # ---- one attempt -----------------------------------------------------------------------------------------

    def _attempt(self, uri: str, modality: str, scheme: str) -> Fetched:
        deadline = time.monotonic() + self.cfg.deadline_s
        folder = self.cache.tmp_dir if isinstance(self.cache, LocalCache) else self.scratch
        part = _Part(folder, self.cfg.max_bytes)
        try:
            if scheme == "tar":
                final = self._tar_member(uri, part, deadline)
            else:
                final = self._http(uri, part, deadline) if scheme in HTTP else self._object(uri, part, deadline)
            part.file.close()
            url_path = urllib.parse.unquote(urllib.parse.urlsplit(final).path)
            self._check(part.head, modality, Path(url_path).suffix)
            return self._commit(uri, part, _ext_for(url_path, part.head))
        finally:
            part.discard()

    def downloader(self) -> YtdlpDownloader:
        """This fetcher's yt-dlp downloader (made on first use; its files land next to the cache's or ours)."""
        with self._ytdlp_lock:
            if self._ytdlp is None:
                folder = self.cache.tmp_dir if isinstance(self.cache, LocalCache) else self.scratch
                self._ytdlp = YtdlpDownloader(self.cfg.ytdlp, str(folder), self.cfg.max_bytes)
            return self._ytdlp

    def _via_ytdlp(self, uri: str, modality: str) -> Fetched:
        try:
            path = Path(self.downloader().download(uri))
        except YtdlpError as exc:
            raise FetchError(str(exc)) from None
        try:
            size = path.stat().st_size
            if size > self.cfg.max_bytes:
                raise FetchError(f"exceeds max_bytes ({size} > {self.cfg.max_bytes} bytes)")
            head = read_head(path)
            self._check(head, modality, path.suffix, path)
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(self.cfg.chunk_bytes):
                    sha.update(chunk)
            done = _Done(path, sha, size)
            return self._commit(uri, done, _ext_for(path.name, head))
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)  # yt-dlp's folder for this video

    def _deadline_error(self, got: int | None = None) -> FetchError:
        return FetchError(
            f"deadline exceeded: {self.cfg.deadline_s:g}s for the whole download"
            + ("" if got is None else f" ({got} bytes received)"),
            retry=True,
        )

    def _http(self, url: str, part: "_Part", deadline: float) -> str:
        """Streams `url` into `part`; returns the url after redirects."""
        expected = None
        try:
            resp, url = self._open(url, deadline)
            try:
                if resp.status_code != 200:
                    _drain(resp, deadline)
                    transient = resp.status_code >= 500 or resp.status_code in (408, 429)
                    raise FetchError(f"http {resp.status_code} {resp.reason_phrase}".strip(), retry=transient)
                length = resp.headers.get("Content-Length", "")
                expected = int(length) if length.isdigit() else None
                if expected is not None and expected > self.cfg.max_bytes:
                    raise FetchError(f"exceeds max_bytes ({expected} > {self.cfg.max_bytes} bytes, Content-Length)")
                for chunk in resp.iter_raw():  # as the socket delivers: no decoding, no re-chunking
                    if time.monotonic() > deadline:
                        raise self._deadline_error(part.size)
                    part.write(chunk)
            finally:
                resp.close()
        except httpx.ConnectTimeout:
            raise FetchError(f"connect timeout after {self.cfg.connect_timeout_s:g}s", retry=True) from None
        except httpx.TimeoutException:
            if time.monotonic() >= deadline - 0.05:  # the read timeout was cut short by the deadline
                raise self._deadline_error() from None
            raise FetchError(f"timeout after {self.cfg.read_timeout_s:g}s without data", retry=True) from None
        except httpx.RemoteProtocolError as exc:
            if expected is not None:  # the server closed before sending Content-Length bytes
                raise FetchError(f"truncated body: got {part.size} of {expected} bytes", retry=True) from None
            raise FetchError(f"connection error: {_root_cause(exc)}", retry=True) from None
        except httpx.TransportError as exc:  # refused, reset, DNS, TLS
            raise FetchError(f"connection error: {_root_cause(exc)}", retry=True) from None
        if expected is not None and part.size != expected:
            raise FetchError(f"truncated body: got {part.size} of {expected} bytes", retry=True)
        return url

    def _open(self, url: str, deadline: float) -> tuple[httpx.Response, str]:
        """Follows redirects (capped, loops detected, the scheme allow-list applied to every hop)."""
        seen: list[str] = []
        for _ in range(self.cfg.max_redirects + 1):
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in HTTP or scheme not in self.cfg.schemes:
                raise FetchError(f"scheme {scheme!r} not allowed" + (" (redirect)" if seen else ""))
            if not parts.hostname:
                raise FetchError(f"no host in url {url!r}")
            seen.append(url)
            left = max(0.01, deadline - time.monotonic())
            timeout = httpx.Timeout(
                connect=min(self.cfg.connect_timeout_s, left),
                read=min(self.cfg.read_timeout_s, left),
                write=min(self.cfg.read_timeout_s, left),
                pool=left,
            )
            resp = self.client.send(self.client.build_request("GET", url, timeout=timeout), stream=True)
            if resp.status_code not in REDIRECTS:
                return resp, url
            location = resp.headers.get("Location")
            _drain(resp, deadline)
            if not location:
                raise FetchError(f"http {resp.status_code} without Location")
            url = urllib.parse.urljoin(url, location)
            if url in seen:
                raise FetchError(f"redirect loop ({len(seen)} hops back to {url})")
        raise FetchError(f"too many redirects (> {self.cfg.max_redirects})")

    def _object(self, uri: str, part: "_Part", deadline: float) -> str:
        """Streams an object-store URI into `part`."""
        try:
            with open_uri(uri, self.storage_options) as f:
                size = f.size()
                if size > self.cfg.max_bytes:
                    raise FetchError(f"exceeds max_bytes ({size} > {self.cfg.max_bytes} bytes, object size)")
                while chunk := f.read(self.cfg.chunk_bytes):
                    if time.monotonic() > deadline:
                        raise self._deadline_error(part.size)
                    part.write(chunk)
        except FileNotFoundError:
            raise FetchError(f"no such object: {uri}") from None
        except PermissionError as exc:
            raise FetchError(f"access denied: {exc}") from None
        except StorageError as exc:
            raise FetchError(str(exc)) from None
        except OSError as exc:  # network, throttling, 5xx: pyarrow says which in the message
            raise FetchError(f"storage error: {exc}", retry=True) from None
        if part.size != size:
            raise FetchError(f"truncated body: got {part.size} of {size} bytes", retry=True)
        return uri

    def _tar_member(self, uri: str, part: "_Part", deadline: float) -> str:
        """Copies one member of an uncompressed tar (a byte range) into `part`; returns the member's name."""
        member, offset, size, tar_uri = parse_tar_uri(uri)
        if scheme_of(tar_uri) not in self.cfg.schemes or scheme_of(tar_uri) == "tar":
            raise FetchError(f"scheme {scheme_of(tar_uri)!r} not allowed (tar member)")
        if size > self.cfg.max_bytes:
            raise FetchError(f"exceeds max_bytes ({size} > {self.cfg.max_bytes} bytes, tar member)")
        try:
            with open_uri(tar_uri, self.storage_options) as f:
                if offset + size > f.size():
                    raise FetchError(f"tar member {member} ends past the end of {tar_uri} (truncated tar?)")
                f.seek(offset)
                left = size
                while left and (chunk := f.read(min(self.cfg.chunk_bytes, left))):
                    if time.monotonic() > deadline:
                        raise self._deadline_error(part.size)
                    part.write(chunk)
                    left -= len(chunk)
        except FileNotFoundError:
            raise FetchError(f"no such tar: {tar_uri}") from None
        except StorageError as exc:
            raise FetchError(str(exc)) from None
        except OSError as exc:
            raise FetchError(f"storage error: {exc}", retry=True) from None
        if part.size != size:
            raise FetchError(f"truncated tar member {member}: got {part.size} of {size} bytes", retry=True)
        return member


def tar_uri(tar: str, member: str, offset: int, size: int) -> str:
    """The URI of one member of an uncompressed tar (fsspec's chained form, with the byte range)."""
    return f"tar://{urllib.parse.quote(member)}?offset={offset}&size={size}::{tar}"


def parse_tar_uri(uri: str) -> tuple[str, int, int, str]:
    head, sep, inner = uri.partition("::")
    parts = urllib.parse.urlsplit(head)
    query = urllib.parse.parse_qs(parts.query)
    try:
        offset, size = int(query["offset"][0]), int(query["size"][0])
    except (KeyError, ValueError, IndexError):
        raise FetchError(f"bad tar member uri {uri!r} (want tar://<member>?offset=<o>&size=<n>::<tar>)") from None
    if not sep or not inner or offset < 0 or size < 0:
        raise FetchError(f"bad tar member uri {uri!r} (want tar://<member>?offset=<o>&size=<n>::<tar>)")
    return urllib.parse.unquote(parts.netloc + parts.path), offset, size, inner


@dataclass
class _Done:
    """A finished download (yt-dlp's), in the shape `_commit` takes."""

    path: Path
    sha: Any
    size: int


class _Part:
    """A download in progress: written, hashed and size-checked chunk by chunk; `discard` removes what is left."""

    def __init__(self, folder: Path, max_bytes: int):
        fd, name = tempfile.mkstemp(dir=folder, suffix=".part")
        self.path, self.file, self.max_bytes = Path(name), os.fdopen(fd, "wb"), max_bytes
        self.sha, self.size, self.head = hashlib.sha256(), 0, b""

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise FetchError(f"exceeds max_bytes (> {self.max_bytes} bytes)")
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self.sha.update(chunk)
        self.file.write(chunk)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)  # gone already once committed


def _drain(resp: httpx.Response, deadline: float) -> None:
    """Reads a small unwanted body (a redirect, an error page) so the connection can be reused, then closes."""
    try:
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= 64 << 10:
            for _ in resp.iter_raw():
                if time.monotonic() > deadline:
                    break
    except httpx.HTTPError:
        pass
    finally:
        resp.close()


def _local_path(uri: str) -> Path:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() != "file":
        return Path(uri)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"file url with a remote host {parts.netloc!r}")
    return Path(urllib.request.url2pathname(parts.path))


def _root_cause(exc: BaseException) -> str:
    """'ConnectionRefusedError: [Errno 111] ...': httpx wraps the OS error twice."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return f"{type(exc).__name__}: {exc}"


def _ext_for(url_path: str, head: bytes) -> str:
    """The file name extension for fetched bytes: the url's when known, else from the magic bytes."""
    ext = Path(url_path).suffix.lower()
    if ext in EXTENSIONS:
        return ext
    fmt = sniff_bytes(head)
    return CANONICAL_EXT.get(fmt, "") if fmt else (ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else "")


__all__ = ["FetchConfig", "FetchError", "Fetched", "Fetcher", "tar_uri", "parse_tar_uri"]
