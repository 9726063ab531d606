import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.buckets import BucketConfig, choose_bucket, make_buckets, resize_crop
from pipeline.decode import (
    DecodeConfig,
    DecodeError,
    clean_decoder_error,
    decode_file,
    decode_image,
    frame_count,
    sample_indices,
    target_size,
    to_rgb8,
)
from pipeline.isolate import IsolateError, Isolator, run_with_timeout
from pipeline.sources import iter_rows, make_source, source_config

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CFG = DecodeConfig(fps=8.0, max_frames=16, timeout_s=30.0)
BUCKETS = set(make_buckets(CFG.buckets))


def decoded(path, modality, cfg=CFG, span=None):
    return decode_file(str(path), modality, cfg, span)


# ---- buckets -----------------------------------------------------------------------------------------------


def test_buckets():
    b = make_buckets(BucketConfig())
    assert all(h % 16 == 0 and w % 16 == 0 and 128 <= min(h, w) and max(h, w) <= 512 for h, w in b)
    assert (256, 256) in b and all((w, h) in b for h, w in b)  # symmetric
    assert all(abs(h * w - 256 * 256) / (256 * 256) < 0.1 for h, w in b)
    assert choose_bucket(1080, 1920, b) == (192, 336)
    assert choose_bucket(1920, 1080, b) == (336, 192)
    assert choose_bucket(500, 500, b) == (256, 256)
    assert make_buckets(BucketConfig(buckets=((256, 256), (128, 256)))) == [(128, 256), (256, 256)]
    with pytest.raises(ValueError, match="multiples of 16"):
        make_buckets(BucketConfig(buckets=((250, 256),)))
    img = Image.fromarray(np.zeros((100, 300, 3), np.uint8))
    assert resize_crop(img, (192, 336)).size == (336, 192)


# ---- videos ------------------------------------------------------------------------------------------------


def test_frame_count_rule():
    assert [frame_count(n, 16) for n in range(0, 21)] == [
        0,
        1,
        2,
        3,
        4,
        4,
        4,
        4,
        8,
        8,
        8,
        8,
        12,
        12,
        12,
        12,
        16,
        16,
        16,
        16,
        16,
    ]


def test_sample_indices_clamped_and_spanned():
    idx, rate = sample_indices(241, 25.0, 8.0, 16)
    assert rate == 8.0 and len(idx) == 16 and idx[0] == 0 and idx[1] == 3
    idx, _ = sample_indices(241, 25.0, 8.0, 16, span=[2.0, 3.0])
    assert idx.tolist() == [50, 53, 56, 59, 62, 65, 68, 71]
    idx, rate = sample_indices(10, 30.0, 60.0, 16, span=[0.0, 100.0])  # rate capped at native, indices clamped
    assert rate == 30.0 and len(idx) == 8 and idx.max() <= 9
    with pytest.raises(ValueError, match="starts after the video ends"):
        sample_indices(241, 25.0, 8.0, 16, span=[20.0, 25.0])
    with pytest.raises(ValueError, match="no usable frame rate"):
        sample_indices(10, float("nan"), 8.0, 16)


# file -> (frames, orig [h, w], size fed to the tokenizer) with fps 8, max_frames 16. Sources smaller than their
# bucket are kept at native resolution (decode.upscale: false): cropped to the bucket's aspect, multiples of 16.
VIDEOS = {
    "Big_Buck_Bunny_180_10s.webm": (16, [180, 320], (176, 304)),  # bucket (192, 336) would upscale 180 -> 192
    "bbb_480p_vp9_opus_1second.webm": (8, [480, 854], (192, 336)),
    "chaplin.mp4": (16, [360, 640], (192, 336)),
    "max-heromode.mp4": (16, [480, 848], (192, 336)),
    "stub_mjpeg.avi": (3, [120, 160], (112, 144)),  # 3 frames at 10 fps: too short for 4 at 8 fps -> all 3
    "stub_mp4v.mp4": (4, [120, 160], (112, 144)),  # 160x120: native (bucket 224x288 would upscale it)
    "video-1080p-60fps-2s.mp4": (16, [1080, 1920], (192, 336)),
    "video_270.mov": (3, [568, 320], (336, 192)),  # 3 frames in all: every one is kept (tokenizer pads)
    "video_90.mov": (3, [568, 320], (336, 192)),
}


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_real_videos(name):
    frames, orig, bucket = VIDEOS[name]
    out = decoded(DATA / "videos" / name, "video")
    px = out["pixels"]
    assert px.dtype == np.uint8 and px.shape == (frames, *bucket, 3) and out["num_frames"] == frames
    assert [out["orig_height"], out["orig_width"]] == orig and px.flags.c_contiguous
    assert out["fps"] == 8.0 if frames >= 4 else out["fps"] > 8.0  # short clips are sampled faster
    assert 5 < px.mean() < 250 and px.std() > 5  # real picture content
    if frames > 1:
        assert np.all(np.diff(out["frame_indices"]) >= 0)


