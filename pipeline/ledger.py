"""The ledger: every sample's outcome (ok | failed | skipped) as Parquet in the store, read by hash bucket on the
workers, so resume never holds the ids on the driver and its cost per bucket stays small.

Layout, under the version directory:
    ledger/log/<seq:010d>.parquet           one fragment per commit (written by a writer, moved in by the commit)
    ledger/levels/<first>-<last>-<n>.parquet
                                            compacted fragments of commits first..last (n input files): one row per
                                            id, sorted by (bucket, id), row groups cut at bucket boundaries, so
                                            reading one bucket reads ~1 group
`compact` turns fragments (or levels) into one level, then deletes its inputs: a crash in between leaves the same
outcome twice, which is harmless (an id's status is decided by priority: ok > skipped > failed, then the latest
commit), never a loss. A `requeued` outcome (a damaged shard un-committed by `verify --repair`) sets aside
every earlier outcome of its id, so the id is to do again; what the redo records later decides. The schema is
`schemas.tokens.ledger_schema`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.storage import Storage
from schemas.tokens import REQUEUED, ledger_schema

LOG, LEVELS = "ledger/log", "ledger/levels"
PRIORITY = {"failed": 1, "skipped": 2, "ok": 3}
ROW_GROUP_ROWS = 65536
MAX_LEVELS = 8
_SEQ = re.compile(r"(\d{10})\.parquet$")
_SPAN = re.compile(r"(\d{10})(?:-(\d{10})-\d+)?\.parquet$")


def fragment_path(seq: int) -> str:
    return f"{LOG}/{seq:010d}.parquet"


def seq_span(rel: str) -> tuple[int, int] | None:
    """The commits a ledger file covers, from its name: a fragment its own seq, a level `<first>-<last>-<n>`."""
    m = _SPAN.search(rel)
    return None if not m else (int(m.group(1)), int(m.group(2) or m.group(1)))


def write_table(storage: Storage, rel: str, table: pa.Table, row_group_rows: int | None = None) -> None:
    with storage.open_output(rel) as f:
        pq.write_table(
            table,
            f,
            compression="zstd",
            row_group_size=row_group_rows or max(1, table.num_rows),
            write_page_checksum=True,
        )


@dataclass(frozen=True)
class LedgerView:
    """A snapshot of the ledger files, picklable for the workers that filter a bucket against it."""

    root: str
    options: dict
    files: tuple[str, ...]

    def statuses(self, bucket: int) -> pa.Table:
        """(id, status) of every recorded id in `bucket`, one row per id (the deciding outcome)."""
        storage = Storage(self.root, self.options)
        parts = [read_bucket(storage, f, bucket) for f in self.files]
        parts = [p for p in parts if p.num_rows]
        if not parts:
            return pa.table({"id": pa.array([], pa.string()), "status": pa.array([], pa.string())})
        return deduplicate(pa.concat_tables(parts)).select(["id", "status"])


def read_bucket(storage: Storage, rel: str, bucket: int, columns=("id", "status", "seq", "bucket")) -> pa.Table:
    """Rows of one bucket from a ledger file, reading only the row groups whose bucket range covers it."""
    with storage.open_input(rel) as f:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        col = pf.schema_arrow.get_field_index("bucket")
        groups = []
        for i in range(pf.num_row_groups):
            st = pf.metadata.row_group(i).column(col).statistics
            if st is None or not st.has_min_max or st.min <= bucket <= st.max:
                groups.append(i)
        if not groups:
            return pa.table({c: pa.array([], ledger_schema().field(c).type) for c in columns})
        table = pf.read_row_groups(groups, columns=list(columns))
    table = _with_seq(table, rel)
    return table.filter(pc.equal(table.column("bucket"), bucket))


def _with_seq(table: pa.Table, rel: str) -> pa.Table:
    """Fragments are written before their commit has a number: their seq comes from the file name."""
    m = _SEQ.search(rel)
    if rel.startswith(LOG) and m:
        i = table.schema.get_field_index("seq")
        table = table.set_column(i, table.schema.field(i), pa.array(np.full(table.num_rows, int(m.group(1)), np.int64)))
    return table


def deduplicate(table: pa.Table) -> pa.Table:
    """One row per id: the highest priority status, then the latest commit; outcomes older than an id's latest
    `requeued` one do not count."""
    requeued = pc.equal(table.column("status"), REQUEUED)
    if pc.any(requeued).as_py():
        last = table.filter(requeued).group_by("id").aggregate([("seq", "max")]).rename_columns(["id", "_rq"])
        table = table.join(last, "id", join_type="left outer")
        keep = pc.or_kleene(pc.is_null(table.column("_rq")), pc.greater_equal(table.column("seq"), table.column("_rq")))
        table = table.filter(keep).drop_columns(["_rq"])
    prio = pc.fill_null(pc.index_in(table.column("status"), value_set=pa.array(list(PRIORITY))), -1)
    table = table.append_column("_prio", prio)
    table = table.sort_by([("id", "ascending"), ("_prio", "descending"), ("seq", "descending")])
    ids = table.column("id").combine_chunks()
    if len(ids) > 1:
        first = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
        keep = np.concatenate([[True], first])
        table = table.filter(pa.array(keep))
    return table.drop_columns(["_prio"])


class Ledger:
    """The ledger files of one store; the driver only lists and compacts them (compaction may run remotely)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def fragments(self) -> list[str]:
        return [e.path for e in self.storage.list(LOG) if e.path.endswith(".parquet")]

    def levels(self) -> list[str]:
        return [e.path for e in self.storage.list(LEVELS) if e.path.endswith(".parquet")]

    def view(self) -> LedgerView:
        return LedgerView(self.storage.root, self.storage.options.model_dump(), tuple(self.levels() + self.fragments()))

    def covers(self, seq: int) -> bool:
        """True if a level holds the fragment of commit `seq` (a fragment compacted since its commit)."""
        return any(sp and sp[0] <= seq <= sp[1] for sp in map(seq_span, self.levels()))

    def plan_compaction(self) -> list[list[str]]:
        """Groups of files to compact now: all fragments into one level; all levels into one when too many."""
        jobs = []
        frags = self.fragments()
        if frags:
            jobs.append(frags)
        if len(self.levels()) + bool(frags) > MAX_LEVELS:
            jobs = [self.levels() + frags]
        return jobs


