"""The prepare stage (fetch + decode, fetch + mesh) without Ray: real files from the shared data, a loopback HTTP
server, fault injection in the isolated decode child, and the scratch folder's clean-up."""

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeConfig, decode_file
from pipeline.fetch import FetchConfig, Fetcher
from pipeline.mesh.stage import MeshConfig
from pipeline.prepare import DECODED, Prepare
from pipeline.rows import fail, new_row
from pipeline.sources import iter_rows, make_source, source_config
from tests.http_server import FaultServer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DECODE = DecodeConfig(fps=4, max_frames=8, timeout_s=30)
MESH = MeshConfig(views=4, resolution=64, backend="cpu")
FETCH = FetchConfig(retries=0)


@pytest.fixture(autouse=True)
def _own_scratch(scratch) -> Path:
    """Every test here runs in its own scratch root (tests/conftest.py)."""
    return scratch


@pytest.fixture
def prepare():
    stages = []

    def make(branch="media", decode=DECODE, fetch=FETCH):
        st = Prepare(fetch, decode, MESH, branch=branch)
        stages.append(st)
        return st

    yield make
    for st in stages:
        st.teardown()


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def row(uri, modality, id_=None, **kw):
    return new_row(id_ or Path(str(uri)).name, modality, "test", uri=str(uri), **kw)


# ---- a local folder --------------------------------------------------------------------------------------


def test_local_folder_to_decoded_rows(tmp_path, prepare, scratch):
    src = tmp_path / "in"
    (src / "clips").mkdir(parents=True)
    (src / "meshes").mkdir()
    for name in ("coffee.png", "portrait-orientation-6.jpg", "hopper_16bit.pgm"):
        shutil.copy(DATA / "images" / name, src / name)
    for name in ("chaplin.mp4", "stub_mjpeg.avi"):
        shutil.copy(DATA / "videos" / name, src / "clips" / name)
    shutil.copy(DATA / "meshes" / "Box.glb", src / "meshes" / "Box.glb")
    rows = list(iter_rows(make_source(source_config({"type": "folder", "path": str(src)}))))
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    media = [r for r in rows if r["modality"] != "3d"]
    meshes = [r for r in rows if r["modality"] == "3d"]

    out = {r["id"]: r for r in prepare("media")(media)}
    for r in out.values():
        assert (r["status"], r["stage"], r["reason"]) == ("ok", "decode", None), r["reason"]
        px = r["pixels"]
        assert px.dtype == np.uint8 and px.ndim == 4 and px.shape[-1] == 3 and px.shape[0] == r["num_frames"]
        assert px.shape[1] % 16 == 0 and px.shape[2] % 16 == 0
        assert {"fetch", "decode", "_done"} <= set(r["timings"])
        assert set(DECODED) <= set(r)
    image = out["folder-coffee.png"]
    assert (image["num_frames"], image["fps"]) == (1, 0.0)
    assert (image["orig_width"], image["orig_height"]) == Image.open(DATA / "images" / "coffee.png").size
    w, h = Image.open(DATA / "images" / "portrait-orientation-6.jpg").size
    portrait = out["folder-portrait-orientation-6.jpg"]
    assert (portrait["orig_width"], portrait["orig_height"]) == (h, w)  # EXIF rotation applied
    video = next(r for r in out.values() if r["uri"].endswith("chaplin.mp4"))
    assert (video["num_frames"], video["fps"], video["orig_width"], video["orig_height"]) == (8, 4.0, 640, 360)
    short = next(r for r in out.values() if r["uri"].endswith("stub_mjpeg.avi"))
    assert short["num_frames"] == 3 and short["pixels"].shape == (3, 112, 144, 3)  # 160x120: native, not upscaled
    assert short["upscaled"] is False and (short["window_start"], short["window_end"]) == (0.0, 0.3)
    # the same pixels as decoding the file directly
    ref = decode_file(str(DATA / "videos" / "chaplin.mp4"), "video", DECODE)
    np.testing.assert_array_equal(video["pixels"], ref["pixels"])
    assert files_under(scratch) == []  # local files are read in place, never copied

    (mesh,) = prepare("3d")(meshes)
    assert (mesh["status"], mesh["stage"], mesh["reason"]) == ("ok", "mesh", None)
    assert mesh["voxel_feats"].dtype == np.float16 and mesh["voxel_feats"].shape == (mesh["num_voxels"], 768)
    assert mesh["voxel_coords"].dtype == np.int16 and mesh["voxel_coords"].shape == (mesh["num_voxels"], 3)
    assert mesh["num_voxels"] > 1000 and "pixels" not in mesh and {"fetch", "mesh"} <= set(mesh["timings"])


# ---- failures ------------------------------------------------------------------------------------------


