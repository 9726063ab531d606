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
from pipeline.ledger import Ledger, fragment_path, read_all
from pipeline.licences import card_section
from pipeline.storage import Storage
from schemas.tokens import MODALITIES, SCHEMA_VERSION, shard_index_schema

FORMAT = "atoken-cache/2"
MANIFEST = "manifest"
CHECKPOINT_EVERY = 256


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
        for name, obj in (("version.json", {"format": FORMAT, "schema_version": SCHEMA_VERSION, **version}),
                          ("tokenizer.json", tokenizer), ("preprocess.json", preprocess)):
            if not self.storage.exists(name):
                self.storage.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, name: str) -> dict:
        return json.loads(self.storage.read_bytes(name))

    # ---- reading the committed state --------------------------------------------------------------------------
    def load(self) -> list[dict]:
        """Reads the checkpoint and the commit records after it; returns those records (oldest first)."""
        self.shards, records = {}, []
        self.checkpoint_seq, self._records_since_checkpoint, self.damaged = -1, [], []
        entries = self.storage.list(MANIFEST)
        checkpoints = sorted(e.path for e in entries if e.path.rsplit("/", 1)[-1].startswith("checkpoint-"))
        if checkpoints:
            with self.storage.open_input(checkpoints[-1]) as f:
                for rec in pq.read_table(f).to_pylist():
                    self.shards[rec["path"]] = Shard(**rec)
            self.checkpoint_seq = int(checkpoints[-1].rsplit("-", 1)[-1].split(".")[0])
        self.next_seq = self.checkpoint_seq + 1
        for e in entries:
            name = e.path.rsplit("/", 1)[-1]
            if not name.endswith(".json") or not name[:-5].isdigit() or int(name[:-5]) <= self.checkpoint_seq:
                continue
            try:
                rec = json.loads(self.storage.read_bytes(e.path))
            except (json.JSONDecodeError, UnicodeDecodeError):  # cannot be torn (atomic writes): a damaged one is
                self.damaged.append(e.path)                     # reported, not applied, and its number not reused
                self.next_seq = max(self.next_seq, int(name[:-5]) + 1)
                continue
            records.append(rec)
        records.sort(key=lambda r: r["seq"])
        for rec in records:
            self._apply(rec)
            self._records_since_checkpoint.append(f"{MANIFEST}/{rec['seq']:010d}.json")
            self.next_seq = max(self.next_seq, rec["seq"] + 1)
        return records

    def _apply(self, rec: dict) -> None:
        for path in rec.get("removes", []):
            self.shards.pop(path, None)
        for s in rec.get("shards", []):
            self.shards[s["path"]] = Shard(**{**s, "seq": rec["seq"]})

    # ---- opening for a run: roll forward, quarantine, collect garbage ------------------------------------------
    def recover(self, run_id: str | None = None) -> Recovery:
        out = Recovery()
        records = self.load()
        out.problems += [f"damaged commit record {p} (not applied)" for p in self.damaged]
        for rec in records:
            out.rolled_forward += self._finish_moves(rec, out.problems)
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
            else:
                problems.append(f"commit {rec['seq']}: {dst} is missing and its staged copy {src} is gone")
        return done

    # ---- committing ------------------------------------------------------------------------------------------
    def commit(self, record: dict, run_id: str) -> dict:
        """Commits a writer's record: names the final paths, writes the commit record, performs the moves."""
        seq = self.next_seq
        shards, moves = [], []
        for k, f in enumerate(record.get("shards", [])):
            final = f"data/{f['modality']}/part-{seq:06d}-{k}.parquet"
            moves.append([f["staging"], final])
            shards.append({"path": final, "modality": f["modality"], "rows": f["rows"], "bytes": f["bytes"],
                           "sha256": f["sha256"], "row_groups": f.get("row_groups", 1)})
        ledger = None
        if record.get("ledger"):
            ledger = fragment_path(seq)
            moves.append([record["ledger"], ledger])  # last: the outcomes count only once the shards are in
        commit = {"seq": seq, "op": record.get("op", "write"), "run": run_id, "time": time.time(),
                  "shards": shards, "removes": record.get("removes", []), "ledger": ledger,
                  "counts": record.get("counts", {}), "moves": moves}
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
        pq.write_table(table, buf, compression="zstd")
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
        configs = "".join(f"- config_name: {m}\n  data_files: \"data/{m}/*.parquet\"\n" for m in present)
        body = (f"---\nconfigs:\n{configs}---\n\n# AToken token cache\n\n"
                f"- tokenizer: `{tok.get('id', '?')}` (config {tok.get('config', '?')}, weights sha256 "
                f"{str(tok.get('weights_sha256'))[:12]})\n"
                f"- preprocessing: `{pre.get('id', '?')}` (settings in `preprocess.json`)\n"
                + "".join(f"- {m}: {counts[m]['rows']} samples in {counts[m]['shards']} shards "
                          f"({counts[m]['bytes'] / 1e6:.1f} MB)\n" for m in present)
                + "\nLoad with `datasets.load_dataset(\"parquet\", data_files=\"data/<modality>/*.parquet\")` or "
                  "`datasets.load_dataset(<this folder>, \"<modality>\")`; `with_format(\"arrow\")` keeps fp16. "
                  "Columns: `schemas/tokens.py`. Per-sample outcomes: `ledger/**/*.parquet` (latest per id).\n"
                + card_section(self.storage, self.shards))
        if not self.storage.exists("README.md") or self.storage.read_bytes("README.md").decode() != body:
            self.storage.write_bytes("README.md", body.encode())


