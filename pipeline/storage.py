"""Storage: one small interface over `pyarrow.fs` for everything the job reads and writes.

Locations stay URI strings from end to end (`/data/out`, `file:///data/out`, `s3://bucket/out`, `gs://bucket/out`,
and read-only `hf://datasets/org/name`, `https://host/file.csv`), so they survive pickling to workers and
mean the same on every node. A `Storage` is rooted at one URI; its methods take paths relative to that root.

- Local disk: atomic writes are a temp file + fsync + rename + fsync of the directory; `move` is a rename.
- Object stores: an object appears whole when its upload completes (no partial reads); there is no rename, so
  `move` is a server-side copy followed by a delete.
- `open_output` files appear under their name only when closed without error, on every backend: a `with` block
  that raises (or `discard()`) leaves no partial file behind.

Credentials and endpoints come from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL[_S3]`, `GOOGLE_APPLICATION_CREDENTIALS`, ...) or from a job's
`storage:` options, which win.

Other backends are one module each: `pipeline/storage_backends/<scheme>.py` with `WRITABLE: bool` and
`filesystem(uri, options) -> (pyarrow FileSystem, path)` (an fsspec implementation wraps in one line with
`pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(...))`; `storage.fsspec` carries its keyword arguments).
A scheme that nothing handles is refused with one line before any work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import re
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Iterator

import pyarrow.fs as pafs

from pipeline.config import Config

WRITABLE = ("file", "s3", "gs")  # built in; more in pipeline/storage_backends/
READ_ONLY = ("hf", "http", "https")
READ_ATTEMPTS = 5  # read_bytes on an object store: tries to get one whole version of an object being overwritten


class StorageError(ValueError):
    """A location that cannot be used (unknown scheme, read-only, bad bucket); the message says which."""


class StorageOptions(Config):
    """Overrides of the standard environment for object stores (all optional)."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 (S3-compatible servers, GCS emulators)
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    anonymous: bool = False
    hf_token: str | None = None
    fsspec: dict = {}  # keyword arguments for an fsspec-provided backend (az://, ...)


def scheme_of(uri: str) -> str:
    """'file' for local paths (a one-letter scheme is a Windows drive), else the URI scheme, lower case."""
    scheme = urllib.parse.urlsplit(str(uri)).scheme.lower()
    return "file" if len(scheme) <= 1 else ("gs" if scheme == "gcs" else scheme)


def check_uri(uri: str, writable: bool = False) -> str:
    """The scheme of `uri`, or a StorageError naming what is supported."""
    scheme = scheme_of(uri)
    allowed = WRITABLE if writable else WRITABLE + READ_ONLY
    extra = backend_module(scheme)
    if scheme in allowed or (extra is not None and (extra.WRITABLE or not writable)):
        return scheme
    kind = "output" if writable else "input"
    raise StorageError(
        f"unsupported {kind} location {uri!r}: scheme {scheme!r}; use a local path, file://, "
        f"s3:// or gs://" + ("" if writable else ", or read-only hf://, http(s)://")
    )


def backend_module(scheme: str):
    """`pipeline.storage_backends.<scheme>`, if that module exists (one module per extra backend)."""
    import importlib
    import importlib.util

    if not scheme.isidentifier() or scheme in WRITABLE + READ_ONLY:
        return None
    name = f"pipeline.storage_backends.{scheme}"
    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


