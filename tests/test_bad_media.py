"""The small decode defects, each fed a real file: HEIC (pillow-heif, and the message without it), readable decoder
reasons, `python -m atoken reconstruct` on bad input (no traceback) with EXIF orientation, the photo evaluator's
image types, and MPEG-TS / FLV / OGV containers. HEIC, AVIF, TS, FLV, OGV and MPEG-PS files are made by the tests
from the real images and videos in ../shared/data (none of those formats is among them)."""

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageOps

from atoken.cli import load_image
from atoken.images import HEIF_MISSING, load_rgb
from atoken.train import load_eval_photos
from pipeline.decode import DecodeConfig, DecodeError, decode_file
from pipeline.magic import check_modality, classify, read_head
from pipeline.sources import iter_rows, make_source, source_config

REPO = Path(__file__).resolve().parents[1]
pillow_heif = pytest.importorskip("pillow_heif")


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "atoken", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def save_heic(src: Path, dst: Path) -> Path:
    pillow_heif.register_heif_opener()
    with Image.open(src) as im:
        ImageOps.exif_transpose(im).convert("RGB").save(dst, quality=95)
    return dst


# ---- HEIC ---------------------------------------------------------------------------------------------------


def test_heic_decodes_like_its_source(shared_data, tmp_path):
    src = shared_data / "images" / "Landscape_6.jpg"  # EXIF orientation 6: displays 600x450
    heic = save_heic(src, tmp_path / "landscape.heic")
    assert classify(heic) == ("heic", "image", "magic bytes")
    got = decode_file(str(heic), "image", DecodeConfig(icc_to_srgb=False))
    ref = decode_file(str(src), "image", DecodeConfig(icc_to_srgb=False))
    assert (got["orig_width"], got["orig_height"]) == (600, 450) == (ref["orig_width"], ref["orig_height"])
    assert got["pixels"].shape == ref["pixels"].shape
    assert np.abs(got["pixels"].astype(float) - ref["pixels"].astype(float)).mean() < 6  # lossy, same picture


