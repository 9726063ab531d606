"""End-to-end jobs on a real local Ray cluster (2 CPUs) over real files, loaded back with Hugging Face datasets."""
import csv
import shutil

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.job import JobConfig, build
from pipeline.run import run_job
from pipeline.store import load_state, verify
from tests.http_server import Fault, FaultServer

IMAGES = ["astronaut.png", "Channel_digital_image_CMYK_color.jpg", "portrait-orientation-6.jpg", "hopper_16bit.pgm"]
VIDEOS = ["video_90.mov", "bbb_480p_vp9_opus_1second.webm"]
BAD = ["truncated.jpg", "no_duration.webm"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_job(out, sources, **extra) -> JobConfig:
    cfg = {"name": "t", "out": str(out), "sources": sources,
           "decode": {"fps": 4, "max_frames": 8, "timeout_s": 30, "buckets": {"area": 128 * 128, "min_side": 64,
                                                                               "max_side": 256}},
           "fetch": {"retries": 2, "backoff_s": 0.05, "read_timeout_s": 1.0, "deadline_s": 5.0},
           "mesh": {"views": 8, "backend": "cpu"},
           "tokenize": {"config": "tiny", "batch_tokens": 4096, "batch_rows": 4, "device": "cpu"},
           "write": {"shard_rows": 4}, "qa": {"samples": 1}}
    cfg.update(extra)
    return build(JobConfig, cfg)


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
    store_dir = summary.store_dir
    state = load_state(store_dir)
    assert summary.counts["ok"] == len(IMAGES) + len(VIDEOS) + 1
    assert summary.counts["failed"] == len(BAD)
    assert {r["stage"] for r in state.other.values()} == {"decode"}
    assert all(r["reason"] for r in state.other.values())
    assert verify(store_dir) == []
    assert summary.qa["image"]["n"] == 1 and np.isfinite(summary.qa["image"]["psnr"])
    assert 0 < summary.qa["video"]["ssim"] <= 1
    from PIL import Image
    with Image.open(f"{store_dir}/qa/image.png") as grid:  # inputs above reconstructions
        assert grid.size[1] == 2 * grid.size[0] and np.asarray(grid).std() > 0

    images = datasets.load_dataset("parquet", data_files=f"{store_dir}/data/image/*.parquet", split="train")
    assert len(images) == len(IMAGES)
    table = images.with_format("arrow")[:]
    assert str(table.column("latent").type.value_type) == "fixed_size_list<item: halffloat>[48]"
    assert str(table.column("pooled").type) == "fixed_size_list<item: halffloat>[144]"
    for rec in images:
        assert rec["num_tokens"] == (rec["height"] // 16) * (rec["width"] // 16) == len(rec["latent"])
        assert rec["fsq_indices"] is None  # continuous tokenizer
    portrait = next(r for r in images if r["id"].endswith("portrait-orientation-6.jpg"))
    assert portrait["width"] > portrait["height"]  # stored 700x840, EXIF orientation 6 turns it landscape
    assert (portrait["orig_width"], portrait["orig_height"]) == (840, 700)
    videos = datasets.load_dataset("parquet", data_files=f"{store_dir}/data/video/*.parquet", split="train",
                                   streaming=True)
    vids = list(videos)
    assert sorted(v["num_frames"] for v in vids) == [3, 4]  # video_90.mov has 3 frames; the tokenizer pads to 4
    assert all(v["num_tokens"] == (v["height"] // 16) * (v["width"] // 16) for v in vids)
    box = pq.read_table(next((tmp_path / "out").glob("*/data/3d/*.parquet"))).to_pylist()[0]
    assert box["num_voxels"] == box["num_tokens"] > 0

    again = run_job(job)  # a rerun does no work
    assert again.todo == 0 and again.skipped_done == len(IMAGES) + len(VIDEOS) + 1 + len(BAD)
    assert load_state(store_dir).shards == state.shards


def write_webvid(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerows(rows)


def test_csv_over_http_incremental_and_retry_failed(ray_local, shared_data, tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    for name in VIDEOS + ["video_270.mov"]:
        shutil.copy(shared_data / "videos" / name, served / name)
    faults = {"/video_90.mov": Fault("status", code=500, times=1),   # retried to success
              "/missing.mp4": Fault("status", code=404),
              "/video_270.mov": Fault("status", code=404, times=None)}
    with FaultServer(served, faults) as srv:
        csv_path = tmp_path / "webvid.csv"
        rows = [["1", srv.url("video_90.mov"), "PT00H00M01S", "p", "a rotated clip"],
                ["2", srv.url("missing.mp4"), "PT00H00M02S", "p", "gone"],
                ["3", srv.url("video_270.mov"), "PT00H00M01S", "p", "not yet there"]]
        write_webvid(csv_path, rows)
        job = make_job(tmp_path / "out", [{"type": "webvid", "path": str(csv_path)}], qa={"samples": 0})
        first = run_job(job)
        assert first.counts == {"ok": 1, "failed": 2}
        reasons = {r["id"]: r["reason"] for r in load_state(first.store_dir).other.values()}
        assert all("404" in r for r in reasons.values())

        write_webvid(csv_path, rows + [["4", srv.url("bbb_480p_vp9_opus_1second.webm"), "PT00H00M01S", "p", "new"]])
        hits = srv.total_hits()
        second = run_job(job)  # only the appended row is new work; failures stay failed
        assert second.todo == 1 and second.counts == {"ok": 1}
        assert srv.total_hits() == hits + 1

        del srv.faults["/video_270.mov"]
        third = run_job(job, retry_failed=True)
        assert third.todo == 2 and third.counts == {"ok": 1, "failed": 1}
    state = load_state(third.store_dir)
    assert len(state.ok) == 3 and list(state.other) == [i for i in reasons if i.endswith("-2")]
    captions = {r["caption"] for s in state.shards for r in pq.read_table(f"{third.store_dir}/{s['path']}").to_pylist()}
    assert captions == {"a rotated clip", "new", "not yet there"}
    assert verify(third.store_dir) == []


def test_objaverse_job_end_to_end(ray_local, tmp_path):
    """The Objaverse source (objaverse package against a local mirror) through mesh render + voxelise + tokenize."""
    import json

    from tests.test_sources import build_mirror

    m = build_mirror(tmp_path / "mirror")
    uid0, uid1, uid2 = m["uids"]
    caps = tmp_path / "cap3d.csv"
    caps.write_text(f"{uid1},a small cube with vertex colours\n")
    job = make_job(tmp_path / "out", [{"type": "objaverse", "objaverse": {
        "mirror_dir": str(tmp_path / "mirror"), "captions_csv": str(caps)}}], qa={"samples": 1})
    summary = run_job(job)
    assert summary.counts == {"ok": 2, "failed": 1}
    state = load_state(summary.store_dir)
    assert "downloads disabled" in state.other[f"objaverse-{uid2}"]["reason"]
    rows = {r["id"]: r for s in state.shards for r in pq.read_table(f"{summary.store_dir}/{s['path']}").to_pylist()}
    cube = rows[f"objaverse-{uid1}"]
    assert cube["modality"] == "3d" and cube["caption"] == "a small cube with vertex colours"
    assert cube["num_voxels"] == cube["num_tokens"] > 1000
    assert {tuple(c[:1]) for c in cube["coords"]} == {(1,)} and max(max(c[1:]) for c in cube["coords"]) <= 63
    render = json.loads(cube["meta"])["render"]
    assert render["views"] == 8 and render["backend"] == "cpu" and json.loads(cube["meta"])["uid"] == uid1
    assert summary.qa["3d"]["n"] == 1 and np.isfinite(summary.qa["3d"]["psnr"])
    assert verify(summary.store_dir) == []
