"""The image host path (issue 10 item 5): the decoder's cached ICC transform and Pillow-image hand-off give the
same pixels as the plain path, and `decode.image_resize: device` moves the resize of images that downscale to the
tokenizer's device (real shared images, the real prepare stage with its isolated child, the real tokenize stage).

Tolerance, device vs decoder resize (torch bicubic + antialias vs Pillow's, same kernel; on the shared test images
that downscale into 256^2-area buckets): mean |diff| <= 0.5 levels, max <= 16 (measured: mean 0.07-0.19, max 11:
Pillow rounds to uint8 between its two passes).
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from atoken.images import load_rgb
from pipeline.buckets import resize_crop, resize_crop_frames
from pipeline.decode import DEVICE_RESIZE_MAX_AREA, DecodeConfig, decode_file, resize_placement, target_size
from pipeline.rows import new_row
from pipeline.tokenize import Tokenize, TokenizeConfig

BUCKETS = {"area": 256 * 256, "min_side": 128, "max_side": 1024}
DECODER = DecodeConfig(upscale=True, timeout_s=30, buckets=BUCKETS)
DEVICE = DecodeConfig(upscale=True, timeout_s=30, buckets=BUCKETS, image_resize="device")


def plain_decode(path: str, cfg: DecodeConfig) -> np.ndarray:
    """The decoder's rules written out plainly (a new sRGB transform per call, numpy between the steps): the
    reference the faster path must equal exactly."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        icc = im.info.get("icc_profile")
        if icc and im.mode in ("RGB", "CMYK", "L"):
            src = ImageCms.ImageCmsProfile(__import__("io").BytesIO(icc))
            im = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        rgb = np.asarray(im.convert("RGB"))
    size, resample = target_size(*rgb.shape[:2], cfg)
    assert resample  # upscale: true
    return np.asarray(resize_crop(Image.fromarray(rgb), size))


def images(shared_data, suffixes=(".jpg", ".png")):
    return sorted(p for p in (shared_data / "images").iterdir() if p.suffix.lower() in suffixes)


def test_decoder_pixels_equal_the_plain_path_also_from_the_cached_icc_transform(shared_data):
    files = images(shared_data)
    with_icc = [p for p in files if Image.open(p).info.get("icc_profile")]
    assert with_icc, "the shared images include ICC-profiled files"
    for _ in range(2):  # the second pass uses the cached transforms
        for p in files:
            got = decode_file(str(p), "image", DECODER)
            assert got["resize_to"] is None
            np.testing.assert_array_equal(got["pixels"][0], plain_decode(str(p), DECODER), err_msg=p.name)
    cmyk = shared_data / "images" / "Channel_digital_image_CMYK_color.jpg"
    assert load_rgb(str(cmyk)).shape == (333, 500, 3)


def test_a_broken_icc_profile_falls_back_and_is_not_cached(tmp_path):
    a = np.tile(np.arange(64, dtype=np.uint8)[:, None, None] * 4, (1, 48, 3))
    path = tmp_path / "bad_icc.png"
    Image.fromarray(a).save(path, icc_profile=b"not a profile")
    for _ in range(2):
        np.testing.assert_array_equal(load_rgb(str(path)), a)


def test_device_resize_leaves_the_resize_to_the_tokenizer_within_tolerance(shared_data):
    deferred = 0
    for p in images(shared_data):
        dev, dec = decode_file(str(p), "image", DEVICE), decode_file(str(p), "image", DECODER)
        h, w = dev["orig_height"], dev["orig_width"]
        size = dec["pixels"].shape[1:3]
        if dev["resize_to"] is None:  # upscales, exact fits and very large sources stay with the decoder
            assert dec["upscaled"] or (h, w) == size or h * w > DEVICE_RESIZE_MAX_AREA * size[0] * size[1], p.name
            np.testing.assert_array_equal(dev["pixels"], dec["pixels"])
            continue
        deferred += 1
        assert dev["pixels"].shape == (1, h, w, 3) and tuple(dev["resize_to"]) == size and not dev["upscaled"]
        resized = resize_crop_frames(torch.from_numpy(dev["pixels"].copy()), dev["resize_to"]).numpy()
        diff = np.abs(resized.astype(np.int16) - dec["pixels"].astype(np.int16))
        assert resized.shape == dec["pixels"].shape and diff.mean() <= 0.5 and diff.max() <= 16, p.name
    assert deferred >= 5
    retina = decode_file(str(shared_data / "images" / "retina.jpg"), "image", DEVICE)  # 30x its bucket's area
    assert retina["resize_to"] is None and retina["pixels"].shape == (1, 256, 256, 3)
    assert "images are resized on the tokenizer's device" in resize_placement(DEVICE)
    assert "images are resized by the decoder" in resize_placement(DECODER)


