"""The stage interface: a small class over lists of rows, testable without Ray.

A stage declares what it needs (`resources()`), what it reads and adds (`reads`, `adds`), and gets a `setup()` that
runs once per worker (a model, a renderer, an HTTP client). Its work is `process(row)` or, for stages that batch,
`process_batch(rows)`. Calling the stage (`stage(rows)`) adds what every stage needs and is written only here:
failed rows pass through untouched, exceptions become a failed row with the reason, each ok row gets its stage
name and timing, and a fault-injection point named after the stage. `process_batch` returns one entry per input
row: a row, or a list of rows when one input becomes several samples (the windows of a video clip).

`pipeline/ray_job.py` maps any stage to a Ray Data task or actor pool; nothing else here knows about Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from pipeline.faults import maybe_fault
from pipeline.rows import Row, describe, fail, is_ok


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0  # a fraction packs several workers on one GPU
    memory: int | None = None  # bytes a worker may need at peak (Ray schedules by it)


class Stage:
    name: ClassVar[str] = "stage"
    reads: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()
    batch_size: int = 8  # rows per call

    _ready = False

    def resources(self) -> Resources:
        return Resources()

    @property
    def stateful(self) -> bool:
        """Stages with a setup (or a GPU) run as a pool of long-lived actors; the others as tasks."""
        return type(self).setup is not Stage.setup or self.resources().gpus > 0

    def setup(self) -> None:
        """Runs once per worker before the first call."""

    def teardown(self) -> None:
        """Releases what setup() took (child processes, clients); safe to call twice."""

    def process(self, row: Row) -> Row:
        raise NotImplementedError

    def process_batch(self, rows: list[Row]) -> list[Row]:
        return [self._one(r) for r in rows]

    # ---- written once for every stage ----------------------------------------------------------------------
    def __call__(self, rows: list[Row]) -> list[Row]:
        if not self._ready:
            self.setup()
            self._ready = True
        maybe_fault(self.name)
        todo = [i for i, r in enumerate(rows) if is_ok(r)]
        if not todo:
            return list(rows)
        t0 = time.perf_counter()
        try:
            done = self.process_batch([rows[i] for i in todo])
        except Exception:  # a batch-level failure: find the bad row(s) one by one, keep the good ones
            done = [self._one(rows[i]) for i in todo]
        if len(done) != len(todo):
            raise RuntimeError(f"stage {self.name} returned {len(done)} rows for {len(todo)}")
        per_row = (time.perf_counter() - t0) / len(todo)
        now = time.time()
        out: list = list(rows)
        for i, got in zip(todo, done):
            for r in got if isinstance(got, list) else [got]:  # a list: one row became several (video windows)
                if is_ok(r):
                    r["stage"] = self.name
                    r["timings"] = {self.name: per_row, **(r.get("timings") or {}), "_done": now}
            out[i] = got
        return [r for got in out for r in (got if isinstance(got, list) else [got])]

    def _one(self, row: Row) -> Row:
        try:
            if type(self).process is Stage.process and type(self).process_batch is not Stage.process_batch:
                return self.process_batch([row])[0]
            return self.process(row)  # (neither overridden: NotImplementedError, not endless recursion)
        except Exception as exc:  # bad input must never crash the job
            return fail(row, self.name, describe(exc))
