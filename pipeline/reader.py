"""The training-side reader: `TokenReader`, a torch IterableDataset over one version of a token store.

    from pipeline.reader import TokenReader
    reader = TokenReader("out/demo", modality="image", max_tokens=16384, shuffle_seed=0)
    for batch in torch.utils.data.DataLoader(reader, batch_size=None, num_workers=4): ...

What it reads: only committed shards (the store's shard index, `pipeline/store.py`), of one version directory
(several only when named: `version=[...]`), with pyarrow directly, local or any `Storage` URI (s3://, gs://).
The set of shards is fixed when the reader is made and at each `set_epoch`: a shard committed meanwhile by a
running job is read from the next epoch on.

The order, a function of (shards, seed, epoch, rank, world size, workers) only:
1. units of work are row groups; shards are shuffled, then the row groups inside each shard;
2. unit k goes to consumer k mod (world_size x num_workers), consumer = rank x num_workers + worker;
3. a consumer reads `buffer_units` units at a time, shuffles their rows, sorts them by length when packing to a
   token budget (length bucketing), cuts batches (`pipeline/packing.py`) and shuffles the batch order; the last,
   partial batch of a buffer is carried into the next one, so no batch is short except the very last.
Row groups are decoded in `read_threads` threads, `read_ahead` buffers ahead of the one being batched.

Resume: `state_dict()` is (epoch, snapshot, buffer index, batches already given from it, the carried rows as
(unit, row) references). `load_state_dict()` then rebuilds that buffer and skips the batches given, so the rows
after a resume are exactly those an uninterrupted run gives. torchdata's `StatefulDataLoader` calls both in each
worker; with `num_workers=0` a plain loop can call them on the reader itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.packing import Chunk, assemble, plan_batches
from pipeline.storage import Storage, StorageOptions
from pipeline.store import Store, sha256_of, versions

STATE_VERSION = 1
DEFAULT_COLUMNS = ("modality", "caption")


class ShardError(RuntimeError):
    """A committed shard that cannot be read as recorded (corrupt, truncated, missing); the message names it."""


@dataclass(frozen=True)
class ShardRef:
    version: str  # version directory name
    path: str  # relative to the version directory
    rows: int
    row_groups: int
    sha256: str
    modality: str


def open_versions(
    uri: str, options: StorageOptions | dict | None = None, version: str | list[str] | None = None
) -> dict[str, Storage]:
    """{name: Storage} of the version directories to read. `uri` is a version directory or a job's output root;
    a root with several versions needs `version=` (a name, or a list to mix them on purpose)."""
    root = Storage(uri, options)
    if root.exists("version.json"):
        found = {root.root.rstrip("/").rsplit("/", 1)[-1]: root}
    else:
        found = {s.root.rstrip("/").rsplit("/", 1)[-1]: s for s in versions(root)}
    if not found:
        raise FileNotFoundError(f"no token store under {uri} (no version.json there or one level down)")
    if version is None:
        if len(found) > 1:
            raise ValueError(
                f"{uri} holds {len(found)} versions ({', '.join(sorted(found))}): pick one with "
                "version='<name>', or pass a list to read several together"
            )
        return found
    wanted = [version] if isinstance(version, str) else list(version)
    missing = [v for v in wanted if v not in found]
    if missing:
        raise ValueError(f"{uri}: no version {missing}; there are {sorted(found)}")
    return {v: found[v] for v in wanted}


def snapshot(
    stores: dict[str, Storage], modalities: tuple[str, ...] | None, cutoff: dict[str, int] | None = None
) -> tuple[list[ShardRef], dict[str, int]]:
    """The committed shards (sorted), and each version's last commit seq. With `cutoff`, only shards committed
    at or before it (a resumed run sees the shards of the run it resumes)."""
    out, seqs = [], {}
    for name, storage in stores.items():
        store = Store(storage)
        store.load_whole()
        seqs[name] = store.next_seq - 1
        limit = None if cutoff is None else cutoff.get(name, -1)
        for s in store.shards.values():
            if (modalities is None or s.modality in modalities) and (limit is None or s.seq <= limit):
                out.append(ShardRef(name, s.path, s.rows, s.row_groups or 1, s.sha256, s.modality))
    out.sort(key=lambda r: (r.version, r.path))
    return out, (seqs if cutoff is None else dict(cutoff))


def fingerprint(shards: list[ShardRef]) -> str:
    return hashlib.sha256(json.dumps([[s.version, s.path, s.sha256] for s in shards]).encode()).hexdigest()[:16]


class TokenReader(torch.utils.data.IterableDataset):
    """Batches of token rows. Each batch is a dict with `ids` and, packed (default), `latent` [N, C] fp16 (or
    `fsq_indices` with `tokens='fsq_indices'`), `coords` [N, 5] (b, t, x, y, z), `cu_seqlens`, `num_tokens`,
    `pooled`, and the `columns` as lists; `padded=True` gives [B, L, ...] and a `mask` instead.

    Batches are cut by `max_tokens` (a token budget; length-bucketed), `batch_size` (rows), or both. Use it with
    `DataLoader(reader, batch_size=None, num_workers=...)`. `on_error='skip'` skips an unreadable shard's row
    groups with a warning (listed in `errors`) instead of raising `ShardError`."""

    def __init__(
        self,
        path_or_uri: str,
        modality: str | list[str] | None = None,
        max_tokens: int | None = None,
        batch_size: int | None = None,
        shuffle_seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        *,
        version: str | list[str] | None = None,
        storage_options: dict | None = None,
        tokens: str = "latent",
        columns: list[str] | tuple[str, ...] = DEFAULT_COLUMNS,
        sources: list[str] | None = None,
        has_caption: bool | None = None,
        min_tokens: int | None = None,
        max_sample_tokens: int | None = None,
        where: pc.Expression | None = None,
        padded: bool = False,
        with_logvar: bool = False,
        buffer_units: int = 2,
        bucket: bool | None = None,
        drop_last: bool = False,
        on_error: str = "raise",
        verify_sha256: bool = False,
        epoch: int = 0,
        where_columns: list[str] | None = None,
        read_threads: int = 2,
        read_ahead: int = 1,
    ):
        super().__init__()
        if max_tokens is None and batch_size is None:
            batch_size = 1
        if tokens not in ("latent", "fsq_indices"):
            raise ValueError(f"tokens must be 'latent' or 'fsq_indices', got {tokens!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.uri, self.options = path_or_uri, storage_options
        self.modalities = None if modality is None else ((modality,) if isinstance(modality, str) else tuple(modality))
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.seed, self.rank, self.world_size = shuffle_seed, rank, world_size
        self.tokens, self.columns = tokens, [c for c in columns if c not in ("id", "num_tokens")]
        self.padded, self.with_logvar, self.drop_last = padded, with_logvar, drop_last
        self.buffer_units = max(1, buffer_units)
        self.read_threads, self.read_ahead = read_threads, read_ahead  # row groups decoded in threads, ahead of use
        self.bucket = (max_tokens is not None) if bucket is None else bucket
        self.on_error, self.verify_sha256 = on_error, verify_sha256
        self.filter = _filter(sources, has_caption, min_tokens, max_sample_tokens, where)
        self._has = {"sources": sources is not None, "caption": has_caption is not None, "where": where is not None}
        self.stores = open_versions(path_or_uri, storage_options, version)
        self.where_columns = where_columns
        self._pid = os.getpid()
        self.epoch = epoch
        self.shards, self.cutoff = snapshot(self.stores, self.modalities)
        self.errors: list[str] = []
        self._resume: dict | None = None
        self._state: dict | None = None
        self._tokenizers: dict = {}

    # ---- epochs and the plan ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Starts another epoch: a new order, and the shards committed since the last snapshot."""
        self.epoch = epoch
        self.shards, self.cutoff = snapshot(self.stores, self.modalities)
        self._resume = None

    def units(self) -> list[tuple[int, int]]:
        """The epoch's (shard index, row group) units in global order."""
        order = list(range(len(self.shards)))
        rng = np.random.default_rng([self.seed, self.epoch]) if self.seed is not None else None
        if rng is not None:
            order = [order[i] for i in rng.permutation(len(order))]
        out = []
        for si in order:
            groups = np.arange(self.shards[si].row_groups)
            if rng is not None:
                groups = rng.permutation(groups)
            out += [(si, int(g)) for g in groups]
        return out

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    # ---- resumable state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where this reader (this worker, inside a DataLoader) stands; JSON-serialisable."""
        wid, nw = self._worker()
        base = {
            "format": STATE_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "cutoff": self.cutoff,
            "fingerprint": fingerprint(self.shards),
            "rank": self.rank,
            "world_size": self.world_size,
            "worker": wid,
            "num_workers": nw,
        }
        pos = self._state or self._resume or {"group": 0, "skip": 0, "carry": []}
        return {**base, "group": pos["group"], "skip": pos["skip"], "carry": [list(c) for c in pos["carry"]]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_VERSION:
            raise ValueError(f"reader state format {state.get('format')!r}, expected {STATE_VERSION}")
        for key in ("seed", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"reader state is for {key}={state[key]!r}, this reader has {getattr(self, key)!r}")
        self._own_connections()
        self.epoch = state["epoch"]
        self.shards, self.cutoff = snapshot(self.stores, self.modalities, state["cutoff"])
        if fingerprint(self.shards) != state["fingerprint"]:
            raise ValueError(
                "the store's shards changed since this state was saved (a compaction?): the epoch "
                "cannot be resumed exactly; start the next epoch instead"
            )
        self._resume = {
            "group": state["group"],
            "skip": state["skip"],
            "carry": [tuple(c) for c in state["carry"]],
            "worker": state["worker"],
            "num_workers": state["num_workers"],
        }
        self._state = None

    # ---- iteration ---------------------------------------------------------------------------------------------
    def _own_connections(self) -> None:
        """Object-store clients do not survive a fork: a DataLoader worker opens its own."""
        if self._pid != os.getpid():
            self.stores = {k: Storage(s.root, s.options) for k, s in self.stores.items()}
            self._pid = os.getpid()

    def __iter__(self):
        self._own_connections()
        wid, nw = self._worker()
        consumers, me = self.world_size * nw, self.rank * nw + wid
        resume, self._resume = self._resume, None
        if resume is not None and (resume["worker"], resume["num_workers"]) != (wid, nw):
            raise ValueError(
                f"reader state is for worker {resume['worker']} of {resume['num_workers']}, this is "
                f"worker {wid} of {nw}: resume with the same num_workers"
            )
        units = self.units()
        mine = list(range(me, len(units), consumers))  # indices into the epoch's unit list
        groups = [mine[i : i + self.buffer_units] for i in range(0, len(mine), self.buffer_units)]
        start = resume or {"group": 0, "skip": 0, "carry": []}
        carry = list(start["carry"])
        self._state = {"group": start["group"], "skip": start["skip"], "carry": carry}
        pool = ThreadPoolExecutor(self.read_threads) if self.read_threads else None
        cache: dict[int, Chunk | None] = {}
        pending: dict[int, Future] = {}
        try:
            for g in range(start["group"], len(groups)):
                for ahead in groups[g : g + 1 + self.read_ahead]:  # decode the next buffers while this one is used
                    for u in ahead:
                        if pool is not None and u not in cache and u not in pending:
                            pending[u] = pool.submit(self._read, units, u)
                chunks = {u: self._chunk(units, u, cache, pending) for u in groups[g]}
                refs = self._refs(units, carry, cache, pending)
                for u in groups[g]:
                    if chunks[u] is not None:
                        refs += [(chunks[u], i) for i in range(len(chunks[u]))]
                rng = np.random.default_rng([self.seed, self.epoch, me, g]) if self.seed is not None else None
                if rng is not None:
                    refs = [refs[i] for i in rng.permutation(len(refs))]
                lengths = np.array([c.num_tokens[i] for c, i in refs], np.int64)
                batches = plan_batches(lengths, self.max_tokens, self.batch_size, self.bucket)
                last = g == len(groups) - 1
                tail = batches.pop() if batches and not last else None
                if rng is not None:
                    batches = [batches[i] for i in rng.permutation(len(batches))]
                if last and self.drop_last and batches and not self._full(lengths, batches[-1]):
                    batches = batches[:-1]
                carry_in = carry
                skip = start["skip"] if g == start["group"] else 0
                for j in range(skip, len(batches)):
                    batch = assemble(
                        [refs[k] for k in batches[j]], self.tokens, self.padded, self.columns, self.with_logvar
                    )
                    self._state = {"group": g, "skip": j + 1, "carry": carry_in}
                    yield batch
                carry = [] if tail is None else [(refs[k][0].unit, int(refs[k][0].rows[refs[k][1]])) for k in tail]
                self._state = {"group": g + 1, "skip": 0, "carry": carry}
                cache = {u: c for u, c in cache.items() if any(u == cu for cu, _ in carry)}
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._state = {"group": len(groups), "skip": 0, "carry": []}  # this epoch is done: a resume yields nothing

    def _full(self, lengths: np.ndarray, batch: list[int]) -> bool:
        if self.batch_size is not None and len(batch) >= self.batch_size:
            return True
        return self.max_tokens is not None and int(lengths[batch].sum()) >= self.max_tokens

    def _refs(self, units, carry, cache, pending) -> list[tuple[Chunk, int]]:
        out = []
        for u, row in carry:
            chunk = self._chunk(units, u, cache, pending)
            if chunk is None:
                continue
            pos = np.flatnonzero(chunk.rows == row)
            if len(pos) != 1:
                raise ShardError(f"{self._where(units[u])}: row {row} carried from the previous buffer is gone")
            out.append((chunk, int(pos[0])))
        return out

    def _where(self, unit) -> str:
        s = self.shards[unit[0]]
        return f"{self.stores[s.version].uri(s.path)} (row group {unit[1]})"

    # ---- reading one unit ----------------------------------------------------------------------------------------
    def _chunk(self, units, u: int, cache: dict, pending: dict) -> Chunk | None:
        if u not in cache:
            try:
                fut = pending.pop(u, None)
                cache[u] = fut.result() if fut is not None else self._read(units, u)
            except ShardError as exc:
                if self.on_error == "raise":
                    raise
                warnings.warn(f"skipping: {exc}", stacklevel=2)
                self.errors.append(str(exc))
                cache[u] = None
        return cache[u]

    def _read(self, units, u: int) -> Chunk:
        si, rg = units[u]
        ref = self.shards[si]
        storage = self.stores[ref.version]
        where = f"{storage.uri(ref.path)} (row group {rg})"
        try:
            if self.verify_sha256 and sha256_of(storage, ref.path) != ref.sha256:
                raise ShardError(f"{storage.uri(ref.path)}: sha256 differs from the commit record (corrupt shard)")
            with storage.open_input(ref.path) as f:
                pf = pq.ParquetFile(f, page_checksum_verification=True)
                if pf.metadata.num_row_groups != ref.row_groups or pf.metadata.num_rows != ref.rows:
                    raise ShardError(
                        f"{storage.uri(ref.path)}: {pf.metadata.num_rows} rows in "
                        f"{pf.metadata.num_row_groups} row groups, the commit says {ref.rows} in "
                        f"{ref.row_groups} (corrupt or replaced shard)"
                    )
                names = set(pf.schema_arrow.names)
                cols = ["id", "num_tokens", self.tokens, "coords"] + (["logvar"] if self.with_logvar else [])
                cols += [c for c in ("pooled", *self.columns) if c in names and c not in cols]
                cols += [c for c in self._filter_columns(pf.schema_arrow) if c not in cols]
                missing = [c for c in self.columns if c not in names]
                if missing:
                    raise ValueError(f"no column {missing} (columns: {sorted(names)})")
                table = pf.read_row_group(rg, columns=cols)
        except ShardError:
            raise
        except FileNotFoundError as exc:
            raise ShardError(f"{where}: missing ({exc})") from exc
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{where}: unreadable, {type(exc).__name__}: {exc}") from exc
        rows = np.arange(table.num_rows)
        if self.filter is not None:
            table = table.append_column("__row", pa.array(rows))
            table = table.filter(self.filter)
            rows = table.column("__row").to_numpy()
            table = table.drop_columns(["__row"])
        token_cols = [self.tokens, "coords"] + (["logvar"] if self.with_logvar else [])
        table = table.select([c for c in cols if c in token_cols or c in ("id", "num_tokens", "pooled", *self.columns)])
        return Chunk.from_table(u, table, rows, token_cols, self.columns)

    def _filter_columns(self, schema) -> list[str]:
        """Columns the filters read: the built-in ones, and for `where` the listed or all non-token columns."""
        out = [c for c, on in (("source", self._has["sources"]), ("caption", self._has["caption"])) if on]
        if self._has["where"]:
            out += (
                self.where_columns
                if self.where_columns is not None
                else [f.name for f in schema if f.name not in ("coords", "latent", "logvar", "fsq_indices", "pooled")]
            )
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizers"] = {}  # models are rebuilt where they are used
        return state

    # ---- back to pixels ------------------------------------------------------------------------------------------
    def tokenizer(self, version: str | None = None):
        """The tokenizer that made a version's tokens (from its tokenizer.json; weights checked by identity)."""
        from atoken.tokenizer import Tokenizer, tokenizer_identity

        name = version or next(iter(self.stores))
        if name not in self._tokenizers:
            rec = json.loads(self.stores[name].read_bytes("tokenizer.json"))
            got = tokenizer_identity(rec["config"], rec.get("checkpoint"))
            if got["id"] != rec["id"]:
                raise ValueError(
                    f"{self.stores[name].uri('tokenizer.json')}: tokenizer {rec['id']} is recorded, "
                    f"but config {rec['config']} with {rec.get('checkpoint')} is {got['id']}"
                )
            self._tokenizers[name] = Tokenizer.from_files(rec["config"], rec.get("checkpoint"), device="cpu")
        return self._tokenizers[name]

    def decode(self, batch_or_row: dict, version: str | None = None) -> list[np.ndarray]:
        """Pixels or voxels per sample: see `decode`."""
        return decode(batch_or_row, self.tokenizer(version))


def _filter(sources, has_caption, min_tokens, max_sample_tokens, where) -> pc.Expression | None:
    parts = []
    if sources is not None:
        parts.append(pc.field("source").isin(list(sources)))
    if has_caption is not None:
        valid = pc.field("caption").is_valid() & (pc.utf8_length(pc.field("caption")) > 0)
        parts.append(valid if has_caption else ~valid)
    if min_tokens is not None:
        parts.append(pc.field("num_tokens") >= min_tokens)
    if max_sample_tokens is not None:
        parts.append(pc.field("num_tokens") <= max_sample_tokens)
    if where is not None:
        parts.append(where)
    out = None
    for p in parts:
        out = p if out is None else out & p
    return out


def samples_of(batch_or_row: dict) -> list[dict]:
    """Per-sample {modality, coords [n, 4], latent or fsq_indices} from a packed or padded batch, or one row
    (a dict as `datasets` or `pyarrow ... to_pylist()` gives it)."""
    key = "fsq_indices" if batch_or_row.get("latent") is None else "latent"
    if "cu_seqlens" in batch_or_row:
        cu = np.asarray(batch_or_row["cu_seqlens"])
        vals, coords = np.asarray(batch_or_row[key]), np.asarray(batch_or_row["coords"])[:, 1:]
        return [
            {"modality": m, key: vals[a:b], "coords": coords[a:b]}
            for m, a, b in zip(batch_or_row["modality"], cu[:-1], cu[1:])
        ]
    if "mask" in batch_or_row:
        mask = np.asarray(batch_or_row["mask"])
        vals, coords = np.asarray(batch_or_row[key]), np.asarray(batch_or_row["coords"])
        return [
            {"modality": m, key: vals[i][mask[i]], "coords": coords[i][mask[i]]}
            for i, m in enumerate(batch_or_row["modality"])
        ]
    return [
        {
            "modality": batch_or_row["modality"],
            key: np.asarray(batch_or_row[key]),
            "coords": np.asarray(batch_or_row["coords"]),
        }
    ]


def decode(batch_or_row: dict, tokenizer) -> list[np.ndarray]:
    """Decodes tokens back to float arrays in [0, 1]: an image [H, W, 3], a video [T, H, W, 3], a 3D asset's voxel
    features [n, 768] (their voxels are `coords[:, 1:]`; `voxel_grid` places them in 64^3). Batches need the
    `modality` column (a default one)."""
    import torch as th

    from atoken.sparse import VOXEL_DIM, tokens_to_video

    out = []
    for s in samples_of(batch_or_row):
        coords = np.asarray(s["coords"], np.int64)
        if "latent" in s:
            feats = tokenizer.decode([(np.asarray(s["latent"], np.float32), coords)])[0]
        else:
            feats = tokenizer.decode_indices([(np.asarray(s["fsq_indices"], np.int64), coords)])[0]
        if s["modality"] == "3d":
            out.append(((feats[:, :VOXEL_DIM] + 1) / 2).clip(0, 1))
            continue
        video = ((tokens_to_video(th.from_numpy(feats), th.as_tensor(coords)).numpy() + 1) / 2).clip(0, 1)
        out.append(video[0] if s["modality"] == "image" else video)
    return out


def voxel_grid(coords, values, size: int = 64) -> np.ndarray:
    """A 3D row's per-token values placed in a dense [size, size, size, C] grid (coords [n, 4] = (1, x, y, z),
    or [n, 3]); empty voxels are 0."""
    c = np.asarray(coords, np.int64)
    c = c[:, 1:] if c.shape[1] == 4 else c
    v = np.asarray(values)
    grid = np.zeros((size, size, size, v.shape[1]), v.dtype)
    grid[c[:, 0], c[:, 1], c[:, 2]] = v
    return grid
