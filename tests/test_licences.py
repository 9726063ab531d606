"""Licence and provenance per row, from the real metadata rows in ../shared/data/metadata: Objaverse's per-object
licence from its annotations, Panda-70M (none granted), WebVid (withdrawn), local folders (unknown unless the job
says); `require_licence` skips the others with a reason; the tokenizer weights' licence; the card's summary, also
for a store written before schema 1.3."""

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.job import load_job, validate_job
from pipeline.licences import APPLE_MODEL_TOU, RANDOM, SHIPPED, card_section, normalise, summary, weights_licence
from pipeline.sources import iter_rows, make_source, source_config
from pipeline.storage import Storage
from tests.test_pipeline_e2e import make_job, outcomes, shard_rows, the_store
from tests.test_sources import DATA, META, build_mirror

REPO = Path(__file__).resolve().parents[1]


def read(allowed=None, **cfg) -> list[dict]:
    return list(iter_rows(make_source(source_config(cfg), require_licence=allowed)))


def relicence(mirror: Path, uid: str, licence: str) -> None:
    """Gives one object of a built mirror another licence (the real annotation row, its `license` changed)."""
    for path in (mirror / "metadata").glob("*.json.gz"):
        with gzip.open(path, "rt") as f:
            anns = json.load(f)
        if uid in anns:
            anns[uid]["license"] = licence
            with gzip.open(path, "wt") as f:
                json.dump(anns, f)


@pytest.mark.parametrize(
    "raw,want",
    [
        ("by", "cc-by"),
        ("by-nc-sa", "cc-by-nc-sa"),
        ("cc0", "cc0"),
        ("CC-BY 4.0", "cc-by"),
        ("CC0 1.0", "cc0"),
        ("st", "sketchfab-standard"),
        ("ed", "sketchfab-editorial"),
        ("MIT", "mit"),
        ("", None),
        (None, None),
    ],
)
def test_normalise(raw, want):
    assert normalise(raw) == want


def test_objaverse_licence_per_object_and_require_licence(tmp_path):
    m = build_mirror(tmp_path / "mirror")
    uid0, uid1, uid2 = m["uids"]
    assert m["ann0"]["license"] == "by"  # the real annotation row
    relicence(tmp_path / "mirror", uid1, "by-nc")
    cfg = {"type": "objaverse", "mirror_dir": str(tmp_path / "mirror")}
    by = {json.loads(r["meta"])["uid"]: r for r in read(**cfg)}
    assert by[uid0]["licence"] == "cc-by" and by[uid1]["licence"] == "cc-by-nc" and by[uid0]["status"] == "ok"
    assert by[uid2]["status"] == "failed"  # not mirrored: still failed, with its licence
    by = {json.loads(r["meta"])["uid"]: r for r in read(frozenset({"cc-by", "cc0"}), **cfg)}
    assert by[uid0]["status"] == "ok"
    assert by[uid1]["status"] == "skipped" and by[uid1]["stage"] == "source"
    assert by[uid1]["reason"] == "require_licence: licence cc-by-nc is not one of cc-by, cc0"
    assert by[uid2]["status"] == "failed" and "downloads disabled" in by[uid2]["reason"]  # not hidden by the rule


def test_dataset_licences_panda_webvid_folder(tmp_path):
    panda = read(type="panda70m", path=str(META / "panda70m_training_format_example.csv"))
    webvid = read(type="webvid", path=str(META / "webvid10M_format_sample.csv"))
    shutil.copy(DATA / "images" / "camera.png", tmp_path / "camera.png")
    folder = read(type="folder", path=str(tmp_path))
    stated = read(type="folder", path=str(tmp_path), licence="CC-BY 4.0")
    assert len(panda) == 3 and {r["licence"] for r in panda} == {"none-granted"}
    assert webvid and {r["licence"] for r in webvid} == {"withdrawn"}
    assert [r["licence"] for r in folder] == ["unknown"] and [r["licence"] for r in stated] == ["cc-by"]
    skipped = read(frozenset({"cc-by"}), type="panda70m", path=str(META / "panda70m_training_format_example.csv"))
    assert {(r["status"], r["reason"]) for r in skipped} == {
        ("skipped", "require_licence: licence none-granted is not one of cc-by")
    }


