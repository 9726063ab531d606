import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline.sources import (ObjaverseConfig, local_files, make_id, objaverse_objects, panda70m_csv,
                              parse_iso_duration, parse_timestamp, webvid_csv)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
META = DATA / "metadata"
SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def meta(row):
    return json.loads(row["meta"])


# ---- ids ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["../../etc/passwd", "..", ".", "", "a/b", "a\\b", "/abs/path", "x" * 300,
                                 "名字 with spaces", "\x00nul"])
def test_ids_are_safe_file_names(key):
    rid = make_id("csv", key)
    assert SAFE_ID.match(rid) and "/" not in rid and ".." not in rid.split("-", 1)[0]
    assert len(rid) < 120
    assert make_id("csv", key) == rid  # deterministic


def test_ids_do_not_collide_after_sanitising():
    keys = ["a/b", "a_b", "a b", "a\\b", "a?b"]
    assert len({make_id("s", k) for k in keys}) == len(keys)
    assert make_id("webvid", "1053841541") == "webvid-1053841541"  # clean keys stay readable


# ---- WebVid ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("PT00H00M17S", 17.0), ("PT00H01M05S", 65.0), ("PT1H", 3600.0),
                                          ("PT2.5S", 2.5), ("P1DT1S", 86401.0), ("PT00H00M00S", 0.0)])
def test_iso_duration(text, seconds):
    assert parse_iso_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "P", "PT", "17", "PT17", "PTxS", "00:00:17"])
def test_iso_duration_rejects(bad):
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_iso_duration(bad)


def test_webvid_both_column_orders():
    a = list(webvid_csv(META / "test_webvid.csv"))
    b = list(webvid_csv(META / "webvid10M_format_sample.csv"))
    assert len(a) == 20 and len(b) == 10
    assert all(r["status"] == "ok" and r["modality"] == "video" and r["span"] is None for r in a + b)
    first = a[0]
    assert first["id"] == "webvid-1053841541"
    assert first["caption"] == "Travel blogger shoot a story on top of mountains. young man holds camera in forest."
    assert first["uri"] == ("https://ak.picdn.net/shutterstock/videos/1053841541/preview/stock-footage-travel-"
                            "blogger-shoot-a-story-on-top-of-mountains-young-man-holds-camera-in-forest.mp4")
    assert meta(first)["duration"] == 17.0 and meta(first)["page_dir"] == "027701_027750"
    assert [meta(r)["duration"] for r in a[:4]] == [17.0, 24.0, 13.0, 16.0]
    # quoted caption with commas
    last = a[-1]
    assert last["id"] == "webvid-13292570"
    assert last["caption"] == "Kiev, ukraine 30.07.2015. cars go on the road. road traffic. peak hour."
    assert meta(last)["duration"] == 10.0
    # the same videos read from the other column order give the same ids, captions, uris, durations
    by_id = {r["id"]: r for r in a}
    for r in b:
        assert r["id"] in by_id
        for k in ("caption", "uri"):
            assert r[k] == by_id[r["id"]][k]
        assert meta(r)["duration"] == meta(by_id[r["id"]])["duration"]


def test_webvid_bad_rows_fail_with_reason(tmp_path):
    p = tmp_path / "w.csv"
    p.write_text("videoid,name,duration,contentUrl\n"
                 "1,ok clip,PT00H00M05S,http://h/1.mp4\n"
                 "2,bad duration,five seconds,http://h/2.mp4\n"
                 ",no id,PT00H00M05S,http://h/3.mp4\n")
    rows = list(webvid_csv(p))
    assert [r["status"] for r in rows] == ["ok", "failed", "failed"]
    assert rows[1]["stage"] == "source" and "line 3" in rows[1]["error"] and "ISO-8601" in rows[1]["error"]
    assert "empty videoid" in rows[2]["error"]
    with pytest.raises(ValueError, match="missing columns"):
        list(webvid_csv(META / "panda70m_validation_head.csv"))


def test_webvid_incremental(tmp_path):
    p = tmp_path / "w.csv"
    shutil.copy(META / "test_webvid.csv", p)
    before = [r["id"] for r in webvid_csv(p)]
    with open(p, "a") as f:
        f.write("999,appended,7,000001_000050,PT00H00M03S,http://h/999.mp4\n")
    after = [r["id"] for r in webvid_csv(p)]
    assert after[:len(before)] == before and after[-1] == "webvid-999"


