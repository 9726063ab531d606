"""yt-dlp downloads, not mocked: the real yt-dlp (generic extractor) against a loopback HTTP server (127.0.0.1)
serving real test videos, HTML pages with <video>/<source> tags, bot-check (403/429) pages, a slow body and 404s.
Also the routing rule and the error classification."""

import hashlib
import shutil
import time

import pytest

from pipeline.fetch import FetchConfig, Fetcher
from pipeline.ytdlp import YtdlpConfig, YtdlpDownloader, YtdlpError, classify, reason_kind, route
from tests.http_server import Fault, FaultServer

PAGE = (
    "<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1>"
    '<video controls width="320">{tag}</video></body></html>'
)


def page(title: str, src: str, source_tag: bool = True) -> str:
    tag = f'<source src="{src}" type="video/mp4">' if source_tag else ""
    html = PAGE.format(title=title, tag=tag)
    return html if source_tag else html.replace("<video controls", f'<video src="{src}" controls')


@pytest.fixture()
def site(tmp_path, shared_data):
    root = tmp_path / "site"
    (root / "watch").mkdir(parents=True)
    (root / "media").mkdir()
    for name in ("chaplin.mp4", "Big_Buck_Bunny_180_10s.webm"):
        shutil.copy(shared_data / "videos" / name, root / "media" / name)
    (root / "watch" / "a").write_text(page("clip a", "/media/chaplin.mp4"))
    (root / "watch" / "b").write_text(page("clip b", "/media/Big_Buck_Bunny_180_10s.webm", source_tag=False))
    (root / "watch" / "gone").write_text(page("gone", "/media/missing.mp4"))
    faults = {
        "/watch/bot403": Fault("status", code=403),
        "/watch/bot429": Fault("status", code=429),
        "/media/slow.mp4": Fault("drip", chunk=1024, seconds=2.0),
    }
    shutil.copy(root / "media" / "chaplin.mp4", root / "media" / "slow.mp4")
    (root / "watch" / "slow").write_text(page("slow", "/media/slow.mp4"))
    with FaultServer(root, faults) as srv:
        yield srv, root


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fast(**kw) -> FetchConfig:
    yt = {"retries": 0, "backoff_s": 0.05, "socket_timeout_s": 2.0, "host_rate_per_min": 60000, **kw.pop("ytdlp", {})}
    return FetchConfig(ytdlp=YtdlpConfig(**yt), **{"downloader": "ytdlp", **kw})  # loopback pages: generic


def test_route_rule():
    assert route("https://ak.picdn.net/shutterstock/videos/1/preview/stock-footage-x.mp4") == "http"
    assert route("http://127.0.0.1:1/media/a.WEBM?sig=1") == "http"
    assert route("https://www.youtube.com/watch?v=-2yHu5qgTzM") == "ytdlp"
    assert route("https://vimeo.com/123456") == "ytdlp"
    assert route("http://127.0.0.1:1/watch/a") == "http"  # no site extractor: plain HTTP unless forced
    assert route("https://www.youtube.com/watch?v=x", "http") == "http"
    assert route("https://example.com/a.mp4", "ytdlp") == "ytdlp"


def test_classify_real_messages():
    """yt-dlp's and YouTube's own wording, each sorted into one readable kind."""
    cases = {
        "[youtube] abc: Sign in to confirm you're not a bot. Use --cookies-from-browser or --cookies": "bot-check",
        "[youtube] abc: Sign in to confirm your age. This video may be inappropriate for some users.": "bot-check",
        "[youtube] abc: Private video. Sign in if you've been granted access to this video": "private",
        "[youtube] abc: Video unavailable. This video has been removed by the uploader": "unavailable",
        "[youtube] abc: The uploader has not made this video available in your country": "geo",
        "Unable to download webpage: HTTP Error 429: Too Many Requests": "rate-limited",
        "Unable to download webpage: <urlopen error [Errno 111] Connection refused>": "network",
        "Unable to download webpage: HTTP Error 404: Not Found": "unavailable",
    }
    assert {m: classify(m) for m in cases} == cases
    assert reason_kind("fetch", "http 404 Not Found") == "unavailable"
    assert reason_kind("fetch", "bot-check: yt-dlp: HTTP Error 403") == "bot-check"
    assert reason_kind("decode", "span [20, 24]s starts after the video ends (10.000s)") == "decode"


def test_html_pages_and_direct_video_through_yt_dlp(site, tmp_path, shared_data):
    """A page with <source>, a page with <video src>, and a direct file (forced to yt-dlp) all arrive whole."""
    srv, root = site
    with Fetcher(fast(), str(tmp_path / "scratch")) as f:  # (downloader: ytdlp; auto would use HTTP here)
        got = {k: f.fetch(srv.url(p), "video") for k, p in (("a", "watch/a"), ("b", "watch/b"))}
        assert sha(got["a"].path) == sha(root / "media" / "chaplin.mp4")
        assert sha(got["b"].path) == sha(root / "media" / "Big_Buck_Bunny_180_10s.webm")
        assert got["b"].path.endswith(".webm")
        for g in got.values():
            f.release(g)
        assert f.downloader().calls == 2
    with Fetcher(fast(downloader="ytdlp"), str(tmp_path / "scratch")) as f:
        direct = f.fetch(srv.url("media/chaplin.mp4"), "video")
        assert sha(direct.path) == sha(root / "media" / "chaplin.mp4")
        assert f.downloader().calls == 1
    assert srv.hits["/watch/a"] == 1 and srv.hits["/watch/b"] == 1


