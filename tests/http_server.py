"""A real HTTP server on 127.0.0.1 with per-path fault injection, for fetch and reliability tests.

    with FaultServer(root, {"/a.mp4": Fault("status", code=500, times=2)}) as srv:
        srv.url("a.mp4")        # -> http://127.0.0.1:<port>/a.mp4
        srv.hits["/a.mp4"]      # requests seen for that path
        srv.ranges              # (path, start) of each `Range: bytes=N-` request (answered 206)

Fault kinds (each applies to the first `times` requests of its path, then the file is served normally;
times=None: always):
    status        answer `code` with a short body (404, 500, 503, ...)
    stall         sleep `seconds` before sending anything (read timeout on the client)
    drip          send headers, then the body `chunk` bytes at a time every `seconds` (slow drip)
    truncate      Content-Length of the whole file, send `fraction` of it, close
    reset         close the connection with a TCP RST before answering
    content_type  serve the real bytes with Content-Type `content_type` (a wrong one)
    html          200 with an HTML page instead of the file
    oversize      serve `size` bytes of zeros (Content-Length `size`), or only claim it with `claim_only`
    redirect      302 to `location` (use two paths redirecting to each other for a loop)
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Fault:
    kind: str
    times: int | None = None  # None: every request
    code: int = 500
    seconds: float = 1.0
    chunk: int = 1
    fraction: float = 0.5
    content_type: str = "text/html"
    size: int = 0
    claim_only: bool = False
    location: str = "/"


class FaultServer:
    def __init__(self, root: str | Path, faults: dict[str, Fault] | None = None):
        self.root = Path(root)
        self.faults = dict(faults or {})
        self.hits: collections.Counter = collections.Counter()  # GET per path ("HEAD <path>" for HEAD)
        self.ranges: list[tuple[str, int]] = []  # (path, first byte) of each range request
        self._lock = threading.Lock()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                with server._lock:
                    server.hits[path] += 1
                    n = server.hits[path]
                fault = server.faults.get(path)
                if fault is not None and (fault.times is None or n <= fault.times):
                    return server._fault(self, path, fault)
                server._serve_file(self, path)

            def do_HEAD(self):
                path = self.path.split("?")[0]
                with server._lock:
                    server.hits[f"HEAD {path}"] += 1
                data = server._file(path)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data) if data is not None else 0))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def total_hits(self) -> int:
        return sum(self.hits.values())

    def __enter__(self) -> "FaultServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # wakes stalled handlers
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    # ---- responses -----------------------------------------------------------------------------------------

    def _file(self, path: str) -> bytes | None:
        target = (self.root / path.lstrip("/")).resolve()
        if self.root.resolve() not in target.parents or not target.is_file():
            return None
        return target.read_bytes()

    def _send(
        self,
        h,
        code: int,
        body: bytes,
        ctype: str = "application/octet-stream",
        length: int | None = None,
        headers: dict | None = None,
    ) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _serve_file(self, h, path: str) -> None:
        data = self._file(path)
        if data is None:
            return self._send(h, 404, b"not found", "text/plain")
        rng = h.headers.get("Range", "")
        if rng.startswith("bytes=") and rng[6:].rstrip("-").isdigit():  # `bytes=N-`, as resumable clients send
            start = int(rng[6:].rstrip("-"))
            if start >= len(data):
                return self._send(h, 416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
            self.ranges.append((path, start))
            return self._send(
                h, 206, data[start:], headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            )
        self._send(h, 200, data)

    def _fault(self, h, path: str, f: Fault) -> None:
        k = f.kind
        if k == "status":
            return self._send(h, f.code, f"error {f.code}".encode(), "text/plain")
        if k == "redirect":
            return self._send(h, 302, b"", "text/plain", headers={"Location": f.location})
        if k == "html":
            return self._send(h, 200, b"<!doctype html><html><body>Please log in</body></html>", "text/html")
        if k == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        if k == "stall":
            self._stop.wait(f.seconds)
            return self._serve_file(h, path)
        if k == "oversize":
            if f.claim_only:  # claim a huge length and send a little
                return self._send(h, 200, b"\0" * 1024, length=f.size)
            return self._send(h, 200, b"\0" * f.size)
        data = self._file(path)
        if data is None:
            return self._send(h, 404, b"not found", "text/plain")
        if k == "content_type":
            return self._send(h, 200, data, f.content_type)
        if k == "truncate":
            h.close_connection = True
            return self._send(h, 200, data[: int(len(data) * f.fraction)], length=len(data))
        if k == "drip":
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.close_connection = True
            try:
                for i in range(0, len(data), f.chunk):
                    if self._stop.wait(f.seconds):
                        return
                    h.wfile.write(data[i : i + f.chunk])
                    h.wfile.flush()
            except OSError:  # the client gave up
                pass
            return
        raise ValueError(f"unknown fault {k!r}")


__all__ = ["Fault", "FaultServer"]
