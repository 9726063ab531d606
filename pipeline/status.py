"""`python -m pipeline status`: what one version store holds and why samples failed, as text or JSON.

`report()` gathers it (the commit records, the ledger, and the licence columns of the shards), `render()`
prints it. Failed samples are listed with their id, uri, stage and reason, filtered by stage and by a reason substring.
"""

from __future__ import annotations

import collections

import pyarrow.compute as pc

from pipeline.ledger import read_all
from pipeline.licences import summary as licence_summary
from pipeline.store import Store


def _read(store: Store, name: str) -> dict:
    return store.read_json(name) if store.storage.exists(name) else {}


def report(store: Store, stage: str | None = None, reason: str | None = None, reasons: int = 20) -> dict:
    """Counts per modality, outcomes, outcomes by stage, top reasons, kinds, and the failed samples (filtered)."""
    from pipeline.ytdlp import reason_kind

    store.load()
    tok, pre = _read(store, "tokenizer.json"), _read(store, "preprocess.json")
    table = read_all(store.storage, ["id", "status", "stage", "reason", "uri", "source"])
    total = table.num_rows
    status = table.column("status").to_pylist()
    bad = table.filter(pc.invert(pc.equal(table.column("status"), "ok")))
    rows = bad.to_pylist()
    by_stage = collections.Counter((r["status"], r["stage"]) for r in rows)
    top = collections.Counter(
        (r["status"], r["stage"], (r["reason"] or "").splitlines()[0][:200] if r["reason"] else "") for r in rows
    )
    kinds = collections.Counter((r["status"], reason_kind(r["stage"], r["reason"])) for r in rows)
    needle = (reason or "").lower()
    failed = [
        {k: r[k] for k in ("id", "uri", "source", "stage", "reason")}
        for r in rows
        if r["status"] == "failed" and (stage is None or r["stage"] == stage) and needle in (r["reason"] or "").lower()
    ]
    return {
        "store": store.uri,
        "tokenizer": {
            "id": tok.get("id"),
            "config": tok.get("config"),
            "checkpoint": tok.get("checkpoint"),
            "discrete": tok.get("discrete"),
        },
        "preprocess": {"id": pre.get("id"), "settings": pre.get("settings", {})},
        "damaged": dict(store.damaged),
        "modalities": store.counts(),
        "licences": licence_summary(store.storage, store.shards),
        "samples": total,
        "outcomes": dict(sorted(collections.Counter(status).items())),
        "by_stage": [{"status": s, "stage": st, "n": n} for (s, st), n in by_stage.most_common()],
        "reasons": [{"status": s, "stage": st, "reason": r, "n": n} for (s, st, r), n in top.most_common(reasons)],
        "kinds": [{"status": s, "kind": k, "n": n} for (s, k), n in kinds.most_common()],
        "failed": sorted(failed, key=lambda r: r["id"]),
        "filtered": stage is not None or bool(reason),
    }


def render(rep: dict, failed: bool = False, limit: int = 0) -> str:
    tok, pre = rep["tokenizer"], rep["preprocess"]
    lines = [rep["store"], f"  tokenizer {tok['id']} (config {tok['config']}), preprocessing {pre['id']}"]
    for path, why in rep["damaged"].items():
        lines.append(f"  damaged {path}: {why} (`python -m pipeline verify {rep['store']} --repair`)")
    for m, c in rep["modalities"].items():
        lines.append(f"  {m}: {c['rows']} samples in {c['shards']} shards, {c['bytes'] / 1e6:.2f} MB")
    for col, got in rep["licences"].items():  # licence, tokenizer_licence, renderer
        if set(got) != {"none"}:
            lines.append(f"  {col}: " + ", ".join(f"{v} {n}" for v, n in got.items()))
    lines.append("  outcomes: " + (", ".join(f"{k} {v}" for k, v in rep["outcomes"].items()) or "none yet"))
    if rep["by_stage"]:
        lines.append("  by stage: " + ", ".join(f"{b['status']} at {b['stage']} {b['n']}" for b in rep["by_stage"]))
    for r in rep["reasons"]:
        lines.append(f"  {r['n']:6d} {r['status']} at {r['stage']}: {r['reason'][:120]}")
    if rep["kinds"]:
        total = max(rep["samples"], 1)
        lines.append(
            "  by kind: "
            + ", ".join(f"{k['status']} {k['kind']} {k['n']} ({k['n'] / total:.1%})" for k in rep["kinds"])
        )
    if failed:
        shown = rep["failed"][:limit] if limit else rep["failed"]
        lines.append(
            f"  failed samples{' (filtered)' if rep.get('filtered') else ''}: {len(rep['failed'])}"
            + (f", first {len(shown)} shown" if len(shown) < len(rep["failed"]) else "")
        )
        for r in shown:
            lines.append(f"    {r['id']}\t{r['uri']}\t{r['stage']}: {(r['reason'] or '').splitlines()[0][:200]}")
    n_failed = rep["outcomes"].get("failed", 0)
    if n_failed:
        hint = "" if failed else f"`python -m pipeline status {rep['store']} --failed` lists them; "
        lines.append(f"  {n_failed} failed: {hint}rerun the job with --retry-failed to try them again")
    return "\n".join(lines)
