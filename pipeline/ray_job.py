"""The Ray wiring, and the only module that imports Ray.

    phase 1, per source:  read (Ray Data: CSV/Parquet/JSON files, or listing chunks)
                          -> keys (id, group, bucket)                  tasks
                          -> resume filter, one bucket per call         shuffle on `bucket` (groupby)
                          -> describe (descriptor rows + branch)        tasks
                          all sources -> union -> materialised, split into media / 3d when they differ
    phase 2, per branch:  prepare (fetch + decode | fetch + mesh)       actor pool (3D: a GPU share)
                          -> union -> tokenize (GPU or CPU actors) -> write shards (tasks, on the workers)
    driver:               small shard records -> Store.commit

`map_stage` is the one adapter from a `pipeline.stage.Stage` to a Ray Data task or actor pool. Rows travel between
operators as one pickled `payload` column (plus `id`), so ragged arrays and failed rows never fight Ray's tensor
types; stages see plain dicts. A `RunControl` actor carries the stop request of a graceful interrupt and the
resume counts.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.ledger import LedgerView
from pipeline.rows import FAILED, OK, SKIPPED, Row
from pipeline.sources import (
    DUPLICATE_OF,
    Source,
    described as describe_rows,
    duplicate_keys,
    keyed,
    make_source,
)
from pipeline.sources.ids import bucket_of
from pipeline.sources.tables import (
    FILE_COL,
    LINE_COL,
    csv_header,
    file_labels,
    read_csv_stream,
    read_json_stream,
    read_parquet_file,
)
from pipeline.stage import Stage
from pipeline.storage import filesystem

DESCRIBE_ROWS = 64  # descriptor rows per block after the resume filter (parallelism downstream)
DUP = "duplicate"  # the plan's branch of duplicate rows: failures to record, committed before any sample
BYTES_PER_TOKEN = 130  # shard bytes per token (coords + fp16 latent + list offsets, ~fsq); for sizing
_ENV_PREFIXES = ("PIPELINE_", "AWS_", "GOOGLE_", "HF_", "RAY_AUTH_MODE", "STORAGE_EMULATOR_HOST")


# ---- Ray setup -------------------------------------------------------------------------------------------------


def forwarded_env() -> dict:
    """The environment every worker needs too: pipeline settings and storage credentials/endpoints."""
    node_local = (
        "PIPELINE_DRIVER_PID",
        "PIPELINE_SCRATCH",
        "PIPELINE_REAPER_FOR",  # each node keeps its own
        "PIPELINE_JOB",
    )  # (the job `submit` sent: the driver's alone)
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) and k not in node_local}


def init_ray(ray_cfg):
    """Ray, started or joined. Ray's own progress output (Ray Data's bars or 10 s block-count log, its execution
    plans, the start banner) only with `ray.progress_bars` (`--ray-progress`); PIPELINE_PROGRESS=0 forces it off.
    The driver draws its own bar (pipeline/progress.py)."""
    import logging

    import ray

    if ray.is_initialized():
        return ray
    verbose = ray_cfg.progress_bars and os.environ.get("PIPELINE_PROGRESS", "1") != "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")  # under `ray job submit`: merge with the job's env
    os.environ["PIPELINE_DRIVER_PID"] = str(os.getpid())
    env = {**forwarded_env(), "PIPELINE_DRIVER_PID": str(os.getpid())}
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    kw = dict(
        log_to_driver=False, runtime_env={"env_vars": env}, logging_level=logging.INFO if verbose else logging.WARNING
    )
    # a task killed by Ray's memory monitor is retried without end by default: bounded like any other retry
    # (the driver owns the Ray Data tasks; a fresh local cluster gets it for every process)
    os.environ.setdefault("RAY_task_oom_retries", str(ray_cfg.max_task_retries))
    if address:
        ray.init(address=address, **kw)
    else:  # "local": a fresh cluster (without it Ray joins any cluster it finds on this machine)
        ray.init(
            address="local",
            num_cpus=ray_cfg.num_cpus,
            num_gpus=ray_cfg.num_gpus,
            include_dashboard=False,
            _system_config={"task_oom_retries": ray_cfg.max_task_retries},
            **kw,
        )
        from pipeline import reaper

        reaper.start()  # a killed driver takes this cluster's processes along within a second or so
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    # the console side of Ray Data's progress reporting: its periodic block counts and its hints about them
    # ("progress bars disabled"), and the per-dataset "execution finished" lines; its log file keeps them all
    for name, level in (
        ("ray.data._internal.progress", logging.ERROR),
        ("ray.data._internal.execution.streaming_executor", logging.WARNING),
    ):
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)
    return ray


def cluster(ray) -> tuple[int, int]:
    res = ray.cluster_resources()
    return int(res.get("CPU", 1)), int(res.get("GPU", 0))


def make_control(ray):
    @ray.remote(num_cpus=0)
    class RunControl:
        """Stop flag for a graceful interrupt, and the resume filter's counts."""

        def __init__(self):
            self.stop, self.counts = False, {}
            self.done, self.reasons = {}, {}  # rows out of the tokenizer (progress), failure reasons

        def add_progress(self, counts: dict, reasons: list):
            for k, v in counts.items():
                self.done[k] = self.done.get(k, 0) + v
            for stage, reason, n in reasons:
                if len(self.reasons) < 1000 or (stage, reason) in self.reasons:
                    self.reasons[(stage, reason)] = self.reasons.get((stage, reason), 0) + n

        def get_progress(self) -> tuple[dict, dict]:
            return self.done, self.reasons

        def request_stop(self):
            self.stop = True

        def stopped(self) -> bool:
            return self.stop

        def add(self, source: str, counts: dict):
            c = self.counts.setdefault(source, {})
            for k, v in counts.items():
                c[k] = c.get(k, 0) + v

        def get_counts(self) -> dict:
            return self.counts

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node: a lost worker node must not take the stop flag and counts along
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return RunControl.options(scheduling_strategy=here).remote()


