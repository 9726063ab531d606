"""Headless Chromium (Debian's `chromium` package) for tests that look at a page as a person would.

`chromium()` skips the test when the browser is not installed, unless ATOKEN_REQUIRE_BROWSER=1 (CI), where a
missing browser fails it. Every call has a wall-clock limit and a fresh profile folder."""

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("ATOKEN_REQUIRE_BROWSER") == "1":
            pytest.fail("ATOKEN_REQUIRE_BROWSER=1 but `chromium` is not on PATH (apt-get install -y chromium)")
        pytest.skip("`chromium` is not on PATH (apt-get install -y chromium; CI sets ATOKEN_REQUIRE_BROWSER=1)")
    return exe


def _run(page: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
            capture_output=True,
            timeout=timeout_s,
            check=True,
        )


def screenshot(page: Path, out: Path, size=(1280, 2000)) -> Path:
    """The page as rendered in a size[0] x size[1] window, as a PNG."""
    _run(page, f"--screenshot={out}", f"--window-size={size[0]},{size[1]}")
    assert out.is_file(), f"chromium wrote no screenshot for {page}"
    return out


def dump_dom(page: Path) -> str:
    """The DOM after loading (what the browser parsed, not the file's text)."""
    return _run(page, "--dump-dom").stdout.decode()


class PageParts(HTMLParser):
    """What a QA page holds: every <img src> and the text of every sample row's cells (stdlib parser)."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.rows, self._row, self._cell = [], [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src"))
        elif tag == "tr" and attrs.get("class") == "sample":
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None


def coloured_pixels(png) -> int:
    """Pixels of a screenshot (a path) or a picture (a PIL image) that are clearly coloured: not the page's
    white, nor grey or black text."""
    import numpy as np
    from PIL import Image

    with Image.open(png) if isinstance(png, (str, Path)) else png.copy() as im:
        a = np.asarray(im.convert("RGB"), np.int16)
    return int(((a.max(-1) - a.min(-1)) > 60).sum())