def test_errors_become_readable_kinds(site, tmp_path):
    srv, _ = site
    with Fetcher(fast(ytdlp={"retries": 1, "socket_timeout_s": 0.5}), str(tmp_path / "s")) as f:
        reasons = {}
        for p in ("watch/missing", "watch/bot403", "watch/bot429", "watch/gone", "watch/slow"):
            with pytest.raises(Exception) as err:
                f.fetch(srv.url(p), "video")
            reasons[p] = str(err.value)
    kinds = {p: r.split(":", 1)[0] for p, r in reasons.items()}
    assert kinds == {
        "watch/missing": "unavailable",
        "watch/bot403": "bot-check",
        "watch/bot429": "rate-limited",
        "watch/gone": "unavailable",
        "watch/slow": "network",
    }, reasons
    assert "HTTP Error 429" in reasons["watch/bot429"] and "after 2 attempts" in reasons["watch/bot429"]
    # rate limits and network errors are retried once (retries: 1); 404s and bot checks are not
    assert srv.hits["/watch/bot429"] == 2 and srv.hits["/watch/bot403"] == 1 and srv.hits["/watch/missing"] == 1
    assert not list((tmp_path / "s").rglob("video.*"))  # a failed download leaves no file


def test_per_host_rate_limit_and_proxy(site, tmp_path):
    srv, _ = site
    cfg = YtdlpConfig(retries=0, host_rate_per_min=120, host_concurrency=1)  # one start per 0.5 s
    with YtdlpDownloader(cfg, str(tmp_path / "s")) as dl:
        t0 = time.monotonic()
        for _ in range(3):
            dl.download(srv.url("media/chaplin.mp4"))
        assert time.monotonic() - t0 >= 1.0
    hits = srv.total_hits()
    # a proxy that refuses connections: yt-dlp goes through it (the server sees nothing) and says network
    with YtdlpDownloader(YtdlpConfig(retries=0, proxy="http://127.0.0.1:9", socket_timeout_s=2), str(tmp_path)) as dl:
        with pytest.raises(YtdlpError) as err:
            dl.download(srv.url("watch/a"))
    assert err.value.kind == "network" and srv.total_hits() == hits


def test_format_spec_from_job():
    spec = YtdlpConfig(max_height=360, container="mp4", codec="avc1").format_spec()
    assert spec.startswith("wv*[height>=?360][ext=mp4][vcodec^=avc1]+wa/")
    assert YtdlpConfig(format="best").format_spec() == "best"


def panda_csv(path, url, spans):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoID", "url", "timestamp", "caption", "matching_score"])
        w.writerow(
            [
                "vidA",
                url,
                repr([list(s) for s in spans]),
                repr([f"clip {i}" for i in range(len(spans))]),
                repr([0.5] * len(spans)),
            ]
        )


def test_prepare_downloads_once_deletes_after_unless_cached(site, tmp_path, monkeypatch):
    """The clips of one video in one prepare call: one yt-dlp download, each clip cut by its span; the file is
    gone afterwards, unless `fetch.cache` keeps it (a second worker then downloads nothing)."""
    from pipeline.decode import DecodeConfig
    from pipeline.mesh.stage import MeshConfig
    from pipeline.prepare import Prepare
    from pipeline.sources import iter_rows, make_source, source_config

    srv, _ = site
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / "scratch"))
    panda_csv(tmp_path / "p.csv", srv.url("watch/b"), [("0:00:01.000", "0:00:03.000"), ("0:00:05.000", "0:00:07.000")])
    rows = list(iter_rows(make_source(source_config({"type": "panda70m", "path": str(tmp_path / "p.csv")}))))
    decode = DecodeConfig(fps=4, max_frames=8, timeout_s=30)

    def prepare(fetch):
        stage = Prepare(fetch, decode, MeshConfig())
        try:
            out = stage(rows)
            left = [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]
        finally:
            stage.teardown()
        return out, left

    out, left = prepare(fast())
    assert [r["status"] for r in out] == ["ok", "ok"] and srv.hits["/watch/b"] == 1
    assert [(r["span_start"], r["span_end"]) for r in out] == [(1.0, 3.0), (5.0, 7.0)]
    assert all(r["num_frames"] == 8 for r in out) and not out[0]["pixels"].tobytes() == out[1]["pixels"].tobytes()
    assert left == []  # the download is deleted once its clips are done

    cached = fast(cache="local", cache_dir=str(tmp_path / "cache"))
    prepare(cached)
    assert srv.hits["/watch/b"] == 2
    out, _ = prepare(cached)  # another worker: served from the cache
    assert srv.hits["/watch/b"] == 2 and [r["status"] for r in out] == ["ok", "ok"]
    assert [p.suffix for p in (tmp_path / "cache").rglob("*.webm")] == [".webm"]