# ---- Panda-70M ---------------------------------------------------------------------------------------------

def test_timestamps():
    assert parse_timestamp("0:01:20.880") == 80.88
    assert parse_timestamp("1:00:00.000") == 3600.0
    assert parse_timestamp("0:17:31.116") == 1051.116
    for bad in ("1:20.880", "0:61:00.000", "abc", ""):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_panda_validation_head():
    rows = list(panda70m_csv(META / "panda70m_validation_head.csv"))
    assert len(rows) == 15 and all(r["status"] == "ok" for r in rows)
    r = rows[0]
    assert r["id"] == "panda70m--1hTK0wGrTg_19227_28278"
    assert r["uri"] == "https://www.youtube.com/watch?v=-1hTK0wGrTg"
    assert r["span"] == [19.227, 28.278]
    assert r["caption"] == ("The speaker is standing in front of a purple background, wearing a blue shirt "
                            "and glasses.")
    assert meta(r)["matching_score"] == 0.50927734375 and meta(r)["clip"] == 0
    cooking = rows[7]  # caption with an apostrophe, double-quoted in the list literal
    assert cooking["caption"] == ("A man is cooking in a blue kitchen. he is wearing a chef's hat and appears to "
                                  "be preparing food.")
    assert cooking["span"] == [150.683, 154.654] and meta(cooking)["matching_score"] == 0.468505859375
    last = rows[-1]
    assert last["span"] == [1033.499, 1051.116] and meta(last)["matching_score"] == 0.4765625
    assert last["caption"] == 'A picture of an orange background with the words "watch this video" written on it.'
    assert len({r["id"] for r in rows}) == 15


def test_panda_training_format_extra_columns():
    rows = list(panda70m_csv(META / "panda70m_training_format_example.csv"))
    assert [r["span"] for r in rows] == [[80.88, 83.983], [151.151, 154.32], [208.841, 213.68]]
    assert [meta(r)["matching_score"] for r in rows] == [0.451416015625, 0.4990234375, 0.434814453125]
    assert rows[0]["caption"] == "A neuron in a black background."


def test_panda_malformed_rows(tmp_path):
    good = ("vidA,https://y/vidA,\"[['0:00:01.000', '0:00:02.500']]\",\"['a cat']\",\"[0.5]\"\n")
    bad = [
        "vidB,https://y/vidB,\"[['0:00:01.000', '0:00:02.500']\",\"['x']\",\"[0.5]\"\n",              # syntax
        "vidC,https://y/vidC,\"[['0:00:01.000', '0:00:02.500']]\",\"['x', 'y']\",\"[0.5]\"\n",          # lengths
        "vidD,https://y/vidD,\"[['0:00:05.000', '0:00:02.500']]\",\"['x']\",\"[0.5]\"\n",              # end<start
        "vidE,https://y/vidE,\"__import__('os').system('touch pwned')\",\"['x']\",\"[0.5]\"\n",         # code
        "vidF,https://y/vidF,\"[['1:20', '0:00:02.500']]\",\"['x']\",\"[0.5]\"\n",                     # timestamp
    ]
    p = tmp_path / "p.csv"
    p.write_text("videoID,url,timestamp,caption,matching_score\n" + good + "".join(bad) + good.replace("A", "G"))
    rows = list(panda70m_csv(p))
    assert [r["status"] for r in rows] == ["ok"] + ["failed"] * 5 + ["ok"]
    assert rows[0]["span"] == [1.0, 2.5] and rows[0]["caption"] == "a cat"
    failed = rows[1:6]
    assert all(r["stage"] == "source" and SAFE_ID.match(r["id"]) for r in failed)
    assert "not a Python list literal" in failed[0]["error"]
    assert "1 timestamps, 2 captions" in failed[1]["error"]
    assert "not after start" in failed[2]["error"]
    assert "not a Python list literal" in failed[3]["error"]
    assert "bad timestamp" in failed[4]["error"]
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_panda_incremental(tmp_path):
    p = tmp_path / "p.csv"
    shutil.copy(META / "panda70m_validation_head.csv", p)
    before = [r["id"] for r in panda70m_csv(p)]
    with open(p, "a") as f:
        f.write("newvid,https://y/new,\"[['0:00:00.000', '0:00:03.000']]\",\"['new']\",\"[0.4]\"\n")
    after = [r["id"] for r in panda70m_csv(p)]
    assert after[:15] == before and after[15] == "panda70m-newvid_0_3000"