# ---- payload tables ------------------------------------------------------------------------------------------


def to_table(rows: list[Row]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "payload": pa.array([pickle.dumps(r, protocol=5) for r in rows], pa.binary()),
        }
    )


def from_table(batch: pa.Table) -> list[Row]:
    """The rows of a payload table (a payload may be a bundle: a list of rows that travel as one, see _describe)."""
    out: list[Row] = []
    for p in batch.column("payload").to_pylist():
        got = pickle.loads(p)
        out.extend(got) if isinstance(got, list) else out.append(got)
    return out


# ---- the adapter: any Stage -> a Ray Data operator ------------------------------------------------------------


class _Gate:
    """Drops new work once a stop was requested (checked at most every half second)."""

    def __init__(self, control):
        self.control, self.checked, self.stop = control, 0.0, False

    def closed(self) -> bool:
        import time

        import ray

        if self.control is None or self.stop:
            return self.stop
        if time.monotonic() - self.checked > 0.5:
            self.checked = time.monotonic()
            self.stop = bool(ray.get(self.control.stopped.remote()))
        return self.stop


def _report(control, rows: list[Row]) -> None:
    """Outcomes of finished rows to the control actor (the driver's progress bar); fire and forget."""
    counts: dict[str, int] = {}
    reasons: dict[tuple, int] = {}
    for r in rows:
        status = r.get("status", OK)
        counts[status] = counts.get(status, 0) + 1
        if status == FAILED:
            key = (r.get("stage"), (r.get("reason") or "").splitlines()[0][:160] if r.get("reason") else "")
            reasons[key] = reasons.get(key, 0) + 1
    control.add_progress.remote(counts, [[s, m, n] for (s, m), n in reasons.items()])


class StageActor:
    def __init__(self, stage: Stage, control=None, gate: bool = False, report: bool = False):
        self.stage, self.gate = stage, _Gate(control) if gate else None
        self.control = control if report else None
        stage.setup()
        stage._ready = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.gate is not None and self.gate.closed():
            return to_table([])
        rows = self.stage(from_table(batch))
        if self.control is not None:
            _report(self.control, rows)
        return to_table(rows)

    def __del__(self):
        self.stage.teardown()


