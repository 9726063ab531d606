"""Spans and metadata that tell the truth: the window actually tokenized, clamped and past-the-end spans, several
windows per clip, typed source columns, non-fatal bad metadata, filters and no silent upscaling. Real videos from
../shared/data, Panda-70M / WebVid CSVs with the real rows' structure, real decode, tokenize and Parquet loaded back
with Hugging Face datasets."""

import csv
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.decode import DecodeConfig, DecodeError, decode_file, plan_windows
from pipeline.fetch import FetchConfig
from pipeline.job import preprocess_identity, validate_job
from pipeline.mesh.stage import MeshConfig
from pipeline.prepare import Prepare
from pipeline.rows import window_id
from pipeline.sources import iter_rows, make_source, source_config
from pipeline.tokenize import Tokenize, TokenizeConfig
from schemas.tokens import TokenDims, rows_to_table

SMALL = {"area": 64 * 64, "min_side": 32, "max_side": 128}  # small buckets: cheap CPU tokenizing


@pytest.fixture(autouse=True)
def scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.delenv("PIPELINE_FAULT", raising=False)


@pytest.fixture
def prepare():
    stages = []

    def make(**decode):
        st = Prepare(FetchConfig(retries=0), DecodeConfig(timeout_s=30, **decode), MeshConfig(backend="cpu"))
        stages.append(st)
        return st

    yield make
    for st in stages:
        st.teardown()


def read(**cfg):
    return list(iter_rows(make_source(source_config(cfg))))


# ---- windows ------------------------------------------------------------------------------------------------


def test_plan_windows_first_centre_all_and_clamping():
    # chaplin.mp4: 241 frames at 25 fps (9.64 s); 8 fps x 16 frames = 2 s windows
    first = plan_windows(241, 25.0, 8.0, 16, [1.0, 9.0])
    assert [(w.start, w.end, len(w.frames)) for w in first.windows] == [(1.0, 3.0, 16)] and not first.clamped
    centre = plan_windows(241, 25.0, 8.0, 16, [1.0, 9.0], "centre")
    assert [(w.start, w.end) for w in centre.windows] == [(4.0, 6.0)]
    every = plan_windows(241, 25.0, 8.0, 16, [1.0, 9.0], "all", max_windows=8)
    assert [(w.index, w.start, w.end) for w in every.windows] == [
        (0, 1.0, 3.0),
        (1, 3.0, 5.0),
        (2, 5.0, 7.0),
        (3, 7.0, 9.0),
    ]
    assert every.windows[1].frames[0] == 75  # 3.0 s x 25 fps
    assert len(plan_windows(241, 25.0, 8.0, 16, [1.0, 9.0], "all", max_windows=2).windows) == 2  # the cap
    tail = plan_windows(241, 25.0, 8.0, 16, [8.0, 48.0])  # a 40 s span in a 9.64 s file
    assert tail.clamped and tail.clip == pytest.approx(1.64) and tail.windows[0].end <= 9.64
    assert not plan_windows(241, 25.0, 8.0, 16, [8.0, 9.66]).clamped  # within a frame of the end: rounding
    with pytest.raises(DecodeError, match=r"starts after the video ends \(9.640s\)"):
        plan_windows(241, 25.0, 8.0, 16, [19.227, 28.278])


def test_windows_all_decodes_distinct_frames(shared_data):
    path = str(shared_data / "videos" / "chaplin.mp4")
    out = decode_file(path, "video", DecodeConfig(fps=4, max_frames=8, windows="all", max_windows=3), (1.0, 9.0))
    wins = [out] + out["more_windows"]
    assert [(w["window_index"], w["window_start"], w["window_end"]) for w in wins] == [
        (0, 1.0, 3.0),
        (1, 3.0, 5.0),
        (2, 5.0, 7.0),
    ]
    assert all(w["pixels"].shape[0] == w["num_frames"] == 8 and w["fps"] == 4.0 for w in wins)
    assert not np.array_equal(wins[0]["pixels"], wins[1]["pixels"])
    first = decode_file(path, "video", DecodeConfig(fps=4, max_frames=8), (1.0, 9.0))
    np.testing.assert_array_equal(first["pixels"], wins[0]["pixels"])  # window 0 is what `first` gives
    assert window_id("panda70m-x_1000_9000", 0) == "panda70m-x_1000_9000"
    assert window_id("panda70m-x_1000_9000", 2) == "panda70m-x_1000_9000.w2"


# ---- a Panda-70M CSV end to end -----------------------------------------------------------------------------