def test_require_licence_is_validated():
    base = {"out": "o", "sources": [{"type": "folder", "path": "x"}]}
    assert validate_job({**base, "require_licence": ["CC-BY", "cc0", "by"]}).require_licence == ["cc-by", "cc0"]
    assert validate_job(base).allowed_licences() is None
    with pytest.raises(ConfigError, match="require_licence: got \\[\\]; an empty list would skip every sample"):
        validate_job({**base, "require_licence": []})
    job = load_job(REPO / "jobs" / "objaverse.yaml", overrides=["require_licence=[by, cc0]"])
    assert job.allowed_licences() == frozenset({"cc-by", "cc0"})


def test_weights_licence(tmp_path):
    from atoken.tokenizer import tokenizer_identity

    assert weights_licence(tokenizer_identity("tiny-c")) == SHIPPED  # atoken/weights/tiny-c.safetensors
    assert weights_licence({"checkpoint": None}) == RANDOM
    assert weights_licence({"checkpoint": "/anywhere/atoken-soc.pt"}) == APPLE_MODEL_TOU  # a released file
    mine = tmp_path / "renamed.pt"
    mine.write_bytes(b"")
    assert weights_licence({"checkpoint": str(mine)}) == "unknown"
    (tmp_path / "MODEL-LICENSE").write_text("research use only")  # as `make checkpoints` writes it
    assert weights_licence({"checkpoint": str(mine)}) == APPLE_MODEL_TOU
    assert weights_licence({"checkpoint": str(mine)}, "my-terms") == "my-terms"


def test_card_of_a_store_written_before_schema_1_3(tmp_path):
    old = pa.table({"id": ["a", "b"], "modality": ["image", "image"]})
    new = pa.table({"id": ["c"], "licence": ["cc0"], "tokenizer_licence": [SHIPPED], "renderer": [None]})
    (tmp_path / "data").mkdir()
    pq.write_table(old, tmp_path / "data" / "old.parquet")
    pq.write_table(new, tmp_path / "data" / "new.parquet")
    got = summary(Storage(str(tmp_path)), ["data/old.parquet", "data/new.parquet"])
    assert got["licence"] == {"not recorded": 2, "cc0": 1} and got["renderer"] == {"not recorded": 2, "none": 1}
    card = card_section(Storage(str(tmp_path)), ["data/old.parquet", "data/new.parquet"])
    assert "- sample licences: `not recorded` 2 rows" in card and "- sample licences: `cc0` 1 rows" in card


def test_objaverse_job_records_licences_and_skips_by_rule(ray_local, tmp_path):
    """End to end (real Ray, real render + tokenize): the shard rows carry licence, renderer and the weights'
    licence; a cc-by-nc object is skipped under require_licence with its reason in the ledger; the card sums up."""
    m = build_mirror(tmp_path / "mirror")
    uid0, uid1, uid2 = m["uids"]
    relicence(tmp_path / "mirror", uid1, "by-nc")
    job = make_job(
        tmp_path / "out",
        [{"type": "objaverse", "mirror_dir": str(tmp_path / "mirror")}],
        qa={"samples": 0},
        require_licence=["cc-by", "cc0"],
    )
    from pipeline.run import run_job

    summary_ = run_job(job)
    assert summary_.counts == {"ok": 1, "skipped": 1, "failed": 1}
    store = the_store(tmp_path / "out")
    state = outcomes(store)
    assert state[f"objaverse-{uid1}"]["status"] == "skipped"
    assert state[f"objaverse-{uid1}"]["reason"] == "require_licence: licence cc-by-nc is not one of cc-by, cc0"
    (row,) = shard_rows(store)
    assert row["id"] == f"objaverse-{uid0}" and row["licence"] == "cc-by"
    assert row["renderer"].startswith("pipeline.mesh cpu rasterizer (torch ")
    assert row["tokenizer_licence"] == weights_licence(json.loads(store.storage.read_bytes("tokenizer.json")))
    card = store.storage.read_bytes("README.md").decode()
    assert "## Licences and provenance" in card and "- sample licences: `cc-by` 1 rows" in card
    assert f"- tokenizer weights: `{row['tokenizer_licence']}` 1 rows" in card