def test_video_span_cut():
    out = decoded(DATA / "videos" / "chaplin.mp4", "video", span=(2.0, 3.0))
    assert out["pixels"].shape[0] == 8 and out["num_frames"] == 8 and out["fps"] == 8.0
    assert out["frame_indices"].tolist() == [50, 53, 56, 59, 62, 65, 68, 71]
    with pytest.raises(DecodeError) as exc:
        decoded(DATA / "videos" / "chaplin.mp4", "video", span=(60.0, 65.0))
    assert str(exc.value) == "span [60, 65]s starts after the video ends (9.640s)"
    with pytest.raises(DecodeError, match=r"bad span \[3.0, 2.0\]"):
        decoded(DATA / "videos" / "chaplin.mp4", "video", span=(3.0, 2.0))
    # a span running past the end is cut at the end
    tail = decoded(DATA / "videos" / "chaplin.mp4", "video", span=(9.0, 20.0))
    assert tail["num_frames"] == 4 and tail["frame_indices"].max() < 241


def test_video_timeout_is_recorded():
    with pytest.raises(IsolateError) as exc:
        run_with_timeout(
            decode_file, str(DATA / "videos" / "video-1080p-60fps-2s.mp4"), "video", CFG, None, timeout_s=0.001
        )
    assert str(exc.value) == "decode timed out after 0.001s"


# ---- images ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in (DATA / "images").iterdir()))
def test_real_images(name):
    out = decoded(DATA / "images" / name, "image")
    px = out["pixels"]
    assert px.dtype == np.uint8 and px.ndim == 4 and px.shape[0] == 1 and px.shape[-1] == 3
    h, w = out["orig_height"], out["orig_width"]
    bucket = choose_bucket(h, w, sorted(BUCKETS))
    if max(bucket[0] / h, bucket[1] / w) <= 1:  # the source covers its bucket
        assert px.shape[1:3] == bucket
    else:  # smaller than its bucket: native resolution, never upscaled (decode.upscale: false)
        assert px.shape[1] <= h and px.shape[2] <= w and px.shape[1] % 16 == 0 == px.shape[2] % 16
    assert px.shape[1:3] == target_size(h, w, CFG)[0] and out["upscaled"] is False
    assert out["fps"] == 0.0 and out["num_frames"] == 1
    assert 0 < px.mean() < 255 and px.std() > 3


@pytest.mark.parametrize("name", ["portrait-orientation-6.jpg", "Landscape_6.jpg"])
def test_exif_orientation(name):
    raw = Image.open(DATA / "images" / name)
    assert raw.getexif().get(0x0112) == 6  # "rotate 90 CW to display"
    w, h = raw.size
    out = decode_image(str(DATA / "images" / name), DecodeConfig(icc_to_srgb=False))  # compare like with like
    assert (out["orig_height"], out["orig_width"]) == (w, h)  # displayed height = stored width
    rgb = np.asarray(raw.convert("RGB"))
    size = out["pixels"].shape[1:3]
    cw = np.asarray(resize_crop(Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=-1))), size)).astype(float)
    ccw = np.asarray(resize_crop(Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1))), size)).astype(float)
    got = out["pixels"][0].astype(float)
    assert np.abs(got - cw).mean() < 3 < np.abs(got - ccw).mean()