def _env(*names: str) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URI."""
    opts = options or StorageOptions()
    scheme = check_uri(uri)
    parts = urllib.parse.urlsplit(str(uri))
    if scheme == "file":
        path = urllib.parse.unquote(parts.path) if parts.scheme.lower() == "file" else str(uri)
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    bucket_path = (parts.netloc + parts.path).rstrip("/")
    if scheme == "s3":
        if not parts.netloc:
            raise StorageError(f"{uri!r}: no bucket (want s3://bucket/prefix)")
        endpoint = opts.endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        kw = dict(
            region=opts.region or _env("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
            anonymous=opts.anonymous,
            allow_bucket_creation=False,
            allow_bucket_deletion=False,
        )
        if endpoint:
            ep = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
            kw.update(endpoint_override=ep.netloc, scheme=ep.scheme or "https")
        if opts.access_key:
            kw.update(access_key=opts.access_key, secret_key=opts.secret_key, session_token=opts.session_token)
        return pafs.S3FileSystem(**kw), bucket_path
    if scheme == "gs":
        kw = dict(anonymous=opts.anonymous)
        endpoint = opts.endpoint_url or _env("STORAGE_EMULATOR_HOST")
        if endpoint:
            ep = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
            kw.update(endpoint_override=ep.netloc, scheme=ep.scheme)
        return pafs.GcsFileSystem(**kw), bucket_path
    if scheme == "hf":
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem(token=opts.hf_token) if opts.hf_token else HfFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), bucket_path
    if scheme in ("http", "https"):
        import fsspec  # read-only through fsspec's HTTP filesystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme))), str(uri)
    return backend_module(scheme).filesystem(uri, opts)


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the Storage root, '/'-separated
    size: int
    mtime: float | None


def _etag_matches(etag, data: bytes) -> bool | None:
    """Whether `data` is the object an S3 ETag names, where the ETag says: a single-part PUT's ETag is the MD5 of
    its bytes, a one-part multipart upload's (pyarrow writes those) is MD5(MD5(bytes)) + "-1". None: the ETag says
    nothing checkable (several parts, or an opaque tag)."""
    if etag is None:
        return None
    tag = (etag.decode("ascii", "replace") if isinstance(etag, bytes) else str(etag)).strip().strip('"').lower()
    if re.fullmatch(r"[0-9a-f]{32}", tag):
        return hashlib.md5(data).hexdigest() == tag
    if re.fullmatch(r"[0-9a-f]{32}-1", tag):
        return hashlib.md5(hashlib.md5(data).digest()).hexdigest() == tag[:32]
    return None


class Storage:
    """Files under one root URI. Picklable (it pickles its URI and options, not connections)."""

    def __init__(self, root: str, options: StorageOptions | dict | None = None):
        self.root = str(root).rstrip("/") or "/"
        self.options = options if isinstance(options, StorageOptions) else StorageOptions(**(options or {}))
        self.scheme = check_uri(self.root)
        self.fs, self.base = filesystem(self.root, self.options)
        self.local = self.scheme == "file"

    def __reduce__(self):
        return (Storage, (self.root, self.options))

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # ---- naming ----------------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The path inside the filesystem (for pyarrow / Ray readers that take `filesystem=`)."""
        rel = str(rel).lstrip("/")
        if not rel:
            return self.base
        return os.path.join(self.base, *rel.split("/")) if self.local else posixpath.join(self.base, rel)

    def uri(self, rel: str = "") -> str:
        rel = str(rel).lstrip("/")
        return self.root if not rel else f"{self.root}/{rel}"

    def child(self, rel: str) -> "Storage":
        return Storage(self.uri(rel), self.options)

    def _writable(self) -> None:
        extra = backend_module(self.scheme)
        if self.scheme not in WRITABLE and not (extra is not None and extra.WRITABLE):
            raise StorageError(f"{self.root!r} is read-only ({self.scheme}://)")

    # ---- reading ---------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory

    def size(self, rel: str) -> int | None:
        info = self.fs.get_file_info(self.path(rel))
        return None if info.type == pafs.FileType.NotFound else info.size

    def read_bytes(self, rel: str) -> bytes:
        """The whole file, from one version of it even while it is being overwritten (see `_read_object`)."""
        if self.local:  # an open file keeps the version it opened across a rename over it
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        for attempt in range(READ_ATTEMPTS):
            data = self._read_object(self.path(rel), last=attempt == READ_ATTEMPTS - 1)
            if data is not None:
                return data
        raise OSError(errno.EAGAIN, f"kept changing while being read ({READ_ATTEMPTS} attempts)", self.uri(rel))

    def _read_object(self, path: str, last: bool) -> bytes | None:
        """One object's bytes, or None if it changed while being read. A pyarrow input *stream* reads in
        chunks of 256 KiB, each its own ranged GET, so an overwrite in between mixes two versions; a seekable
        file reads its (HEAD) size in one GET, and a second HEAD with the same ETag shows that GET was served
        by the same version. An error mid-read is retried if the object changed meanwhile."""
        with self.fs.open_input_file(path) as f:  # HEAD: size and ETag
            etag = f.metadata().get("ETag")
            try:
                data = f.read()
            except FileNotFoundError:
                raise
            except OSError:
                if last or etag is None or self._etag(path) == etag:
                    raise
                return None
        same = _etag_matches(etag, data)  # what was read, checked against the ETag itself where it can be
        if same is not None:
            return data if same else None
        if etag is None or self._etag(path) == etag:  # (an A -> B -> A overwrite passes this: same ETag)
            return data
        return None

    def _etag(self, path: str) -> bytes | str | None:
        try:
            with self.fs.open_input_file(path) as f:
                return f.metadata().get("ETag")
        except FileNotFoundError:
            return None

    def open_input(self, rel: str):
        """A seekable file (for pyarrow.parquet.ParquetFile and friends)."""
        return self.fs.open_input_file(self.path(rel))

    def list(self, rel: str = "", recursive: bool = False) -> list[Entry]:
        """Files (not directories) under `rel`, sorted by path; an absent directory lists as empty."""
        sel = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        base = self.path("")
        out = []
        try:
            infos = self.fs.get_file_info(sel)
        except NotADirectoryError:  # `rel` is a file: local disk says so, object stores list nothing
            return []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            p = (
                info.path[len(base) :].lstrip("/").replace(os.sep, "/")
                if self.local
                else info.path[len(base) :].lstrip("/")
            )
            mtime = info.mtime.timestamp() if info.mtime is not None else None
            out.append(Entry(p, info.size, mtime))
        return sorted(out, key=lambda e: e.path)

    def walk_files(self, rel: str = "") -> Iterator[Entry]:
        yield from self.list(rel, recursive=True)

    # ---- writing ---------------------------------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        self._writable()
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)
        # object stores have no directories

    def open_output(self, rel: str) -> "OutputFile":
        """A new file at `rel` (parents created). It appears, whole, only when closed; a `with` block that raises
        (or `discard()`) publishes nothing. Local: a temp file renamed on close. Object stores: the upload
        completes on close."""
        self._writable()
        return OutputFile(self, rel)

    def write_bytes(self, rel: str, data: bytes, durable: bool = True) -> None:
        """Atomic: readers see the old content or the new, never a part. Local writes are fsynced if durable."""
        self._writable()
        if not self.local:
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)
            return
        final = self.path(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if durable:
            fsync_dir(os.path.dirname(final))

    def sync(self, rel: str) -> None:
        """Makes a finished local file durable (fsync); a no-op on object stores, where a closed upload is."""
        if self.local:
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def move(self, src: str, dst: str) -> None:
        """Moves a file: an atomic rename on local disk, a server-side copy + delete on object stores.
        The destination appears whole either way."""
        self._writable()
        if self.local:
            os.makedirs(os.path.dirname(self.path(dst)), exist_ok=True)
            os.replace(self.path(src), self.path(dst))
            fsync_dir(os.path.dirname(self.path(dst)))
        elif self._same(src, dst):  # copy + delete onto itself would delete it
            return
        else:
            self._copy_object(src, dst)
            self.fs.delete_file(self.path(src))

    def copy(self, src: str, dst: str) -> None:
        self._writable()
        if self._same(src, dst):
            return
        if self.local:
            os.makedirs(os.path.dirname(self.path(dst)), exist_ok=True)
            self.fs.copy_file(self.path(src), self.path(dst))
        else:
            self._copy_object(src, dst)

    def _same(self, src: str, dst: str) -> bool:
        """True if src and dst name the same file (which must exist: FileNotFoundError otherwise)."""
        if self.path(src) != self.path(dst):
            return False
        if self.fs.get_file_info(self.path(src)).type != pafs.FileType.File:
            raise FileNotFoundError(errno.ENOENT, "no such file", self.uri(src))
        return True

    def _copy_object(self, src: str, dst: str) -> None:
        """Server-side copy; a missing source is a FileNotFoundError as on local disk (S3 says only OSError)."""
        try:
            self.fs.copy_file(self.path(src), self.path(dst))
        except FileNotFoundError:
            raise
        except OSError as exc:
            if self.fs.get_file_info(self.path(src)).type == pafs.FileType.NotFound:
                raise FileNotFoundError(errno.ENOENT, "no such file", self.uri(src)) from exc
            raise

    def delete(self, rel: str, missing_ok: bool = True) -> None:
        self._writable()
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def delete_dir(self, rel: str) -> None:
        """Deletes everything under `rel` (missing is fine)."""
        self._writable()
        path = self.path(rel)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        if not self.local and "/" not in path.strip("/"):  # a bucket's root: empty it, keep the bucket
            self.fs.delete_dir_contents(path, missing_dir_ok=True)
            return
        try:
            self.fs.delete_dir(path)
        except FileNotFoundError:  # gone meanwhile, or only an empty prefix that SeaweedFS still lists
            pass


class OutputFile:
    """A file being written by `Storage.open_output`: write/flush/tell, then `close()` publishes it whole under
    its name, or `discard()` drops it. As a context manager it closes on success and discards on an exception;
    one that is garbage-collected unclosed is discarded.

    Local disk: the bytes go to a hidden temp file next to the target (`.<name>.tmp-<hex>`), renamed on close.
    Object stores: the bytes go to the upload, which completes on close. pyarrow cannot abort an upload (its
    stream completes it even from its destructor), so `discard()` completes it and then deletes the object: no
    partial object is left, but an object that was at that name before is gone too, and a reader could see the
    partial one in between.
    """

    def __init__(self, storage: Storage, rel: str):
        self.closed = True
        self.storage, self.rel, self.path = storage, rel, storage.path(rel)
        self._tmp: str | None = None
        if storage.local:
            folder = os.path.dirname(self.path)
            os.makedirs(folder, exist_ok=True)
            self._tmp = os.path.join(folder, f".{os.path.basename(self.path)}.tmp-{uuid.uuid4().hex[:12]}")
            self._f = open(self._tmp, "wb")
        else:
            self._f = storage.fs.open_output_stream(self.path)
        self.closed = False

    def __repr__(self) -> str:
        return f"OutputFile({self.storage.uri(self.rel)!r}{', closed' if self.closed else ''})"

    def write(self, data) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        """Publishes the file (a no-op if already closed or discarded)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._f.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.path)
        except BaseException:
            if self._tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)
            raise

    def discard(self) -> None:
        """Drops what was written: nothing appears under the name (see the class notes for object stores)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._f.close()
        with contextlib.suppress(Exception):
            if self._tmp is not None:
                os.unlink(self._tmp)
            else:
                self.storage.fs.delete_file(self.path)

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def __del__(self):
        if not getattr(self, "closed", True):
            self.discard()


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_uri(uri: str, options: StorageOptions | None = None):
    """A readable, seekable file for any supported URI or local path."""
    fs, path = filesystem(uri, options)
    return fs.open_input_file(path)


def split_uri(uri: str) -> tuple[str, str]:
    """(parent URI, file name)."""
    uri = str(uri).rstrip("/")
    head, _, name = uri.rpartition("/")
    return head, name
