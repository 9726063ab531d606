import hashlib
import os
import threading
import time
from pathlib import Path


from pipeline.fetch import FetchConfig, cached, fetch_row
from pipeline.rows import fail
from tests.http_server import Fault, FaultServer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
VIDEOS = DATA / "videos"
CLIP = "bbb_480p_vp9_opus_1second.webm"  # 45 KB
CLIP_BYTES = (VIDEOS / CLIP).read_bytes()


def cfg_for(tmp_path, **kw) -> FetchConfig:
    base = dict(cache_dir=str(tmp_path / "cache"), connect_timeout_s=2.0, read_timeout_s=2.0, deadline_s=10.0,
                retries=2, backoff_s=0.01, backoff_max_s=0.05)
    return FetchConfig(**{**base, **kw})


def row(uri, modality="video"):
    return {"id": "t-1", "modality": modality, "source": "test", "status": "ok", "stage": "source",
            "error": None, "uri": uri}


def cache_files(cfg):
    root = Path(cfg.cache_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_no_partial_files(cfg):
    assert [p for p in cache_files(cfg) if p.startswith("tmp/") or "/.tmp-" in p] == []


def test_download_cache_layout_and_no_second_request(tmp_path):
    cfg = cfg_for(tmp_path)
    with FaultServer(VIDEOS) as srv:
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert out["status"] == "ok" and out["stage"] == "fetch"
        sha = hashlib.sha256(CLIP_BYTES).hexdigest()
        assert out["path"] == str(Path(cfg.cache_dir) / sha[:2] / f"{sha}.webm")
        assert Path(out["path"]).read_bytes() == CLIP_BYTES
        index = Path(cfg.cache_dir) / "index" / hashlib.sha256(srv.url(CLIP).encode()).hexdigest()
        assert index.is_file()
        assert srv.hits[f"/{CLIP}"] == 1
        # second fetch, and a rerun with a fresh config over the same cache: no request at all
        again = fetch_row(row(srv.url(CLIP)), cfg)
        rerun = fetch_row(row(srv.url(CLIP)), cfg_for(tmp_path))
        assert again["path"] == rerun["path"] == out["path"]
        assert srv.total_hits() == 1
        # a cached file that went missing is downloaded again
        os.unlink(out["path"])
        assert cached(cfg, srv.url(CLIP)) is None
        assert fetch_row(row(srv.url(CLIP)), cfg)["status"] == "ok" and srv.total_hits() == 2
    assert_no_partial_files(cfg)


def test_http_404_not_retried(tmp_path):
    cfg = cfg_for(tmp_path)
    with FaultServer(VIDEOS) as srv:
        out = fetch_row(row(srv.url("missing.mp4")), cfg)
        assert out["status"] == "failed" and out["stage"] == "fetch"
        assert out["error"].startswith("http 404")
        assert srv.hits["/missing.mp4"] == 1


def test_http_500_retried_to_success(tmp_path):
    cfg = cfg_for(tmp_path)
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("status", code=500, times=2)}) as srv:
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert out["status"] == "ok" and Path(out["path"]).read_bytes() == CLIP_BYTES
        assert srv.hits[f"/{CLIP}"] == 3


def test_http_503_gives_up_after_retries(tmp_path):
    cfg = cfg_for(tmp_path, retries=3)
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("status", code=503)}) as srv:
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert out["status"] == "failed"
        assert out["error"].startswith("http 503") and "after 4 attempts" in out["error"]
        assert srv.hits[f"/{CLIP}"] == 4
    assert cache_files(cfg) == []


def test_stall_times_out_then_retries(tmp_path):
    cfg = cfg_for(tmp_path, read_timeout_s=0.3, retries=1)
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("stall", seconds=5)}) as srv:
        t = time.monotonic()
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert time.monotonic() - t < 3
        assert out["status"] == "failed" and out["error"].startswith("timeout after 0.3s")
        assert srv.hits[f"/{CLIP}"] == 2
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("stall", seconds=5, times=1)}) as srv:
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert out["status"] == "ok" and srv.hits[f"/{CLIP}"] == 2


def test_slow_drip_hits_the_deadline(tmp_path):
    # every chunk arrives well within the read timeout, but the whole body would take ~5 s
    cfg = cfg_for(tmp_path, read_timeout_s=1.0, deadline_s=0.6, retries=0)
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("drip", chunk=1000, seconds=0.1)}) as srv:
        t = time.monotonic()
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert time.monotonic() - t < 2.5
    assert out["status"] == "failed" and out["error"].startswith("deadline exceeded: 0.6s")
    assert_no_partial_files(cfg)


def test_truncated_body(tmp_path):
    cfg = cfg_for(tmp_path, retries=1)
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("truncate", fraction=0.5)}) as srv:
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert out["status"] == "failed"
        assert out["error"].startswith(f"truncated body: got {len(CLIP_BYTES) // 2} of {len(CLIP_BYTES)} bytes")
        assert srv.hits[f"/{CLIP}"] == 2
    assert cache_files(cfg) == []
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("truncate", fraction=0.5, times=1)}) as srv:
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert out["status"] == "ok" and Path(out["path"]).read_bytes() == CLIP_BYTES


def test_connection_reset(tmp_path):
    cfg = cfg_for(tmp_path, retries=2)
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("reset", times=1)}) as srv:
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert out["status"] == "ok" and srv.hits[f"/{CLIP}"] == 2
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("reset")}) as srv:
        out = fetch_row(row(srv.url(CLIP)), cfg)
        assert out["status"] == "failed" and out["error"].startswith("connection error")
        assert srv.hits[f"/{CLIP}"] == 3


