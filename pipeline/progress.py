"""Driver-side progress of a run: a live tqdm bar on a terminal, a plain line every `every_s` seconds otherwise
(logs, `ray job submit`). Samples done / to do, samples/s, ETA, ok / failed so far and the top failure reason.

`Progress` only formats and ticks (a daemon thread, `refresh_s`); what it shows comes from `poll()`, a callable
returning `(counts, reasons)` (status -> n, (stage, reason) -> n), e.g. the run's control actor. Testable
without Ray.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Callable


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def describe(counts: dict, reasons: dict, width: int = 80) -> str:
    """`ok 4, failed 1; top failure: decode: corrupt ...` (the part after the counts and rate)."""
    text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "ok 0"
    if reasons:
        (stage, reason), n = collections.Counter(reasons).most_common(1)[0]
        text += f"; top failure ({n}x) {stage}: {(reason or '')[:width]}"
    return text


class Progress:
    def __init__(
        self,
        poll: Callable[[], tuple[dict, dict]],
        total: int | None = None,
        stream=None,
        tty: bool | None = None,
        every_s: float = 10.0,
        refresh_s: float = 0.5,
        bar: bool = True,
    ):
        self.poll, self.total = poll, total
        self.stream = stream or sys.stdout
        self.tty = (self.stream.isatty() if tty is None else tty) and bar
        self.every_s, self.refresh_s = every_s, refresh_s
        self.counts: dict = {}
        self.reasons: dict = {}
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._last_line = self.t0

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "Progress":
        if self.tty:
            import shutil

            from tqdm import tqdm

            sized = shutil.get_terminal_size((0, 0)).columns > 0  # a pty without a size: tqdm would draw nothing
            self._bar = tqdm(
                total=self.total,
                unit="sample",
                file=self.stream,
                dynamic_ncols=sized,
                ncols=None if sized else 120,
                mininterval=self.refresh_s,
                smoothing=0,
                desc="tokenizing",
            )
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._thread is not None:  # an abort (a second Ctrl-C, an error) waits for nothing
            self._thread.join(timeout=1 if exc_type else 10)
        if exc_type is None:
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the run is ending (perhaps because Ray is gone): show what we have
                pass
        if self._bar is not None:
            self._bar.close()
        elif self.done:
            self._line()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - a lost poll must never stop the run; shown once, then off
                print(f"progress: no longer updated ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
                return

    def tick(self) -> None:
        counts, reasons = self.poll()
        with self._lock:
            self.counts, self.reasons = dict(counts), dict(reasons)
            if self._bar is not None:
                self._bar.update(max(0, self.done - self._bar.n))
                self._bar.set_postfix_str(describe(self.counts, self.reasons, 60), refresh=False)
                self._bar.refresh()
            elif time.monotonic() - self._last_line >= self.every_s:
                self._line()

    def line(self) -> str:
        """The plain progress line: `progress: 5/12 samples (41.7%), 0.45 samples/s, ETA 0:15, ok 4, ...`."""
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({self.done / self.total:.1%})" if self.total else ""
        eta = (
            f", ETA {_clock((self.total - self.done) / rate)}"
            if self.total is not None and rate > 0 and self.done < self.total
            else ""
        )
        return (
            f"progress: {self.done}{of} samples{pct}, {rate:.2f} samples/s, elapsed {_clock(elapsed)}{eta}, "
            + describe(self.counts, self.reasons)
        )

    def _line(self) -> None:
        self._last_line = time.monotonic()
        print(self.line(), file=self.stream, flush=True)
