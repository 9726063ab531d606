"""The fetcher against a real loopback HTTP server (tests/http_server.py) and the real files in /work/shared/data."""

import hashlib
import json
import multiprocessing
import os
import random
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.config import ConfigError, validate
from pipeline.fetch import FetchConfig, Fetched, FetchError, Fetcher
from tests.http_server import Fault, FaultServer

pytestmark = pytest.mark.timeout(60)

DATA = Path(os.environ.get("ATOKEN_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
VIDEOS = DATA / "videos"
CLIP = "bbb_480p_vp9_opus_1second.webm"  # 45 KB
CLIP_BYTES = (VIDEOS / CLIP).read_bytes()
CLIP_SHA = hashlib.sha256(CLIP_BYTES).hexdigest()


class Server(FaultServer):
    """FaultServer that also counts accepted connections, requests in flight at once, and request headers."""

    def __init__(self, root, faults=None):
        super().__init__(root, faults)
        self.connections, self.in_flight, self.max_in_flight, self.headers = 0, 0, 0, []
        count = threading.Lock()
        srv = self

        class Handler(self.httpd.RequestHandlerClass):
            timeout = 10  # safety net: an idle keep-alive connection cannot hold up server shutdown forever

            def setup(self):  # once per accepted connection
                with count:
                    srv.connections += 1
                super().setup()

            def do_GET(self):
                if self.path.startswith("/unsized/"):  # n bytes of an image, no Content-Length, then close
                    n = int(self.path.split("/")[2])
                    self.send_response(200)
                    self.end_headers()
                    self.close_connection = True
                    self.wfile.write(b"\x89PNG\r\n\x1a\n" + b"\0" * (n - 8))
                    return
                with count:
                    srv.in_flight += 1
                    srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                    srv.headers.append(dict(self.headers))
                try:
                    super().do_GET()
                finally:
                    with count:
                        srv.in_flight -= 1

        self.httpd.RequestHandlerClass = Handler


def cfg_for(tmp_path=None, **kw) -> FetchConfig:
    base = dict(
        connect_timeout_s=2.0, read_timeout_s=2.0, deadline_s=10.0, retries=2, backoff_s=0.01, backoff_max_s=0.05
    )
    if kw.get("cache") == "local" and tmp_path is not None:
        base["cache_dir"] = str(tmp_path / "cache")
    return FetchConfig(**{**base, **kw})


@contextmanager
def fetcher(tmp_path, **kw):
    with Fetcher(cfg_for(tmp_path, **kw), str(tmp_path / "scratch")) as f:
        yield f


def files(root) -> list[str]:
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_clean(tmp_path):
    """No scratch files and no half-written cache files anywhere under tmp_path."""
    assert files(tmp_path / "scratch") == []
    assert [p for p in files(tmp_path) if p.endswith(".part") or "/.tmp-" in p or "/tmp/" in f"/{p}"] == []


def fail(f: Fetcher, uri: str, modality: str = "video") -> str:
    with pytest.raises(FetchError) as exc:
        f.fetch(uri, modality)
    return str(exc.value)


# ---- config --------------------------------------------------------------------------------------------------


def test_config_defaults_and_validation():
    cfg = FetchConfig()
    assert (cfg.concurrency, cfg.cache, cfg.cache_dir, cfg.cache_max_bytes) == (8, "none", None, 50 << 30)
    assert cfg.schemes == ("http", "https", "file", "s3", "gs", "hf", "tar") and cfg.user_agent == "atoken-cache/0.2"
    assert FetchConfig.IDENTITY == () and cfg.identity() == {}
    assert FetchConfig(schemes=["http"], cache="s3://bucket/fetch-cache").schemes == ("http",)
    FetchConfig(cache="/shared/nfs/cache")
    for bad in (
        {"concurrency": 0},
        {"read_timeout_s": 0},
        {"retries": -1},
        {"max_bytes": 0},
        {"schemes": ["ftp"]},
        {"cache": "ftp://host/cache"},
        {"cache_dir_typo": "/x"},
        {"copy_local": True},
    ):
        with pytest.raises(ConfigError):
            validate(FetchConfig, bad)
    with pytest.raises(ValueError):  # validate_assignment
        cfg.concurrency = 0


# ---- http ----------------------------------------------------------------------------------------------------


def test_download_to_scratch_headers_and_release(tmp_path):
    with Server(VIDEOS) as srv, fetcher(tmp_path) as f:
        got = f.fetch(srv.url(CLIP), "video")
        assert got.temporary and not got.from_cache and got.bytes == len(CLIP_BYTES)
        assert Path(got.path).parent.parent == tmp_path / "scratch" and got.path.endswith(".webm")
        assert Path(got.path).read_bytes() == CLIP_BYTES
        assert srv.headers[0]["User-Agent"] == "atoken-cache/0.2"
        assert srv.headers[0]["Accept-Encoding"] == "identity"
        f.release(got)
        f.release(got)  # idempotent
        assert not Path(got.path).exists() and files(tmp_path / "scratch") == []
        again = f.fetch(srv.url(CLIP), "video")  # no cache: a second request
        assert again.path != got.path and srv.hits[f"/{CLIP}"] == 2
    assert files(tmp_path / "scratch") == []  # close() removed the unreleased one


def test_keep_alive_reuses_the_connection(tmp_path):
    # also across redirect hops and error answers (their small bodies are read so the connection stays usable)
    with (
        Server(
            VIDEOS,
            {
                "/r1": Fault("redirect", location="/r2"),
                "/r2": Fault("redirect", location=f"/{CLIP}"),
                "/chaplin.mp4": Fault("status", code=503, times=1),
            },
        ) as srv,
        fetcher(tmp_path) as f,
    ):
        for _ in range(3):
            f.release(f.fetch(srv.url(CLIP), "video"))
        fail(f, srv.url("missing.mp4"))
        f.release(f.fetch(srv.url("r1"), "video"))
        f.release(f.fetch(srv.url("chaplin.mp4"), "video"))  # 503, then retried
        assert srv.total_hits() == 9 and srv.connections == 1


def test_downloads_in_flight(tmp_path):
    # every request stalls 0.5 s at the server; 8 in flight at once take ~0.5 s, one at a time 4 s
    with Server(VIDEOS, {f"/{CLIP}": Fault("stall", seconds=0.5)}) as srv, fetcher(tmp_path, concurrency=8) as f:
        t = time.monotonic()
        out = dict(f.fetch_all([(i, srv.url(f"{CLIP}?n={i}"), "video") for i in range(8)]))
        elapsed = time.monotonic() - t
        assert sorted(out) == list(range(8)) and all(isinstance(g, Fetched) for g in out.values())
        assert elapsed < 3, elapsed
        assert srv.max_in_flight >= 4 and srv.connections >= 4
        assert len({g.path for g in out.values()}) == 8


def test_local_cache_layout_and_no_second_request(tmp_path):
    cache = tmp_path / "cache"
    with Server(VIDEOS) as srv:
        with fetcher(tmp_path, cache="local") as f:
            got = f.fetch(srv.url(CLIP), "video")
            assert got.path == str(cache / CLIP_SHA[:2] / f"{CLIP_SHA}.webm")
            assert not got.temporary and not got.from_cache and Path(got.path).read_bytes() == CLIP_BYTES
            index = cache / "index" / hashlib.sha256(srv.url(CLIP).encode()).hexdigest()
            assert json.loads(index.read_text())["sha256"] == CLIP_SHA
            f.release(got)
            f.release(got)
            assert Path(got.path).exists()  # release never deletes a cache entry
            hit = f.fetch(srv.url(CLIP), "video")
            assert hit.from_cache and hit.path == got.path and not hit.temporary
            assert srv.total_hits() == 1
        with fetcher(tmp_path, cache="local") as f:  # a rerun with a fresh fetcher over the same cache
            assert f.fetch(srv.url(CLIP), "video").from_cache and srv.total_hits() == 1
            os.unlink(got.path)  # a cached file that went missing is downloaded again
            again = f.fetch(srv.url(CLIP), "video")
            assert not again.from_cache and srv.total_hits() == 2
            Path(got.path).write_bytes(CLIP_BYTES[:-1])  # ... and so is one that changed size
            assert not f.fetch(srv.url(CLIP), "video").from_cache and srv.total_hits() == 3
            assert Path(got.path).read_bytes() == CLIP_BYTES
    assert_clean(tmp_path)


def test_local_cache_default_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with Server(VIDEOS) as srv, Fetcher(cfg_for(cache="local"), str(tmp_path / "scratch")) as f:
        got = f.fetch(srv.url(CLIP), "video")
        assert got.path.startswith(str(tmp_path / "atoken-fetch-cache") + os.sep)


def test_http_404_not_retried(tmp_path):
    with Server(VIDEOS) as srv, fetcher(tmp_path) as f:
        assert fail(f, srv.url("missing.mp4")).startswith("http 404 Not Found")
        assert srv.hits["/missing.mp4"] == 1
    assert_clean(tmp_path)


def test_http_500_retried_to_success(tmp_path):
    with Server(VIDEOS, {f"/{CLIP}": Fault("status", code=500, times=2)}) as srv, fetcher(tmp_path) as f:
        assert Path(f.fetch(srv.url(CLIP), "video").path).read_bytes() == CLIP_BYTES
        assert srv.hits[f"/{CLIP}"] == 3


def test_http_503_gives_up_after_retries_with_backoff(tmp_path):
    # backoff 0.1, 0.2, 0.4 s (no jitter): at least 0.7 s between the first and the last attempt
    with (
        Server(VIDEOS, {f"/{CLIP}": Fault("status", code=503)}) as srv,
        fetcher(tmp_path, cache="local", retries=3, backoff_s=0.1, backoff_max_s=1.0, jitter=0.0) as f,
    ):
        t = time.monotonic()
        reason = fail(f, srv.url(CLIP))
        assert 0.7 <= time.monotonic() - t < 5
        assert reason.startswith("http 503") and "after 4 attempts" in reason
        assert srv.hits[f"/{CLIP}"] == 4
    assert_clean(tmp_path)
    assert files(tmp_path / "cache") == []


def test_429_and_408_are_retried(tmp_path):
    with (
        Server(
            VIDEOS, {f"/{CLIP}": Fault("status", code=429, times=1), "/chaplin.mp4": Fault("status", code=408, times=1)}
        ) as srv,
        fetcher(tmp_path) as f,
    ):
        f.fetch(srv.url(CLIP), "video")
        f.fetch(srv.url("chaplin.mp4"), "video")
        assert srv.hits[f"/{CLIP}"] == 2 and srv.hits["/chaplin.mp4"] == 2


def test_stall_times_out_then_retries(tmp_path):
    with (
        Server(VIDEOS, {f"/{CLIP}": Fault("stall", seconds=5)}) as srv,
        fetcher(tmp_path, read_timeout_s=0.3, retries=1) as f,
    ):
        t = time.monotonic()
        reason = fail(f, srv.url(CLIP))
        assert time.monotonic() - t < 3
        assert reason.startswith("timeout after 0.3s")
        assert srv.hits[f"/{CLIP}"] == 2
    with (
        Server(VIDEOS, {f"/{CLIP}": Fault("stall", seconds=5, times=1)}) as srv,
        fetcher(tmp_path, read_timeout_s=0.3, retries=1) as f,
    ):
        f.fetch(srv.url(CLIP), "video")
        assert srv.hits[f"/{CLIP}"] == 2
    assert_clean(tmp_path)


def test_slow_drip_hits_the_deadline(tmp_path):
    # every chunk arrives well within the read timeout, but the whole body would take ~5 s
    with (
        Server(VIDEOS, {f"/{CLIP}": Fault("drip", chunk=1000, seconds=0.1)}) as srv,
        fetcher(tmp_path, read_timeout_s=1.0, deadline_s=0.6, retries=0) as f,
    ):
        t = time.monotonic()
        reason = fail(f, srv.url(CLIP))
        assert time.monotonic() - t < 2.5
    assert reason.startswith("deadline exceeded: 0.6s")
    assert_clean(tmp_path)


def test_truncated_body(tmp_path):
    with (
        Server(VIDEOS, {f"/{CLIP}": Fault("truncate", fraction=0.5)}) as srv,
        fetcher(tmp_path, cache="local", retries=1) as f,
    ):
        reason = fail(f, srv.url(CLIP))
        assert reason.startswith(f"truncated body: got {len(CLIP_BYTES) // 2} of {len(CLIP_BYTES)} bytes")
        assert srv.hits[f"/{CLIP}"] == 2
    assert files(tmp_path / "cache") == []
    assert_clean(tmp_path)
    with (
        Server(VIDEOS, {f"/{CLIP}": Fault("truncate", fraction=0.5, times=1)}) as srv,
        fetcher(tmp_path, cache="local", retries=1) as f,
    ):
        assert Path(f.fetch(srv.url(CLIP), "video").path).read_bytes() == CLIP_BYTES


def test_connection_reset(tmp_path):
    with Server(VIDEOS, {f"/{CLIP}": Fault("reset", times=1)}) as srv, fetcher(tmp_path, retries=2) as f:
        f.fetch(srv.url(CLIP), "video")
        assert srv.hits[f"/{CLIP}"] == 2
    with Server(VIDEOS, {f"/{CLIP}": Fault("reset")}) as srv, fetcher(tmp_path, retries=2) as f:
        assert fail(f, srv.url(CLIP)).startswith("connection error")
        assert srv.hits[f"/{CLIP}"] == 3


def test_connection_refused_is_recorded(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with fetcher(tmp_path, retries=1) as f:
        reason = fail(f, f"http://127.0.0.1:{port}/x.mp4")
    assert reason.startswith("connection error") and "ConnectionRefusedError" in reason
    assert "after 2 attempts" in reason


def test_wrong_content_type_is_judged_by_magic_bytes(tmp_path):
    with (
        Server(
            VIDEOS, {f"/{CLIP}": Fault("content_type", content_type="text/html"), "/chaplin.mp4": Fault("html")}
        ) as srv,
        fetcher(tmp_path, cache="local") as f,
    ):
        f.fetch(srv.url(CLIP), "video")
        assert fail(f, srv.url("chaplin.mp4")).startswith("content is not a video (magic bytes 3c21")
        assert srv.hits["/chaplin.mp4"] == 1  # not retried
        assert "content is not an image" in fail(f, srv.url("chaplin.mp4"), "image")
        # a cached entry asked for as another modality is checked again (and stays cached)
        assert fail(f, srv.url(CLIP), "image") == "content is not an image (looks like mkv)"
        assert srv.hits[f"/{CLIP}"] == 1
    index = tmp_path / "cache" / "index"
    assert sorted(p.name for p in index.iterdir()) == [hashlib.sha256(srv.url(CLIP).encode()).hexdigest()]
    assert_clean(tmp_path)


def test_max_bytes(tmp_path):
    with (
        Server(VIDEOS, {"/big.mp4": Fault("oversize", size=10**9, claim_only=True)}) as srv,
        fetcher(tmp_path, cache="local", max_bytes=10_000) as f,
    ):
        assert fail(f, srv.url("big.mp4")) == "exceeds max_bytes (1000000000 > 10000 bytes, Content-Length)"
        assert srv.hits["/big.mp4"] == 1
        assert fail(f, srv.url(CLIP)).startswith("exceeds max_bytes")  # 45 KB body, streamed
        assert srv.hits[f"/{CLIP}"] == 1
        assert fail(f, str(VIDEOS / CLIP)).startswith("exceeds max_bytes")  # local files too
    assert files(tmp_path / "cache") == []
    assert_clean(tmp_path)


def test_streamed_bytes_over_max_without_content_length(tmp_path):
    # without a Content-Length the limit applies to what arrives
    with Server(VIDEOS) as srv, fetcher(tmp_path, cache="local", max_bytes=40_000) as f:
        ok = f.fetch(srv.url("unsized/30000"), "image")
        assert ok.bytes == 30_000 and ok.path.endswith(".png")  # named by its magic bytes
        assert fail(f, srv.url("unsized/50000"), "image") == "exceeds max_bytes (> 40000 bytes)"
    assert_clean(tmp_path)


def test_redirects(tmp_path):
    with (
        Server(
            VIDEOS,
            {
                "/a": Fault("redirect", location="/b"),
                "/b": Fault("redirect", location="/a"),
                "/r1": Fault("redirect", location="/r2"),
                "/r2": Fault("redirect", location=f"/{CLIP}"),
                "/far": Fault("redirect", location="/f1"),
                "/f1": Fault("redirect", location="/f2"),
                "/f2": Fault("redirect", location="/f3"),
                "/f3": Fault("redirect", location="/f4"),
                "/to-file": Fault("redirect", location="file:///etc/passwd"),
                "/to-s3": Fault("redirect", location="s3://bucket/x.mp4"),
                "/to-https": Fault("redirect", location="https://example.com/x.mp4"),
            },
        ) as srv,
        fetcher(tmp_path, max_redirects=3) as f,
    ):
        assert fail(f, srv.url("a")).startswith("redirect loop")
        assert srv.hits["/a"] == 1 and srv.hits["/b"] == 1
        ok = f.fetch(srv.url("r1"), "video")
        assert Path(ok.path).read_bytes() == CLIP_BYTES and ok.path.endswith(".webm")  # named by the final url
        assert fail(f, srv.url("far")) == "too many redirects (> 3)"
        assert fail(f, srv.url("to-file")) == "scheme 'file' not allowed (redirect)"
        assert fail(f, srv.url("to-s3")) == "scheme 's3' not allowed (redirect)"
    with (
        Server(VIDEOS, {"/to-https": Fault("redirect", location="https://example.com/x.mp4")}) as srv,
        fetcher(tmp_path, schemes=("http",)) as f,
    ):
        assert fail(f, srv.url("to-https")) == "scheme 'https' not allowed (redirect)"
    assert_clean(tmp_path)


def test_schemes_and_local_files(tmp_path):
    with fetcher(tmp_path, schemes=("http", "https")) as f:
        assert fail(f, "ftp://example.com/x.mp4") == "scheme 'ftp' not allowed"
        assert fail(f, str(VIDEOS / CLIP)) == "scheme 'file' not allowed"
        assert fail(f, "s3://bucket/x.mp4") == "scheme 's3' not allowed"
        assert fail(f, "") == "empty uri"
    with fetcher(tmp_path, cache="local") as f:  # local files are read in place, also with the cache on
        by_path = f.fetch(str(VIDEOS / CLIP), "video")
        by_url = f.fetch((VIDEOS / CLIP).resolve().as_uri(), "video")
        assert by_path == by_url == Fetched(str((VIDEOS / CLIP).resolve()), False, len(CLIP_BYTES), False)
        f.release(by_path)
        assert (VIDEOS / CLIP).exists()
        assert fail(f, str(tmp_path / "nope.mp4")).startswith("no such file")
        assert fail(f, str(DATA / "images" / "astronaut.png")) == "content is not a video (looks like png)"
        f.fetch(str(DATA / "meshes" / "fuze.obj"), "3d")  # no magic bytes: judged by the mesh loader
        f.fetch(str(DATA / "images" / "astronaut.png"), "image")
        assert "remote host" in fail(f, "file://otherhost/etc/passwd")
        f.fetch("file://localhost" + str((VIDEOS / CLIP).resolve()), "video")
    assert files(tmp_path / "cache" / "index") == [] and files(tmp_path / "scratch") == []


def test_concurrent_fetches_of_one_url(tmp_path):
    results = []
    with Server(VIDEOS) as srv, fetcher(tmp_path, cache="local") as f:
        threads = [threading.Thread(target=lambda: results.append(f.fetch(srv.url(CLIP), "video"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4 and len({r.path for r in results}) == 1
        assert Path(results[0].path).read_bytes() == CLIP_BYTES
    assert_clean(tmp_path)


# ---- fetch_all -----------------------------------------------------------------------------------------------


def test_fetch_all_yields_every_item_once(tmp_path, monkeypatch):
    with Server(VIDEOS, {"/bad.mp4": Fault("status", code=503)}) as srv, fetcher(tmp_path, concurrency=3) as f:
        real = f._attempt

        def attempt(uri, modality, scheme):  # an unexpected exception for one item
            if "boom" in uri:
                raise RuntimeError("boom")
            return real(uri, modality, scheme)

        monkeypatch.setattr(f, "_attempt", attempt)
        items = [
            ("ok", srv.url(CLIP), "video"),
            ("404", srv.url("nope.mp4"), "video"),
            ("503", srv.url("bad.mp4"), "video"),
            ("ftp", "ftp://x/y.mp4", "video"),
            ("local", str(VIDEOS / CLIP), "video"),
            ("missing", str(tmp_path / "x.mp4"), "video"),
            ("boom", srv.url("boom.mp4"), "video"),
            ("image", srv.url(CLIP), "image"),
            ("ok2", srv.url(f"{CLIP}?2"), "video"),
        ]
        seen = list(f.fetch_all(iter(items)))  # any iterable
        assert sorted(k for k, _ in seen) == sorted(k for k, _, _ in items)
        got = dict(seen)
        assert {k for k, v in got.items() if isinstance(v, Fetched)} == {"ok", "local", "ok2"}
        assert str(got["boom"]) == "RuntimeError: boom" and not got["boom"].retry
        assert str(got["503"]).startswith("http 503") and str(got["404"]).startswith("http 404")
        assert got["ftp"].reason == "scheme 'ftp' not allowed"
        for v in got.values():
            if isinstance(v, Fetched):
                f.release(v)
        assert files(tmp_path / "scratch") == []
        assert list(f.fetch_all([])) == []


def test_fetch_all_stopped_early_leaves_no_files(tmp_path):
    with Server(VIDEOS, {f"/{CLIP}": Fault("stall", seconds=0.2)}) as srv, fetcher(tmp_path, concurrency=4) as f:
        gen = f.fetch_all([(i, srv.url(f"{CLIP}?{i}"), "video") for i in range(10)])
        _, first = next(gen)
        gen.close()  # the three others in flight finish and are released; the rest never start
        assert files(tmp_path / "scratch") == [Path(first.path).relative_to(tmp_path / "scratch").as_posix()]
        assert srv.total_hits() == 4
        f.release(first)
    assert_clean(tmp_path)


FAILURES = {
    "/503.mp4": Fault("status", code=503),
    "/stub_mp4v.mp4": Fault("stall", seconds=3),
    f"/{CLIP}": Fault("drip", chunk=2000, seconds=0.05),
    "/stub_mjpeg.avi": Fault("truncate"),
    "/reset.mp4": Fault("reset"),
    "/chaplin.mp4": Fault("html"),
    "/claim.mp4": Fault("oversize", size=10**9, claim_only=True),
    "/big.mp4": Fault("oversize", size=200_000),
    "/loop": Fault("redirect", location="/loop2"),
    "/loop2": Fault("redirect", location="/loop"),
}


@pytest.mark.parametrize("cache", ["none", "local", "shared"])
def test_nothing_left_behind_after_failures(tmp_path, cache):
    # 5xx, read timeout, slow drip past the deadline, truncated, reset, html, size claimed, size streamed,
    # redirect loop, 404 (with retries where they apply)
    names = [p.lstrip("/") for p in FAILURES if p != "/loop2"] + ["unsized/200000", "missing.mp4"]
    mode = str(tmp_path / "shared") if cache == "shared" else cache
    with (
        Server(VIDEOS, FAILURES) as srv,
        fetcher(tmp_path, cache=mode, retries=1, read_timeout_s=0.3, deadline_s=0.5, max_bytes=100_000) as f,
    ):
        out = dict(f.fetch_all([(n, srv.url(n), "video") for n in names]))
        assert sorted(out) == sorted(names)
        assert all(isinstance(v, FetchError) for v in out.values()), out
        assert out[CLIP].reason.startswith("deadline exceeded") and out["stub_mp4v.mp4"].reason.startswith("timeout")
        assert out["stub_mjpeg.avi"].reason.startswith("truncated") and out["unsized/200000"].reason.startswith(
            "exceeds max_bytes (> 100000"
        )
        assert files(tmp_path / "scratch") == []
    assert_clean(tmp_path)
    assert files(tmp_path / "cache") == [] and files(tmp_path / "shared") == []


# ---- cache cap -----------------------------------------------------------------------------------------------


def make_pngs(folder: Path, n: int, size: int = 1000) -> list[str]:
    """Small distinct files that pass the image magic check."""
    folder.mkdir()
    rng = random.Random(0)
    for i in range(n):
        (folder / f"f{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.randbytes(size - 8))
    return [f"f{i}.png" for i in range(n)]


def test_local_cache_cap_evicts_least_recently_used(tmp_path):
    names = make_pngs(tmp_path / "www", 11)
    cache = tmp_path / "cache"

    def cached():
        return sorted(p.name[:-4] for p in cache.glob("??/*.png"))

    def sha(name):
        return hashlib.sha256((tmp_path / "www" / name).read_bytes()).hexdigest()

    with Server(tmp_path / "www") as srv, fetcher(tmp_path, cache="local", cache_max_bytes=10_000) as f:

        def get(name, keep=False):
            got = f.fetch(srv.url(name), "image")
            if not keep:
                f.release(got)
            time.sleep(0.02)  # distinct mtimes
            return got

        held = None
        for name in names[:8]:
            got = get(name, keep=name == "f2.png")  # f2 stays in use
            held = got if name == "f2.png" else held
        assert get("f0.png").from_cache and get("f1.png").from_cache  # now the most recently used
        for name in names[8:]:
            get(name)
        # 11 KB > 10 KB cap: the LRU entries go until <= 9 KB, skipping f2 which is in use
        gone = {sha("f3.png"), sha("f4.png")}
        assert cached() == sorted({sha(n) for n in names} - gone)
        assert sum(p.stat().st_size for p in cache.glob("??/*")) <= 9_000
        assert Path(held.path).exists()
        f.release(held)
        assert get("f0.png").from_cache and not get("f3.png").from_cache  # an evicted entry is a miss
        assert srv.hits["/f0.png"] == 1 and srv.hits["/f3.png"] == 2
        assert sum(p.stat().st_size for p in cache.glob("??/*")) <= 10_000
    assert_clean(tmp_path)


def test_shared_cache_cap(tmp_path):
    names = make_pngs(tmp_path / "www", 12)
    shared = tmp_path / "shared"
    with Server(tmp_path / "www") as srv, fetcher(tmp_path, cache=str(shared), cache_max_bytes=5_000) as f:
        for name in names:
            f.release(f.fetch(srv.url(name), "image"))
            time.sleep(0.02)
        kept = sorted(shared.glob("??/*.png"))
        assert sum(p.stat().st_size for p in kept) <= 5_000 and len(kept) >= 4
        assert f.fetch(srv.url(names[-1]), "image").from_cache and not f.fetch(srv.url(names[0]), "image").from_cache


# ---- shared cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "file-uri"])
def test_shared_cache_in_a_local_folder(tmp_path, form):
    shared = tmp_path / "shared"
    uri = str(shared) if form == "path" else shared.as_uri()
    with Server(VIDEOS) as srv:
        with fetcher(tmp_path, cache=uri) as f:
            got = f.fetch(srv.url(CLIP), "video")
            assert got.temporary and not got.from_cache and Path(got.path).parent.parent == tmp_path / "scratch"
            assert (shared / CLIP_SHA[:2] / f"{CLIP_SHA}.webm").read_bytes() == CLIP_BYTES
            assert (shared / "index" / hashlib.sha256(srv.url(CLIP).encode()).hexdigest()).is_file()
        assert files(tmp_path / "scratch") == []
        with fetcher(tmp_path, cache=uri) as f:  # another node: a hit is copied into scratch, no request
            hit = f.fetch(srv.url(CLIP), "video")
            assert hit.temporary and hit.from_cache and Path(hit.path).read_bytes() == CLIP_BYTES
            assert srv.total_hits() == 1
            f.release(hit)
            assert not Path(hit.path).exists() and (shared / CLIP_SHA[:2] / f"{CLIP_SHA}.webm").exists()
            # same size, other content: the sha256 check makes it a miss, and the download repairs the entry
            (shared / CLIP_SHA[:2] / f"{CLIP_SHA}.webm").write_bytes(b"\0" * len(CLIP_BYTES))
            again = f.fetch(srv.url(CLIP), "video")
            assert not again.from_cache and srv.total_hits() == 2
            assert (shared / CLIP_SHA[:2] / f"{CLIP_SHA}.webm").read_bytes() == CLIP_BYTES
    assert_clean(tmp_path)


# ---- object stores -------------------------------------------------------------------------------------------


def test_s3_unreachable_is_a_clear_error(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "anonymous": True}
    with Fetcher(cfg_for(retries=1), str(tmp_path / "scratch"), storage_options=opts) as f:
        t = time.monotonic()
        reason = fail(f, "s3://bucket/x.mp4")
        assert time.monotonic() - t < 30
        assert reason.startswith("storage error:") and "after 2 attempts" in reason, reason
        assert fail(f, "s3:///x.mp4").startswith("'s3:///x.mp4': no bucket")
        assert files(tmp_path / "scratch") == []


# ---- several processes on one local cache --------------------------------------------------------------------


def _child(urls, tmp, n, out):
    cfg = cfg_for(cache="local", cache_dir=str(Path(tmp) / "cache"), cache_max_bytes=6_000)
    ok = 0
    with Fetcher(cfg, str(Path(tmp) / f"scratch{n}")) as f:
        for _ in range(3):
            for name, got in f.fetch_all([(u.rsplit("/", 1)[1], u, "image") for u in urls]):
                if isinstance(got, Fetched):
                    ok += Path(got.path).read_bytes() == (Path(tmp) / "www" / name).read_bytes()
                    f.release(got)
    Path(out).write_text(str(ok))


def test_processes_sharing_a_local_cache(tmp_path):
    names = make_pngs(tmp_path / "www", 10)
    ctx = multiprocessing.get_context("fork")
    with Server(tmp_path / "www") as srv:
        urls = [srv.url(n) for n in names]
        procs = [ctx.Process(target=_child, args=(urls, str(tmp_path), i, str(tmp_path / f"ok{i}"))) for i in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(40)
    assert [p.exitcode for p in procs] == [0, 0]
    assert srv.total_hits() > len(names)  # entries were evicted and fetched again
    assert [(tmp_path / f"ok{i}").read_text() for i in (0, 1)] == ["30", "30"]
    cache = tmp_path / "cache"
    for entry in (cache / "index").iterdir():  # every entry that is still there is whole and right
        e = json.loads(entry.read_text())
        path = cache / e["path"]
        if path.exists():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"] and path.stat().st_size == e["bytes"]
    # each process counts its own inserts between listings, so the cap holds to within a few entries
    assert sum(p.stat().st_size for p in cache.glob("??/*")) <= 8_000
    assert [p for p in files(cache) if "tmp/" in p or ".tmp-" in p] == []