def test_wrong_content_type_is_judged_by_magic_bytes(tmp_path):
    cfg = cfg_for(tmp_path)
    with FaultServer(VIDEOS, {f"/{CLIP}": Fault("content_type", content_type="text/html"),
                              "/chaplin.mp4": Fault("html")}) as srv:
        ok = fetch_row(row(srv.url(CLIP)), cfg)
        assert ok["status"] == "ok"
        bad = fetch_row(row(srv.url("chaplin.mp4")), cfg)
        assert bad["status"] == "failed" and bad["error"].startswith("content is not a video (magic bytes 3c21")
        assert srv.hits["/chaplin.mp4"] == 1  # not retried
        img = fetch_row(row(srv.url("chaplin.mp4"), modality="image"), cfg)
        assert img["status"] == "failed" and "content is not an image" in img["error"]
    assert cached(cfg, srv.url("chaplin.mp4")) is None


def test_max_bytes(tmp_path):
    cfg = cfg_for(tmp_path, max_bytes=10_000)
    with FaultServer(VIDEOS, {"/big.mp4": Fault("oversize", size=10**9, claim_only=True)}) as srv:
        claimed = fetch_row(row(srv.url("big.mp4")), cfg)
        assert claimed["status"] == "failed"
        assert claimed["error"] == "exceeds max_bytes (1000000000 > 10000 bytes, Content-Length)"
        assert srv.hits["/big.mp4"] == 1
        real = fetch_row(row(srv.url(CLIP)), cfg)  # 45 KB body, streamed
        assert real["status"] == "failed" and real["error"].startswith("exceeds max_bytes")
    assert_no_partial_files(cfg)


def test_redirects(tmp_path):
    cfg = cfg_for(tmp_path, max_redirects=3)
    with FaultServer(VIDEOS, {"/a": Fault("redirect", location="/b"), "/b": Fault("redirect", location="/a"),
                              "/r1": Fault("redirect", location="/r2"),
                              "/r2": Fault("redirect", location=f"/{CLIP}"),
                              "/far": Fault("redirect", location="/f1"), "/f1": Fault("redirect", location="/f2"),
                              "/f2": Fault("redirect", location="/f3"), "/f3": Fault("redirect", location="/f4"),
                              "/to-file": Fault("redirect", location="file:///etc/passwd")}) as srv:
        loop = fetch_row(row(srv.url("a")), cfg)
        assert loop["status"] == "failed" and loop["error"].startswith("redirect loop")
        assert srv.hits["/a"] == 1 and srv.hits["/b"] == 1
        ok = fetch_row(row(srv.url("r1")), cfg)
        assert ok["status"] == "ok" and Path(ok["path"]).read_bytes() == CLIP_BYTES
        far = fetch_row(row(srv.url("far")), cfg)
        assert far["error"] == "too many redirects (> 3)"
        sneaky = fetch_row(row(srv.url("to-file")), cfg)
        assert sneaky["status"] == "failed" and sneaky["error"] == "scheme 'file' not allowed (redirect)"


def test_schemes_and_local_files(tmp_path):
    cfg = cfg_for(tmp_path, schemes=("http", "https"))
    ftp = fetch_row(row("ftp://example.com/x.mp4"), cfg)
    assert ftp["error"] == "scheme 'ftp' not allowed"
    local = fetch_row(row(str(VIDEOS / CLIP)), cfg)
    assert local["error"] == "scheme 'file' not allowed"

    cfg = cfg_for(tmp_path)
    by_path = fetch_row(row(str(VIDEOS / CLIP)), cfg)
    by_url = fetch_row(row((VIDEOS / CLIP).resolve().as_uri()), cfg)
    assert by_path["path"] == by_url["path"] == str((VIDEOS / CLIP).resolve())
    missing = fetch_row(row(str(tmp_path / "nope.mp4")), cfg)
    assert missing["status"] == "failed" and missing["error"].startswith("no such file")
    wrong = fetch_row(row(str(DATA / "images" / "astronaut.png")), cfg)
    assert wrong["error"] == "content is not a video (looks like png)"
    mesh = fetch_row(row(str(DATA / "meshes" / "fuze.obj"), modality="3d"), cfg)
    assert mesh["status"] == "ok"
    remote_file = fetch_row(row("file://otherhost/etc/passwd"), cfg)
    assert "remote host" in remote_file["error"]
    # copy_local puts local files into the content-addressed cache too
    copy = fetch_row(row(str(VIDEOS / CLIP)), cfg_for(tmp_path, copy_local=True))
    assert copy["path"].startswith(cfg.cache_dir) and Path(copy["path"]).read_bytes() == CLIP_BYTES


def test_failed_rows_pass_through(tmp_path):
    r = fail(row("http://127.0.0.1:9/x.mp4"), "source", "bad csv row")
    assert fetch_row(r, cfg_for(tmp_path)) is r


def test_connection_refused_is_recorded(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    out = fetch_row(row(f"http://127.0.0.1:{port}/x.mp4"), cfg_for(tmp_path, retries=1))
    assert out["status"] == "failed" and "ConnectionRefusedError" in out["error"]


def test_concurrent_fetches_of_one_url(tmp_path):
    cfg = cfg_for(tmp_path)
    results = []
    with FaultServer(VIDEOS) as srv:
        threads = [threading.Thread(target=lambda: results.append(fetch_row(row(srv.url(CLIP)), cfg)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 4 and all(r["status"] == "ok" for r in results)
    assert len({r["path"] for r in results}) == 1 and Path(results[0]["path"]).read_bytes() == CLIP_BYTES
    assert_no_partial_files(cfg)