def test_16bit_scaled_not_clipped():
    a = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    rgb = to_rgb8(Image.fromarray(a))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()
    pgm = decode_image(str(DATA / "images" / "hopper_16bit.pgm"), CFG)["pixels"][0].astype(float)
    ref = decode_image(str(DATA / "images" / "hopper_gray.jpg"), CFG)["pixels"][0].astype(float)
    assert 20 < pgm.mean() < 235 and pgm.std() > 20
    assert np.corrcoef(pgm[..., 0].ravel(), ref[..., 0].ravel())[0, 1] > 0.95  # same picture, same scale
    assert abs(pgm.mean() - ref.mean()) < 10
    tif = decode_image(str(DATA / "images" / "tiff_16bit_RGB.tiff"), CFG)["pixels"]
    assert 0 < tif.mean() < 255 and tif.std() > 5 and not (tif == 255).all()


def test_cmyk_converted():
    path = DATA / "images" / "Channel_digital_image_CMYK_color.jpg"
    raw = Image.open(path)
    assert raw.mode == "CMYK"
    got = decode_image(str(path), CFG)["pixels"][0].astype(float)
    naive = np.asarray(resize_crop(raw.convert("RGB"), got.shape[:2])).astype(float)
    assert np.corrcoef(got.ravel(), naive.ravel())[0, 1] > 0.8  # not inverted, same picture
    assert np.abs(got[..., 0] - got[..., 2]).mean() > 5  # still in colour


def test_alpha_palette_gray():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque red-ish, bottom transparent
    out = to_rgb8(Image.fromarray(rgba, "RGBA"))
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 3].tolist() == [255, 255, 255]
    assert to_rgb8(Image.fromarray(rgba, "RGBA"), background=128)[3, 3].tolist() == [128, 128, 128]
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 1
    assert to_rgb8(pal).tolist() == [[[255, 0, 0], [255, 255, 255]], [[255, 255, 255], [255, 0, 0]]]
    gray = to_rgb8(Image.fromarray(np.full((2, 2), 77, np.uint8), "L"))
    assert gray.shape == (2, 2, 3) and (gray == 77).all()


# ---- bad files and isolation -------------------------------------------------------------------------------

BAD = {  # file -> what happens to it after the folder source + decode_file (3d files go to the mesh branch)
    # decord cannot seek it; PyAV reads the one frame ffmpeg can decode
    "block_ends_beyond_cluster.mkv": ("ok", (1, 224, 288, 3)),
    "broken.png": ("failed", "cannot identify image"),
    "corrupted.mp4": ("ok", (16, 192, 336, 3)),  # damaged mid-stream: ffmpeg conceals the errors
    "empty.ply": ("skipped", "empty file"),
    "empty_file.glb": ("skipped", "empty file"),
    "fixed_lacing_bad_lace_size.mkv": ("failed", "corrupt or truncated video stream (decoder: Cannot create buffer"),
    "invalid_magic.glb": ("skipped", "unrecognised content"),
    "no_duration.webm": ("ok", (16, 192, 336, 3)),  # no container duration: decord refuses, PyAV reads it
    "truncated.jpg": ("failed", "Truncated File Read"),
    "truncated_jpeg.jpg": ("failed", "image file is truncated"),
}


def test_damaged_stream_prints_no_decoder_lines(capfd):
    """A stream ffmpeg conceals damage in decodes without ffmpeg's own `[h264 @ 0x...]` lines on stderr (QA
    decodes samples again on the driver: they landed on the console of a run that went well)."""
    capfd.readouterr()
    got = decode_file(str(DATA / "bad" / "corrupted.mp4"), "video", DecodeConfig())
    err = capfd.readouterr().err
    assert got["pixels"].shape == BAD["corrupted.mp4"][1], got["pixels"].shape
    assert "[h264 @" not in err and "Invalid NAL unit" not in err, err


