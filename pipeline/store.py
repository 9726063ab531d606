"""The token store: one version directory (tokenizer + preprocessing identity) of immutable Parquet shards,
the commit records that name them, the ledger of every sample's outcome, and the dataset card.

    data/<modality>/part-<seq:06d>-<k>.parquet    shards: only committed files ever appear here
    manifest/<seq:010d>.json                      one commit record per commit (written atomically)
    manifest/checkpoint-<seq:010d>.parquet        every shard committed up to seq (older records are folded in)
    ledger/                                       per-sample outcomes (pipeline/ledger.py)
    staging/<run>/<attempt>/                      what writers on the workers wrote, not yet committed
    runs/<run>.json, version.json, tokenizer.json, preprocess.json, README.md, qa/, quarantine/

The commit protocol (docs/design.md), with one live driver (pipeline/lock.py):
1. a writer task writes its shards and its ledger fragment under `staging/<run>/<attempt>/` and returns a small
   record; nothing it writes is visible to readers of `data/`;
2. the driver writes `manifest/<seq>.json` naming every move `staging -> final`: this is the commit point;
3. the driver performs the moves (a rename on local disk, a server-side copy + delete on object stores).
A crash before 2 leaves only staging garbage (collected on the next open); a crash after 2 is rolled forward on
the next open. Files in `data/` that no commit names are moved to `quarantine/`. So a reader that globs
`data/**/*.parquet` never sees a partial file, a duplicate row or a row from an attempt that was not committed.
Damage is found, never trusted: a corrupt commit record (other than a torn last one) or shard index stops the
open (`StoreDamaged`); a shard whose size differs from its record is un-committed and its samples requeued
(`Store.repair`, also what `verify --repair` does after re-hashing every shard).
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.faults import maybe_fault
from pipeline.ledger import Ledger, fragment_path, read_all, seq_span
from pipeline.licences import card_section
from pipeline.storage import Storage, StorageError
from schemas.tokens import MODALITIES, REQUEUED, SCHEMA_VERSION, ledger_table, shard_index_schema

FORMAT = "atoken-cache/2"
MANIFEST = "manifest"
CHECKPOINT_EVERY = 256


class StoreDamaged(StorageError):
    """The committed state cannot be read as written: the start stops, and says how to repair it."""


def repair_hint(uri: str) -> str:
    return (
        f"nothing was changed; `python -m pipeline verify {uri} --repair` un-commits what is damaged (kept "
        "under quarantine/) so that the next run redoes exactly those samples"
    )


class DamagedFile(OSError):
    """A store file that is missing, truncated or fails its Parquet page checksums (the message names it)."""


def read_parquet(storage: Storage, rel: str, columns=None, present_only: bool = False) -> pa.Table:
    """A whole Parquet file of the store, read with page checksum verification (every shard and ledger file is
    written with page checksums): a flipped bit is an error naming the file, never wrong data. `present_only`:
    of `columns`, read those the file has (older schema versions lack some)."""
    try:
        with storage.open_input(rel) as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            if present_only:
                columns = [c for c in columns if c in pf.schema_arrow.names]
            return pf.read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise DamagedFile(f"{storage.uri(rel)}: {type(exc).__name__}: {exc}") from exc


def sha256_of(storage: Storage, rel: str) -> str:
    h = hashlib.sha256()
    with storage.open_input(rel) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Shard:
    path: str
    modality: str
    rows: int
    bytes: int
    sha256: str
    row_groups: int = 1
    seq: int = 0


@dataclass
class Recovery:
    rolled_forward: int = 0
    quarantined: list[str] = field(default_factory=list)
    staging_removed: int = 0
    problems: list[str] = field(default_factory=list)


class Store:
    """One version directory. Readers may open it any time; only the lock holder calls the writing methods."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.ledger = Ledger(storage)
        self.shards: dict[str, Shard] = {}
        self.next_seq = 0
        self.checkpoint_seq = -1
        self._records_since_checkpoint: list[str] = []
        self.damaged: list[str] = []  # commit records that could not be parsed (by load)

    @property
    def uri(self) -> str:
        return self.storage.root

    # ---- identity ---------------------------------------------------------------------------------------------
    def init(self, version: dict, tokenizer: dict, preprocess: dict) -> None:
        """Writes the identity files once (a store's identity never changes)."""
        for name, obj in (
            ("version.json", {"format": FORMAT, "schema_version": SCHEMA_VERSION, **version}),
            ("tokenizer.json", tokenizer),
            ("preprocess.json", preprocess),
        ):
            if not self.storage.exists(name):
                self.storage.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, name: str) -> dict:
        return json.loads(self.storage.read_bytes(name))

    # ---- reading the committed state --------------------------------------------------------------------------
    def load(self) -> list[dict]:
        """Reads the checkpoint and the commit records after it; returns those records (oldest first). What cannot
        be parsed is listed in `damaged` (path -> why), not applied; a damaged record's number is not reused."""
        self.shards, records = {}, []
        self.checkpoint_seq, self._records_since_checkpoint, self.damaged = -1, [], {}
        entries = self.storage.list(MANIFEST)
        checkpoints = sorted(e.path for e in entries if e.path.rsplit("/", 1)[-1].startswith("checkpoint-"))
        if checkpoints:
            self.checkpoint_seq = int(checkpoints[-1].rsplit("-", 1)[-1].split(".")[0])
            try:
                for rec in read_parquet(self.storage, checkpoints[-1]).to_pylist():
                    self.shards[rec["path"]] = Shard(**rec)
            except (OSError, TypeError) as exc:
                self.damaged[checkpoints[-1]] = f"unreadable shard index: {exc}"
                self.shards = {}
        self.next_seq = self.checkpoint_seq + 1
        for e in entries:
            name = e.path.rsplit("/", 1)[-1]
            if not name.endswith(".json") or not name[:-5].isdigit() or int(name[:-5]) <= self.checkpoint_seq:
                continue
            self.next_seq = max(self.next_seq, int(name[:-5]) + 1)
            try:
                rec = json.loads(self.storage.read_bytes(e.path))
                if not isinstance(rec, dict) or rec.get("seq") != int(name[:-5]):
                    raise ValueError(
                        f"its seq {rec.get('seq') if isinstance(rec, dict) else rec!r} is not {int(name[:-5])}"
                    )
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
                self.damaged[e.path] = f"corrupt commit record: {type(exc).__name__}: {exc}"
                continue
            records.append(rec)
        records.sort(key=lambda r: r["seq"])
        for rec in records:
            self._apply(rec)
            self._records_since_checkpoint.append(f"{MANIFEST}/{rec['seq']:010d}.json")
        for rel in self.ledger.levels() + self.ledger.fragments():  # never reuse a number the ledger holds
            span = seq_span(rel)
            if span:
                self.next_seq = max(self.next_seq, span[1] + 1)
        return records

    def load_whole(self) -> list[dict]:
        """`load` for readers: a damaged manifest is an error (DamagedFile, with the repair command), not a
        silently smaller set of shards."""
        records = self.load()
        if self.damaged:
            raise DamagedFile(
                f"{self.uri}: "
                + "; ".join(f"{p}: {why}" for p, why in self.damaged.items())
                + f". Run `python -m pipeline verify {self.uri} --repair`"
            )
        return records

    def _apply(self, rec: dict) -> None:
        for path in rec.get("removes", []):
            self.shards.pop(path, None)
        for d in rec.get("drops", []):  # verify --repair: un-committed, its samples requeued
            self.shards.pop(d["path"], None)
        for s in rec.get("shards", []):
            self.shards[s["path"]] = Shard(**{**s, "seq": rec["seq"]})

    def _torn_last(self, records: list[dict]) -> str | None:
        """The one damaged record that may be dropped: the last one, when nothing of its commit was moved in
        (then it is a write that never completed). None otherwise."""
        if len(self.damaged) != 1:
            return None
        path = next(iter(self.damaged))
        if not path.endswith(".json"):
            return None
        seq = int(path.rsplit("/", 1)[-1][:-5])
        if records and records[-1]["seq"] > seq:
            return None
        moved = (
            self.storage.exists(fragment_path(seq))
            or self.ledger.covers(seq)
            or any(
                e.path.rsplit("/", 1)[-1].startswith(f"part-{seq:06d}-")
                for m in MODALITIES
                for e in self.storage.list(f"data/{m}")
            )
        )
        return None if moved else path

    # ---- opening for a run: roll forward, check sizes, quarantine, collect garbage --------------------------
    def recover(self, run_id: str | None = None) -> Recovery:
        """With the lock held. A damaged record in the middle of the manifest or a damaged shard index stops it
        (StoreDamaged, with the repair command); a torn last record is set aside. Committed shards whose size
        differs from their record, or that are gone, are un-committed and their samples requeued (`repair`)."""
        out = Recovery()
        records = self.load()
        torn = self._torn_last(records)
        if torn:
            self.storage.move(torn, f"quarantine/torn-{int(time.time())}/{torn}")
            out.problems.append(
                f"dropped a torn last commit record {torn} ({self.damaged.pop(torn)}); nothing of "
                "it was moved in, its samples are redone"
            )
        if not self.storage.list(MANIFEST) and (self.ledger.levels() or self.ledger.fragments()):
            self.damaged[f"{MANIFEST}/"] = "missing, but the ledger records finished samples"
        if self.damaged:
            raise StoreDamaged(
                f"{self.uri}: "
                + "; ".join(f"{p}: {why}" for p, why in self.damaged.items())
                + f". {repair_hint(self.uri)}"
            )
        for rec in records:
            out.rolled_forward += self._finish_moves(rec, out.problems)
        sizes = {e.path: e.size for e in self.storage.list("data", recursive=True)}
        damaged = {
            p: ("missing" if sizes.get(p) is None else f"{sizes[p]} bytes, the commit says {s.bytes}")
            for p, s in self.shards.items()
            if sizes.get(p) != s.bytes
        }
        if damaged:
            res = self.repair(damaged, run_id or "recover")
            out.problems.append(
                f"{len(res['drops'])} damaged shards un-committed ({res['quarantine']}); "
                f"{res['requeued']} samples requeued"
            )
        self.checkpoint()  # fold the records now that their moves are done: none outlives a later compaction
        known = set(self.shards)
        for e in self.storage.list("data", recursive=True):  # paths are relative to the store root
            rel = e.path
            if rel not in known:  # not named by any commit: a foreign or copied file, kept out of readers' sight
                dest = f"quarantine/{int(time.time())}/{rel}"
                self.storage.move(rel, dest)
                out.quarantined.append(rel)
        for e in self.storage.list("staging", recursive=True):
            if run_id is None or not e.path.startswith(f"staging/{run_id}/"):
                self.storage.delete(e.path)
                out.staging_removed += 1
        return out

    def _finish_moves(self, rec: dict, problems: list[str]) -> int:
        """Completes a commit's removes and moves (idempotent). Returns how many moves were done now."""
        done = 0
        for path in rec.get("removes", []):
            self.storage.delete(path)
        for src, dst in rec.get("moves", []):
            if dst.startswith("data/") and dst not in self.shards:  # removed by a later commit (compaction)
                continue
            if self.storage.exists(dst):
                continue
            if self.storage.exists(src):
                self.storage.move(src, dst)
                done += 1
            elif dst.startswith("ledger/") and self.ledger.covers(rec["seq"]):
                continue  # the fragment was moved in, then compacted into a level
            elif rec.get("op") == "repair" and dst.startswith("quarantine/"):
                continue  # a damaged file that is gone: nothing to keep
            else:
                problems.append(f"commit {rec['seq']}: {dst} is missing and its staged copy {src} is gone")
        if rec.get("op") == "repair":
            self._write_quarantine_record(rec)
        return done

    # ---- repair: un-commit damaged shards, requeue their samples --------------------------------------------
    def repair(self, damaged: dict[str, str], run_id: str) -> dict:
        """One commit (op `repair`) that un-commits the `damaged` shards (path -> why; they move to
        `quarantine/repair-<seq>/`), sets aside the damaged manifest files in `self.damaged`, and records every
        sample that is ok in the ledger but has no row in an intact shard as `requeued`, with the reason: the
        next run redoes exactly those. The commit record is also kept as `quarantine/repair-<seq>.json`."""
        damaged = dict(damaged)
        have: set[str] = set()
        for path in sorted(p for p in self.shards if p not in damaged):  # the intact shards' ids
            try:
                have.update(read_parquet(self.storage, path, ["id"]).column("id").to_pylist())
            except OSError as exc:
                damaged[path] = f"unreadable: {exc}"
        why_of: dict[str, str] = {}
        for path in damaged:  # a damaged shard's own ids, where its id column still reads
            try:
                why_of.update(
                    dict.fromkeys(
                        read_parquet(self.storage, path, ["id"]).column("id").to_pylist(), f"{path}: {damaged[path]}"
                    )
                )
            except OSError:
                pass
        by_seq = {(self.shards[p].seq, self.shards[p].modality): p for p in damaged if p in self.shards}
        ledger = read_all(self.storage)
        ledger = ledger.filter(pc.equal(ledger.column("status"), "ok")).to_pylist()
        lost = [r for r in ledger if r["id"] not in have]
        seq = self.next_seq
        base = f"staging/{run_id}/repair-{seq:010d}"
        for r in lost:
            where = why_of.get(r["id"]) or (
                f"{by_seq[(r['seq'], r['modality'])]}: {damaged[by_seq[(r['seq'], r['modality'])]]}"
                if (r["seq"], r["modality"]) in by_seq
                else "no intact committed shard holds its row"
            )
            r.update(status=REQUEUED, stage="verify", reason=f"requeued by repair: {where}")
        q = f"quarantine/repair-{seq:010d}"
        moves = [[p, f"{q}/{p}"] for p in sorted(damaged) if self.storage.exists(p)]
        moves += [[p, f"{q}/{p}"] for p in sorted(self.damaged) if self.storage.exists(p)]
        ledger_rel = None
        if lost:
            buf = pa.BufferOutputStream()
            pq.write_table(ledger_table(lost), buf, compression="zstd", write_page_checksum=True)
            self.storage.write_bytes(f"{base}/ledger.parquet", buf.getvalue().to_pybytes())
            ledger_rel = fragment_path(seq)
            moves.append([f"{base}/ledger.parquet", ledger_rel])
        drops = [
            {"path": p, "reason": why, "record": vars(self.shards[p]) if p in self.shards else None}
            for p, why in sorted(damaged.items())
        ]
        record = {
            "seq": seq,
            "op": "repair",
            "run": run_id,
            "time": time.time(),
            "shards": [],
            "removes": [],
            "drops": drops,
            "manifest_damage": self.damaged,
            "ledger": ledger_rel,
            "moves": moves,
            "counts": {REQUEUED: len(lost)},
        }
        name = f"{MANIFEST}/{seq:010d}.json"
        self.storage.write_bytes(name, json.dumps(record, ensure_ascii=False, default=str).encode())
        self.next_seq = seq + 1
        self._move_all(moves)
        self._write_quarantine_record(record)
        self._apply(record)
        self._records_since_checkpoint.append(name)
        self.damaged = {}
        return {"seq": seq, "drops": drops, "requeued": len(lost), "quarantine": f"{q}.json"}

    def _write_quarantine_record(self, rec: dict) -> None:
        rel = f"quarantine/repair-{rec['seq']:010d}.json"
        if not self.storage.exists(rel):
            self.storage.write_bytes(rel, json.dumps(rec, indent=1, ensure_ascii=False, default=str).encode())

    # ---- committing ------------------------------------------------------------------------------------------
    def commit(self, record: dict, run_id: str) -> dict:
        """Commits a writer's record: names the final paths, writes the commit record, performs the moves."""
        seq = self.next_seq
        shards, moves = [], []
        for k, f in enumerate(record.get("shards", [])):
            final = f"data/{f['modality']}/part-{seq:06d}-{k}.parquet"
            moves.append([f["staging"], final])
            shards.append(
                {
                    "path": final,
                    "modality": f["modality"],
                    "rows": f["rows"],
                    "bytes": f["bytes"],
                    "sha256": f["sha256"],
                    "row_groups": f.get("row_groups", 1),
                }
            )
        ledger = None
        if record.get("ledger"):
            ledger = fragment_path(seq)
            moves.append([record["ledger"], ledger])  # last: the outcomes count only once the shards are in
        commit = {
            "seq": seq,
            "op": record.get("op", "write"),
            "run": run_id,
            "time": time.time(),
            "shards": shards,
            "removes": record.get("removes", []),
            "ledger": ledger,
            "counts": record.get("counts", {}),
            "moves": moves,
        }
        name = f"{MANIFEST}/{seq:010d}.json"
        self.storage.write_bytes(name, json.dumps(commit, ensure_ascii=False).encode())
        self.next_seq = seq + 1
        maybe_fault("commit_written")
        for path in commit["removes"]:  # compaction: the old shards go first, so no reader sees a row twice
            self.storage.delete(path)
        self._move_all(moves)
        maybe_fault("commit_moved")
        self._apply(commit)
        self._records_since_checkpoint.append(name)
        if len(self._records_since_checkpoint) >= CHECKPOINT_EVERY:
            self.checkpoint()
        return commit

    def _move_all(self, moves: list[list[str]]) -> None:
        if self.storage.local or len(moves) < 2:
            for src, dst in moves:
                self.storage.move(src, dst)
            return
        with ThreadPoolExecutor(min(8, len(moves))) as pool:  # server-side copies run side by side
            list(pool.map(lambda m: self.storage.move(*m), moves[:-1]))
        self.storage.move(*moves[-1])

    def checkpoint(self) -> None:
        """Folds the commit records into one shard index (only after their moves are done), then drops them."""
        if not self._records_since_checkpoint:
            return
        seq = self.next_seq - 1
        table = pa.Table.from_pylist([vars(s) for s in self.shards.values()], schema=shard_index_schema())
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
        name = f"{MANIFEST}/checkpoint-{seq:010d}.parquet"
        self.storage.write_bytes(name, buf.getvalue().to_pybytes())
        for rel in self._records_since_checkpoint:
            self.storage.delete(rel)
        for e in self.storage.list(MANIFEST):
            if e.path.startswith(f"{MANIFEST}/checkpoint-") and e.path != name:
                self.storage.delete(e.path)
        self._records_since_checkpoint = []
        self.checkpoint_seq = seq

    def drop_staging(self, run_id: str | None = None) -> None:
        """Deletes one run's staging folder, or (None) all of it: with the lock held, at the end of a run, every
        staged file is garbage, including what a killed run's leftover workers wrote after this run started."""
        self.storage.delete_dir(f"staging/{run_id}" if run_id else "staging")

    # ---- derived views -----------------------------------------------------------------------------------------
    def counts(self) -> dict:
        """Rows, shards and bytes per modality (from the commit records; no shard is opened)."""
        out = {}
        for s in self.shards.values():
            c = out.setdefault(s.modality, {"rows": 0, "shards": 0, "bytes": 0})
            c["rows"] += s.rows
            c["shards"] += 1
            c["bytes"] += s.bytes
        return out

    def write_card(self) -> None:
        counts = self.counts()
        tok = self.read_json("tokenizer.json") if self.storage.exists("tokenizer.json") else {}
        pre = self.read_json("preprocess.json") if self.storage.exists("preprocess.json") else {}
        present = [m for m in MODALITIES if m in counts]
        configs = "".join(f'- config_name: {m}\n  data_files: "data/{m}/*.parquet"\n' for m in present)
        body = (
            f"---\nconfigs:\n{configs}---\n\n# AToken token cache\n\n"
            f"- tokenizer: `{tok.get('id', '?')}` (config {tok.get('config', '?')}, weights sha256 "
            f"{str(tok.get('weights_sha256'))[:12]})\n"
            f"- preprocessing: `{pre.get('id', '?')}` (settings in `preprocess.json`)\n"
            + "".join(
                f"- {m}: {counts[m]['rows']} samples in {counts[m]['shards']} shards "
                f"({counts[m]['bytes'] / 1e6:.1f} MB)\n"
                for m in present
            )
            + '\nLoad with `datasets.load_dataset("parquet", data_files="data/<modality>/*.parquet")` or '
            '`datasets.load_dataset(<this folder>, "<modality>")`; `with_format("arrow")` keeps fp16. '
            "Columns: `schemas/tokens.py`. Per-sample outcomes: `ledger/**/*.parquet` (latest per id).\n"
            + card_section(self.storage, self.shards)
            + CHECKSUM_NOTE
        )
        if not self.storage.exists("README.md") or self.storage.read_bytes("README.md").decode() != body:
            self.storage.write_bytes("README.md", body.encode())


