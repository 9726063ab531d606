"""Damage to a finished store (issue 15 items 1-3, issue 13 item 3): flipped bits, truncated, deleted and copied
shards, an edited shard index, a corrupt commit record in the middle, a missing manifest, and a duplicate source
row with a kill between the two commits.

Each case damages a copy of one real store (a real job: folder source, tiny model on CPU, real Ray), then checks
what the project's readers serve, what `verify` says, and that `verify --repair` (or a plain rerun, for damage the
open sees by size) followed by a rerun ends with every sample in exactly one intact shard: 0 lost, 0 duplicated,
0 wrong data served. Figures go to the reliability report (section `damage`).
"""

from __future__ import annotations

import json
import random
import shutil

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli
from pipeline.job import validate_job
from pipeline.run import run_job
from pipeline.storage import Storage
from pipeline.store import MANIFEST, DamagedFile, Store, StoreDamaged, read_parquet, verify, versions
from tests.reliability.conftest import (
    IMAGES,
    count_lost_dup,
    expected_ids,
    final_state,
    job_dict,
    make_inputs,
    outcomes_by_key,
    run_cli,
    shard_ids,
    the_store,
    write_job,
)

FLIP_TRIALS = 20
N = len(IMAGES)  # images in the baseline store (5 shards)


@pytest.fixture(scope="module")
def baseline(shared_data, tmp_path_factory, ray_local):
    """One finished store of 10 images in 5 shards (2 rows per writer call); tests damage copies of it."""
    root = tmp_path_factory.mktemp("damage")
    src = make_inputs(shared_data, root / "in", images=IMAGES, videos=[], meshes=[])
    cfg = job_dict(str(root / "out"), [{"type": "folder", "path": str(src), "name": "local"}])
    summary = run_job(validate_job(cfg))
    assert summary.counts.get("ok") == N and verify(the_store(root / "out").storage) == []
    return {"src": src, "expected": expected_ids(src), "cfg": cfg, "out": root / "out"}


def copy_of(baseline, tmp_path) -> tuple[dict, object]:
    """A copy of the baseline store, its job (pointing at the copy) and the store."""
    out = tmp_path / "out"
    shutil.copytree(baseline["out"], out)
    cfg = {**baseline["cfg"], "out": str(out)}
    return cfg, the_store(out)


def record(figures, **row) -> None:
    figures.setdefault("damage", []).append(row)


def check_whole(baseline, cfg, figures, case: str, rerun, redone: int, third: bool = False) -> None:
    """After the rerun: every expected id in exactly one shard, the ledger agrees, verify is clean, and (`third`)
    another run has nothing to do."""
    out = cfg["out"]
    ids = shard_ids(out)
    lost, dups = count_lost_dup(baseline["expected"], ids)
    state = final_state(out)
    record(
        figures,
        case=case,
        trials=1,
        requeued=redone,
        redone_by_rerun=rerun.finished,
        lost=len(lost),
        duplicated=dups,
        wrong_data_served=0,
        verify_problems=len(state["problems"]),
    )
    assert not lost and dups == 0, (lost, ids)
    assert state["problems"] == [] and set(ids) == state["ok"] and not state["other"], state
    assert rerun.finished == redone and rerun.counts.get("ok", 0) == redone
    if third:
        again = run_job(validate_job(cfg))
        assert again.finished == 0 and shard_ids(out) == ids


# ---- item 1: checksums end to end ------------------------------------------------------------------------------


def latent_range(path) -> tuple[int, int]:
    """The byte range of the first row group's latent column chunk (its pages: what a flipped bit corrupts)."""
    md = pq.ParquetFile(path).metadata
    rg = md.row_group(0)
    col = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema.startswith("latent"))
    start = col.dictionary_page_offset or col.data_page_offset
    return start, start + col.total_compressed_size


