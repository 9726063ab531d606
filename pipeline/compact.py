"""`compact`: merges the small shards that incremental runs leave behind, under the same commit protocol.

A group of small shards of one modality is checked against its recorded sha256, streamed row group by row group
into one staged shard, and committed by a record that removes the old shards and moves the new one in: the old
ones go first, so a reader that globs `data/` may briefly miss those rows but never sees one twice, and a crash
at any point is rolled forward on the next open. The ledger records outcomes, not shard paths, so it is untouched.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store import Store, sha256_of
from pipeline.writer import WriteConfig, _Hashing


def plan(store: Store, small_bytes: int, target_bytes: int) -> list[list[str]]:
    """Groups (in commit order) of at least two small shards of one modality, each about target_bytes."""
    groups = []
    by_mod: dict[str, list] = {}
    for s in sorted(store.shards.values(), key=lambda s: (s.seq, s.path)):
        if s.bytes < small_bytes:
            by_mod.setdefault(s.modality, []).append(s)
    for shards in by_mod.values():
        cur, size = [], 0
        for s in shards:
            cur.append(s.path)
            size += s.bytes
            if size >= target_bytes:
                groups.append(cur)
                cur, size = [], 0
        if len(cur) > 1:
            groups.append(cur)
    return [g for g in groups if len(g) > 1]


def compact(store: Store, run_id: str, cfg: WriteConfig, small_bytes: int | None = None) -> dict:
    """Merges small shards; returns counts (groups, shards before/after, problems)."""
    small = small_bytes or cfg.shard_bytes // 2
    out = {"groups": 0, "merged_shards": 0, "problems": []}
    for k, group in enumerate(plan(store, small, cfg.shard_bytes)):
        shards = [store.shards[p] for p in group]
        bad = [s.path for s in shards if sha256_of(store.storage, s.path) != s.sha256]
        if bad:  # never spread a damaged shard into a new one
            out["problems"].append(f"not merged (hash mismatch): {', '.join(bad)}")
            continue
        rel = f"staging/{run_id}/compact-{k}.parquet"
        sink = _Hashing(store.storage.open_output(rel))
        rows = groups_written = 0
        writer, pending = None, []

        def flush():
            nonlocal groups_written
            if pending:
                t = pa.concat_tables(pending)
                writer.write_table(t, row_group_size=t.num_rows)
                groups_written += 1
                pending.clear()

        for s in shards:
            with store.storage.open_input(s.path) as f:
                pf = pq.ParquetFile(f, page_checksum_verification=True)
                if writer is None:
                    writer = pq.ParquetWriter(
                        sink,
                        pf.schema_arrow,
                        compression=None if cfg.compression == "none" else cfg.compression,
                        write_page_checksum=True,
                    )
                for i in range(pf.num_row_groups):  # re-cut into row groups of about row_group_bytes
                    t = pf.read_row_group(i)
                    rows += t.num_rows
                    if pending and sum(p.nbytes for p in pending) + t.nbytes > cfg.row_group_bytes:
                        flush()
                    pending.append(t)
        flush()
        writer.close()
        sink.close()
        store.storage.sync(rel)
        record = {
            "op": "compact",
            "removes": group,
            "shards": [
                {
                    "staging": rel,
                    "modality": shards[0].modality,
                    "rows": rows,
                    "bytes": sink.n,
                    "sha256": sink.h.hexdigest(),
                    "row_groups": groups_written,
                }
            ],
        }
        store.commit(record, run_id)
        out["groups"] += 1
        out["merged_shards"] += len(group)
    store.checkpoint()
    return out
