"""Row helpers shared by every stage.

A row is a plain dict. It always carries `id`, `modality`, `source`, `status` (ok|failed|skipped), `stage`
(the last stage that touched it) and `error` (None unless failed/skipped). A stage never raises for bad input:
it returns the row marked failed, and later stages pass such rows through untouched.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
MAX_ERROR_CHARS = 500


def new_row(id: str, modality: str, source: str, **fields: Any) -> dict:
    return {"id": id, "modality": modality, "source": source, "status": OK, "stage": "source", "error": None,
            **fields}


def fail(row: dict, stage: str, reason: str) -> dict:
    """Return a copy of `row` marked failed at `stage` with a readable reason."""
    return {**row, "status": FAILED, "stage": stage, "error": str(reason)[:MAX_ERROR_CHARS]}


def skip(row: dict, stage: str, reason: str) -> dict:
    return {**row, "status": SKIPPED, "stage": stage, "error": str(reason)[:MAX_ERROR_CHARS]}


def is_ok(row: dict) -> bool:
    return row.get("status", OK) == OK


def describe(exc: BaseException) -> str:
    """'ValueError: message' (or just the type name when the message is empty)."""
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def stage(name: str) -> Callable:
    """Decorator for `fn(row, *args) -> row`: passes non-ok rows through, turns exceptions into a failed row,
    and records `name` as the row's stage on success."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(row: dict, *args: Any, **kwargs: Any) -> dict:
            if not is_ok(row):
                return row
            try:
                out = fn(row, *args, **kwargs)
            except Exception as exc:  # bad input must never crash the pipeline
                return fail(row, name, describe(exc))
            if is_ok(out):
                out["stage"] = name
            return out
        return run
    return wrap
