"""The output store: immutable Parquet shards, an append-only manifest, per-sample status and a dataset card.

Crash safety rests on three rules:
1. a shard is written to `.tmp/` and renamed into `data/<modality>/`, so readers never see a partial file;
2. the manifest line that commits a shard is appended (and fsynced) after the rename; a torn last line is dropped;
3. on open, a renamed shard that no manifest line names is adopted (its rows are complete), so a crash between
   rename and commit neither loses nor duplicates its samples.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.faults import maybe_fault
from schemas.tokens import MODALITIES, TokenDims, rows_to_table, status_table

MANIFEST = "manifest.jsonl"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StoreState:
    """What the manifest says is done: ok ids with their shard, and the last status of every other id."""
    ok: dict[str, str] = field(default_factory=dict)          # id -> shard path
    other: dict[str, dict] = field(default_factory=dict)      # id -> {status, stage, reason, ...}
    shards: list[dict] = field(default_factory=list)
    commits: int = 0


class ShardStore:
    """One tokenizer version's output directory. Single writer (the job driver)."""

    def __init__(self, root: Path, tokenizer: dict, dims: TokenDims, shard_rows: int = 512,
                 compression: str = "zstd"):
        self.dir = Path(root) / tokenizer["id"]
        self.tokenizer, self.dims = tokenizer, dims
        self.shard_rows, self.compression = shard_rows, compression
        self.buffers: dict[str, list[dict]] = {m: [] for m in MODALITIES}
        self.buffered: set[str] = set()
        self.pending_status: list[dict] = []
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / ".tmp").mkdir(exist_ok=True)
        self._write_json_once("tokenizer.json", tokenizer)
        self.state = self._recover()

    # ---- reading the committed state -------------------------------------------------------------
    def _read_manifest(self) -> list[dict]:
        path = self.dir / MANIFEST
        if not path.exists():
            return []
        raw = path.read_bytes()
        lines, good = [], 0
        for line in raw.split(b"\n"):
            if not line.strip():
                good += len(line) + 1
                continue
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn tail from a crash mid-append: everything after it is dropped
            good += len(line) + 1
        if good < len(raw):
            with open(path, "r+b") as f:
                f.truncate(min(good, len(raw)))
        return lines

    def _recover(self) -> StoreState:
        for tmp in (self.dir / ".tmp").iterdir():
            tmp.unlink()
        state = StoreState()
        for commit in self._read_manifest():
            self._apply(state, commit)
        named = {s["path"] for s in state.shards}
        for path in sorted((self.dir / "data").glob("*/*.parquet")):
            rel = path.relative_to(self.dir).as_posix()
            if rel not in named:  # renamed but never committed: complete, so adopt it
                try:
                    shard = self._describe_shard(path, path.parent.name)
                except (OSError, pa.ArrowException):  # unreadable: keep it out of readers' sight, never delete
                    quarantine = self.dir / "quarantine" / rel.replace("/", "-")
                    quarantine.parent.mkdir(exist_ok=True)
                    os.replace(path, quarantine)
                    continue
                self._commit(state, [shard], [], adopted=True)
        return state

    @staticmethod
    def _apply(state: StoreState, commit: dict) -> None:
        for shard in commit.get("shards", []):
            state.shards.append(shard)
            for i in shard["ids"]:
                state.ok[i] = shard["path"]
                state.other.pop(i, None)
        for rec in commit.get("status", []):
            if rec["id"] not in state.ok:
                state.other[rec["id"]] = rec
        state.commits += 1

    def done_ids(self, retry_failed: bool = False) -> set[str]:
        """Ids a rerun must not redo: ok ones, plus failed/skipped ones unless retrying failures."""
        done = set(self.state.ok)
        if not retry_failed:
            done |= set(self.state.other)
        else:
            done |= {i for i, r in self.state.other.items() if r["status"] == "skipped"}
        return done

    # ---- writing --------------------------------------------------------------------------------
    def add(self, row: dict) -> None:
        """Buffers a finished row: ok rows go to shards, others to the status log."""
        # only ok rows need a shard; failed/skipped ones may say modality "unknown" (an unrecognised file)
        if row.get("status", "ok") == "ok" and row.get("modality") not in self.buffers:
            raise ValueError(f"row {row.get('id')!r}: unknown modality {row.get('modality')!r}")
        if row["id"] in self.state.ok or row["id"] in self.buffered:
            return  # exactly once, even if an upstream task was retried
        if row.get("status", "ok") == "ok":
            self.buffered.add(row["id"])
            buf = self.buffers[row["modality"]]
            buf.append(row)
            if len(buf) >= self.shard_rows:
                self.flush(row["modality"])
        else:
            self.pending_status.append(_status_record(row))
            if len(self.pending_status) >= self.shard_rows:
                self.flush()

    def flush(self, modality: str | None = None) -> None:
        """Writes buffered rows as shards and commits them with the pending statuses in one manifest line."""
        shards = []
        for m in ([modality] if modality else MODALITIES):
            rows, self.buffers[m] = self.buffers[m], []
            self.buffered.difference_update(r["id"] for r in rows)
            if rows:
                shards.append(self._write_shard(m, rows))
        status, self.pending_status = self.pending_status, []
        if shards or status:
            self._commit(self.state, shards, status)

    def _write_shard(self, modality: str, rows: list[dict]) -> dict:
        table = rows_to_table(rows, self.dims)
        name = f"part-{self.state.commits:05d}.parquet"
        final = self.dir / "data" / modality / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / ".tmp" / f"{modality}-{name}"
        maybe_fault("shard_write")
        pq.write_table(table, tmp, compression=self.compression)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        maybe_fault("shard_tmp_written")
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        maybe_fault("shard_renamed")
        return self._describe_shard(final, modality, ids=[r["id"] for r in rows])

    def _describe_shard(self, path: Path, modality: str, ids: list[str] | None = None) -> dict:
        if ids is None:
            ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        return {"path": path.relative_to(self.dir).as_posix(), "modality": modality, "rows": len(ids),
                "bytes": path.stat().st_size, "sha256": sha256_file(path), "ids": ids}

    def _commit(self, state: StoreState, shards: list[dict], status: list[dict], adopted: bool = False) -> None:
        commit = {"seq": state.commits, "time": time.time(), "shards": shards, "status": status}
        if adopted:
            commit["adopted"] = True
        line = (json.dumps(commit, ensure_ascii=False) + "\n").encode()
        with open(self.dir / MANIFEST, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        maybe_fault("manifest_appended")
        self._apply(state, commit)

    def close(self) -> None:
        self.flush()
        self.write_status()
        self.write_card()

    # ---- derived files ------------------------------------------------------------------------------
    def status_records(self) -> list[dict]:
        recs = [{"id": i, "status": "ok", "shard": p, "modality": p.split("/")[1]} for i, p in self.state.ok.items()]
        recs += list(self.state.other.values())
        return sorted(recs, key=lambda r: r["id"])

    def write_status(self) -> None:
        tmp = self.dir / ".tmp" / "status.parquet"
        pq.write_table(status_table(self.status_records()), tmp)
        os.replace(tmp, self.dir / "status.parquet")

    def write_card(self) -> None:
        present = sorted({s["modality"] for s in self.state.shards})
        configs = "".join(f"- config_name: {m}\n  data_files: \"data/{m}/*.parquet\"\n" for m in present)
        counts = {m: sum(s["rows"] for s in self.state.shards if s["modality"] == m) for m in present}
        body = (f"---\nconfigs:\n{configs}---\n\n# AToken token cache\n\n"
                f"Tokenizer: `{self.tokenizer['id']}` ({self.tokenizer.get('config_name', '')}).\n\n"
                + "".join(f"- {m}: {n} samples\n" for m, n in counts.items())
                + "\nLoad with `datasets.load_dataset(\"parquet\", data_files=\"data/<modality>/*.parquet\")`, "
                  "or `datasets.load_dataset(<this dir>, \"<modality>\")`. Columns are described by the "
                  "Arrow schema in `schemas/tokens.py`; `with_format(\"arrow\")` keeps fp16.\n")
        tmp = self.dir / ".tmp" / "README.md"
        tmp.write_text(body)
        os.replace(tmp, self.dir / "README.md")

    def _write_json_once(self, name: str, obj: dict) -> None:
        path = self.dir / name
        if not path.exists():
            tmp = self.dir / ".tmp" / name
            tmp.parent.mkdir(exist_ok=True)
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
            os.replace(tmp, path)


def _status_record(row: dict) -> dict:
    return {"id": row["id"], "modality": row.get("modality"), "source": row.get("source"), "uri": row.get("uri"),
            "status": row.get("status", "failed"), "stage": row.get("stage"), "reason": row.get("error")}


def verify(store_dir: Path) -> list[str]:
    """Re-hashes every shard against the manifest; returns a list of problems (empty when all is well)."""
    store_dir = Path(store_dir)
    problems, seen = [], {}
    lines = [json.loads(l) for l in (store_dir / MANIFEST).read_text().splitlines() if l.strip()]
    named = set()
    for commit in lines:
        for s in commit["shards"]:
            path = store_dir / s["path"]
            named.add(s["path"])
            if not path.exists():
                problems.append(f"missing shard {s['path']}")
                continue
            if path.stat().st_size != s["bytes"] or sha256_file(path) != s["sha256"]:
                problems.append(f"hash mismatch {s['path']}")
            try:
                ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
            except (OSError, pa.ArrowException) as e:
                problems.append(f"unreadable shard {s['path']}: {e}")
                continue
            if ids != s["ids"] or len(ids) != s["rows"]:
                problems.append(f"ids in {s['path']} differ from the manifest")
            for i in ids:
                if i in seen:
                    problems.append(f"duplicate id {i} in {s['path']} and {seen[i]}")
                seen[i] = s["path"]
    for path in (store_dir / "data").glob("*/*.parquet"):
        if path.relative_to(store_dir).as_posix() not in named:
            problems.append(f"uncommitted shard {path.relative_to(store_dir)}")
    return problems


def open_versions(out: Path) -> list[Path]:
    """Tokenizer-version directories under a job's output root."""
    return sorted(p for p in Path(out).iterdir() if (p / "tokenizer.json").exists()) if Path(out).exists() else []


def read_table(store_dir: Path, modality: str) -> pa.Table:
    files = sorted((Path(store_dir) / "data" / modality).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def load_state(store_dir: Path) -> StoreState:
    """The committed state of a store, read-only (a torn manifest tail is ignored, not repaired)."""
    state = StoreState()
    path = Path(store_dir) / MANIFEST
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            commit = json.loads(line)
        except json.JSONDecodeError:
            break
        ShardStore._apply(state, commit)
    return state