def _stage_task(batch: pa.Table, stage: Stage, control=None, gate: bool = False) -> pa.Table:
    if gate and _Gate(control).closed():
        return to_table([])
    return to_table(stage(from_table(batch)))


def pool(size) -> tuple[int, int]:
    """(min, max) actors from an int (fixed) or a (min, max) pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def map_stage(
    ds,
    stage: Stage,
    concurrency=None,
    control=None,
    gate: bool = False,
    batch_size: int | None = None,
    report: bool = False,
):
    """The one adapter: a Stage becomes an actor pool (stateful or GPU stages) or tasks, with its declared
    resources and batch size. `concurrency`: actors (int, or (min, max) to autoscale) or concurrent tasks.
    `report`: the rows' outcomes go to the control actor (progress). Tasks get Ray's retries after a lost worker;
    a lost actor is not restarted by Ray (its constructor arguments live in the object store, where a restart
    can fail: ray-project/ray#53727): the execution fails and the driver runs it again (`ray.restarts`)."""
    kw: dict[str, Any] = dict(
        batch_size=batch_size or stage.batch_size, batch_format="pyarrow", zero_copy_batch=True
    ) | remote_args(stage.resources())
    if stage.stateful:
        lo, hi = pool(concurrency or 1)
        # max_restarts=0 has no named parameter in map_batches (Ray 2.60), and passing it through
        # **ray_remote_args is deprecated there; map_batches_internal (DeveloperAPI) takes it as is
        return ds.map_batches_internal(
            StageActor,
            fn_constructor_kwargs={"stage": stage, "control": control, "gate": gate, "report": report},
            compute=ray_data().ActorPoolStrategy(min_size=lo, max_size=hi, initial_size=hi),
            max_restarts=0,
            **kw,
        )
    compute = ray_data().TaskPoolStrategy(size=concurrency) if concurrency else None
    return ds.map_batches(
        _stage_task, fn_kwargs={"stage": stage, "control": control, "gate": gate}, compute=compute, **kw
    )


def remote_args(res) -> dict:
    """A stage's declared resources as Ray Data's remote arguments. A GPU stage of one CPU leaves num_cpus out:
    Ray Data books 1 CPU for a GPU map by itself, and warns ("experimental") whenever both are given."""
    out: dict[str, Any] = {"num_cpus": res.cpus}
    if res.gpus:
        out["num_gpus"] = res.gpus
        if res.cpus == 1.0:
            del out["num_cpus"]
    if res.memory:
        out["memory"] = res.memory
    return out


def ray_data():
    import ray.data

    return ray.data


# ---- sources: read -> keys -> resume filter -> describe --------------------------------------------------------

SMALL_TASK_CPUS = 0.25  # keys, resume filter, describe: light tasks that must not wait behind actor pools
# Tasks take `ray.max_task_retries` (Ray Data retries a task whose worker died without end by default); Ray 2.60's
# map_batches deprecates every remote argument, so they go through map_batches_internal (DeveloperAPI) as is.
READ_CPUS = 0.5


def _keys(raw: pa.Table, source: Source, buckets: int) -> pa.Table:
    out = keyed(source, raw)
    return out.append_column("bucket", pa.array(bucket_of(out.column("group"), buckets), pa.int32()))


def _resume_filter(
    group: pa.Table, view: LedgerView, retry_failed: bool, source: str, control=None, dry_run: bool = False
) -> Iterator[pa.Table]:
    """One bucket of one source: drops what the ledger has done; in a dry run it only counts. Of the rows that
    share an id, the first by position (file, line) is the sample; each other one is a duplicate, failed under a
    key of its own (its source, file and line: `sources.duplicate_keys`), never under the id the first one owns,
    so no commit order (or crash between commits) lets it shadow the sample. Rows come out sorted by group, so
    the clips of one video travel together; duplicates come first, in slices of their own (failed rows: no stage
    downstream spends anything on them)."""
    bucket = group.column("bucket")[0].as_py()
    group = group.sort_by(
        [("id", "ascending"), (FILE_COL, "ascending"), (LINE_COL, "ascending"), ("order", "ascending")]
    )
    uniq, dups = _split_duplicates(group, source)
    todo_parts, counts = [], {"rows": group.num_rows, "duplicate": dups.num_rows, "todo": 0}
    for s in (OK, FAILED, SKIPPED):
        counts[s] = 0
    counts["failed_duplicate"] = 0  # of `failed`: recorded duplicates, which --retry-failed leaves as they are
    known = view.statuses(bucket)
    for part, retry in ((uniq, retry_failed), (dups, False)):  # (a recorded duplicate would fail the same again)
        status = pc.take(known.column("status"), pc.index_in(part.column("id"), value_set=known.column("id")))
        for s in (OK, FAILED, SKIPPED):
            n = pc.sum(pc.fill_null(pc.equal(status, s), False).cast(pa.int64())).as_py() or 0
            counts[s] += n
            if s == FAILED and part is dups:
                counts["failed_duplicate"] += n
        done = pc.fill_null(
            pc.is_in(status, value_set=pa.array([OK, SKIPPED] if retry else [OK, SKIPPED, FAILED])), False
        )
        todo_parts.append(part.filter(pc.invert(done)))
        counts["todo"] += todo_parts[-1].num_rows
    if dry_run:
        yield pa.table({"source": [source], **{k: [v] for k, v in counts.items()}})
        return
    if control is not None:
        control.add.remote(source, counts)
    for todo in todo_parts[::-1]:  # the duplicates first
        todo = todo.sort_by([("group", "ascending"), ("id", "ascending")])
        groups = todo.column("group").to_pylist()
        start = 0
        while start < todo.num_rows:  # slices of about DESCRIBE_ROWS that never split a group
            end = min(start + DESCRIBE_ROWS, todo.num_rows)
            while end < todo.num_rows and groups[end] == groups[end - 1]:
                end += 1
            yield todo.slice(start, end - start)
            start = end


def _split_duplicates(group: pa.Table, source: str) -> tuple[pa.Table, pa.Table]:
    """(the first row of each id, the other rows): both with DUPLICATE_OF, null for the first rows; a duplicate
    gets its own key as its id, and why it is failed (the id it repeats, where that id's row is)."""
    ids = group.column("id").combine_chunks()
    n = len(ids)
    first = np.ones(n, bool)
    if n > 1:
        first[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    uniq = group.filter(pa.array(first))
    uniq = uniq.append_column(DUPLICATE_OF, pa.nulls(uniq.num_rows, pa.string()))
    at = np.flatnonzero(~first)
    if not len(at):
        return uniq, uniq.slice(0, 0)
    idx = np.arange(n)
    owner = np.maximum.accumulate(np.where(first, idx, 0))  # the first row of each row's id
    files = group.column(FILE_COL).to_pylist()
    lines = group.column(LINE_COL).to_pylist()
    id_list = ids.to_pylist()
    keys = duplicate_keys(
        source, [files[i] for i in at], [lines[i] for i in at], [id_list[i] for i in at], list(idx[at] - owner[at])
    )

    def where(i: int) -> str:
        return f"{files[i]}:{lines[i]}" if files[i] is not None and lines[i] is not None else "an earlier row"

    why = [
        f"duplicate of {id_list[o]} (its row: {where(o)}); this row ({where(i)}) repeats that id and is not processed"
        for i, o in zip(at, owner[at])
    ]
    dups = group.take(pa.array(at))
    dups = dups.set_column(dups.schema.get_field_index("id"), "id", pa.array(keys, pa.string()))
    return uniq, dups.append_column(DUPLICATE_OF, pa.array(why, pa.string()))


def _describe(rows: pa.Table, source: Source, bundle_rows: dict | None = None) -> pa.Table:
    """Descriptor rows as a payload table, with the branch (prepare pool) each row goes to. With `bundle_rows`
    (per branch), rows travel in bundles of about one prepare batch, one payload each, and a group (the clips of
    one video) is never split between bundles: one prepare call sees all of a video's clips and downloads it
    once."""
    described = describe_rows(source, rows)
    dups = set()
    if DUPLICATE_OF in rows.column_names and rows.column(DUPLICATE_OF).null_count < rows.num_rows:
        dups = set(rows.filter(pc.is_valid(rows.column(DUPLICATE_OF))).column("id").to_pylist())
    branches = [DUP if r["id"] in dups else "3d" if r.get("modality") == "3d" else "media" for r in described]
    if not bundle_rows:
        return to_table(described).append_column("branch", pa.array(branches, pa.string()))
    groups = rows.column("group").to_pylist() if len(described) == rows.num_rows else list(range(len(described)))
    bundles: list[tuple[str, list]] = []
    current: dict[str, tuple[list, Any]] = {}
    for row, group, branch in zip(described, groups, branches):
        bundle, last = current.get(branch, (None, None))
        if bundle is None or (group != last and len(bundle) >= bundle_rows.get(branch, 1)):
            bundle = []
            bundles.append((branch, bundle))
        bundle.append(row)
        current[branch] = (bundle, group)
    return pa.table(
        {
            "id": pa.array([b[0]["id"] for _, b in bundles], pa.string()),
            "payload": pa.array([pickle.dumps(b, protocol=5) for _, b in bundles], pa.binary()),
            "branch": pa.array([br for br, _ in bundles], pa.string()),
        }
    )


def read_source(ray, source: Source, plan, retries: int = 3):
    """The raw rows of a source as a Ray dataset, read in parallel on the workers (one task per file for table
    files: each row keeps its position, FILE_COL and LINE_COL, for duplicates and unparsable rows)."""
    if plan.format == "items":
        ds = ray.data.from_items(
            [{"item": json.dumps(i)} for i in plan.items], override_num_blocks=max(1, len(plan.items))
        )
        return ds.map_batches_internal(
            _list_chunks,
            fn_kwargs={"source": source},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=SMALL_TASK_CPUS,
            max_retries=retries,
        )
    fs, _ = filesystem(plan.uris[0], source.storage)
    paths = [filesystem(u, source.storage)[1] for u in plan.uris]
    labels = file_labels(plan.uris)
    files = {
        path: {
            "format": plan.format,
            "uri": uri,
            "label": labels[uri],
            "encoding": plan.encodings.get(uri) or "utf8",
            "columns": csv_header(uri, source.storage, plan.encodings.get(uri))
            if plan.format == "csv"
            else plan.columns,
        }
        for path, uri in zip(paths, plan.uris)
    }
    return ray.data.read_datasource(
        _table_datasource()(paths, files=files, filesystem=fs),
        num_cpus=READ_CPUS,
        ray_remote_args={"max_retries": retries},
    )


def _list_chunks(batch: pa.Table, source: Source) -> Iterator[pa.Table]:
    """The raw rows of listing chunks (none: no block)."""
    rows = [r for item in batch.column("item").to_pylist() for r in source.list_chunk(json.loads(item))]
    if rows:
        yield pa.Table.from_pylist(rows)


def _table_datasource():
    """A Ray Data file datasource over `tables.read_csv_stream` (per-file encoding and header),
    `read_json_stream` and `read_parquet_file`: a CSV row or JSON line that does not parse becomes a row of its
    own, failed later, instead of aborting the read; every row has its file's label and its line number."""
    from ray.data.datasource import FileBasedDatasource

    class TableRows(FileBasedDatasource):
        def __init__(self, paths, files: dict, **kw):
            super().__init__(paths, **kw)
            self.files = files

        def _file(self, path: str) -> dict:
            return self.files.get(path) or next(
                v for k, v in self.files.items() if path.endswith(k.lstrip("/")) or k.endswith(path.lstrip("/"))
            )

        def _open_input_source(self, filesystem, path: str, **open_args):
            if self._file(path)["format"] == "parquet":  # random access (the footer first)
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str):
            spec = self._file(path)
            if spec["format"] == "parquet":
                yield from read_parquet_file(f, spec["label"])
            elif spec["format"] == "json":
                yield from read_json_stream(f, spec["uri"], spec["label"], spec["columns"])
            else:
                yield from read_csv_stream(f, spec["uri"], spec["columns"], spec["encoding"], spec["label"])

    return TableRows


def source_dataset(
    ray,
    source: Source,
    view: LedgerView,
    buckets: int,
    retry_failed: bool,
    control=None,
    dry_run: bool = False,
    partitions: int = 16,
    bundle_rows: dict | None = None,
    retries: int = 3,
):
    """One source up to descriptor rows (to do, per the ledger), or up to its counts in a dry run. `retries`:
    Ray's retries of each task after its worker died (Ray Data's default is without end)."""
    ds = read_source(ray, source, source.plan(), retries)
    ds = ds.map_batches_internal(
        _keys,
        fn_kwargs={"source": source, "buckets": buckets},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=SMALL_TASK_CPUS,
        max_retries=retries,
    )
    if source.cfg.limit is not None:
        ds = ds.limit(source.cfg.limit)
    ds = ds.groupby("bucket", num_partitions=partitions).map_groups(
        _resume_filter,
        fn_kwargs={
            "view": view,
            "retry_failed": retry_failed,
            "source": source.name,
            "control": control,
            "dry_run": dry_run,
        },
        batch_format="pyarrow",
        num_cpus=SMALL_TASK_CPUS,
        max_retries=retries,
    )
    if dry_run:
        return ds
    return ds.map_batches_internal(
        _describe,
        fn_kwargs={"source": source, "bundle_rows": bundle_rows},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=SMALL_TASK_CPUS,
        max_retries=retries,
    )


def dry_run_counts(job, view: LedgerView, buckets: int, id_rule: int | None = None) -> dict[str, dict]:
    """Per source: rows, to do, already ok / failed / skipped, duplicate rows (nothing is fetched)."""
    ray = init_ray(job.ray)
    cpus, _ = cluster(ray)
    out: dict[str, dict] = {}
    for cfg in job.sources:
        source = make_source(cfg, job.storage, id_rule)
        ds = source_dataset(
            ray,
            source,
            view,
            buckets,
            retry_failed=False,
            dry_run=True,
            partitions=max(2, cpus),
            retries=job.ray.max_task_retries,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for rec in batch.to_pylist():
                c = out.setdefault(rec.pop("source"), {})
                for k, v in rec.items():
                    c[k] = c.get(k, 0) + v
    return out


# ---- the job -----------------------------------------------------------------------------------------------------


def rows_per_write(job) -> int:
    """Rows per writer call: about one target shard, as a multiple of the tokenizer's batch."""
    if job.write.rows_per_write:
        return job.write.rows_per_write
    b = job.decode.buckets
    per_video = (b.area // 256) * max(1, job.decode.max_frames // 4)
    tokens = min([per_video if "media" in job.branches() else 10**9, 20000 if "3d" in job.branches() else 10**9])
    rows = max(16, min(4096, job.write.shard_bytes // max(1, tokens * BYTES_PER_TOKEN)))
    step = job.tokenize.batch_rows
    return max(step, rows // step * step)


def _write_task(batch: pa.Table, writer) -> pa.Table:
    return pa.table({"record": [json.dumps(writer.write(from_table(batch)))]})


def plan_work(
    job,
    view: LedgerView,
    buckets: int,
    retry_failed: bool,
    control,
    ray,
    split: bool,
    batch_rows: dict,
    id_rule: int | None = None,
) -> dict:
    """Phase 1: every source read, keyed, filtered against the ledger and described, materialised in the object
    store, then split by branch when the branches go to different pools. (The shuffle is a barrier anyway;
    materialising first leaves the whole cluster to it, before phase 2's actor pools take CPUs and GPUs.)"""
    cpus, _ = cluster(ray)
    partitions = max(2, min(cpus, 64))
    parts = [
        source_dataset(
            ray,
            make_source(cfg, job.storage, id_rule, job.allowed_licences()),
            view,
            buckets,
            retry_failed,
            control,
            partitions=partitions,
            bundle_rows=batch_rows,
            retries=job.ray.max_task_retries,
        )
        for cfg in job.sources
    ]
    todo = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()
    out = {}
    bundles = todo.count()
    if not bundles:
        return out
    per_block = bundles_per_block(bundles, cpus)
    for branch in (DUP, "media", "3d") if split else (DUP, "media"):
        want = f"branch == '{branch}'" if split or branch == DUP else f"branch != '{DUP}'"
        ds = todo.filter(expr=want, num_cpus=SMALL_TASK_CPUS)
        ds = ds.repartition(target_num_rows_per_block=per_block).materialize()
        if ds.count():
            out[branch] = ds
    return out


def bundles_per_block(bundles: int, cpus: int, most: int = 32) -> int:
    """Bundles (one prepare call each) per block of the planned dataset: one while there are few (every block can
    go to another actor), up to `most` for big jobs, so a 10M-row job is ~40k blocks, not 1.25M block refs and
    their metadata held by the driver. Prepare still takes one bundle per call; a stop drops the rest of a block."""
    return max(1, min(most, bundles // (8 * max(1, cpus))))


def build(
    job, stages: dict, view: LedgerView, buckets: int, retry_failed: bool, control, ray, id_rule: int | None = None
):
    """The whole job as datasets of writer records (`Work`). 3D rows get a pool of their own only when it has
    resources of its own (a GPU share); otherwise one prepare pool takes every modality."""
    split = stages["3d"].resources() != stages["media"].resources()
    todo = plan_work(
        job,
        view,
        buckets,
        retry_failed,
        control,
        ray,
        split,
        {b: stages[b].batch_size for b in ("media", "3d")},
        id_rule,
    )
    work = Work([])
    if DUP in todo:  # failures only: written and committed before any sample is started
        work.datasets.append(
            todo.pop(DUP).map_batches_internal(
                _write_duplicates,
                fn_kwargs={"writer": stages["writer"], "control": control},
                batch_size=None,
                batch_format="pyarrow",
                num_cpus=job.ray.write_cpus,
                max_retries=job.ray.max_task_retries,
            )
        )
    if not todo:  # nothing new: no actor pool, no model load
        return work
    prepared = [
        map_stage(
            ds, stages[branch], concurrency=stages[f"{branch}_actors"], control=control, gate=True, batch_size=1
        )  # one bundle: about stage.batch_size rows, whole groups
        for branch, ds in todo.items()
    ]
    ds = prepared[0].union(*prepared[1:]) if len(prepared) > 1 else prepared[0]
    ds = map_stage(ds, stages["tokenize"], concurrency=stages["tokenize_actors"], control=control, report=True)
    work.datasets.append(
        ds.map_batches_internal(
            _write_task,
            fn_kwargs={"writer": stages["writer"]},
            batch_size=rows_per_write(job),
            batch_format="pyarrow",
            num_cpus=job.ray.write_cpus,
            max_retries=job.ray.max_task_retries,
        )
    )
    return work


@dataclass
class Work:
    """What `build` plans, datasets of writer records run one after the other: the duplicates' failures first
    (they need no work; committed before any sample starts, so no crash can leave a sample's commit before the
    record of a row that repeats it), then the samples."""

    datasets: list

    def __bool__(self) -> bool:
        return bool(self.datasets)

    def stats(self) -> str:
        return "\n".join(d.stats() for d in self.datasets)


def _write_duplicates(batch: pa.Table, writer, control=None) -> pa.Table:
    rows = from_table(batch)
    if control is not None:
        _report(control, rows)
    return pa.table({"record": [json.dumps(writer.write(rows))]})


def records(work: Work | None) -> Iterator[dict]:
    for ds in work.datasets if work else ():
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for rec in batch.column("record").to_pylist():
                yield json.loads(rec)


def remote_compact(ray, storage, files: list[str]) -> str | None:
    """Ledger compaction on a worker (its memory grows with the rows compacted, not the driver's)."""
    from pipeline.ledger import compact

    return ray.get(ray.remote(num_cpus=SMALL_TASK_CPUS)(compact).remote(storage, files))