# ---- local folders -----------------------------------------------------------------------------------------

BAD_EXPECTED = {  # file -> (status, modality)
    "block_ends_beyond_cluster.mkv": ("ok", "video"), "broken.png": ("ok", "image"),
    "chunk_too_big.glb": ("ok", "3d"), "corrupted.mp4": ("ok", "video"), "empty.ply": ("skipped", "unknown"),
    "empty_file.glb": ("skipped", "unknown"), "fixed_lacing_bad_lace_size.mkv": ("ok", "video"),
    "invalid_json_chunk.glb": ("ok", "3d"), "invalid_magic.glb": ("skipped", "unknown"),
    "length_mismatch.glb": ("ok", "3d"), "no_duration.webm": ("ok", "video"),
    "notenoughindices.obj": ("ok", "3d"), "truncated.jpg": ("ok", "image"), "truncated_jpeg.jpg": ("ok", "image"),
    "unaligned_chunk.glb": ("ok", "3d"),
}


def test_local_bad_folder_classified():
    rows = {Path(r["uri"]).name: r for r in local_files(DATA / "bad")}
    assert set(rows) == set(BAD_EXPECTED)
    for name, (status, modality) in BAD_EXPECTED.items():
        assert (rows[name]["status"], rows[name]["modality"]) == (status, modality), name
    assert rows["empty.ply"]["error"] == "empty file (0 bytes)"
    assert "unrecognised content" in rows["invalid_magic.glb"]["error"]


def test_local_all_data_folders():
    rows = list(local_files(DATA))
    by_name = {Path(r["uri"]).name: r for r in rows}
    for p in (DATA / "videos").iterdir():
        assert by_name[p.name]["modality"] == "video"
    for p in (DATA / "images").iterdir():
        assert by_name[p.name]["modality"] == "image"
    for ext in (".glb", ".ply", ".obj", ".stl"):
        for p in (DATA / "meshes").glob(f"*{ext}"):
            assert by_name[p.name]["modality"] == "3d", p.name
    assert by_name["fuze uv.jpg"]["modality"] == "image"
    assert by_name["fuze.obj.mtl"]["status"] == "skipped"
    assert by_name["test_webvid.csv"]["status"] == "skipped"
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) and all(SAFE_ID.match(i) for i in ids)
    assert [r["id"] for r in local_files(DATA)] == ids  # deterministic order and ids