def check(store: Store) -> tuple[dict[str, str], list[str]]:
    """Re-hashes every committed shard, reads its ids (page checksums verified), checks ids are unique and agree
    with the ledger, and lists files in `data/` that no commit names. Returns (damaged shards: path -> why,
    every problem found, as lines). Never raises on a damaged store: what it cannot read is a finding."""
    storage, problems, damaged = store.storage, [], {}
    try:
        store.load()
    except Exception as exc:  # noqa: BLE001 - a store this damaged is a finding, not a crash
        return {}, [f"cannot read the manifest: {type(exc).__name__}: {exc}"]
    if not storage.list(MANIFEST) and storage.list("data", recursive=True):
        problems.append(f"{MANIFEST}/ is missing or empty, but data/ holds files")
    problems += [f"damaged {p}: {why}" for p, why in store.damaged.items()]
    seen: dict[str, str] = {}
    for path, s in sorted(store.shards.items()):
        size = storage.size(path)
        if size is None:
            damaged[path] = "missing"
            continue
        if size != s.bytes:
            damaged[path] = f"truncated or replaced: {size} bytes, the commit says {s.bytes}"
        elif sha256_of(storage, path) != s.sha256:
            damaged[path] = "hash mismatch: the bytes differ from the commit record (corrupt shard)"
        try:
            ids = read_parquet(storage, path, ["id"]).column("id").to_pylist()
        except OSError as exc:
            damaged.setdefault(path, f"unreadable: {exc}")
            continue
        if len(ids) != s.rows:
            damaged.setdefault(path, f"{len(ids)} rows, the commit says {s.rows}")
        for i in ids:
            if i in seen:
                problems.append(f"duplicate id {i} in {path} and {seen[i]}")
            seen[i] = path
    problems += [
        f"missing shard {p}"
        if why == "missing"
        else f"hash mismatch {p}"
        if why.startswith("hash")
        else f"damaged shard {p}: {why}"
        for p, why in damaged.items()
    ]
    known = set(store.shards)
    for e in storage.list("data", recursive=True):
        if e.path not in known:
            problems.append(f"uncommitted file {e.path}")
    try:
        outcomes = read_all(storage, ["id", "status"])
    except (OSError, pa.ArrowException) as exc:
        return damaged, problems + [f"cannot read the ledger: {type(exc).__name__}: {exc}"]
    ok = set(outcomes.filter(pc.equal(outcomes.column("status"), "ok")).column("id").to_pylist())
    if ok != set(seen):
        problems.append(
            f"ledger and shards disagree: {len(ok - set(seen))} ok in the ledger without a row, "
            f"{len(set(seen) - ok)} rows without an ok outcome"
        )
    return damaged, problems


