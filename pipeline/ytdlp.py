"""Video-site downloads through yt-dlp's Python API (`yt_dlp.YoutubeDL`), and the rule that picks a downloader.

    route(url, "auto")  -> "http" for direct media files (a known media extension), "ytdlp" for other pages
    with YtdlpDownloader(cfg, scratch_dir) as dl:
        path = dl.download(url)          # a local file, or YtdlpError(kind, detail, retry)

The format comes from the job (`max_height`, `container`, `codec`, or a raw yt-dlp `format`); a cookies file, a
proxy, retries with exponential backoff, and per-host politeness (at most `host_concurrency` downloads in flight
and `host_rate_per_min` starts a minute per host, per downloader) are job settings too. yt-dlp's errors are sorted
into a few readable kinds (`KINDS`), which lead the failed sample's reason ("bot-check: ...") so that `status
--failed` and the run summary count them.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from typing import ClassVar, Literal

from pydantic import Field

from pipeline.config import Config

log = logging.getLogger(__name__)

Downloader = Literal["auto", "http", "ytdlp"]
KINDS = ("unavailable", "private", "bot-check", "geo", "rate-limited", "network", "error")
# direct media files: the HTTP fetcher (yt-dlp would only add a probe request)
MEDIA_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .gif .webp .tif .tiff .bmp .pgm .ppm .pbm .pnm .avif .heic .heif .mp4 .m4v .mov .webm .mkv "
    ".avi .ts .mts .m2ts .flv .ogv .ogg .mpg .mpeg .3gp .wmv .glb .gltf .ply .stl .obj .tar".split()
)

# (kind, pattern) in order: the first match wins. Patterns are yt-dlp's and the sites' own wording.
_RULES = [
    ("private", r"private video|this video is private|video is private|members-only|join this channel"),
    (
        "bot-check",
        r"not a bot|confirm your age|age[- ]restricted|inappropriate for some users|sign in to confirm|"
        r"use --cookies|login required|requires authentication|http error 403|403: forbidden",
    ),
    ("geo", r"available in your country|geo[- ]?restrict|blocked it in your country|from your location"),
    ("rate-limited", r"http error 429|too many requests|rate[- ]limit"),
    (
        "unavailable",
        r"video unavailable|not available|has been removed|no longer available|does not exist|"
        r"http error 404|http error 410|not found|unsupported url|no video formats|"
        r"requested format is not available|account .* terminated|copyright|no such (file|object)",
    ),
    (
        "network",
        r"timed out|timeout|connection (refused|reset|aborted)|name or service not known|"
        r"temporary failure in name resolution|network is unreachable|urlopen error|incompleteread|"
        r"remote end closed|http error 5\d\d|unable to download|transporterror|ssl",
    ),
]
_RETRY = {"rate-limited", "network"}


class YtdlpConfig(Config):
    IDENTITY: ClassVar[tuple[str, ...]] = ()  # which copy of a video is fetched is not a token setting
    format: str | None = None  # a raw yt-dlp format string; overrides the three below
    max_height: int = Field(360, ge=1)  # the smallest stream at least this high, else the largest below
    container: str = Field("mp4", pattern=r"^[a-z0-9]+$")  # preferred extension (mp4, webm, ...)
    codec: str | None = Field(None, pattern=r"^[a-z0-9.]+$")  # preferred video codec prefix (avc1, vp9, av01)
    cookies_file: str | None = None  # Netscape cookies.txt (the usual cure for YouTube's bot check)
    proxy: str | None = None  # http://, socks5://
    retries: int = Field(3, ge=0)  # extra attempts after rate limits and network errors
    backoff_s: float = Field(5.0, ge=0)  # first backoff; doubles each retry
    backoff_max_s: float = Field(300.0, ge=0)
    socket_timeout_s: float = Field(30.0, gt=0)
    host_concurrency: int = Field(2, ge=1)  # downloads in flight per host (per worker)
    host_rate_per_min: float = Field(30.0, gt=0)  # download starts per minute per host (per worker)
    max_bytes: int | None = Field(None, gt=0)  # default: fetch.max_bytes

    def format_spec(self) -> str:
        """e.g. 'wv*[height>=360][ext=mp4]+wa/w[height>=360][ext=mp4]/...': video2dataset's choice (the smallest
        stream of at least max_height), then the same without container/codec preferences, then the best below."""
        if self.format:
            return self.format
        h, pref = self.max_height, f"[ext={self.container}]" + (f"[vcodec^={self.codec}]" if self.codec else "")
        return "/".join(
            [f"wv*[height>=?{h}]{pref}+wa/w[height>=?{h}]{pref}", f"wv*[height>=?{h}]+wa/w[height>=?{h}]", "bv*+ba/b"]
        )


def route(url: str, downloader: Downloader = "auto") -> str:
    """'http' or 'ytdlp' for an http(s) url: forced by the job; else direct media files (by extension) -> http,
    pages of the sites yt-dlp has an extractor for (YouTube, Vimeo, ...) -> ytdlp, anything else -> http (yt-dlp's
    generic extractor, for any page with a <video> tag, is `downloader: ytdlp`)."""
    if downloader != "auto":
        return downloader
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    if os.path.splitext(path)[1].lower() in MEDIA_EXTENSIONS:
        return "http"
    return "ytdlp" if site_extractor(url) else "http"


def site_extractor(url: str) -> str | None:
    """The name of the yt-dlp extractor (other than the generic one) that claims `url`, if any."""
    from yt_dlp.extractor import gen_extractor_classes

    for ie in gen_extractor_classes():
        if ie.ie_key() != "Generic" and ie.suitable(url):
            return ie.ie_key()
    return None


def classify(message: str) -> str:
    """One of KINDS for a yt-dlp error message."""
    text = message.lower()
    for kind, pattern in _RULES:
        if re.search(pattern, text):
            return kind
    return "error"


class YtdlpError(Exception):
    def __init__(self, kind: str, detail: str):
        self.kind, self.detail, self.retry = kind, detail, kind in _RETRY
        super().__init__(f"{kind}: yt-dlp: {detail}")


class _Quiet:
    """yt-dlp logger: debug/info dropped, warnings to our log, errors kept for the reason."""

    def __init__(self):
        self.errors: list[str] = []

    def debug(self, msg):
        pass

    def info(self, msg):
        pass

    def warning(self, msg):
        log.debug("yt-dlp: %s", msg)

    def error(self, msg):
        self.errors.append(str(msg))


class _Hosts:
    """Per-host politeness for one downloader: a semaphore (concurrency) and spaced starts (rate)."""

    def __init__(self, concurrency: int, per_min: float):
        self.concurrency, self.interval = concurrency, 60.0 / per_min
        self.lock = threading.Lock()
        self.slots: dict[str, threading.Semaphore] = collections.defaultdict(
            lambda: threading.BoundedSemaphore(concurrency)
        )
        self.next_start: dict[str, float] = {}

    def enter(self, host: str, stop: threading.Event) -> None:
        with self.lock:
            slot = self.slots[host]
        slot.acquire()
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start.get(host, now))
            self.next_start[host] = start + self.interval
        if stop.wait(max(0.0, start - now)):
            slot.release()
            raise YtdlpError("error", "downloader is closed")

    def leave(self, host: str) -> None:
        self.slots[host].release()


class YtdlpDownloader:
    """Downloads one video per call into its own scratch folder. Thread-safe (one YoutubeDL per call)."""

    def __init__(self, cfg: YtdlpConfig, scratch_dir: str, max_bytes: int | None = None, rng=None):
        import random

        self.cfg, self.max_bytes = cfg, cfg.max_bytes or max_bytes
        os.makedirs(scratch_dir, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix="ytdlp-", dir=scratch_dir)
        self.hosts = _Hosts(cfg.host_concurrency, cfg.host_rate_per_min)
        self.rng = rng or random.Random()
        self.closed = threading.Event()
        self.calls = 0  # yt-dlp downloads started (tests and the summary read it)

    def download(self, url: str) -> str:
        """A local file with the video at `url` (the caller deletes it); raises YtdlpError."""
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        for attempt in range(self.cfg.retries + 1):
            self.hosts.enter(host, self.closed)
            try:
                return self._once(url)
            except YtdlpError as exc:
                if not exc.retry or attempt == self.cfg.retries:
                    if exc.retry and attempt:
                        raise YtdlpError(exc.kind, f"{exc.detail} (after {attempt + 1} attempts)") from None
                    raise
            finally:
                self.hosts.leave(host)
            wait = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2**attempt) * (1 + self.rng.uniform(0, 0.5))
            if self.closed.wait(wait):
                raise YtdlpError("error", "downloader is closed")
        raise AssertionError("unreachable")

    def _once(self, url: str) -> str:
        import yt_dlp

        self.calls += 1
        folder = tempfile.mkdtemp(prefix="v-", dir=self.scratch)
        quiet = _Quiet()
        opts = {
            "format": self.cfg.format_spec(),
            "outtmpl": os.path.join(folder, "video.%(ext)s"),
            "noplaylist": True,
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "logger": quiet,
            "retries": 0,
            "fragment_retries": 0,
            "extractor_retries": 0,
            "socket_timeout": self.cfg.socket_timeout_s,
            "cachedir": False,
            "overwrites": True,
            "continuedl": False,
        }
        if self.cfg.cookies_file:
            opts["cookiefile"] = self.cfg.cookies_file
        if self.cfg.proxy:
            opts["proxy"] = self.cfg.proxy
        if self.max_bytes:
            opts["max_filesize"] = self.max_bytes
        try:
            with yt_dlp.YoutubeDL(opts) as ydl:
                ydl.download([url])
        except yt_dlp.utils.DownloadError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            msg = _clean(str(exc) or " ".join(quiet.errors))
            raise YtdlpError(classify(msg), msg) from None
        except Exception as exc:  # an extractor bug is this sample's, never the worker's
            shutil.rmtree(folder, ignore_errors=True)
            msg = _clean(f"{type(exc).__name__}: {exc}")
            raise YtdlpError(classify(msg), msg) from None
        files = [f for f in glob.glob(os.path.join(folder, "video.*")) if not f.endswith((".part", ".ytdl"))]
        if not files:
            shutil.rmtree(folder, ignore_errors=True)
            why = "over max_bytes" if self.max_bytes else "nothing written"
            raise YtdlpError("unavailable", f"no file downloaded ({why})")
        return max(files, key=os.path.getsize)

    def close(self) -> None:
        self.closed.set()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "YtdlpDownloader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clean(msg: str) -> str:
    """One line: without yt-dlp's 'ERROR: ' prefix and ANSI colours, at most 300 characters."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", msg).replace("ERROR: ", "").strip()
    return " ".join(msg.split())[:300]


__all__ = ["YtdlpConfig", "YtdlpDownloader", "YtdlpError", "classify", "route", "KINDS"]


def reason_kind(stage: str | None, reason: str | None) -> str:
    """The kind of a failed or skipped sample's reason, for counting: a leading kind ('bot-check: ...'), a fetch
    error classified like yt-dlp's ('http 404 Not Found' -> unavailable), else the stage that failed it."""
    text = (reason or "").strip()
    head = text.split(":", 1)[0]
    if head in KINDS:
        return head
    if stage == "fetch":
        kind = classify(re.sub(r"^http (\d{3})", r"http error \1", text))
        if kind != "error":
            return kind
    return stage or "error"