def test_bad_files_end_with_recorded_errors():
    rows = {
        Path(r["uri"]).name: r
        for r in iter_rows(make_source(source_config({"type": "folder", "path": str(DATA / "bad")})))
    }
    assert {n for n, r in rows.items() if r["modality"] != "3d"} == set(BAD)
    for name, row in rows.items():
        if name not in BAD:
            assert row["modality"] == "3d" and row["status"] == "ok", name
            continue
        status, text = BAD[name]
        if status == "skipped":
            assert (row["status"], row["stage"]) == ("skipped", "source") and text in row["reason"], name
            continue
        assert row["status"] == "ok", name
        if status == "ok":
            assert decoded(row["uri"], row["modality"])["pixels"].shape == text, name
            continue
        with pytest.raises(DecodeError) as exc:  # bad input is always a DecodeError with a readable reason
            decoded(row["uri"], row["modality"])
        reason = str(exc.value)
        assert text in reason and len(reason) < 400, (name, reason)
        assert "/project/src" not in reason and "Stack trace" not in reason  # decoder source locations stripped


def test_decode_file_refuses_what_it_cannot_decode(tmp_path):
    with pytest.raises(DecodeError, match="decode handles image and video, not '3d'"):
        decoded(DATA / "meshes" / "Box.glb", "3d")
    with pytest.raises(DecodeError, match="No such file"):
        decoded("/nonexistent/file.jpg", "image")
    with pytest.raises(DecodeError):
        decoded("/nonexistent/file.mp4", "video")
    with pytest.raises(DecodeError, match="max_pixels=1000"):
        decoded(DATA / "images" / "coffee.png", "image", DecodeConfig(max_pixels=1000))
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(DecodeError, match="^UnidentifiedImageError: cannot identify image"):
        decoded(tmp_path / "x.png", "image")
    noisy = RuntimeError(
        "[12:34:56] /project/src/video/video_reader.cc:83: ERROR opening: x.mp4\nStack trace:\n  [bt] (0) libdecord.so"
    )
    assert clean_decoder_error(noisy) == "RuntimeError: ERROR opening: x.mp4"


def _sleep_forever():
    while True:
        time.sleep(60)


def _segfault():
    import faulthandler

    faulthandler.disable()  # (pytest's handler, inherited through fork, would print a traceback)
    os.kill(os.getpid(), signal.SIGSEGV)


def _raise():
    raise KeyError("boom")


def test_run_with_timeout_kills_hangs_and_crashes():
    t = time.monotonic()
    with pytest.raises(IsolateError, match=r"^decode timed out after 0.5s$"):
        run_with_timeout(_sleep_forever, timeout_s=0.5)
    assert time.monotonic() - t < 3
    with pytest.raises(IsolateError, match=r"^decode crashed \(signal 11, SIGSEGV\)$"):
        run_with_timeout(_segfault, timeout_s=10)
    with pytest.raises(KeyError, match="boom"):
        run_with_timeout(_raise, timeout_s=10)
    big = run_with_timeout(np.full, (16, 64, 64, 3), 7, timeout_s=10, dtype=np.uint8)
    assert big.shape == (16, 64, 64, 3) and (big == 7).all()
    assert run_with_timeout(os.getpid, timeout_s=0) == os.getpid()  # in-process
    assert run_with_timeout(os.getpid, timeout_s=10) != os.getpid()


def test_isolator_reuses_its_child_and_replaces_it_after_a_hang():
    with Isolator() as iso:
        pid = iso.run(os.getpid, timeout_s=10)
        assert pid != os.getpid() and iso.run(os.getpid, timeout_s=10) == pid  # one child, reused
        with pytest.raises(KeyError):
            iso.run(_raise, timeout_s=10)
        assert iso.run(os.getpid, timeout_s=10) == pid  # an exception does not cost the child
        with pytest.raises(IsolateError, match="timed out"):
            iso.run(_sleep_forever, timeout_s=0.3, label="decode")
        new = iso.run(os.getpid, timeout_s=10)
        assert new != pid  # the hung child was killed and replaced
        with pytest.raises(IsolateError, match=r"^mesh crashed \(signal 11, SIGSEGV\)$"):
            iso.run(_segfault, timeout_s=10, label="mesh")
        assert iso.run(os.getpid, timeout_s=10) not in (pid, new)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the hung child is gone, not left behind
        out = iso.run(decode_file, str(DATA / "images" / "coffee.png"), "image", CFG, timeout_s=10)
        assert out["pixels"].shape[0] == 1