def verify(storage: Storage) -> list[str]:
    """The problems `check` finds (empty when all is well)."""
    return check(Store(storage))[1]


def repair(storage: Storage, run_id: str) -> dict:
    """`verify --repair`, with the lock held: rolls forward what a crash left, un-commits every damaged shard and
    damaged manifest file (kept under quarantine/), requeues the samples that have no intact row, then re-derives
    the shard index, the ledger level (each id's status) and the card. Returns what it did."""
    from pipeline.ledger import compact as compact_ledger

    store = Store(storage)
    records = store.load()
    rolled = []
    for rec in records:
        store._finish_moves(rec, rolled)
    damage = store.damaged
    damaged, problems = check(store)  # reloads
    store.damaged = {**store.damaged, **damage}
    res = {"drops": [], "requeued": 0, "quarantine": None, "problems": problems}
    if damaged or store.damaged or any(p.startswith("ledger and shards disagree") for p in problems):
        res.update(store.repair(damaged, run_id))
        res["problems"] = problems
    rec = store.recover(run_id)
    res["quarantined"] = rec.quarantined
    for files in store.ledger.plan_compaction():
        compact_ledger(storage, files)
    store.write_card()
    store.drop_staging(run_id)
    res["after"] = verify(storage)
    return res


CHECKSUM_NOTE = (
    "\nShards carry Parquet page checksums; pyarrow and `datasets` check them only when asked. To make a damaged "
    "shard an error instead of wrong data, pass `fragment_scan_options=pyarrow.dataset.ParquetFragmentScanOptions("
    "page_checksum_verification=True)` to `datasets.load_dataset`, or `page_checksum_verification=True` to "
    "`pyarrow.parquet.read_table`. `python -m pipeline verify <this folder>` re-hashes every shard against its "
    "commit record, and `--repair` un-commits damaged ones so that the next run redoes their samples.\n"
)

