"""Real downloads end to end on a real local Ray cluster (2 CPUs): a Panda-70M CSV (several clips per videoID,
real timestamps) whose YouTube-style watch pages are served by a loopback HTTP server and fetched by the real
yt-dlp; a WebVid CSV read through `url_rewrite` from a local mirror layout and a video2dataset-layout tar, in one
job; and a WebVid mirror on a real S3 server (SeaweedFS)."""

import csv
import io
import json
import shutil
import tarfile


from pipeline.decode import DecodeConfig, decode_file
from pipeline.fetch import FetchConfig, Fetcher
from pipeline.run import run_job
from pipeline.sources import iter_rows, make_source, source_config
from pipeline.storage import Storage
from tests.http_server import Fault, FaultServer
from tests.test_pipeline_e2e import make_job, outcomes, shard_rows, the_store
from tests.test_ytdlp import page

PANDA_HEADER = [
    "videoID",
    "url",
    "timestamp",
    "caption",
    "matching_score",
    "desirable_filtering",
    "shot_boundary_detection",
]


def panda_row(vid, url, spans, captions, scores):
    filt = ["desirable"] * len(spans)
    shots = [[["0:00:00.000", e]] for _, e in spans]
    return [vid, url, repr([list(s) for s in spans]), repr(captions), repr(scores), repr(filt), repr(shots)]


def test_panda_job_downloads_each_video_once(ray_local, shared_data, tmp_path, capsys):
    root = tmp_path / "site"
    (root / "watch").mkdir(parents=True)
    (root / "media").mkdir()
    shutil.copy(shared_data / "videos" / "Big_Buck_Bunny_180_10s.webm", root / "media" / "bbb.webm")  # 10.0 s
    shutil.copy(shared_data / "videos" / "chaplin.mp4", root / "media" / "chaplin.mp4")  # 9.64 s
    (root / "watch" / "vidA").write_text(page("A", "/media/bbb.webm"))
    (root / "watch" / "vidB").write_text(page("B", "/media/chaplin.mp4"))
    with FaultServer(root, {"/watch/vidD": Fault("status", code=403)}) as srv:
        rows = [
            panda_row(
                "vidA",
                srv.url("watch/vidA"),
                [("0:00:00.500", "0:00:02.500"), ("0:00:03.000", "0:00:05.000"), ("0:00:20.000", "0:00:24.000")],
                ["a bunny wakes up.", "a bunny stretches.", "past the end."],
                [0.45, 0.49, 0.43],
            ),
            panda_row(
                "vidB",
                srv.url("watch/vidB"),
                [("0:00:01.000", "0:00:03.000"), ("0:00:04.000", "0:00:06.000")],
                ["a man walks.", "a man bows."],
                [0.51, 0.47],
            ),
            panda_row(
                "vidC",
                srv.url("watch/vidC"),
                [("0:00:01.000", "0:00:02.000"), ("0:00:03.000", "0:00:04.000")],
                ["removed", "removed"],
                [0.4, 0.4],
            ),
            panda_row("vidD", srv.url("watch/vidD"), [("0:00:01.000", "0:00:02.000")], ["bot check"], [0.4]),
        ]
        with open(tmp_path / "panda.csv", "w", newline="") as f:
            csv.writer(f).writerows([PANDA_HEADER, *rows])
        job = make_job(
            tmp_path / "out",
            [{"type": "panda70m", "path": str(tmp_path / "panda.csv")}],
            fetch={
                "downloader": "ytdlp",  # (auto picks yt-dlp for YouTube; loopback pages need the generic extractor)
                "ytdlp": {"retries": 0, "host_rate_per_min": 60000},
            },
            ray={"prepare_batch_rows": 2, "prepare_actors": 1},  # a video's 3 clips > one batch
            qa={"samples": 0},
        )  # (QA would fetch a video again to compare)
        summary = run_job(job)
        hits = dict(srv.hits)
    assert hits["/watch/vidA"] == 1 and hits["/watch/vidB"] == 1  # one download per video, for all its clips
    assert hits["/watch/vidC"] == 1 and hits["/watch/vidD"] == 1
    store = the_store(tmp_path / "out")
    state = outcomes(store)
    ok = {r["id"]: r for r in shard_rows(store, "video")}
    assert sorted(ok) == [
        "panda70m-vidA_3000_5000",
        "panda70m-vidA_500_2500",
        "panda70m-vidB_1000_3000",
        "panda70m-vidB_4000_6000",
    ]
    for rid, r in ok.items():
        start, end = (int(x) / 1000 for x in rid.rsplit("_", 2)[1:])
        assert r["span_start"] >= start - 1e-6 and r["span_end"] <= end + 1e-6, r
        assert r["span_end"] - r["span_start"] <= (r["num_frames"] + 1) / 4 + 1e-6  # the window the frames cover
    reasons = {k: (v["status"], v["reason"]) for k, v in state.items() if v["status"] != "ok"}
    assert reasons["panda70m-vidA_20000_24000"][0] == "failed"
    assert "after the video ends" in reasons["panda70m-vidA_20000_24000"][1]
    assert reasons["panda70m-vidC_1000_2000"][1].startswith("unavailable: yt-dlp:")
    assert reasons["panda70m-vidD_1000_2000"][1].startswith("bot-check: yt-dlp:")
    text = summary.render()
    assert "source panda70m: ok 4 of 8 (50.0%)" in text and "failed unavailable 2 (25%)" in text, text
    assert "failed bot-check 1 (12%)" in text and "failed decode 1 (12%)" in text, text
    from pipeline.cli import main

    capsys.readouterr()
    assert main(["status", str(tmp_path / "out"), "--failed"]) == 0
    status = capsys.readouterr().out
    assert "by kind: failed unavailable 2 (25.0%), " in status, status
    assert "failed bot-check 1 (12.5%)" in status and "failed decode 1 (12.5%)" in status, status
    print(text)
    print(status)