def test_local_content_beats_extension(tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(DATA / "images" / "astronaut.png", tmp_path / "sub" / "really_png.mp4")
    shutil.copy(DATA / "videos" / "chaplin.mp4", tmp_path / "video.jpg")
    shutil.copy(DATA / "meshes" / "Box.glb", tmp_path / "mesh.bin")
    (tmp_path / "notes.txt").write_text("hello")
    rows = {Path(r["uri"]).name: r for r in local_files(tmp_path)}
    assert rows["really_png.mp4"]["modality"] == "image" and meta(rows["really_png.mp4"])["format"] == "png"
    assert rows["video.jpg"]["modality"] == "video"
    assert rows["mesh.bin"]["modality"] == "3d"
    assert rows["notes.txt"]["status"] == "skipped" and "unrecognised content" in rows["notes.txt"]["error"]
    assert rows["really_png.mp4"]["id"] == "local-sub_really_png.mp4-" + rows["really_png.mp4"]["id"][-10:]


# ---- Objaverse ---------------------------------------------------------------------------------------------

def build_mirror(root: Path) -> dict:
    """A local objaverse mirror laid out like ~/.objaverse/hf-objaverse-v1."""
    example = json.loads((META / "objaverse_v1_annotation_example.json").read_text())
    (uid0, ann0), = example.items()
    uid1, uid2 = "0" * 31 + "1", "0" * 31 + "2"
    ann1 = {**ann0, "uid": uid1, "name": "second object", "tags": []}
    ann2 = {**ann0, "uid": uid2, "name": "not mirrored", "tags": []}
    paths = {uid0: f"glbs/000-000/{uid0}.glb", uid1: f"glbs/000-001/{uid1}.glb", uid2: f"glbs/000-001/{uid2}.glb"}
    for d in ("metadata", "glbs/000-000", "glbs/000-001"):
        (root / d).mkdir(parents=True)
    with gzip.open(root / "object-paths.json.gz", "wt") as f:
        json.dump(paths, f)
    with gzip.open(root / "metadata" / "000-000.json.gz", "wt") as f:
        json.dump({uid0: ann0}, f)
    with gzip.open(root / "metadata" / "000-001.json.gz", "wt") as f:
        json.dump({uid1: ann1, uid2: ann2}, f)
    shutil.copy(DATA / "meshes" / "Box.glb", root / paths[uid0])
    shutil.copy(DATA / "meshes" / "cubevc.glb", root / paths[uid1])
    return {"uids": [uid0, uid1, uid2], "paths": paths, "ann0": ann0}


def test_objaverse_mirror(tmp_path):
    import objaverse
    old = objaverse._VERSIONED_PATH
    m = build_mirror(tmp_path / "mirror")
    uid0, uid1, uid2 = m["uids"]
    caps = tmp_path / "cap3d.csv"
    caps.write_text(f"{uid1},a small cube with vertex colours\n")
    rows = list(objaverse_objects(ObjaverseConfig(str(tmp_path / "mirror"), captions_csv=str(caps))))
    assert objaverse._VERSIONED_PATH == old  # restored
    by = {meta(r)["uid"]: r for r in rows}
    assert [r["id"] for r in rows] == sorted(f"objaverse-{u}" for u in m["uids"])
    r0 = by[uid0]
    assert r0["status"] == "ok" and r0["modality"] == "3d"
    assert Path(r0["uri"]) == (tmp_path / "mirror" / m["paths"][uid0]).resolve()
    assert r0["caption"] == "Iain_Dawson_Kew_Road_Formby"  # no Cap3D caption: the object name
    assert meta(r0)["tags"] == ["stair", "staircase", "staircon"] and meta(r0)["license"] == "by"
    assert meta(r0)["face_count"] == 14608
    assert by[uid1]["caption"] == "a small cube with vertex colours"
    assert meta(by[uid1])["caption_from"] == "captions_csv"
    assert by[uid2]["status"] == "failed" and "downloads disabled" in by[uid2]["error"]
    # with downloads allowed the missing GLB becomes a URL for the fetch stage (nothing is downloaded here)
    rows = list(objaverse_objects(ObjaverseConfig(str(tmp_path / "mirror"), uids=(uid2, "f" * 32),
                                                  allow_download=True)))
    assert rows[0]["status"] == "ok"
    assert rows[0]["uri"] == f"https://huggingface.co/datasets/allenai/objaverse/resolve/main/{m['paths'][uid2]}"
    assert rows[1]["status"] == "failed" and "not in object-paths" in rows[1]["error"]
    assert SAFE_ID.match(rows[1]["id"])


def test_objaverse_missing_mirror_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="allow_download=False"):
        list(objaverse_objects(ObjaverseConfig(str(tmp_path / "nothing"))))


# ---- row helpers -------------------------------------------------------------------------------------------

def test_row_helpers_and_stage_decorator():
    from pipeline.rows import fail, is_ok, new_row, stage

    @stage("double")
    def double(row, k=2):
        if row["x"] < 0:
            raise ValueError("negative x")
        return {**row, "x": row["x"] * k}

    r = new_row("s-1", "image", "s", x=3)
    assert is_ok(r) and r["stage"] == "source" and r["error"] is None
    out = double(r, k=3)
    assert out["x"] == 9 and out["stage"] == "double" and is_ok(out)
    bad = double(new_row("s-2", "image", "s", x=-1))
    assert (bad["status"], bad["stage"], bad["error"]) == ("failed", "double", "ValueError: negative x")
    failed = fail(r, "fetch", "http 404")
    assert failed is not r and r["status"] == "ok" and not is_ok(failed)
    assert double(failed) is failed  # later stages pass failed rows through untouched
    assert len(fail(r, "x", "e" * 10_000)["error"]) == 500