ROOT_CARD_MARK = "<!-- atoken-cache: output root card, rewritten by each run -->"


def write_root_card(root: Storage, current: str) -> bool:
    """OUT/README.md, so that `datasets.load_dataset(OUT, "<modality>")` reads the tokens of the version `current`
    (the one a run just wrote) and `"<version>-<modality>"` any version; without it `load_dataset(OUT)` mixes
    shards with the ledger's and manifest's Parquet files. A README.md there that is not ours is left alone
    (returns False)."""
    if root.exists("README.md") and ROOT_CARD_MARK not in root.read_bytes("README.md").decode("utf-8", "replace"):
        return False
    found = {v.root.rstrip("/").rsplit("/", 1)[-1]: v for v in versions(root)}
    present = {name: [m for m in MODALITIES if v.list(f"data/{m}")] for name, v in found.items()}
    configs, lines = [], []
    for k, m in enumerate(present.get(current, [])):
        configs.append(
            f'- config_name: {m}\n  data_files: "{current}/data/{m}/*.parquet"\n'
            + ("  default: true\n" if k == 0 else "")
        )
    for name in sorted(present):
        configs += [f'- config_name: {name}-{m}\n  data_files: "{name}/data/{m}/*.parquet"\n' for m in present[name]]
        lines.append(f"- `{name}`{' (latest run)' if name == current else ''}: {', '.join(present[name]) or 'empty'}")
    body = (
        f"---\nconfigs:\n{''.join(configs)}---\n{ROOT_CARD_MARK}\n\n# AToken token cache (output root)\n\n"
        "One folder per version (tokenizer identity + preprocessing identity), each with its own card:\n\n"
        + "\n".join(lines)
        + '\n\n`datasets.load_dataset("<this folder>", "<modality>")` reads the latest '
        'run\'s version; `"<version>-<modality>"` names one. `with_format("arrow")` keeps fp16.\n' + CHECKSUM_NOTE
    )
    root.write_bytes("README.md", body.encode())
    return True


def versions(root: Storage) -> list[Storage]:
    """The version directories under a job's output root (each holds a version.json)."""
    import pyarrow.fs as pafs

    out = []
    infos = root.fs.get_file_info(pafs.FileSelector(root.path(""), recursive=False, allow_not_found=True))
    for info in sorted(infos, key=lambda i: i.base_name):
        if info.type == pafs.FileType.Directory and root.exists(f"{info.base_name}/version.json"):
            out.append(root.child(info.base_name))
    return out
