import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.buckets import BucketConfig, choose_bucket, make_buckets, resize_crop
from pipeline.decode import DecodeConfig, decode_image, decode_row, frame_count, sample_indices, to_rgb8
from pipeline.isolate import IsolateError, run_with_timeout
from pipeline.rows import fail
from pipeline.sources import local_files

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CFG = DecodeConfig(fps=8.0, max_frames=16, timeout_s=30.0)
BUCKETS = set(make_buckets(CFG.buckets))


def decoded(path, modality, cfg=CFG, span=None):
    row = {"id": "t", "modality": modality, "source": "test", "status": "ok", "stage": "fetch", "error": None,
           "path": str(path), "span": span}
    return decode_row(row, cfg)


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
    assert [frame_count(n, 16) for n in range(0, 21)] == [0, 1, 2, 3, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                          16, 16, 16, 16, 16]


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


# file -> (frames, orig [h, w], bucket) with fps 8, max_frames 16
VIDEOS = {
    "Big_Buck_Bunny_180_10s.webm": (16, [180, 320], (192, 336)),
    "bbb_480p_vp9_opus_1second.webm": (8, [480, 854], (192, 336)),
    "chaplin.mp4": (16, [360, 640], (192, 336)),
    "max-heromode.mp4": (16, [480, 848], (192, 336)),
    "stub_mjpeg.avi": (3, [120, 160], (224, 288)),   # 3 frames at 10 fps: too short for 4 at 8 fps -> all 3
    "stub_mp4v.mp4": (4, [120, 160], (224, 288)),
    "video-1080p-60fps-2s.mp4": (16, [1080, 1920], (192, 336)),
    "video_270.mov": (3, [568, 320], (336, 192)),     # 3 frames in all: every one is kept (tokenizer pads)
    "video_90.mov": (3, [568, 320], (336, 192)),
}


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_real_videos(name):
    frames, orig, bucket = VIDEOS[name]
    out = decoded(DATA / "videos" / name, "video")
    assert out["status"] == "ok", out["error"]
    px = out["pixels"]
    assert px.dtype == np.uint8 and px.shape == (frames, *bucket, 3) and out["num_frames"] == frames
    assert out["orig_size"] == orig and out["stage"] == "decode"
    assert out["fps"] == 8.0 if frames >= 4 else out["fps"] > 8.0  # short clips are sampled faster
    assert 5 < px.mean() < 250 and px.std() > 5  # real picture content
    if frames > 1:
        assert np.all(np.diff(out["frame_indices"]) >= 0)


def test_video_span_cut():
    out = decoded(DATA / "videos" / "chaplin.mp4", "video", span=[2.0, 3.0])
    assert out["status"] == "ok" and out["pixels"].shape[0] == 8
    assert out["frame_indices"].tolist() == [50, 53, 56, 59, 62, 65, 68, 71]
    late = decoded(DATA / "videos" / "chaplin.mp4", "video", span=[60.0, 65.0])
    assert late["status"] == "failed" and late["stage"] == "decode"
    assert late["error"] == "span [60, 65]s starts after the video ends (9.640s)"


def test_video_timeout_is_recorded():
    out = decoded(DATA / "videos" / "video-1080p-60fps-2s.mp4", "video", DecodeConfig(timeout_s=0.001))
    assert out["status"] == "failed" and out["error"] == "decode timed out after 0.001s"


# ---- images ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in (DATA / "images").iterdir()))
def test_real_images(name):
    out = decoded(DATA / "images" / name, "image")
    assert out["status"] == "ok", out["error"]
    px = out["pixels"]
    assert px.dtype == np.uint8 and px.ndim == 4 and px.shape[0] == 1 and px.shape[-1] == 3
    h, w = out["orig_size"]
    assert px.shape[1:3] == choose_bucket(h, w, sorted(BUCKETS)) and out["fps"] == 0.0
    assert 0 < px.mean() < 255 and px.std() > 3


@pytest.mark.parametrize("name", ["portrait-orientation-6.jpg", "Landscape_6.jpg"])
def test_exif_orientation(name):
    raw = Image.open(DATA / "images" / name)
    assert raw.getexif().get(0x0112) == 6  # "rotate 90 CW to display"
    w, h = raw.size
    out = decode_image(str(DATA / "images" / name), DecodeConfig(icc_to_srgb=False))  # compare like with like
    assert out["orig_size"] == [w, h]  # displayed height = stored width
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

BAD = {  # file -> expected final status after source + decode (3d files pass to the mesh stages)
    "block_ends_beyond_cluster.mkv": ("failed", "decode", "Failed to seek_accurate to frame 0"),
    "broken.png": ("failed", "decode", "cannot identify image"),
    "corrupted.mp4": ("ok", "decode", None),  # damaged mid-stream: ffmpeg conceals the errors
    "empty.ply": ("skipped", "source", "empty file"),
    "empty_file.glb": ("skipped", "source", "empty file"),
    "fixed_lacing_bad_lace_size.mkv": ("failed", "decode", "Cannot create buffer source"),
    "invalid_magic.glb": ("skipped", "source", "unrecognised content"),
    "no_duration.webm": ("failed", "decode", "Failed to measure duration/frame-count"),
    "truncated.jpg": ("failed", "decode", "Truncated File Read"),
    "truncated_jpeg.jpg": ("failed", "decode", "image file is truncated"),
}


def test_bad_files_end_with_recorded_errors():
    rows = {Path(r["uri"]).name: r for r in local_files(DATA / "bad")}
    for name, row in rows.items():
        out = decode_row({**row, "path": row["uri"]}, CFG)
        if name not in BAD:
            assert out["modality"] == "3d" and out["status"] == "ok" and "pixels" not in out, name
            continue
        status, stage, text = BAD[name]
        assert (out["status"], out["stage"]) == (status, stage), (name, out["error"])
        if text:
            assert text in out["error"] and len(out["error"]) < 400, (name, out["error"])
            assert "/project/src" not in out["error"]  # decoder source locations stripped
        else:
            assert out["pixels"].shape == (16, 192, 336, 3)


def test_failed_and_3d_rows_pass_through():
    r = fail({"id": "x", "modality": "image", "source": "s", "status": "ok"}, "fetch", "http 404")
    assert decode_row(r, CFG) is r
    mesh = {"id": "m", "modality": "3d", "source": "s", "status": "ok", "path": "x.glb"}
    assert decode_row(mesh, CFG) is mesh
    missing = decoded("/nonexistent/file.jpg", "image")
    assert missing["status"] == "failed" and "No such file" in missing["error"]


def _sleep_forever():
    while True:
        time.sleep(60)


def _segfault():
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
