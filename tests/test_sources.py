"""Sources in-process (no Ray): `iter_rows(make_source(source_config({...})))` gives the descriptor rows."""

import gzip
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.sources import iter_rows, make_source, source_config
from pipeline.sources.ids import make_id
from pipeline.sources.panda70m import parse_timestamp
from pipeline.sources.tables import read_local
from pipeline.sources.webvid import parse_iso_duration

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
META = DATA / "metadata"
SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def meta(row):
    return json.loads(row["meta"])


def read(**cfg) -> list[dict]:
    return list(iter_rows(make_source(source_config(cfg))))


# ---- WebVid ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("PT00H00M17S", 17.0),
        ("PT00H01M05S", 65.0),
        ("PT1H", 3600.0),
        ("PT2.5S", 2.5),
        ("P1DT1S", 86401.0),
        ("PT00H00M00S", 0.0),
    ],
)
def test_iso_duration(text, seconds):
    assert parse_iso_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "P", "PT", "17", "PT17", "PTxS", "00:00:17"])
def test_iso_duration_rejects(bad):
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_iso_duration(bad)


def test_webvid_both_column_orders():
    a = read(type="webvid", path=str(META / "test_webvid.csv"))
    b = read(type="webvid", path=str(META / "webvid10M_format_sample.csv"))
    assert len(a) == 20 and len(b) == 10
    assert all(r["status"] == "ok" and r["modality"] == "video" and r["source"] == "webvid" for r in a + b)
    assert all(r["span_start"] is None and r["span_end"] is None and r["reason"] is None for r in a + b)
    first = a[0]
    assert first["id"] == "webvid-1053841541"
    assert first["caption"] == "Travel blogger shoot a story on top of mountains. young man holds camera in forest."
    assert first["uri"] == (
        "https://ak.picdn.net/shutterstock/videos/1053841541/preview/stock-footage-travel-"
        "blogger-shoot-a-story-on-top-of-mountains-young-man-holds-camera-in-forest.mp4"
    )
    assert meta(first) == {"duration": 17.0, "page_dir": "027701_027750", "page_idx": "27732", "videoid": "1053841541"}
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
    assert len(read(type="webvid", path=str(META / "test_webvid.csv"), limit=5)) == 5