def test_bit_flips_are_errors_never_wrong_data(baseline, tmp_path, figures):
    """A flipped bit in a shard's latent pages: the store's reader and `datasets` with verification on (as the
    card says) raise an error naming the file, or return the original data (never a wrong value); plain pyarrow
    without verification is counted for comparison."""
    src = sorted((baseline["out"]).glob("*/data/image/*.parquet"))[0]
    good = pq.read_table(src)
    lo, hi = latent_range(src)
    rng = random.Random(15)
    errors = same = wrong = unverified_wrong = hf_errors = 0
    dest = tmp_path / "flip" / src.name
    dest.parent.mkdir()
    storage = Storage(str(dest.parent))
    opts = pads.ParquetFragmentScanOptions(page_checksum_verification=True)
    import datasets

    for trial in range(FLIP_TRIALS):
        data = bytearray(src.read_bytes())
        data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        dest.write_bytes(bytes(data))
        try:
            got = read_parquet(storage, dest.name)
        except DamagedFile as exc:
            assert str(dest) in str(exc)
            errors += 1
        else:
            same += got.equals(good)
            wrong += not got.equals(good)
        try:
            unverified_wrong += not pq.read_table(dest).equals(good)
        except (OSError, pa.ArrowException):
            pass
        try:
            ds = datasets.load_dataset(
                "parquet",
                data_files=str(dest),
                split="train",
                fragment_scan_options=opts,
                cache_dir=str(tmp_path / f"hf{trial}"),
            )
            assert ds.with_format("arrow")[:].column("latent").equals(good.column("latent"))
        except Exception as exc:  # noqa: BLE001 - datasets wraps the pyarrow error in its own
            chain = []
            while exc is not None and len(chain) < 8:
                chain.append(f"{type(exc).__name__}: {exc}")
                exc = exc.__cause__ or exc.__context__
            assert any(isinstance(e, str) and ("checksum" in e.lower() or "parquet" in e.lower()) for e in chain), chain
            hf_errors += 1
    record(
        figures,
        case="bit flip in latent pages (zstd)",
        trials=FLIP_TRIALS,
        errors_naming_file=errors,
        identical=same,
        wrong_data_served=wrong,
        hf_errors=hf_errors,
        unverified_pyarrow_wrong=unverified_wrong,
    )
    assert wrong == 0 and errors + same == FLIP_TRIALS and errors >= FLIP_TRIALS // 2
    card = next(baseline["out"].glob("*/README.md")).read_text()
    assert "page_checksum_verification=True" in card and "ParquetFragmentScanOptions" in card