def verify(storage: Storage) -> list[str]:
    """Re-hashes every committed shard, checks ids are unique and agree with the ledger, and lists files in
    `data/` that no commit names. Returns the problems (empty when all is well)."""
    store = Store(storage)
    problems = []
    try:
        store.load()
    except Exception as exc:  # a store this damaged is a finding, not a crash
        return [f"cannot read the manifest: {type(exc).__name__}: {exc}"]
    problems += [f"damaged commit record {p}" for p in store.damaged]
    seen: dict[str, str] = {}
    for path, s in sorted(store.shards.items()):
        size = storage.size(path)
        if size is None:
            problems.append(f"missing shard {path}")
            continue
        if size != s.bytes or sha256_of(storage, path) != s.sha256:
            problems.append(f"hash mismatch {path}")
        try:
            with storage.open_input(path) as f:
                ids = pq.read_table(f, columns=["id"]).column("id").to_pylist()
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"unreadable shard {path}: {exc}")
            continue
        if len(ids) != s.rows:
            problems.append(f"{path}: {len(ids)} rows, the commit says {s.rows}")
        for i in ids:
            if i in seen:
                problems.append(f"duplicate id {i} in {path} and {seen[i]}")
            seen[i] = path
    known = set(store.shards)
    for e in storage.list("data", recursive=True):
        if e.path not in known:
            problems.append(f"uncommitted file {e.path}")
    outcomes = read_all(storage, ["id", "status"])
    ok = set(outcomes.filter(pc.equal(outcomes.column("status"), "ok")).column("id").to_pylist())
    if ok != set(seen):
        problems.append(f"ledger and shards disagree: {len(ok - set(seen))} ok in the ledger without a row, "
                        f"{len(set(seen) - ok)} rows without an ok outcome")
    return problems


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
        configs.append(f"- config_name: {m}\n  data_files: \"{current}/data/{m}/*.parquet\"\n"
                       + ("  default: true\n" if k == 0 else ""))
    for name in sorted(present):
        configs += [f"- config_name: {name}-{m}\n  data_files: \"{name}/data/{m}/*.parquet\"\n" for m in present[name]]
        lines.append(f"- `{name}`{' (latest run)' if name == current else ''}: {', '.join(present[name]) or 'empty'}")
    body = (f"---\nconfigs:\n{''.join(configs)}---\n{ROOT_CARD_MARK}\n\n# AToken token cache (output root)\n\n"
            "One folder per version (tokenizer identity + preprocessing identity), each with its own card:\n\n"
            + "\n".join(lines) + "\n\n`datasets.load_dataset(\"<this folder>\", \"<modality>\")` reads the latest "
            "run's version; `\"<version>-<modality>\"` names one. `with_format(\"arrow\")` keeps fp16.\n")
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