def test_webvid_bad_rows(tmp_path):
    p = tmp_path / "w.csv"
    p.write_bytes(
        b"videoid,name,duration,contentUrl\n"
        b"1,ok clip,PT00H00M05S,http://h/1.mp4\n"
        b"2,bad duration,five seconds,http://h/2.mp4\n"
        b",no id,PT00H00M05S,http://h/3.mp4\n"
        b"4,no url,PT00H00M05S,\n"
        b"5,caf\xe9 latin-1 byte,,http://h/5.mp4\n"
    )
    rows = read(type="webvid", path=str(p))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed", "ok"]
    assert meta(rows[0])["duration"] == 5.0
    # a malformed duration is metadata nothing needs: kept raw with the problem, never fatal
    m = meta(rows[1])
    assert "duration" not in m and m["duration_raw"] == "five seconds" and "ISO-8601" in m["duration_error"]
    assert rows[2]["stage"] == "source" and rows[2]["reason"] == "videoid '': empty videoid"
    assert rows[3]["reason"] == "videoid '4': empty contentUrl"
    assert all("line" not in (r["reason"] or "") for r in rows)  # chunks are read in parallel: no line numbers
    assert rows[4]["caption"] == "caf\ufffd latin-1 byte" and "duration" not in meta(rows[4])
    assert all(SAFE_ID.match(r["id"]) for r in rows)
    with pytest.raises(ValueError, match="missing columns"):
        read(type="webvid", path=str(META / "panda70m_validation_head.csv"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read(type="webvid", path=str(tmp_path / "nope.csv"))


def test_webvid_mirror_template_base_dir_and_parquet(tmp_path):
    csv = str(META / "test_webvid.csv")
    rows = read(type="webvid", path=csv, url_template="s3://bkt/webvid/{page_dir}/{videoid}.mp4")
    assert rows[0]["uri"] == "s3://bkt/webvid/027701_027750/1053841541.mp4"
    p = tmp_path / "rel.csv"
    p.write_text("videoid,name,contentUrl\n7,rel,videos/7.mp4\n8,abs,/data/8.mp4\n")
    rows = read(type="webvid", path=str(p), base_dir="/mirror/")
    assert [r["uri"] for r in rows] == ["/mirror/videos/7.mp4", "/data/8.mp4"]
    # the same table as Parquet, and a folder of CSVs: the same rows
    ref = read(type="webvid", path=csv)
    import pyarrow.csv as pacsv

    pq.write_table(
        pacsv.read_csv(
            csv, convert_options=pacsv.ConvertOptions(column_types={"videoid": pa.string(), "page_idx": pa.string()})
        ),
        tmp_path / "w.parquet",
    )
    assert read(type="webvid", path=str(tmp_path / "w.parquet")) == ref
    (tmp_path / "dir").mkdir()
    shutil.copy(csv, tmp_path / "dir" / "part1.csv")
    assert read(type="webvid", path=str(tmp_path / "dir")) == ref
    assert [r["id"] for r in read(type="webvid", path=csv, name="wv")][:1] == ["wv-1053841541"]


def test_webvid_incremental(tmp_path):
    p = tmp_path / "w.csv"
    shutil.copy(META / "test_webvid.csv", p)
    before = [r["id"] for r in read(type="webvid", path=str(p))]
    with open(p, "a") as f:
        f.write("999,appended,7,000001_000050,PT00H00M03S,http://h/999.mp4\n")
    after = [r["id"] for r in read(type="webvid", path=str(p))]
    assert after[: len(before)] == before and after[-1] == "webvid-999"


# ---- Panda-70M ---------------------------------------------------------------------------------------------


def test_timestamps():
    assert parse_timestamp("0:01:20.880") == 80.88
    assert parse_timestamp("1:00:00.000") == 3600.0
    assert parse_timestamp("0:17:31.116") == 1051.116
    for bad in ("1:20.880", "0:61:00.000", "abc", ""):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_panda_validation_head():
    rows = read(type="panda70m", path=str(META / "panda70m_validation_head.csv"))
    assert len(rows) == 15 and all(r["status"] == "ok" and r["modality"] == "video" for r in rows)
    r = rows[0]
    assert r["id"] == "panda70m--1hTK0wGrTg_19227_28278"
    assert r["uri"] == "https://www.youtube.com/watch?v=-1hTK0wGrTg"
    assert (r["span_start"], r["span_end"]) == (19.227, 28.278)
    assert r["caption"] == (
        "The speaker is standing in front of a purple background, wearing a blue shirt and glasses."
    )
    assert meta(r) == {"clip": 0, "duration": 9.051, "videoid": "-1hTK0wGrTg"}
    assert r["matching_score"] == 0.50927734375  # a typed shard column, not inside the JSON
    assert r["desirable_filtering"] is None and r["shot_boundary_detection"] is None  # not in this layout
    cooking = rows[7]  # caption with an apostrophe, double-quoted in the list literal
    assert cooking["caption"] == (
        "A man is cooking in a blue kitchen. he is wearing a chef's hat and appears to be preparing food."
    )
    assert (cooking["span_start"], cooking["span_end"]) == (150.683, 154.654)
    assert cooking["matching_score"] == 0.468505859375
    last = rows[-1]
    assert (last["span_start"], last["span_end"]) == (1033.499, 1051.116)
    assert last["matching_score"] == 0.4765625
    assert last["caption"] == 'A picture of an orange background with the words "watch this video" written on it.'
    assert len({r["id"] for r in rows}) == 15
    assert [meta(r)["clip"] for r in rows[:3]] == [0, 1, 2]


def test_panda_training_format_extra_columns():
    rows = read(type="panda70m", path=str(META / "panda70m_training_format_example.csv"))
    assert [(r["span_start"], r["span_end"]) for r in rows] == [(80.88, 83.983), (151.151, 154.32), (208.841, 213.68)]
    assert [r["matching_score"] for r in rows] == [0.451416015625, 0.4990234375, 0.434814453125]
    assert rows[0]["caption"] == "A neuron in a black background."
    # the extra per-clip columns are kept as typed fields (shard columns), each clip with its own entry
    assert [r["desirable_filtering"] for r in rows] == ["1_still_foreground_image", "desirable", "desirable"]
    assert [r["shot_boundary_detection"] for r in rows] == [
        [[0.0, 3.069]],
        [[0.0, 3.169]],
        [[0.0, 2.702], [2.736, 4.838]],
    ]  # seconds, relative to the clip
    assert all("metadata_errors" not in meta(r) for r in rows)


def test_panda_malformed_rows(tmp_path):
    good = "vidA,https://y/vidA,\"[['0:00:01.000', '0:00:02.500']]\",\"['a cat']\",\"[0.5]\"\n"
    bad = [
        "vidB,https://y/vidB,\"[['0:00:01.000', '0:00:02.500']\",\"['x']\",\"[0.5]\"\n",  # syntax
        "vidC,https://y/vidC,\"[['0:00:01.000', '0:00:02.500']]\",\"['x', 'y']\",\"[0.5]\"\n",  # lengths
        "vidD,https://y/vidD,\"[['0:00:05.000', '0:00:02.500']]\",\"['x']\",\"[0.5]\"\n",  # end<start
        "vidE,https://y/vidE,\"__import__('os').system('touch pwned')\",\"['x']\",\"[0.5]\"\n",  # code
        "vidF,https://y/vidF,\"[['1:20', '0:00:02.500']]\",\"['x']\",\"[0.5]\"\n",  # timestamp
        ",https://y/none,\"[['0:00:01.000', '0:00:02.500']]\",\"['x']\",\"[0.5]\"\n",  # no id
    ]
    p = tmp_path / "p.csv"
    p.write_text("videoID,url,timestamp,caption,matching_score\n" + good + "".join(bad) + good.replace("A", "G"))
    rows = read(type="panda70m", path=str(p))
    assert [r["status"] for r in rows] == ["ok"] + ["failed"] * 6 + ["ok"]
    assert (rows[0]["span_start"], rows[0]["span_end"]) == (1.0, 2.5) and rows[0]["caption"] == "a cat"
    assert rows[0]["id"] == "panda70m-vidA_1000_2500" and rows[-1]["id"] == "panda70m-vidG_1000_2500"
    failed = rows[1:7]
    assert all(r["stage"] == "source" and SAFE_ID.match(r["id"]) for r in failed)
    assert len({r["id"] for r in rows}) == len(rows)
    assert failed[0]["reason"].startswith("videoID 'vidB': ") and "not a Python list literal" in failed[0]["reason"]
    assert failed[1]["reason"].startswith("videoID 'vidC': ") and "1 timestamps, 2 captions" in failed[1]["reason"]
    assert failed[2]["reason"].startswith("videoID 'vidD': ") and "not after start" in failed[2]["reason"]
    assert failed[3]["reason"].startswith("videoID 'vidE': ") and "not a Python list literal" in failed[3]["reason"]
    assert failed[4]["reason"].startswith("videoID 'vidF': ") and "bad timestamp" in failed[4]["reason"]
    assert failed[5]["reason"] == "videoID '': empty videoID or url"
    assert all("line" not in r["reason"] for r in failed)
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()
    # one failed sample per malformed row, with a stable id (re-reading gives the same)
    assert [r["id"] for r in read(type="panda70m", path=str(p))] == [r["id"] for r in rows]


def test_panda_incremental(tmp_path):
    p = tmp_path / "p.csv"
    shutil.copy(META / "panda70m_validation_head.csv", p)
    before = [r["id"] for r in read(type="panda70m", path=str(p))]
    with open(p, "a") as f:
        f.write("newvid,https://y/new,\"[['0:00:00.000', '0:00:03.000']]\",\"['new']\",\"[0.4]\"\n")
    after = [r["id"] for r in read(type="panda70m", path=str(p))]
    assert after[:15] == before and after[15] == "panda70m-newvid_0_3000"
    rows = read(type="panda70m", path=str(p), base_dir="/mirror")
    assert rows[-1]["uri"] == "https://y/new"  # absolute urls are kept
    with pytest.raises(ValueError, match="not a Panda-70M CSV"):
        read(type="panda70m", path=str(META / "test_webvid.csv"))


# ---- folders -----------------------------------------------------------------------------------------------

BAD_EXPECTED = {  # file -> (status, modality)
    "block_ends_beyond_cluster.mkv": ("ok", "video"),
    "broken.png": ("ok", "image"),
    "chunk_too_big.glb": ("ok", "3d"),
    "corrupted.mp4": ("ok", "video"),
    "empty.ply": ("skipped", "unknown"),
    "empty_file.glb": ("skipped", "unknown"),
    "fixed_lacing_bad_lace_size.mkv": ("ok", "video"),
    "invalid_json_chunk.glb": ("ok", "3d"),
    "invalid_magic.glb": ("skipped", "unknown"),
    "length_mismatch.glb": ("ok", "3d"),
    "no_duration.webm": ("ok", "video"),
    "notenoughindices.obj": ("ok", "3d"),
    "truncated.jpg": ("ok", "image"),
    "truncated_jpeg.jpg": ("ok", "image"),
    "unaligned_chunk.glb": ("ok", "3d"),
}


def test_folder_bad_files_classified():
    rows = {Path(r["uri"]).name: r for r in read(type="folder", path=str(DATA / "bad"))}
    assert set(rows) == set(BAD_EXPECTED)
    for name, (status, modality) in BAD_EXPECTED.items():
        assert (rows[name]["status"], rows[name]["modality"]) == (status, modality), name
    assert rows["empty.ply"]["reason"] == "empty file (0 bytes)" and rows["empty.ply"]["stage"] == "source"
    assert "unrecognised content" in rows["invalid_magic.glb"]["reason"]
    assert rows["broken.png"]["id"] == "folder-broken.png"  # top-level files: the file name
    assert meta(rows["corrupted.mp4"]) == {
        "bytes": (DATA / "bad" / "corrupted.mp4").stat().st_size,
        "classified_by": "magic bytes",
        "format": "mp4",
    }
    assert meta(rows["notenoughindices.obj"])["classified_by"] == "extension .obj"


def test_folder_all_data():
    rows = read(type="folder", path=str(DATA))
    by_rel = {str(Path(r["uri"]).relative_to(DATA.resolve())): r for r in rows}
    for sub, modality in (("videos", "video"), ("images", "image")):
        for p in (DATA / sub).iterdir():
            assert by_rel[f"{sub}/{p.name}"]["modality"] == modality, p.name
    for ext in (".glb", ".ply", ".obj", ".stl"):
        for p in (DATA / "meshes").glob(f"*{ext}"):
            assert by_rel[f"meshes/{p.name}"]["modality"] == "3d", p.name
    assert by_rel["meshes/fuze uv.jpg"]["modality"] == "image"
    assert by_rel["meshes/fuze.obj.mtl"]["status"] == "skipped"
    assert by_rel["metadata/test_webvid.csv"]["status"] == "skipped"
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) and all(SAFE_ID.match(i) for i in ids)
    assert by_rel["videos/chaplin.mp4"]["id"] == make_id("folder", "videos/chaplin.mp4")  # ids: relative paths
    assert [r["id"] for r in read(type="folder", path=str(DATA))] == ids  # deterministic order and ids


def test_folder_content_beats_extension(tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(DATA / "images" / "astronaut.png", tmp_path / "sub" / "really_png.mp4")
    shutil.copy(DATA / "videos" / "chaplin.mp4", tmp_path / "video.jpg")
    shutil.copy(DATA / "meshes" / "Box.glb", tmp_path / "mesh.bin")
    (tmp_path / "notes.txt").write_text("hello")
    rows = {Path(r["uri"]).name: r for r in read(type="folder", path=str(tmp_path), name="local")}
    assert rows["really_png.mp4"]["modality"] == "image" and meta(rows["really_png.mp4"])["format"] == "png"
    assert rows["video.jpg"]["modality"] == "video"
    assert rows["mesh.bin"]["modality"] == "3d"
    assert rows["notes.txt"]["status"] == "skipped" and "unrecognised content" in rows["notes.txt"]["reason"]
    assert rows["really_png.mp4"]["id"] == "local-sub_really_png.mp4-" + rows["really_png.mp4"]["id"][-16:]


def test_folder_nested(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "d").mkdir()
    (root / "empty_dir").mkdir()
    shutil.copy(DATA / "images" / "coffee.png", root / "top.png")
    shutil.copy(DATA / "images" / "coffee.png", root / "a" / "x.png")
    shutil.copy(DATA / "videos" / "stub_mjpeg.avi", root / "a" / "b" / "v.avi")
    shutil.copy(DATA / "meshes" / "Box.glb", root / "a" / "b" / "c" / "deep.glb")
    shutil.copy(DATA / "meshes" / "spot.obj", root / "d" / "spot.obj")
    src = make_source(source_config({"type": "folder", "path": str(root)}))
    assert set(src.branches) == {"media", "3d"}
    plan = src.plan()
    assert plan.format == "items"
    # each top-level sub-folder is one listing chunk, the top-level files another
    assert plan.items == [
        {"dir": "a"},
        {"dir": "d"},
        {"dir": "empty_dir"},
        {"files": [("top.png", (root / "top.png").stat().st_size)]},
    ]
    chunk = sorted(r["rel"] for r in src.list_chunk({"dir": "a"}))
    assert chunk == ["a/b/c/deep.glb", "a/b/v.avi", "a/x.png"]  # relative to the root, not to the chunk
    assert src.list_chunk({"dir": "empty_dir"}) == []
    keyed = src.keys(pa.Table.from_pylist(src.list_chunk({"dir": "a"})))
    assert sorted(keyed.column("rel").to_pylist()) == chunk
    assert keyed.column("id").to_pylist() == [make_id("folder", r) for r in keyed.column("rel").to_pylist()]
    rows = {r["id"]: r for r in iter_rows(src)}
    rels = ["a/b/c/deep.glb", "a/b/v.avi", "a/x.png", "d/spot.obj", "top.png"]
    assert set(rows) == {make_id("folder", rel) for rel in rels}
    for rel in rels:
        r = rows[make_id("folder", rel)]
        assert r["uri"] == str((root / rel).resolve()) and r["status"] == "ok"
    assert rows["folder-top.png"]["modality"] == "image"
    assert rows[make_id("folder", "a/b/v.avi")]["modality"] == "video"
    assert rows[make_id("folder", "a/b/c/deep.glb")]["modality"] == "3d"
    assert rows[make_id("folder", "d/spot.obj")]["modality"] == "3d"
    with pytest.raises(NotADirectoryError, match="does not exist"):
        make_source(source_config({"type": "folder", "path": str(tmp_path / "nope")})).plan()


# ---- url lists ---------------------------------------------------------------------------------------------


def test_url_list_csv_columns_and_extras(tmp_path):
    p = tmp_path / "u.csv"
    p.write_text(
        "url,caption,key,start,end,license,width\n"
        'http://h/a.mp4,"a clip, with comma",k1,1.5,3,cc-by,640\n'
        "http://h/b.mp4,second,k2,0,10,mit,320\n"
        ",empty url,k3,0,1,x,1\n"
        "http://h/d.mp4,bad span,k4,5,2,y,2\n"
    )
    rows = read(type="url_list", path=str(p), key_col="key", span_cols=["start", "end"])
    assert [r["id"] for r in rows] == ["url_list-k1", "url_list-k2", "url_list-k3", "url_list-k4"]
    a = rows[0]
    assert (a["status"], a["modality"], a["uri"], a["caption"]) == (
        "ok",
        "video",
        "http://h/a.mp4",
        "a clip, with comma",
    )
    assert (a["span_start"], a["span_end"]) == (1.5, 3.0)
    assert meta(a) == {"license": "cc-by", "width": "640"}  # every other column kept; the named ones are not
    assert rows[1]["status"] == "ok" and (rows[1]["span_start"], rows[1]["span_end"]) == (0.0, 10.0)
    assert (rows[2]["status"], rows[2]["stage"], rows[2]["reason"]) == ("failed", "source", "empty url")
    assert rows[3]["status"] == "failed" and "bad span [5.0, 2.0]" in rows[3]["reason"]
    # only the listed extra columns; no key column: the id is the url
    rows = read(type="url_list", path=str(p), extra_columns=["license"])
    assert meta(rows[0]) == {"license": "cc-by"} and rows[0]["id"] == make_id("url_list", "http://h/a.mp4")
    assert rows[0]["span_start"] is None
    with pytest.raises(ValueError, match="no url column 'link'"):
        read(type="url_list", path=str(p), url_col="link")
    with pytest.raises(ConfigError, match="must differ"):
        read(type="url_list", path=str(p), key_col="url")


def test_url_list_tsv_and_modality(tmp_path):
    p = tmp_path / "u.tsv"
    p.write_text(
        "link\ttext\tsize\n"
        "http://h/a.png\ta, tab\t1\n"
        "http://h/b.webm\tb\t2\n"
        "http://h/c.glb?sig=1\tc\t3\n"
        "http://h/stream\td\t4\n"
        "s3://bkt/e.JPEG\te\t5\n"
        "http://h/f.obj\tf\t6\n"
    )
    rows = read(type="url_list", path=str(p), url_col="link", caption_col="text")
    assert [r["modality"] for r in rows] == ["image", "video", "3d", "video", "image", "3d"]  # auto: extension
    assert [r["caption"] for r in rows][:2] == ["a, tab", "b"] and meta(rows[0]) == {"size": "1"}
    src = make_source(source_config({"type": "url_list", "path": str(p), "url_col": "link"}))
    assert set(src.branches) == {"media", "3d"}
    keyed = src.keys(next(read_local(src)))
    assert keyed.num_rows == 6 and keyed.column("id").to_pylist() == [r["id"] for r in rows]
    fixed = read(type="url_list", path=str(p), url_col="link", modality="image")
    assert {r["modality"] for r in fixed} == {"image"}
    assert make_source(source_config({"type": "url_list", "path": str(p), "modality": "3d"})).branches == ("3d",)


def test_url_list_parquet_and_jsonl(tmp_path):
    pq.write_table(
        pa.table(
            {
                "url": ["http://h/p.jpg", "rel/q.mp4", None],
                "caption": ["p", "q", "r"],
                "n": [1, 2, 3],
                "score": [0.5, None, 1.25],
            }
        ),
        tmp_path / "u.parquet",
    )
    rows = read(type="url_list", path=str(tmp_path / "u.parquet"), base_dir="s3://bkt/mirror")
    assert [r["uri"] for r in rows] == ["http://h/p.jpg", "s3://bkt/mirror/rel/q.mp4", ""]
    assert [r["modality"] for r in rows[:2]] == ["image", "video"] and rows[1]["caption"] == "q"
    assert meta(rows[0]) == {"n": "1", "score": "0.5"} and meta(rows[1])["score"] is None
    assert rows[2]["status"] == "failed" and rows[2]["reason"] == "empty url"
    jl = tmp_path / "u.jsonl"
    jl.write_text(
        "".join(
            json.dumps(x) + "\n"
            for x in [
                {"url": "http://h/a.jpg", "caption": "a", "id": "first", "tags": ["x", "y"]},
                {"url": "http://h/b.stl", "caption": "b", "id": "second", "tags": []},
            ]
        )
    )
    rows = read(type="url_list", path=str(jl), key_col="id")
    assert [r["id"] for r in rows] == ["url_list-first", "url_list-second"]
    assert [r["modality"] for r in rows] == ["image", "3d"] and rows[1]["caption"] == "b"
    assert json.loads(meta(rows[0])["tags"]) == ["x", "y"]  # nested values are kept as JSON text


def test_url_list_span_columns(tmp_path):
    p = tmp_path / "u.csv"
    p.write_text("url,s,e\nhttp://h/a.mp4,1,2\nhttp://h/b.jpg,,\nhttp://h/c.mp4,x,2\nhttp://h/d.mp4,1,\n")
    rows = read(type="url_list", path=str(p), span_cols=["s", "e"])
    assert (rows[0]["status"], rows[0]["span_start"], rows[0]["span_end"]) == ("ok", 1.0, 2.0)
    assert (rows[1]["status"], rows[1]["span_start"], rows[1]["span_end"]) == ("ok", None, None)  # no span
    assert rows[2]["status"] == "failed" and rows[2]["reason"] == "span column 's': got 'x', not a number"
    assert rows[3]["status"] == "failed" and "span column 'e'" in rows[3]["reason"]
    with pytest.raises(ValueError, match="no key column 'nope'"):
        read(type="url_list", path=str(p), key_col="nope")  # else every row would get one and the same id
    with pytest.raises(ValueError, match="no span column 'start'"):
        read(type="url_list", path=str(p), span_cols=["start", "e"])


# ---- Objaverse ---------------------------------------------------------------------------------------------


def build_mirror(root: Path) -> dict:
    """A local objaverse mirror laid out like ~/.objaverse/hf-objaverse-v1."""
    example = json.loads((META / "objaverse_v1_annotation_example.json").read_text())
    ((uid0, ann0),) = example.items()
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
    rows = read(type="objaverse", mirror_dir=str(tmp_path / "mirror"), captions_csv=str(caps))
    assert objaverse._VERSIONED_PATH == old  # restored
    by = {meta(r)["uid"]: r for r in rows}
    assert sorted(r["id"] for r in rows) == sorted(f"objaverse-{u}" for u in m["uids"])
    r0 = by[uid0]
    assert r0["status"] == "ok" and r0["modality"] == "3d"
    assert Path(r0["uri"]) == (tmp_path / "mirror" / m["paths"][uid0]).resolve()
    assert r0["caption"] == "Iain_Dawson_Kew_Road_Formby"  # no Cap3D caption: the object name
    assert meta(r0)["tags"] == ["stair", "staircase", "staircon"] and meta(r0)["license"] == "by"
    assert meta(r0)["face_count"] == 14608 and meta(r0)["caption_from"] == "name"
    assert by[uid1]["caption"] == "a small cube with vertex colours"
    assert meta(by[uid1])["caption_from"] == "captions_csv"
    assert by[uid2]["status"] == "failed" and "downloads disabled" in by[uid2]["reason"]
    assert by[uid2]["stage"] == "source"
    # with downloads allowed the missing GLB becomes a URL for the fetch stage (nothing is downloaded here)
    rows = read(type="objaverse", mirror_dir=str(tmp_path / "mirror"), uids=[uid2, "f" * 32], allow_download=True)
    by = {meta(r)["uid"]: r for r in rows}
    assert by[uid2]["status"] == "ok"
    assert by[uid2]["uri"] == f"https://huggingface.co/datasets/allenai/objaverse/resolve/main/{m['paths'][uid2]}"
    assert by["f" * 32]["status"] == "failed" and "not in object-paths" in by["f" * 32]["reason"]
    assert SAFE_ID.match(by["f" * 32]["id"])
    # a few listing chunks or one: the same rows
    one = read(type="objaverse", mirror_dir=str(tmp_path / "mirror"), list_parts=1)
    many = read(type="objaverse", mirror_dir=str(tmp_path / "mirror"), list_parts=5)
    assert sorted(one, key=lambda r: r["id"]) == sorted(many, key=lambda r: r["id"]) and len(one) == 3


def test_objaverse_missing_mirror_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="allow_download=False"):
        read(type="objaverse", mirror_dir=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="sources.0.mirror_dir: missing"):
        read(type="objaverse")


@pytest.mark.parametrize(
    "cfg", [{"type": "url_list", "url_col": "contentUrl", "key_col": "videoid"}, {"type": "webvid"}]
)
def test_hostile_csv_keys_lose_nothing(tmp_path, cfg):
    """Issue 15: 10k distinct raw keys (invalid UTF-8, cleaned form + hash, whitespace/case/normalisation
    variants) give 10k distinct ids; an old store's rule (1) is still what `id_rule=1` gives."""
    from tests.test_ids import hostile_keys, write_hostile_csv

    keys = hostile_keys()
    write_hostile_csv(tmp_path / "k.csv", keys)
    src = make_source(source_config({**cfg, "name": "s", "path": str(tmp_path / "k.csv")}))
    rows = list(iter_rows(src))
    assert len(rows) == len(keys) and len({r["id"] for r in rows}) == len(keys)
    assert {r["id"] for r in rows} == {make_id("s", k) for k in keys}
    old = list(iter_rows(make_source(src.cfg, id_rule=1)))
    assert {r["id"] for r in old} == {make_id("s", k, 1) for k in keys}


WEBVID_TEXT = "videoid,name,contentUrl\n1,café,http://h/1.mp4\n2,naïve ☃,http://h/2.mp4\n"


@pytest.mark.parametrize(
    "codec,declared",
    [
        ("utf-8", "auto"),
        ("utf-8-sig", "auto"),
        ("utf-16", "auto"),
        ("utf-16-le", "auto"),
        ("utf-16-be", "auto"),
        ("utf-32", "auto"),
        ("cp1252", "cp1252"),
        ("utf-16", "utf-16"),
    ],
)
def test_csv_encodings(tmp_path, codec, declared):
    """UTF-8 with or without BOM and UTF-16/32 are detected; other encodings are read as the job file says."""
    text = WEBVID_TEXT.replace("☃", "") if codec == "cp1252" else WEBVID_TEXT
    (tmp_path / "w.csv").write_bytes(text.encode(codec))
    rows = read(type="webvid", path=str(tmp_path / "w.csv"), encoding=declared)
    assert [r["caption"] for r in rows] == ["café", "naïve ☃" if codec != "cp1252" else "naïve"]
    assert [r["id"] for r in rows] == ["webvid-1", "webvid-2"] and all(r["status"] == "ok" for r in rows)


def test_csv_encoding_errors_are_clear(tmp_path):
    (tmp_path / "l.csv").write_bytes(WEBVID_TEXT.replace("☃", "").replace("name", "nåme").encode("latin-1"))
    with pytest.raises(ValueError, match=r"l.csv: not UTF-8 .*set the source's `encoding:` \(e.g. latin-1"):
        read(type="url_list", path=str(tmp_path / "l.csv"), url_col="contentUrl")
    rows = read(type="url_list", path=str(tmp_path / "l.csv"), url_col="contentUrl", encoding="latin-1")
    assert json.loads(rows[0]["meta"])["nåme"] == "café"
    (tmp_path / "u.csv").write_bytes(WEBVID_TEXT.encode("utf-8"))
    with pytest.raises(ValueError, match=r"u.csv: not ascii .*fix the source's `encoding:`"):
        read(type="webvid", path=str(tmp_path / "u.csv"), encoding="ascii")
    with pytest.raises(ConfigError, match="encoding.*unknown encoding 'klingon'"):
        source_config({"type": "url_list", "path": "x.csv", "encoding": "klingon"})


def test_rows_that_do_not_parse_fail_alone(tmp_path):
    """A row with too many or too few fields is that row's failure (with the reason); the others are read."""
    (tmp_path / "w.csv").write_text(
        "videoid,name,contentUrl\n1,a,http://h/1.mp4\n2,b,http://h/2.mp4,x,y\n"
        "3,c\n4,d,http://h/4.mp4\n2,b,http://h/2.mp4,x,y\n"
    )
    rows = read(type="webvid", path=str(tmp_path / "w.csv"))
    ok = sorted(r["id"] for r in rows if r["status"] == "ok")
    bad = [r for r in rows if r["status"] == "failed"]
    assert ok == ["webvid-1", "webvid-4"] and len(bad) == 3 and {r["stage"] for r in bad} == {"source"}
    reasons = sorted(r["reason"] for r in bad)
    assert [r.split(":")[0] for r in reasons] == [f"unparsable line {n} of w.csv" for n in (3, 4, 6)]
    assert reasons[1] == "unparsable line 4 of w.csv: expected 3 fields, got 2: '3,c'"
    assert len({r["id"] for r in bad}) == 2  # the repeated bad row is one id (a duplicate), the others differ
    for cfg in ({"type": "url_list"}, {"type": "panda70m"}):
        (tmp_path / "p.csv").write_text(
            "videoID,url,timestamp,caption\nv,http://h/v,\"[['0:00:01.000', "
            "'0:00:02.000']]\",\"['a']\"\nw,http://h/w,oops,\"['b']\",extra\n"
        )
        rows = read(**cfg, path=str(tmp_path / "p.csv"))
        assert sorted(r["status"] for r in rows) == ["failed", "ok"], cfg
        assert "expected 4 fields, got 5" in next(r["reason"] for r in rows if r["status"] == "failed")


def test_json_lines_that_do_not_parse_fail_alone(tmp_path):
    """A torn JSON line and a line that is not an object, in the middle of a JSON-lines file: each is that line's
    failure (with its line number); the lines around them are read, blank lines counted."""
    (tmp_path / "l.jsonl").write_text(
        '{"url": "http://h/1.mp4"}\n{"url": "http://h/2\n\n[3]\n{"url": "http://h/5.mp4", "caption": "five"}\n'
    )
    rows = read(type="url_list", path=str(tmp_path / "l.jsonl"))
    ok = sorted((r["uri"], r["caption"]) for r in rows if r["status"] == "ok")
    assert ok == [("http://h/1.mp4", ""), ("http://h/5.mp4", "five")]
    bad = sorted(r["reason"] for r in rows if r["status"] == "failed")
    assert len(bad) == 2 and {r["stage"] for r in rows if r["status"] == "failed"} == {"source"}
    assert bad[0].startswith("unparsable line 2 of l.jsonl: JSONDecodeError: Unterminated string")
    assert bad[1].startswith("unparsable line 4 of l.jsonl: not a JSON object: list: '[3]'")


def test_duplicates_are_failed_under_their_own_line(tmp_path):
    """The resume filter without Ray: of the rows that share an id, the first by position is the sample; each
    later one is failed under `<source>:<file>:<line>` (never the sample's id), naming the id it repeats, and
    comes out first. Parquet rows are numbered too."""
    from pipeline.ledger import LedgerView
    from pipeline.ray_job import _keys, _resume_filter
    from pipeline.sources import described

    (tmp_path / "l.csv").write_text("url,caption\nhttp://h/a,1\nhttp://h/b,2\nhttp://h/a,3\nhttp://h/a,4\n")
    pq.write_table(pa.table({"url": ["http://h/a", "http://h/a"], "caption": ["1", "2"]}), tmp_path / "l.parquet")
    view = LedgerView(str(tmp_path / "store"), {}, ())
    for name, lines in (("l.csv", (2, 4, 5)), ("l.parquet", (1, 2))):
        src = make_source(source_config({"type": "url_list", "path": str(tmp_path / name), "name": "ul"}))
        keyed = _keys(pa.concat_tables(read_local(src)), src, 1)
        slices = list(_resume_filter(keyed, view, False, "ul"))
        rows = [r for t in slices for r in described(src, t)]
        first, dups = make_id("ul", "http://h/a"), [f"ul:{name}:{n}" for n in lines[1:]]
        assert [r["id"] for r in rows[: len(dups)]] == dups  # the duplicates first
        assert {r["id"]: r["status"] for r in rows} == {
            first: "ok",
            **({make_id("ul", "http://h/b"): "ok"} if name == "l.csv" else {}),
            **{d: "failed" for d in dups},
        }
        for r in rows[: len(dups)]:
            assert r["stage"] == "source" and r["uri"] == "http://h/a"
            assert r["reason"].startswith(
                f"duplicate of {first} (its row: {name}:{lines[0]}); this row ({r['id'][3:]})"
            )


def test_long_fields_and_a_10k_clip_row(tmp_path):
    """No field size limit: a 1 MB caption, and a Panda-70M row of 10k clips (lists of ~0.5 MB)."""
    (tmp_path / "w.csv").write_text(
        'videoid,name,contentUrl\n1,"' + "x" * (1 << 20) + '",http://h/1.mp4\n2,b,http://h/2.mp4\n'
    )
    rows = read(type="webvid", path=str(tmp_path / "w.csv"))
    assert [len(r["caption"]) for r in rows] == [1 << 20, 1] and all(r["status"] == "ok" for r in rows)
    n = 10_000
    t = [f"{i // 3600}:{i // 60 % 60:02d}:{i % 60:02d}" for i in range(n)]
    stamps = "[" + ", ".join(f"['{s}.000', '{s}.500']" for s in t) + "]"
    caps = "[" + ", ".join(f"'clip {i}'" for i in range(n)) + "]"
    (tmp_path / "p.csv").write_text(f'videoID,url,timestamp,caption\nv,http://h/v,"{stamps}","{caps}"\n')
    rows = read(type="panda70m", path=str(tmp_path / "p.csv"))
    assert len(rows) == n and len({r["id"] for r in rows}) == n and all(r["status"] == "ok" for r in rows)


def test_cap3d_captions_have_no_field_limit(tmp_path):
    """Objaverse's Cap3D captions: a 200k-character caption (over the csv module's limit) is read whole."""
    from pipeline.sources.objaverse import read_captions

    (tmp_path / "c.csv").write_text('uid,caption\nabc,"a chair"\ndef,' + "x" * 200_000 + "\nghi,a red, shiny car\n")
    caps = read_captions(str(tmp_path / "c.csv"))
    assert caps == {"abc": "a chair", "def": "x" * 200_000, "ghi": "a red"}  # (unquoted commas: as csv reads them)