def test_every_reader_refuses_a_flipped_shard(baseline, tmp_path, capsys):
    """The same damage through each reader the project ships: export and QA name it, QA never reads it,
    verify reports it, the training reader raises."""
    from pipeline.export import export
    from pipeline.qa import run_qa
    from pipeline.reader import ShardError, TokenReader

    cfg, store = copy_of(baseline, tmp_path)
    victim = sorted(store.shards)[0]
    path = store.storage.path(victim)
    data = bytearray(open(path, "rb").read())
    lo, hi = latent_range(path)
    data[(lo + hi) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    assert f"hash mismatch {victim}" in verify(store.storage)
    with pytest.raises(DamagedFile, match=victim):
        export(cfg["out"], "webdataset", dest=str(tmp_path / "wds"))
    with pytest.raises(ShardError, match=victim):
        list(TokenReader(store.uri, modality="image", max_tokens=1 << 20, verify_sha256=False))
    qa = run_qa(store, validate_job({**cfg, "qa": {"samples": 2}}))
    assert len(qa["damaged_shards"]) == 1 and victim in qa["damaged_shards"][0] and qa["image"]["n"] == 2
    assert cli(["verify", cfg["out"]]) == 1
    assert f"hash mismatch {victim}" in capsys.readouterr().out


def damage_shard(store, victim: str, how: str) -> None:
    path = store.storage.path(victim)
    data = bytearray(open(path, "rb").read())
    if how == "flip":  # one bit in the middle of the latent pages: same size, so only hashes and checksums see it
        lo, hi = latent_range(path)
        data[(lo + hi) // 2] ^= 0x01
        open(path, "wb").write(bytes(data))
    elif how == "truncate":
        open(path, "wb").write(bytes(data[: len(data) // 2]))
    elif how == "delete":
        store.storage.delete(victim)
    else:  # an edited line of the shard index (the manifest checkpoint): a wrong sha256 for the victim
        ckpt = next(e.path for e in store.storage.list(MANIFEST) if "checkpoint-" in e.path)
        table = read_parquet(store.storage, ckpt).to_pylist()
        for r in table:
            if r["path"] == victim:
                r["sha256"] = "0" * 64
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(store.storage.path(ckpt))), buf)
        store.storage.write_bytes(ckpt, buf.getvalue().to_pybytes())


DAMAGES = ("flip", "truncate", "delete", "edit_index")


def test_repair_then_rerun(baseline, tmp_path, figures, capsys):
    """A flipped byte, a truncated shard, a deleted shard and an edited line of the shard index, one shard each:
    verify names each; verify --repair un-commits the four (kept in quarantine/ with a record), requeues exactly
    their samples, each with a reason naming its shard, and re-derives the index, the ledger level and the card;
    the rerun redoes those samples only, and a third run nothing."""
    cfg, store = copy_of(baseline, tmp_path)
    victims = dict(zip(DAMAGES, sorted(store.shards)))
    owner = {i: v for v in victims.values() for i in read_parquet(store.storage, v, ["id"]).column("id").to_pylist()}
    for how, victim in victims.items():
        damage_shard(store, victim, how)
    assert cli(["verify", cfg["out"]]) == 1
    said = capsys.readouterr()
    assert all(v in said.out for v in victims.values()) and "Traceback" not in said.err, said
    assert cli(["verify", cfg["out"], "--repair"]) == 0
    said = capsys.readouterr().out
    assert f"4 shards un-committed, {len(owner)} samples requeued" in said, said
    st = the_store(cfg["out"])
    assert not set(victims.values()) & set(st.shards) and verify(st.storage) == []
    qrec = [e.path for e in st.storage.list("quarantine") if e.path.endswith(".json")]
    assert len(qrec) == 1
    assert {d["path"] for d in json.loads(st.storage.read_bytes(qrec[0]))["drops"]} == set(victims.values())
    requeued = {f"local-{k}": v for k, v in outcomes_by_key(cfg["out"]).items() if v["status"] == "requeued"}
    assert set(requeued) == set(owner) and all(owner[i] in v["reason"] for i, v in requeued.items()), requeued
    assert sum(c["rows"] for c in st.counts().values()) == N - len(owner)
    assert f"{N - len(owner)} samples" in st.storage.read_bytes("README.md").decode()
    rerun = run_job(validate_job(cfg))
    check_whole(
        baseline,
        cfg,
        figures,
        "flip + truncate + delete + edited index line, verify --repair, rerun",
        rerun,
        len(owner),
        third=True,
    )


def test_rerun_alone_requeues_damage_seen_by_size_and_never_adopts_copies(baseline, tmp_path, figures):
    """Damage the open sees by size (a truncated shard, a deleted one) needs no repair command: the next run
    un-commits them with the reason recorded and redoes their samples. A committed shard copied under names the
    store itself could have written (a later seq, another part of a committed seq) is reported and moved to
    quarantine/, never adopted: no duplicate."""
    cfg, store = copy_of(baseline, tmp_path)
    a, b, c = sorted(store.shards)[:3]
    n = store.shards[a].rows + store.shards[b].rows
    for name in ("part-000999-0.parquet", c.rsplit("/", 1)[-1].replace("-0.parquet", "-7.parquet")):
        shutil.copy(store.storage.path(c), store.storage.path(f"data/image/{name}"))
    assert sum(p.startswith("uncommitted file") for p in verify(store.storage)) == 2
    damage_shard(store, a, "truncate")
    damage_shard(store, b, "delete")
    rerun = run_job(validate_job(cfg))
    assert any("2 damaged shards un-committed" in note for note in rerun.notes), rerun.notes
    assert any("2 files in data/ that no commit names" in note for note in rerun.notes), rerun.notes
    st = the_store(cfg["out"])
    qrec = next(e.path for e in st.storage.list("quarantine") if e.path.endswith(".json"))
    reasons = sorted(d["reason"] for d in json.loads(st.storage.read_bytes(qrec))["drops"])
    assert reasons[1] == "missing" and "bytes, the commit says" in reasons[0], reasons
    check_whole(baseline, cfg, figures, "truncated + deleted + 2 copied shards, plain rerun", rerun, n)


# ---- item 2: recovery adopts only what it wrote -----------------------------------------------------------------


def test_corrupt_middle_record_stops_the_start(baseline, tmp_path, figures, capsys, monkeypatch):
    """Commit records not yet folded (a run that died at its 4th commit), the 2nd of them corrupt: the start
    stops with the repair command (the old code truncated there and forgot the rest); verify reports it without a
    traceback; verify --repair and a rerun end with nothing lost or duplicated."""
    out = tmp_path / "out"
    cfg = {**baseline["cfg"], "out": str(out)}
    monkeypatch.setenv("PIPELINE_FAULT", "commit_moved:3:enospc")
    monkeypatch.setenv("PIPELINE_FAULT_DIR", str(tmp_path / "fault"))
    (tmp_path / "fault").mkdir()
    with pytest.raises(OSError, match="injected at commit_moved"):
        run_job(validate_job(cfg))
    monkeypatch.delenv("PIPELINE_FAULT")
    store = the_store(out)
    recs = sorted(e.path for e in store.storage.list(MANIFEST) if e.path.endswith(".json"))
    assert len(recs) == 3, recs
    store.storage.write_bytes(recs[1], store.storage.read_bytes(recs[1])[:40] + b"#\x00")
    from pipeline.export import export  # readers refuse a damaged manifest rather than serve fewer shards

    with pytest.raises(DamagedFile, match=recs[1]):
        export(str(out), "webdataset", dest=str(tmp_path / "wds"))
    assert cli(["status", str(out)]) == 0 and f"damaged {recs[1]}" in capsys.readouterr().out
    with pytest.raises(StoreDamaged, match="verify .* --repair"):
        run_job(validate_job(cfg))
    job = write_job(tmp_path / "job.yaml", cfg)
    assert cli(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert recs[1] in err and "--repair" in err and "Traceback" not in err
    assert cli(["verify", str(out)]) == 1
    said = capsys.readouterr()
    assert f"damaged {recs[1]}" in said.out and "Traceback" not in said.err
    assert cli(["verify", str(out), "--repair"]) == 0
    capsys.readouterr()
    kept = shard_ids(out)  # the corrupt record's shard is quarantined: its rows are redone, with those never done
    assert len(kept) == 4 and not any(p.endswith("part-000001-0.parquet") for p in the_store(out).shards)
    rerun = run_job(validate_job(cfg))
    check_whole(baseline, cfg, figures, "corrupt middle commit record, verify --repair, rerun", rerun, N - len(kept))


def test_missing_manifest_stops_the_start_and_verify_says_so(baseline, tmp_path, capsys):
    """A deleted manifest/: the old open quarantined every shard while the ledger kept them done (all lost for
    good). Now the start stops with the repair command, and verify reports it without a traceback."""
    cfg, store = copy_of(baseline, tmp_path)
    shutil.rmtree(store.storage.path(MANIFEST))
    with pytest.raises(StoreDamaged, match="manifest/: missing.*--repair"):
        run_job(validate_job(cfg))
    assert len(store.storage.list("data", recursive=True)) == len(store.shards)  # nothing was moved
    assert cli(["verify", cfg["out"]]) == 1
    said = capsys.readouterr()
    assert "manifest/ is missing or empty, but data/ holds files" in said.out and "Traceback" not in said.err


def test_corrupt_shard_index_is_repaired(baseline, tmp_path, figures, capsys):
    """A torn shard index (the manifest checkpoint): the start stops, verify reports it without a traceback, and
    repair + rerun redo what can no longer be trusted (the shards the index named are quarantined)."""
    cfg, store = copy_of(baseline, tmp_path)
    ckpt = next(e.path for e in store.storage.list(MANIFEST) if "checkpoint-" in e.path)
    store.storage.write_bytes(ckpt, store.storage.read_bytes(ckpt)[:-200])
    with pytest.raises(StoreDamaged, match=f"{ckpt}: unreadable shard index.*--repair"):
        run_job(validate_job(cfg))
    assert cli(["verify", cfg["out"]]) == 1
    said = capsys.readouterr()
    assert f"damaged {ckpt}: unreadable shard index" in said.out and "Traceback" not in said.err
    assert cli(["verify", cfg["out"], "--repair"]) == 0
    capsys.readouterr()
    rerun = run_job(validate_job(cfg))
    check_whole(baseline, cfg, figures, "torn shard index, verify --repair, rerun", rerun, N)


# ---- item 3: a duplicate never shadows the original ---------------------------------------------------------------


def committed(out) -> dict[str, dict]:
    """id -> deciding outcome of what the commits so far hold (read without recovering or locking the store)."""
    from pipeline.ledger import read_all

    store = Store(versions(Storage(str(out)))[0])
    return {r["id"]: r for r in read_all(store.storage, ["id", "status", "stage", "reason"]).to_pylist()}


@pytest.mark.slow  # its own `python -m pipeline run` with its own Ray cluster, killed: like the crash matrix
def test_duplicate_row_and_a_kill_keep_the_original(baseline, tmp_path, figures, capsys):
    """A url_list whose last line (12) repeats line 2, ten lines apart; the driver is killed (kill -9) after the
    commit that holds the duplicate's failure and before the one with the original (duplicates are committed
    first, before any sample starts: the order of the issue's report), then the job is rerun. The original's
    id ends ok with its row in exactly one shard, never failed; the duplicate is a failure recorded against its
    own line (`ul:list.csv:12`), naming the id it repeats, and `status --failed` shows it; verify is clean,
    nothing is lost or duplicated, and another run has nothing to do. (The old code dropped the duplicate
    without a record, or recorded its failure under the original's id, which such a crash left failed.)"""
    from pipeline.sources import iter_rows, make_source, source_config

    files = sorted(baseline["src"].iterdir())
    last = files[-1]
    lines = ["url,caption", f"{last},the original"]
    lines += [f"{p},c{k}" for k, p in enumerate(files[:-1])] + [f"{last},the duplicate"]
    csv = tmp_path / "list.csv"
    csv.write_text("\n".join(lines) + "\n")
    rows = list(iter_rows(make_source(source_config({"type": "url_list", "path": str(csv), "name": "ul"}))))
    original, dup_key = rows[0]["id"], f"ul:list.csv:{len(lines)}"
    assert rows[-1]["id"] == original and len({r["id"] for r in rows}) == len(files)
    out = tmp_path / "out"
    cfg = job_dict(str(out), [{"type": "url_list", "path": str(csv), "name": "ul"}])
    crash = run_cli(write_job(tmp_path / "job.yaml", cfg), out, "commit_moved:1:driver", tmp_path / "fault")
    assert crash.rc == -9, crash.stderr[-2000:]
    before = committed(out)
    assert before[dup_key]["status"] == "failed" and original not in before, before  # killed between the two
    rerun = run_job(validate_job(cfg))
    ids = shard_ids(out)
    state = final_state(out)
    record(
        figures,
        case="duplicate row 10 lines apart + kill -9 between its commit and the original's",
        trials=1,
        requeued=0,
        redone_by_rerun=rerun.finished,
        lost=len(files) - len(ids),
        duplicated=sum(c - 1 for c in ids.values()),
        wrong_data_served=0,
        verify_problems=len(state["problems"]),
    )
    assert len(ids) == len(files) and max(ids.values()) == 1 and original in ids
    assert set(ids) == state["ok"] and state["problems"] == [], state
    assert set(state["other"]) == {dup_key}, state["other"]
    dup = state["other"][dup_key]
    assert dup["status"] == "failed" and dup["stage"] == "source"
    assert f"duplicate of {original} (its row: list.csv:2)" in dup["reason"] and "list.csv:12" in dup["reason"]
    assert rerun.resume["ul"]["duplicate"] == 1
    assert cli(["status", str(out), "--failed"]) == 0
    shown = capsys.readouterr().out
    assert f"{dup_key}\t{last}\tsource: duplicate of {original}" in shown, shown
    again = run_job(validate_job(cfg))
    assert again.finished == 0 and shard_ids(out) == ids


def test_requeued_sets_aside_earlier_outcomes_and_survives_compaction(tmp_path):
    """The ledger rule behind repair, without Ray: a `requeued` outcome beats an earlier ok (so the id is to do
    again), a later ok beats it, and compacting the ledger into a level keeps both decisions."""
    from pipeline.ledger import LedgerView, compact, fragment_path, read_all, write_table
    from schemas.tokens import ledger_table

    storage = Storage(str(tmp_path / "store"))
    rec = {"bucket": 0, "modality": "image", "source": "t"}
    write_table(
        storage,
        fragment_path(0),
        ledger_table([{"id": "a", "status": "ok", **rec}, {"id": "b", "status": "ok", **rec}]),
    )
    write_table(
        storage,
        fragment_path(1),
        ledger_table([{"id": "a", "status": "requeued", **rec}, {"id": "b", "status": "requeued", **rec}]),
    )
    write_table(storage, fragment_path(2), ledger_table([{"id": "b", "status": "ok", **rec}]))

    def statuses():
        t = read_all(storage, ["id", "status"])
        return dict(zip(t.column("id").to_pylist(), t.column("status").to_pylist()))

    assert statuses() == {"a": "requeued", "b": "ok"}
    view = LedgerView(storage.root, {}, tuple(e.path for e in storage.list("ledger", recursive=True)))
    assert dict(zip(*[view.statuses(0).column(c).to_pylist() for c in ("id", "status")])) == statuses()
    compact(storage, [e.path for e in storage.list("ledger/log")])
    assert statuses() == {"a": "requeued", "b": "ok"}
