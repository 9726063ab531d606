"""End-to-end jobs on a real local Ray cluster (2 CPUs) over real files, written to local disk or a real S3 server
(SeaweedFS), loaded back with Hugging Face datasets."""

import csv
import json
import shutil

import datasets
import numpy as np
import pyarrow.parquet as pq

from pipeline.job import validate_job
from pipeline.ledger import read_all
from pipeline.run import run_job
from pipeline.storage import Storage
from pipeline.store import Store, verify, versions
from pipeline.qa_pictures import BAND, CELL
from tests.browser import PageParts
from tests.http_server import Fault, FaultServer

IMAGES = ["astronaut.png", "Channel_digital_image_CMYK_color.jpg", "portrait-orientation-6.jpg", "hopper_16bit.pgm"]
VIDEOS = ["video_90.mov", "bbb_480p_vp9_opus_1second.webm"]
BAD = ["truncated.jpg", "fixed_lacing_bad_lace_size.mkv"]  # (no_duration.webm decodes, through PyAV)


def make_job(out, sources, **extra):
    cfg = {
        "name": "t",
        "out": str(out),
        "sources": sources,
        "decode": {
            "fps": 4,
            "max_frames": 8,
            "timeout_s": 30,
            "buckets": {"area": 128 * 128, "min_side": 64, "max_side": 256},
        },
        "fetch": {"retries": 2, "backoff_s": 0.05, "read_timeout_s": 1.0, "deadline_s": 5.0},
        "mesh": {"views": 8, "backend": "cpu"},
        "tokenize": {"config": "tiny", "batch_tokens": 4096, "batch_rows": 4, "device": "cpu"},
        "write": {"rows_per_write": 4},
        "qa": {"samples": 1},
    }
    for k, v in extra.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return validate_job(cfg)


def the_store(out, options=None) -> Store:
    found = versions(Storage(str(out), options))
    assert len(found) == 1, found
    store = Store(found[0])
    store.load()
    return store


def outcomes(store: Store) -> dict:
    return {r["id"]: r for r in read_all(store.storage).to_pylist()}


def shard_rows(store: Store, modality=None) -> list[dict]:
    out = []
    for path, s in sorted(store.shards.items()):
        if modality is None or s.modality == modality:
            with store.storage.open_input(path) as f:
                out += pq.read_table(f).to_pylist()
    return out


def check_qa_page(store: Store, modalities: set) -> None:
    """qa/index.html lists each QA sample with the id and PSNR of qa.json, and links pictures that exist."""
    qa = json.loads(store.storage.read_bytes("qa/qa.json"))
    page = PageParts(store.storage.read_bytes("qa/index.html").decode())
    assert {s["modality"] for s in qa["samples"]} == modalities
    assert [r[:3] for r in page.rows] == [[s["id"], s["modality"], f"{s['psnr']:.2f}"] for s in qa["samples"]]
    assert page.images == [s["picture"] for s in qa["samples"]]
    assert all(store.storage.size(f"qa/{src}") for src in page.images)