def _panda_csv(path: Path):
    """The official 7-column training layout; two source videos, several clips each, real timestamp format."""
    rows = [
        {
            "videoID": "chaplin",
            "url": "chaplin.mp4",
            "timestamp": "[['0:00:01.000', '0:00:07.000'], ['0:00:08.500', '0:00:48.000'], ['0:00:19.227', '0:00:28.278']]",
            "caption": "['A man walks.', 'A crowd.', 'Past the end.']",
            "matching_score": "[0.451416015625, 0.4990234375, 0.434814453125]",
            "desirable_filtering": "['desirable', '1_still_foreground_image', 'desirable']",
            "shot_boundary_detection": "[[['0:00:00.000', '0:00:03.069']], [['0:00:00.000', '0:00:03.169']], "
            "[['0:00:00.000', '0:00:02.702'], ['0:00:02.736', '0:00:04.838']]]",
        },
        {
            "videoID": "bunny",
            "url": "Big_Buck_Bunny_180_10s.webm",
            "timestamp": "[['0:00:00.500', '0:00:03.000'], ['0:00:04.000', '0:00:09.000']]",
            "caption": "['A rabbit.', 'A tree.']",
            "matching_score": "[0.3, 0.5]",
            "desirable_filtering": "['desirable', 'desirable']",
            "shot_boundary_detection": "[[['0:00:00.000', 'garbage']]]",
        },  # malformed and too short: recorded only
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_panda_clips_store_the_tokenized_window(shared_data, tmp_path, prepare):
    _panda_csv(tmp_path / "panda.csv")
    src = read(type="panda70m", path=str(tmp_path / "panda.csv"), base_dir=str(shared_data / "videos"))
    assert [r["status"] for r in src] == ["ok"] * 5
    bunny = [r for r in src if "bunny" in r["id"]]
    assert all(r["shot_boundary_detection"] is None for r in bunny)  # bad optional metadata: recorded, not fatal
    assert "shot_boundary_detection" in json.loads(bunny[0]["meta"])["metadata_errors"]
    out = prepare(fps=4, max_frames=8, windows="all", max_windows=2, buckets=SMALL)(src)
    by_id = {r["id"]: r for r in out}
    ok = [r for r in out if r["status"] == "ok"]
    assert len(ok) == 6  # chaplin: 2 windows + 1 (clamped, 1.14 s); bunny: 1 (2.5 s) + 2
    for r in ok:  # the stored window is the frames: end - start = frames / fps, inside the span and the file
        assert r["window_end"] - r["window_start"] == pytest.approx(r["num_frames"] / r["fps"], abs=1e-5)
        assert r["span_start"] <= r["window_start"] < r["window_end"] <= min(r["span_end"], r["media_duration"])
        assert r["pixels"].shape[0] == r["num_frames"]
    main = by_id["panda70m-chaplin_1000_7000"]
    assert (main["window_start"], main["window_end"], main["num_frames"], main["fps"]) == (1.0, 3.0, 8, 4.0)
    assert not main["span_clamped"] and main["media_duration"] == pytest.approx(9.64)
    second = by_id["panda70m-chaplin_1000_7000.w1"]
    assert (second["window_start"], second["window_end"], second["window_index"]) == (3.0, 5.0, 1)
    clamped = by_id["panda70m-chaplin_8500_48000"]
    assert clamped["span_clamped"] and clamped["span_end"] == 48.0 and clamped["window_end"] <= 9.64
    past = by_id["panda70m-chaplin_19227_28278"]
    assert past["status"] == "failed" and past["stage"] == "decode"
    assert past["reason"] == "span [19.227, 28.278]s starts after the video ends (9.640s)"

    tok = Tokenize(TokenizeConfig(config="tiny", device="cpu", batch_rows=8), preprocess="pp-test")
    done = tok(out)
    table = rows_to_table([r for r in done if r["status"] == "ok"], TokenDims(**tok.identity["dims"]))
    pq.write_table(table, tmp_path / "part.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "part.parquet"), split="train")
    got = {r["id"]: r for r in ds}
    assert set(got) == {r["id"] for r in ok}
    rec = got["panda70m-chaplin_1000_7000"]
    assert (rec["window_start"], rec["window_end"], rec["num_frames"], rec["fps"]) == (1.0, 3.0, 8, 4.0)
    assert (rec["span_start"], rec["span_end"], rec["window_index"]) == (1.0, 7.0, 0)
    assert rec["matching_score"] == 0.451416015625 and rec["desirable_filtering"] == "desirable"
    assert rec["shot_boundary_detection"] == [[0.0, 3.069]]
    assert got["panda70m-chaplin_8500_48000"]["span_clamped"] is True
    assert rec["upscaled"] is False and rec["page_dir"] is None
    assert str(ds.features["matching_score"].dtype) == "float64"
    assert str(ds.features["span_clamped"].dtype) == "bool"


def test_min_matching_score_skips_before_download(shared_data, tmp_path):
    _panda_csv(tmp_path / "panda.csv")
    rows = read(type="panda70m", path=str(tmp_path / "panda.csv"), min_matching_score=0.45)
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [r["id"] for r in skipped] == ["panda70m-chaplin_19227_28278", "panda70m-bunny_500_3000"]
    assert skipped[1]["stage"] == "source"
    assert skipped[1]["reason"] == "filter min_matching_score=0.45: the clip's score is 0.3000"


# ---- WebVid: typed columns, bad metadata never fatal ----------------------------------------------------------


def test_webvid_typed_columns_and_malformed_duration(shared_data, tmp_path):
    with open(shared_data / "metadata" / "test_webvid.csv", newline="") as f:
        real = list(csv.DictReader(f))[:3]
    real[1]["duration"] = "17 seconds"  # malformed: metadata nothing needs
    with open(tmp_path / "webvid.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(real[0]))
        w.writeheader()
        w.writerows(real)
    rows = read(type="webvid", path=str(tmp_path / "webvid.csv"))
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert rows[0]["page_dir"] == "027701_027750" and rows[0]["duration"] == 17.0
    assert rows[1]["duration"] is None and rows[1]["page_dir"] == real[1]["page_dir"]
    assert "not an ISO-8601 duration" in json.loads(rows[1]["meta"])["metadata_errors"]["duration"]


# ---- filters and sizes ----------------------------------------------------------------------------------------


def test_filters_skip_with_the_rule(shared_data, prepare):
    from pipeline.rows import new_row

    def row(name):
        return new_row(name, "video", "t", uri=str(shared_data / "videos" / name))

    out = prepare(min_side=128, fps=4, max_frames=8)([row("stub_mjpeg.avi"), row("chaplin.mp4")])
    assert [(r["status"], r["stage"]) for r in out] == [("skipped", "decode"), ("ok", "decode")]
    assert out[0]["reason"] == "filter decode.min_side=128: source is 160x120"
    out = prepare(min_frames=4, min_duration_s=1.0)([row("video_90.mov"), row("chaplin.mp4")])
    assert out[0]["status"] == "skipped" and out[0]["reason"] == "filter decode.min_frames=4: the clip gives 3 frames"
    assert out[1]["status"] == "ok"
    out = prepare(min_duration_s=1.0)([row("stub_mp4v.mp4")])
    assert out[0]["status"] == "skipped" and out[0]["reason"] == "filter decode.min_duration_s=1: the clip is 0.500s"


def test_no_silent_upscaling(shared_data):
    small = str(shared_data / "videos" / "stub_mp4v.mp4")  # 160x120; its bucket is 224x288
    native = decode_file(small, "video", DecodeConfig())
    assert native["pixels"].shape[1:3] == (112, 144) and native["upscaled"] is False
    up = decode_file(small, "video", DecodeConfig(upscale=True))  # native frames; the tokenizer resizes them
    assert up["pixels"].shape[1:3] == (120, 160) and up["resize_to"] == (224, 288) and up["upscaled"] is True
    up = decode_file(small, "video", DecodeConfig(upscale=True, defer_upscale="off"))  # the decoder resizes them
    assert up["pixels"].shape[1:3] == (224, 288) and up["resize_to"] is None and up["upscaled"] is True
    img = str(shared_data / "images" / "hopper_gray.jpg")  # 128x128; its bucket is 256x256
    assert decode_file(img, "image", DecodeConfig())["pixels"].shape[1:3] == (128, 128)
    got = decode_file(img, "image", DecodeConfig(upscale=True))
    assert got["pixels"].shape[1:3] == (256, 256) and got["upscaled"] is True
    big = decode_file(str(shared_data / "videos" / "chaplin.mp4"), "video", DecodeConfig())
    assert big["pixels"].shape[1:3] == (192, 336) and big["upscaled"] is False  # large sources: unchanged


def test_window_and_upscale_settings_change_the_preprocessing_identity(tmp_path):
    def ident(**decode):
        job = validate_job(
            {"out": str(tmp_path / "o"), "sources": [{"type": "folder", "path": str(tmp_path)}], "decode": decode}
        )
        return preprocess_identity(job)

    base = ident()
    assert base["settings"]["decode"]["windows"] == "first" and base["settings"]["decode"]["upscale"] is False
    assert ident(windows="all")["id"] != base["id"] and ident(upscale=True)["id"] != base["id"]
    assert ident(min_side=64)["id"] == base["id"]  # filters choose samples, they do not change tokens
    assert ident(defer_upscale="off")["id"] == base["id"]  # where the resize runs, not what it makes