def test_missing_and_bad_files_fail_with_reasons(tmp_path, prepare):
    (tmp_path / "notes.jpg").write_text("hello, not a picture")
    earlier = fail(row(DATA / "images" / "coffee.png", "image", "earlier"), "source", "bad caption")
    rows = [
        row(tmp_path / "nope.png", "image"),
        row(DATA / "bad" / "broken.png", "image"),
        row(DATA / "bad" / "truncated_jpeg.jpg", "image"),
        row(DATA / "bad" / "fixed_lacing_bad_lace_size.mkv", "video"),
        row(tmp_path / "notes.jpg", "image"),
        row(DATA / "images" / "coffee.png", "video", "image-as-video"),
        row(DATA / "images" / "coffee.png", "unknown", "odd-modality"),
        row("", "image", "empty-uri"),
        earlier,
        row(DATA / "bad" / "chunk_too_big.glb", "3d"),
        row(DATA / "images" / "coffee.png", "image"),
    ]
    out = {r["id"]: r for r in prepare("media")(rows)}
    expect = {  # id -> (stage, text in the reason)
        "nope.png": ("fetch", f"no such file: {tmp_path / 'nope.png'}"),
        "broken.png": ("decode", "cannot identify image"),
        "truncated_jpeg.jpg": ("decode", "image file is truncated"),
        "fixed_lacing_bad_lace_size.mkv": ("decode", "corrupt or truncated video stream (decoder: Cannot create"),
        "notes.jpg": ("fetch", "content is not an image"),
        "image-as-video": ("fetch", "content is not a video (looks like png)"),
        "odd-modality": ("fetch", "content is not 'unknown'"),  # (skipped rows never get this far)
        "empty-uri": ("fetch", "empty uri"),
        "chunk_too_big.glb": ("mesh", "malformed GLB"),  # a mesh that reaches the media pool is still meshed
    }
    for rid, (stage, text) in expect.items():
        r = out[rid]
        assert (r["status"], r["stage"]) == ("failed", stage), (rid, r["reason"])
        assert text in r["reason"] and len(r["reason"]) <= 500, (rid, r["reason"])
        assert "pixels" not in r and "voxel_feats" not in r
    assert out["earlier"] is earlier  # failed rows pass through untouched
    assert out["coffee.png"]["status"] == "ok"  # the good row of the batch survives


@pytest.mark.parametrize(
    "action,reason", [("hang", "decode timed out after 1.5s"), ("self", "decode crashed (signal 9, SIGKILL)")]
)
def test_hanging_or_crashing_decode_is_killed_and_recorded(tmp_path, monkeypatch, prepare, action, reason):
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("PIPELINE_FAULT", f"decode_child:1:{action}")
    monkeypatch.setenv("PIPELINE_FAULT_DIR", str(faults))
    stage = prepare("media", decode=DecodeConfig(fps=4, max_frames=8, timeout_s=1.5))
    rows = [row(DATA / "videos" / "stub_mp4v.mp4", "video"), row(DATA / "videos" / "chaplin.mp4", "video")]
    t0 = time.monotonic()
    out = stage(rows)
    assert time.monotonic() - t0 < 15
    assert (faults / "fired").exists()
    failed = [r for r in out if r["status"] == "failed"]
    assert len(failed) == 1, [r["reason"] for r in out]  # the first decode hit the fault; the other is fine
    assert (failed[0]["stage"], failed[0]["reason"]) == ("decode", reason)
    assert [r["status"] for r in out if r is not failed[0]] == ["ok"]
    # the child was replaced: the same worker goes on decoding
    again = stage([row(DATA / "videos" / "stub_mp4v.mp4", "video", "again")])
    assert again[0]["status"] == "ok" and again[0]["num_frames"] == 4


# ---- one download for several clips ---------------------------------------------------------------------


def test_clips_of_one_video_are_fetched_once(prepare, scratch, monkeypatch):
    released = []
    real_release = Fetcher.release

    def spy(self, fetched):
        released.append(fetched)
        return real_release(self, fetched)

    monkeypatch.setattr(Fetcher, "release", spy)
    spans = [(0.0, 2.0), (2.0, 3.0), (5.0, 9.5), (None, None)]
    with FaultServer(DATA / "videos") as srv:
        url = srv.url("chaplin.mp4")
        rows = [row(url, "video", f"clip{i}", span_start=s, span_end=e) for i, (s, e) in enumerate(spans)]
        rows.append(row(srv.url("stub_mp4v.mp4"), "video", "other"))
        rows.append(row(srv.url("missing.mp4"), "video", "missing"))
        stage = prepare("media")
        out = {r["id"]: r for r in stage(rows)}
        assert srv.hits["/chaplin.mp4"] == 1 and srv.hits["/stub_mp4v.mp4"] == 1  # one request per file
    local = str(DATA / "videos" / "chaplin.mp4")
    for i, span in enumerate(spans):
        r = out[f"clip{i}"]
        assert (r["status"], r["stage"]) == ("ok", "decode"), r["reason"]
        ref = decode_file(local, "video", DECODE, None if span[0] is None else span)
        assert r["num_frames"] == ref["num_frames"]
        np.testing.assert_array_equal(r["pixels"], ref["pixels"])  # each clip decoded with its own span
    assert [out[f"clip{i}"]["num_frames"] for i in range(4)] == [8, 4, 8, 8]
    assert not np.array_equal(out["clip0"]["pixels"], out["clip2"]["pixels"])
    assert out["other"]["status"] == "ok"
    assert (out["missing"]["status"], out["missing"]["stage"]) == ("failed", "fetch")
    assert out["missing"]["reason"].startswith("http 404")
    # the downloads were scratch files, released after use: nothing is left once the batch is done
    assert len(released) == 2 and all(f.temporary for f in released)
    assert all(Path(f.path).is_relative_to(scratch) and not Path(f.path).exists() for f in released)
    assert files_under(scratch) == []
    assert os.listdir(scratch)  # the worker's (empty) folder is there until teardown
    stage.teardown()
    assert os.listdir(scratch) == []
    stage.teardown()  # twice is harmless


def test_teardown_then_reuse(prepare, scratch):
    stage = prepare("media")
    rows = [row(DATA / "images" / "coffee.png", "image")]
    assert stage(rows)[0]["status"] == "ok"
    stage.teardown()
    assert os.listdir(scratch) == [] and stage.fetcher is None
    assert stage(rows)[0]["status"] == "ok"  # setup runs again on the next call
    assert len(os.listdir(scratch)) == 1