def compact(storage: Storage, files: list[str]) -> str | None:
    """Merges ledger files into one level (written first, inputs deleted after). Returns its path."""
    if not files:
        return None
    tables = []
    for rel in files:
        with storage.open_input(rel) as f:
            table = pq.read_table(f, page_checksum_verification=True)
            tables.append(_with_seq(table.cast(ledger_schema(), safe=False), rel))
    table = deduplicate(pa.concat_tables(tables)).sort_by([("bucket", "ascending"), ("id", "ascending")])
    table = table.cast(ledger_schema())
    seqs = pc.min_max(table.column("seq")).as_py() if table.num_rows else {"min": 0, "max": 0}
    spans = [seq_span(rel) for rel in files]  # name the commits of the inputs (not of the rows that won)
    if all(spans):
        seqs = {"min": min(a for a, _ in spans), "max": max(b for _, b in spans)}
    out = f"{LEVELS}/{seqs['min']:010d}-{seqs['max']:010d}-{len(files):06d}.parquet"
    write_levels(storage, out, table)
    for rel in files:
        if rel != out:
            storage.delete(rel)
    return out


def write_levels(storage: Storage, rel: str, table: pa.Table) -> None:
    """Row groups of ~ROW_GROUP_ROWS rows, cut only at bucket boundaries."""
    buckets = table.column("bucket").to_numpy()
    cuts, start = [0], 0
    edges = np.flatnonzero(np.diff(buckets)) + 1 if len(buckets) else np.array([], int)
    for e in edges:
        if e - start >= ROW_GROUP_ROWS:
            cuts.append(int(e))
            start = e
    cuts.append(table.num_rows)
    with storage.open_output(rel) as f:
        with pq.ParquetWriter(f, ledger_schema(), compression="zstd", write_page_checksum=True) as w:
            for a, b in zip(cuts[:-1], cuts[1:]):
                if b > a:
                    w.write_table(table.slice(a, b - a), row_group_size=b - a)
            if table.num_rows == 0:
                w.write_table(table)


def read_all(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """Every id's deciding outcome (for `status` and `verify`; memory grows with the store)."""
    led = Ledger(storage)
    tables = []
    for rel in led.levels() + led.fragments():
        with storage.open_input(rel) as f:
            table = pq.read_table(f, page_checksum_verification=True)
            tables.append(_with_seq(table.cast(ledger_schema(), safe=False), rel))
    if not tables:
        return ledger_schema().empty_table()
    table = deduplicate(pa.concat_tables(tables))
    return table.select(columns) if columns else table