def test_device_resized_rows_tokenize_like_decoder_resized_rows(media_stage, shared_data):
    files = images(shared_data)[:8]
    rows = [new_row(p.name, "image", "test", uri=str(p)) for p in files]
    bad = new_row("bad", "image", "test", uri=str(shared_data / "bad" / "broken.png"))
    dev = media_stage(DEVICE)(rows + [bad])
    dec = media_stage(DECODER)(rows)
    assert dev[-1]["status"] == "failed" and dev[-1]["stage"] == "decode" and dev[-1]["reason"]
    assert any(r.get("resize_to") for r in dev[:-1])
    stage = Tokenize(TokenizeConfig(config="tiny", device="cpu", batch_rows=16), "pp")
    a, b = stage(dev[:-1]), stage(dec)
    for x, y in zip(a, b):
        assert x["status"] == y["status"] == "ok", (x.get("reason"), y.get("reason"))
        assert (x["width"], x["height"], x["num_frames"]) == (y["width"], y["height"], y["num_frames"])
        assert "pixels" not in x and "resize_to" not in x
        np.testing.assert_array_equal(x["coords"], y["coords"])
        lx, ly = x["latent"].astype(np.float32), y["latent"].astype(np.float32)
        assert np.linalg.norm(lx - ly) / np.linalg.norm(ly) < 0.05


def test_pending_resizes_are_grouped_and_equal_one_clip_at_a_time(media_stage, shared_data):
    """The tokenizer resizes the pending clips of one (shape, size) in one call: the same pixels, exactly, as each
    clip's own resize (frames_on), for images and a video in one batch; rows without a resize pass as they are."""
    from pipeline.tokenizers.atoken import Model, Pending, frames_on

    names = ["astronaut.png", "camera.png", "astronaut.png", "coffee.png", "hopper_gray.jpg"]
    rows = media_stage(DEVICE)(
        [new_row(f"{k}", "image", "test", uri=str(shared_data / "images" / n)) for k, n in enumerate(names)]
    )
    video = media_stage(DecodeConfig(fps=4, max_frames=8, upscale=True, buckets={"area": 256 * 256}))(
        [new_row("v", "video", "test", uri=str(shared_data / "videos" / "Big_Buck_Bunny_180_10s.webm"))]
    )
    rows += video
    assert [r["status"] for r in rows] == ["ok"] * 6
    assert [r.get("resize_to") is not None for r in rows] == [True, True, True, True, False, True]
    model = Model(TokenizeConfig(config="tiny", device="cpu"), "cpu")
    packed = [model.pack(r) for r in rows]
    assert [isinstance(p, Pending) for p in packed] == [True, True, True, True, False, True]
    done = model.resize_pending(packed)
    for r, got in zip(rows, done):
        want = frames_on(r).numpy()
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        np.testing.assert_array_equal(got, want)
    assert done[4] is packed[4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_resize_on_the_gpu_matches_the_decoder_path(media_stage, shared_data):
    """The same rows on a GPU tokenizer: the pending resize runs on the GPU (bf16 encoder, so a looser bound)."""
    files = images(shared_data)
    rows = [new_row(p.name, "image", "test", uri=str(p)) for p in files]
    dev, dec = media_stage(DEVICE)(rows), media_stage(DECODER)(rows)
    assert sum(r.get("resize_to") is not None for r in dev) >= 5
    stage = Tokenize(TokenizeConfig(config="tiny", device="cuda", batch_rows=32, compile="off"), "pp", gpus=1.0)
    for x, y in zip(stage(dev), stage(dec)):
        assert x["status"] == y["status"] == "ok", (x.get("reason"), y.get("reason"))
        assert (x["width"], x["height"]) == (y["width"], y["height"])
        np.testing.assert_array_equal(x["coords"], y["coords"])
        lx, ly = x["latent"].astype(np.float32), y["latent"].astype(np.float32)
        assert np.linalg.norm(lx - ly) / np.linalg.norm(ly) < 0.05