def make_wds_tar(path, videos: dict[str, str], shared_data):
    """video2dataset's layout: <key>.mp4 / <key>.txt / <key>.json per sample, keys carrying the shard number."""
    with tarfile.open(path, "w") as tar:
        for key, (name, caption) in videos.items():
            tar.add(shared_data / "videos" / name, arcname=f"{key}.{name.rsplit('.', 1)[1]}")
            meta = {"url": f"https://example.com/{name}", "key": key, "status": "success", "caption": caption}
            for ext, data in (("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("000000009.txt")  # a caption whose video is missing
        info.size = 4
        tar.addfile(info, io.BytesIO(b"lost"))


def write_webvid(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerows(rows)


ORIGIN = "https://ak.picdn.net/shutterstock/videos/"


def test_webvid_mirror_and_video2dataset_tar_job(ray_local, shared_data, tmp_path):
    mirror = tmp_path / "mirror"
    for vid, name in (("1053841541", "chaplin.mp4"), ("5641526", "Big_Buck_Bunny_180_10s.webm")):
        (mirror / vid / "preview").mkdir(parents=True)
        shutil.copy(shared_data / "videos" / name, mirror / vid / "preview" / f"stock-footage-{vid}.mp4")
    write_webvid(
        tmp_path / "webvid.csv",
        [
            [
                "1053841541",
                f"{ORIGIN}1053841541/preview/stock-footage-1053841541.mp4",
                "PT00H00M09S",
                "027701_027750",
                "Travel blogger",
            ],
            ["5641526", f"{ORIGIN}5641526/preview/stock-footage-5641526.mp4", "PT00H00M10S", "054101_054150", "Horse"],
            ["404", f"{ORIGIN}404/preview/stock-footage-404.mp4", "PT00H00M10S", "054101_054150", "not mirrored"],
        ],
    )
    (tmp_path / "v2d").mkdir()
    make_wds_tar(
        tmp_path / "v2d" / "00000.tar",
        {"000000000": ("max-heromode.mp4", "a hero jumps"), "000000001": ("bbb_480p_vp9_opus_1second.webm", "a bunny")},
        shared_data,
    )
    job = make_job(
        tmp_path / "out",
        [
            {"type": "webvid", "path": str(tmp_path / "webvid.csv"), "url_rewrite": {ORIGIN: f"{mirror}/"}},
            {"type": "webdataset", "path": str(tmp_path / "v2d"), "name": "v2d"},
        ],
    )
    summary = run_job(job)
    store = the_store(tmp_path / "out")
    rows = {r["id"]: r for r in shard_rows(store, "video")}
    assert sorted(rows) == ["v2d-000000000", "v2d-000000001", "webvid-1053841541", "webvid-5641526"]
    assert rows["v2d-000000000"]["caption"] == "a hero jumps"
    assert json.loads(rows["v2d-000000000"]["meta"])["source_meta"]["status"] == "success"
    assert (rows["v2d-000000000"]["orig_width"], rows["v2d-000000000"]["orig_height"]) == (848, 480)
    assert (rows["webvid-5641526"]["orig_width"], rows["webvid-5641526"]["orig_height"]) == (320, 180)
    state = outcomes(store)
    assert state["webvid-404"]["status"] == "failed" and "no such file" in state["webvid-404"]["reason"]
    assert state["v2d-000000009"]["reason"] == "sample 000000009 has no media member"
    assert not list((tmp_path / "v2d").glob("*.mp4"))  # nothing unpacked next to the tar
    text = summary.render()
    assert "source v2d: ok 2 of 3" in text and "source webvid: ok 2 of 3 (66.7%); failed unavailable 1" in text, text
    print(text)


def test_webvid_s3_mirror_path_template(shared_data, tmp_path, s3_server, s3_prefix):
    """The usual WebVid downloader layout `videos/{page_dir}/{videoid}.mp4` on S3, read in place by the fetcher."""
    mirror = Storage(s3_server.uri(f"{s3_prefix}/webvid/videos"), s3_server.options())
    mirror.write_bytes("027701_027750/1053841541.mp4", (shared_data / "videos" / "chaplin.mp4").read_bytes())
    write_webvid(
        tmp_path / "webvid.csv",
        [
            ["1053841541", f"{ORIGIN}1053841541/preview/x.mp4", "PT00H00M09S", "027701_027750", "Travel blogger"],
            ["77", f"{ORIGIN}77/preview/x.mp4", "PT00H00M10S", "", "no page_dir"],
        ],
    )
    src = make_source(
        source_config(
            {
                "type": "webvid",
                "path": str(tmp_path / "webvid.csv"),
                "base_dir": mirror.uri(""),
                "path_template": "{page_dir}/{videoid}.mp4",
            }
        ),
        s3_server.options(),
    )
    rows = {r["id"]: r for r in iter_rows(src)}
    assert rows["webvid-1053841541"]["uri"] == mirror.uri("027701_027750/1053841541.mp4")
    assert rows["webvid-77"]["status"] == "failed" and "template" in rows["webvid-77"]["reason"]
    with Fetcher(FetchConfig(), str(tmp_path / "scratch"), s3_server.options()) as f:
        got = f.fetch(rows["webvid-1053841541"]["uri"], "video")
        out = decode_file(got.path, "video", DecodeConfig(fps=4, max_frames=8))
        f.release(got)
    assert (out["orig_width"], out["orig_height"]) == (640, 360) and out["num_frames"] == 8