def test_heic_without_pillow_heif_says_what_to_install(shared_data, tmp_path, monkeypatch):
    heic = save_heic(shared_data / "images" / "coffee.png", tmp_path / "coffee.heic")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` now raises ImportError
    with pytest.raises(DecodeError) as exc:
        decode_file(str(heic), "image", DecodeConfig())
    assert str(exc.value) == HEIF_MISSING and "pip install 'atoken-cache[heif]'" in str(exc.value)


# ---- readable decoder reasons --------------------------------------------------------------------------------


def test_corrupt_matroska_reason_is_readable(shared_data):
    with pytest.raises(DecodeError) as exc:
        decode_file(str(shared_data / "bad" / "fixed_lacing_bad_lace_size.mkv"), "video", DecodeConfig())
    reason = str(exc.value)
    assert reason == "corrupt or truncated video stream (decoder: Cannot create buffer source)"
    assert "Check failed" not in reason and "avfilter" not in reason and ".cc:" not in reason


def test_video_without_container_duration_decodes_through_pyav(shared_data):
    out = decode_file(str(shared_data / "bad" / "no_duration.webm"), "video", DecodeConfig(fps=4, max_frames=8))
    assert out["pixels"].shape == (8, 192, 336, 3) and out["media_duration"] == pytest.approx(74 / 14.985, abs=0.05)


# ---- python -m atoken reconstruct -----------------------------------------------------------------------------


def test_reconstruct_bad_input_is_an_error_line_not_a_traceback(shared_data, tmp_path):
    truncated = tmp_path / "truncated.webm"  # the first 3 KB of a real VP9 file
    truncated.write_bytes((shared_data / "videos" / "Big_Buck_Bunny_180_10s.webm").read_bytes()[:3000])
    text_as_webm = tmp_path / "notes.webm"
    text_as_webm.write_text("these are notes, not a video\n" * 20)
    for path, text in (
        (
            shared_data / "bad" / "fixed_lacing_bad_lace_size.mkv",
            "corrupt or truncated video stream (decoder: Cannot create buffer source)",
        ),
        (truncated, "cannot read truncated.webm"),
        (text_as_webm, "cannot read notes.webm"),
        (shared_data / "bad" / "truncated_jpeg.jpg", "image file is truncated"),
    ):
        r = run_cli("reconstruct", path, "--out", tmp_path / "x.png", cwd=tmp_path)
        assert r.returncode == 2, (path.name, r.stdout, r.stderr)
        last = r.stderr.strip().splitlines()[-1]  # (FFmpeg's own log lines may come before it)
        assert "Traceback" not in r.stderr and last.startswith("error: cannot read "), (path.name, r.stderr)
        assert text in last, (path.name, r.stderr)


def test_reconstruct_honours_exif_orientation_and_icc(shared_data, tmp_path):
    src = shared_data / "images" / "portrait-orientation-6.jpg"  # stored 700x840, displays 840x700
    out = tmp_path / "rec.png"
    r = run_cli("reconstruct", src, "--config", "tiny", "--max-side", "128", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.width > im.height  # landscape, as displayed
    cmyk = shared_data / "images" / "Channel_digital_image_CMYK_color.jpg"  # CMYK with an ICC profile
    np.testing.assert_array_equal(load_image(cmyk, 0)[0], load_rgb(str(cmyk)))  # the pipeline's own reader
    np.testing.assert_array_equal(load_image(src, 0)[0], load_rgb(str(src)))
    assert load_image(src, 0).shape[1:3] == (700, 840)


# ---- the photo evaluator -------------------------------------------------------------------------------------


def test_evaluator_reads_every_image_type(shared_data, tmp_path):
    with Image.open(shared_data / "images" / "chelsea.png") as im:
        im.save(tmp_path / "chelsea.avif", quality=90)
    save_heic(shared_data / "images" / "coffee.png", tmp_path / "coffee.heic")
    (tmp_path / "hopper_16bit.pgm").write_bytes((shared_data / "images" / "hopper_16bit.pgm").read_bytes())
    (tmp_path / "notes.txt").write_text("not a photo")
    msgs = []
    photos = dict(load_eval_photos(tmp_path, 64, log=msgs.append))
    assert set(photos) == {"chelsea.avif", "coffee.heic", "hopper_16bit.pgm"}
    assert all(x.shape == (64, 64, 3) and -1 <= x.min() < x.max() <= 1 for x in photos.values())
    assert any("notes.txt" in m for m in msgs)  # what is not an image is named, not silently passed over


# ---- MPEG-TS, FLV, OGV ---------------------------------------------------------------------------------------


def transcode(src: Path, dst: Path, fmt: str, codec: str, frames: int = 30) -> Path:
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt) as out:
        s = out.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt, s.bit_rate = 640, 360, "yuv420p", 4_000_000
        for i, f in enumerate(inp.decode(video=0)):
            if i >= frames:
                break
            for p in s.encode(f.reformat(640, 360, "yuv420p")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return dst


@pytest.fixture(scope="module")
def containers(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("containers")
    src = shared_data / "videos" / "chaplin.mp4"
    return {
        name: transcode(src, root / name, fmt, codec)
        for name, fmt, codec in (
            ("clip.ts", "mpegts", "mpeg2video"),
            ("clip.flv", "flv", "flv"),
            ("clip.ogv", "ogg", "libvpx"),
            ("clip.mpg", "mpeg", "mpeg1video"),
        )
    }


def test_ts_flv_ogv_are_videos(shared_data, containers):
    ref = decode_file(str(shared_data / "videos" / "chaplin.mp4"), "video", DecodeConfig(fps=4, max_frames=4))
    for name, fmt in (("clip.ts", "mpegts"), ("clip.flv", "flv"), ("clip.ogv", "ogg")):
        path = containers[name]
        assert classify(path) == (fmt, "video", "magic bytes"), name
        assert check_modality(read_head(path), "video", path.suffix) is None
        got = decode_file(str(path), "video", DecodeConfig(fps=4, max_frames=4))
        assert got["pixels"].shape == (4, 192, 336, 3) and got["fps"] == 4.0, name
        corr = np.corrcoef(got["pixels"].astype(float).ravel(), ref["pixels"].astype(float).ravel())[0, 1]
        assert corr > 0.8, (name, corr)  # the same pictures as the original (lossy re-encode)


def test_unrecognised_container_is_probed_with_pyav(containers, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / "scratch"))
    mpg = containers["clip.mpg"]  # MPEG-PS: no magic rule
    assert classify(mpg) == ("mpeg", "video", "PyAV probe (mpeg)")
    assert check_modality(read_head(mpg), "video", ".mpg", path=mpg) is None
    from pipeline.fetch import FetchConfig
    from pipeline.mesh.stage import MeshConfig
    from pipeline.prepare import Prepare
    from pipeline.rows import new_row

    stage = Prepare(FetchConfig(retries=0), DecodeConfig(fps=4, max_frames=4), MeshConfig(backend="cpu"))
    try:  # through the fetch check (bytes, then the probe) and the decoder
        (got,) = stage([new_row("mpg", "video", "t", uri=str(mpg))])
    finally:
        stage.teardown()
    assert (got["status"], got["num_frames"], got["pixels"].shape) == ("ok", 4, (4, 192, 336, 3)), got.get("reason")
    junk = tmp_path / "junk.ts"
    junk.write_bytes(b"\x00\x01 not a transport stream " * 40)
    fmt, modality, reason = classify(junk)
    assert fmt is None and modality is None and reason.startswith("unrecognised content: extension .ts")
    assert check_modality(read_head(junk), "video", ".ts", path=junk).startswith("content is not a video")


def test_folder_source_takes_the_containers(containers):
    folder = containers["clip.ts"].parent
    rows = list(iter_rows(make_source(source_config({"type": "folder", "path": str(folder)}))))
    assert sorted((Path(r["uri"]).name, r["modality"], r["status"]) for r in rows) == [
        ("clip.flv", "video", "ok"),
        ("clip.mpg", "video", "ok"),
        ("clip.ogv", "video", "ok"),
        ("clip.ts", "video", "ok"),
    ]