def test_folder_job_end_to_end_and_rerun(ray_local, shared_data, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in IMAGES:
        shutil.copy(shared_data / "images" / name, src / name)
    for name in VIDEOS:
        shutil.copy(shared_data / "videos" / name, src / "sub" / name)
    for name in BAD:
        shutil.copy(shared_data / "bad" / name, src / name)
    shutil.copy(shared_data / "meshes" / "BoxVertexColors.glb", src / "box.glb")
    job = make_job(tmp_path / "out", [{"type": "folder", "path": str(src), "name": "local"}])

    summary = run_job(job)
    store = the_store(tmp_path / "out")
    state = outcomes(store)
    assert summary.counts["ok"] == len(IMAGES) + len(VIDEOS) + 1
    assert summary.counts["failed"] == len(BAD)
    failed = [r for r in state.values() if r["status"] == "failed"]
    assert {r["stage"] for r in failed} == {"decode"} and all(r["reason"] for r in failed)
    assert verify(store.storage) == []
    assert summary.qa["image"]["n"] == 1 and np.isfinite(summary.qa["image"]["psnr"])
    assert 0 < summary.qa["video"]["ssim"] <= 1
    from PIL import Image

    with Image.open(f"{store.uri}/qa/image.png") as grid:  # a label band, the input above its reconstruction
        assert grid.size == (CELL, BAND + 2 * CELL) and np.asarray(grid).std() > 0
    check_qa_page(store, {"image", "video", "3d"})
    assert f"qa pictures and numbers: {store.uri}/qa/index.html" in summary.render()
    with Image.open(f"{store.uri}/qa/samples/3d-00.png") as card:  # mesh, input voxels, decoded voxels x 4 views
        assert card.size == (4 * CELL, BAND + 3 * CELL) and np.asarray(card).std() > 10
    with Image.open(f"{store.uri}/qa/samples/video-00.png") as card:  # up to 4 frames (video_90.mov has 3)
        assert card.size[0] in (3 * CELL, 4 * CELL) and card.size[1] == BAND + 2 * CELL

    images = datasets.load_dataset("parquet", data_files=f"{store.uri}/data/image/*.parquet", split="train")
    assert len(images) == len(IMAGES)
    table = images.with_format("arrow")[:]
    assert str(table.column("latent").type.value_type) == "fixed_size_list<item: halffloat>[48]"
    assert str(table.column("pooled").type) == "fixed_size_list<item: halffloat>[144]"
    for rec in images:
        assert rec["num_tokens"] == (rec["height"] // 16) * (rec["width"] // 16) == len(rec["latent"])
        assert rec["fsq_indices"] is None  # continuous tokenizer
        assert rec["preprocess"] == store.read_json("preprocess.json")["id"]
    portrait = next(r for r in images if r["id"].endswith("portrait-orientation-6.jpg"))
    assert portrait["width"] > portrait["height"]  # stored 700x840, EXIF orientation 6 turns it landscape
    assert (portrait["orig_width"], portrait["orig_height"]) == (840, 700)
    videos = datasets.load_dataset(
        "parquet", data_files=f"{store.uri}/data/video/*.parquet", split="train", streaming=True
    )
    vids = list(videos)
    assert sorted(v["num_frames"] for v in vids) == [3, 4]  # video_90.mov has 3 frames; the tokenizer pads to 4
    assert all(v["num_tokens"] == (v["height"] // 16) * (v["width"] // 16) for v in vids)
    box = shard_rows(store, "3d")[0]
    assert box["num_voxels"] == box["num_tokens"] > 0
    card = (tmp_path / "out" / store.uri.rsplit("/", 1)[-1] / "README.md").read_text()
    assert "config_name: 3d" in card and "data/video/*.parquet" in card
    loaded = datasets.load_dataset(store.uri, "image", split="train")  # through the card's configs
    assert len(loaded) == len(IMAGES)
    name = store.uri.rsplit("/", 1)[-1]  # the output root's card: its configs name the latest version's shards
    from_root = datasets.load_dataset(str(tmp_path / "out"), split="train")  # default: the first modality
    assert len(from_root) == len(IMAGES) and set(from_root["id"]) == set(loaded["id"])
    assert len(datasets.load_dataset(str(tmp_path / "out"), f"{name}-video", split="train")) == len(VIDEOS)

    shards_before = dict(store.shards)
    again = run_job(job)  # a rerun does no work
    assert again.todo == 0 and again.done_before == {"ok": 7, "failed": 2, "skipped": 0}
    assert again.finished == 0 and not again.qa  # nothing new: no QA either
    assert the_store(tmp_path / "out").shards == shards_before


def write_webvid(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerows(rows)


def test_csv_over_http_incremental_retry_failed_and_dry_run(ray_local, shared_data, tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    for name in VIDEOS + ["video_270.mov"]:
        shutil.copy(shared_data / "videos" / name, served / name)
    faults = {
        "/video_90.mov": Fault("status", code=500, times=1),  # retried to success
        "/missing.mp4": Fault("status", code=404),
        "/video_270.mov": Fault("status", code=404, times=None),
    }
    with FaultServer(served, faults) as srv:
        csv_path = tmp_path / "webvid.csv"
        rows = [
            ["1", srv.url("video_90.mov"), "PT00H00M01S", "p", "a rotated clip"],
            ["2", srv.url("missing.mp4"), "PT00H00M02S", "p", "gone"],
            ["3", srv.url("video_270.mov"), "PT00H00M01S", "p", "not yet there"],
            ["3", srv.url("video_270.mov"), "PT00H00M01S", "p", "a duplicate row"],
        ]
        write_webvid(csv_path, rows)
        job = make_job(tmp_path / "out", [{"type": "webvid", "path": str(csv_path)}], qa={"samples": 0})
        plan = run_job(job, dry_run=True)  # plans without fetching
        # the duplicate row (line 5) is a sample to do: its failure, recorded under its own line
        assert plan.resume["webvid"] == {
            "rows": 4,
            "duplicate": 1,
            "todo": 4,
            "ok": 0,
            "failed": 0,
            "skipped": 0,
            "failed_duplicate": 0,
        }
        assert srv.total_hits() == 0

        first = run_job(job)
        assert first.counts == {"ok": 1, "failed": 3} and first.resume["webvid"]["duplicate"] == 1
        store = the_store(tmp_path / "out")
        reasons = {i: r["reason"] for i, r in outcomes(store).items() if r["status"] == "failed"}
        assert reasons.pop("webvid:webvid.csv:5").startswith("duplicate of webvid-3 (its row: webvid.csv:4)")
        assert len(reasons) == 2 and all("404" in r for r in reasons.values())

        write_webvid(csv_path, rows + [["4", srv.url("bbb_480p_vp9_opus_1second.webm"), "PT00H00M01S", "p", "new"]])
        hits = srv.total_hits()
        second = run_job(job)  # only the appended row is new work; failures stay failed
        assert second.todo == 1 and second.counts == {"ok": 1}
        text = second.render()  # the duplicate is not counted as retriable: --retry-failed would skip it
        assert "2 samples failed in earlier runs and were not retried" in text, text
        assert "1 duplicate rows are failed for good" in text, text
        assert srv.total_hits() == hits + 1

        del srv.faults["/video_270.mov"]
        third = run_job(job, retry_failed=True)  # (not the duplicate: it would fail the same)
        assert third.todo == 2 and third.counts == {"ok": 1, "failed": 1}
        text = third.render()  # they were retried: the summary must not say otherwise
        assert "not retried" not in text and "1 samples failed this run" in text, text
        plan = run_job(job, dry_run=True)
        assert plan.resume["webvid"]["ok"] == 3 and plan.resume["webvid"]["failed"] == 2
    store = the_store(tmp_path / "out")
    state = outcomes(store)
    assert sorted(i for i, r in state.items() if r["status"] == "ok") == ["webvid-1", "webvid-3", "webvid-4"]
    captions = {r["caption"] for r in shard_rows(store)}
    assert captions == {"a rotated clip", "new", "not yet there"}
    assert verify(store.storage) == []


def test_objaverse_job_end_to_end(ray_local, tmp_path):
    """The Objaverse source (objaverse package against a local mirror) through mesh render + voxelise + tokenize."""
    from tests.test_sources import build_mirror

    m = build_mirror(tmp_path / "mirror")
    uid0, uid1, uid2 = m["uids"]
    caps = tmp_path / "cap3d.csv"
    caps.write_text(f"{uid1},a small cube with vertex colours\n")
    job = make_job(
        tmp_path / "out",
        [{"type": "objaverse", "mirror_dir": str(tmp_path / "mirror"), "captions_csv": str(caps)}],
        qa={"samples": 1},
    )
    summary = run_job(job)
    assert summary.counts == {"ok": 2, "failed": 1}
    store = the_store(tmp_path / "out")
    assert "downloads disabled" in outcomes(store)[f"objaverse-{uid2}"]["reason"]
    rows = {r["id"]: r for r in shard_rows(store)}
    cube = rows[f"objaverse-{uid1}"]
    assert cube["modality"] == "3d" and cube["caption"] == "a small cube with vertex colours"
    assert cube["num_voxels"] == cube["num_tokens"] > 1000
    assert {tuple(c[:1]) for c in cube["coords"]} == {(1,)} and max(max(c[1:]) for c in cube["coords"]) <= 63
    render = json.loads(cube["meta"])["render"]
    assert render["views"] == 8 and render["backend"] == "cpu" and json.loads(cube["meta"])["uid"] == uid1
    assert summary.qa["3d"]["n"] == 1 and np.isfinite(summary.qa["3d"]["psnr"])
    assert verify(store.storage) == []


def test_job_to_s3_and_datasets_from_s3(ray_local, shared_data, tmp_path, s3_server, s3_prefix):
    """`out: s3://...`: shards, manifest, ledger and card on a real S3 server; HF datasets reads them there.
    (Credentials through the job's `storage:` options here; through the environment in tests/reliability.)"""
    src = tmp_path / "in"
    src.mkdir()
    for name in IMAGES[:2]:
        shutil.copy(shared_data / "images" / name, src / name)
    shutil.copy(shared_data / "videos" / VIDEOS[1], src / VIDEOS[1])
    shutil.copy(shared_data / "bad" / BAD[0], src / BAD[0])
    out = s3_server.uri(s3_prefix)
    job = make_job(
        out,
        [{"type": "folder", "path": str(src), "name": "s3in"}],
        qa={"samples": 1},
        storage=s3_server.options().model_dump(exclude_none=True),
    )
    summary = run_job(job)
    assert summary.counts == {"ok": 3, "failed": 1} and summary.qa["image"]["n"] == 1
    store = the_store(out, s3_server.options())
    assert store.uri.startswith("s3://") and verify(store.storage) == []
    check_qa_page(store, {"image", "video"})  # the QA page and its pictures, on S3
    names = [e.path for e in store.storage.list("", recursive=True)]
    assert any(n.startswith("data/image/") for n in names) and any(n.startswith("ledger/") for n in names)
    assert not any(n.startswith("staging/") for n in names)
    ds = datasets.load_dataset(
        "parquet",
        data_files=f"{store.uri}/data/image/*.parquet",
        split="train",
        storage_options=s3_server.storage_options(),
    )
    assert sorted(ds["id"]) == sorted(f"s3in-{n.replace('.', '.')}" for n in IMAGES[:2])
    assert not (tmp_path / "s3:").exists()  # never a local folder named after the scheme
    again = run_job(job)
    assert again.todo == 0 and again.done_before["ok"] == 3


def test_changed_preprocessing_goes_to_a_new_version(ray_local, shared_data, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared_data / "videos" / VIDEOS[1], src / "clip.webm")
    shutil.copy(shared_data / "images" / IMAGES[0], src / "a.png")
    shutil.copy(shared_data / "videos" / "stub_mp4v.mp4", src / "small.mp4")  # 160x120: upscaled by the second job
    out = tmp_path / "out"
    first = run_job(make_job(out, [{"type": "folder", "path": str(src)}], qa={"samples": 0}))
    # the second job upscales: small.mp4 travels at native size and the tokenizer resizes it (decode.defer_upscale)
    # ("on": auto would leave it to the decoder, this tokenizer being on the CPU)
    up = {
        "fps": 2,
        "upscale": True,
        "defer_upscale": "on",
        "buckets": {"area": 256 * 256, "min_side": 64, "max_side": 512},
    }
    second = run_job(make_job(out, [{"type": "folder", "path": str(src)}], decode=up, qa={"samples": 2}))
    assert first.store_dir != second.store_dir and second.todo == 3  # not appended to the old shards
    assert any("decode.fps 4.0 -> 2.0" in n for n in second.notes)
    assert second.qa["video"]["n"] == 2 and np.isfinite(second.qa["video"]["psnr"])  # QA resizes as tokenized
    new_store = Store(Storage(second.store_dir))
    new_store.load()
    vids = {r["uri"].rsplit("/", 1)[-1]: r for r in shard_rows(new_store, "video")}
    small = vids["small.mp4"]
    assert small["upscaled"] is True and (small["orig_height"], small["orig_width"]) == (120, 160)
    assert (small["height"], small["width"], small["num_frames"]) == (224, 288, 4)  # the bucket, not native
    assert small["num_tokens"] == (224 // 16) * (288 // 16) == len(small["latent"])
    big = vids["clip.webm"]  # 480x854: downscaled by the decoder
    assert big["upscaled"] is False and (big["height"], big["width"], big["num_frames"]) == (192, 336, 4)
    assert big["num_tokens"] == (192 // 16) * (336 // 16)
    old, new = (Store(Storage(d)) for d in (first.store_dir, second.store_dir))
    assert old.read_json("preprocess.json")["settings"]["decode"]["fps"] == 4.0
    assert new.read_json("preprocess.json")["settings"]["decode"]["fps"] == 2.0
    # QA decodes with the recorded settings, not the job's current ones
    from pipeline.qa import recorded_configs

    decode, _ = recorded_configs(old, make_job(out, [{"type": "folder", "path": str(src)}], decode={"fps": 2}))
    assert decode.fps == 4.0


def test_plan_splits_3d_rows_to_their_own_pool(ray_local, shared_data, tmp_path):
    """With a GPU share for 3D workers, phase 1 routes rows by their (content-sniffed) modality: a mesh whose
    name says nothing goes to the 3D pool, images and videos to the media pool; one read of the source."""
    from pipeline import ray_job
    from pipeline.ledger import LedgerView

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared_data / "images" / IMAGES[0], src / "a.png")
    shutil.copy(shared_data / "videos" / VIDEOS[1], src / "b.webm")
    shutil.copy(shared_data / "meshes" / "Box.glb", src / "mesh.bin")  # content, not extension, decides
    job = make_job(tmp_path / "out", [{"type": "folder", "path": str(src)}])
    view = LedgerView(str(tmp_path / "none"), {}, ())
    todo = ray_job.plan_work(job, view, 16, False, None, ray_local, split=True, batch_rows={"media": 2, "3d": 1})
    blocks = {b: list(ds.iter_batches(batch_size=None, batch_format="pyarrow")) for b, ds in todo.items()}
    ids = {b: sorted(r["id"] for t in ts for r in ray_job.from_table(t)) for b, ts in blocks.items()}
    assert ids == {"media": ["folder-a.png", "folder-b.webm"], "3d": ["folder-mesh.bin"]}
    assert max(t.num_rows for t in blocks["media"]) <= 2  # blocks of one prepare batch
