"""`memory://`: fsspec's in-process memory filesystem, for tests and as the template of a backend module.

Not for jobs on a cluster (each process has its own memory), so it is read-only as a job location.
"""

from __future__ import annotations

import pyarrow.fs as pafs

WRITABLE = False


def filesystem(uri: str, options) -> tuple[pafs.FileSystem, str]:
    import urllib.parse

    import fsspec

    parts = urllib.parse.urlsplit(uri)
    fs = fsspec.filesystem("memory", **options.fsspec)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), f"/{parts.netloc}{parts.path}".rstrip("/")
