"""Videos that upscale are decoded at native size and resized on the tokenizer's device (decode.defer_upscale;
"auto", the default, defers where the tokenizer has a GPU; outside a job it defers): real clips from the shared
data, the real prepare stage (isolated decode child) and the real tokenize stage.

Tolerances (uint8 levels, on Big_Buck_Bunny_180_10s.webm 180x320 -> 384x688, 16 frames):
- deferred (torch bicubic + antialias) vs the decoder's own scaler (ffmpeg bicubic, which scales the YUV planes
  before converting to RGB): PSNR >= 38 dB and mean |diff| <= 2.5 levels (measured 41.1 dB, 1.46; max 54 at a few
  chroma edges). Pillow's bicubic, the decoder path's own fallback, is as far from ffmpeg's (41.0 dB).
- deferred vs Pillow's resize_crop (the same kernel, a = -0.5): PSNR >= 50 dB, max |diff| <= 16 (measured 55.2 dB,
  max 11: Pillow rounds to uint8 between its two passes).
- GPU vs CPU torch resize (same code): max |diff| <= 2 and under 1 % of values differing (float rounding).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.buckets import resize_crop_array, resize_crop_frames
from pipeline.decode import DecodeConfig, decode_file, for_tokenizer, resize_placement
from pipeline.ray_job import to_table
from pipeline.rows import new_row
from pipeline.tokenize import Tokenize, TokenizeConfig

SMALL = "Big_Buck_Bunny_180_10s.webm"  # 180x320: upscaled into a 512^2-area bucket
UP = DecodeConfig(fps=8, max_frames=16, timeout_s=30, upscale=True, buckets={"area": 512 * 512, "max_side": 1024})


def decode_cfg(**changes) -> DecodeConfig:
    return DecodeConfig.model_validate({**UP.model_dump(), **changes})


NO_DEFER = decode_cfg(defer_upscale="off")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def prepared(stage, src: Path, **kw):
    (out,) = stage([new_row(src.name, "video", "test", uri=str(src), **kw)])
    assert out["status"] == "ok", out.get("reason")
    return out


def test_upscaled_clip_travels_at_native_size_and_resizes_like_the_decoder(media_stage, shared_data):
    small = shared_data / "videos" / SMALL
    deferred, decoder = prepared(media_stage(UP), small), prepared(media_stage(NO_DEFER), small)
    px = deferred["pixels"]
    assert px.dtype == np.uint8 and px.shape == (16, 180, 320, 3)  # native frames, as decoded
    assert deferred["resize_to"] == (384, 688) and deferred["upscaled"] is True
    assert decoder["resize_to"] is None and decoder["pixels"].shape == (16, 384, 688, 3)
    # what goes through the object store: the row's pickled payload, about the native uint8 frames
    payload = to_table([deferred]).column("payload")[0].as_py()
    assert px.nbytes <= len(payload) < px.nbytes + 16_384
    assert len(to_table([decoder]).column("payload")[0].as_py()) > 4 * px.nbytes

    resized = resize_crop_frames(torch.from_numpy(px), deferred["resize_to"]).numpy()
    assert resized.shape == decoder["pixels"].shape and resized.dtype == np.uint8
    diff = np.abs(resized.astype(np.int16) - decoder["pixels"].astype(np.int16))
    assert psnr(resized, decoder["pixels"]) >= 38.0 and diff.mean() <= 2.5
    pil = np.stack([resize_crop_array(f, deferred["resize_to"]) for f in px])
    assert psnr(resized, pil) >= 50.0 and np.abs(resized.astype(np.int16) - pil).max() <= 16


def test_downscaling_still_resizes_in_the_decoder(shared_data):
    out = decode_file(str(shared_data / "videos" / "chaplin.mp4"), "video", decode_cfg(buckets={}))
    assert out["orig_height"] == 360 and out["resize_to"] is None and out["upscaled"] is False
    assert out["pixels"].shape == (16, 192, 336, 3)  # 360x640 -> its 256^2-area bucket, by the decoder
    assert "resized by the decoder" in resize_placement(UP) and "tokenizer's device" in resize_placement(UP)
    assert "tokenizer" not in resize_placement(NO_DEFER)


def test_auto_defers_only_for_a_tokenizer_on_a_gpu(shared_data):
    """On the CPU the decoder's scaler costs less than torch's resize, and both run on the same CPUs."""
    assert UP.defer_upscale == "auto"
    assert for_tokenizer(UP, gpu=True).defer_upscale == "on" and for_tokenizer(UP, gpu=False).defer_upscale == "off"
    assert for_tokenizer(NO_DEFER, gpu=True).defer_upscale == "off"
    on = decode_cfg(defer_upscale="on")
    assert for_tokenizer(on, gpu=False).defer_upscale == "on"
    small = str(shared_data / "videos" / SMALL)
    assert decode_file(small, "video", for_tokenizer(UP, gpu=False))["resize_to"] is None
    assert decode_file(small, "video", for_tokenizer(UP, gpu=True))["resize_to"] == (384, 688)


def test_tokenizer_applies_the_pending_resize_and_fails_only_a_bad_row(media_stage, shared_data):
    small = {"fps": 4, "max_frames": 8, "buckets": {"area": 256 * 256}}
    src = shared_data / "videos" / SMALL
    deferred = prepared(media_stage(decode_cfg(**small)), src)
    decoder = prepared(media_stage(decode_cfg(**small, defer_upscale="off")), src)
    assert deferred["pixels"].shape == (8, 180, 320, 3) and deferred["resize_to"] == (192, 336)
    bad = {**deferred, "id": "bad", "resize_to": (8, 8)}  # smaller than a patch: that row fails, not the batch
    stage = Tokenize(TokenizeConfig(config="tiny", device="cpu", batch_rows=4), "pp")
    a, b, c = stage([deferred, decoder, bad])
    assert a["status"] == b["status"] == "ok" and c["status"] == "failed"
    assert "cannot pack tokens" in c["reason"] and "patch" in c["reason"]
    assert (a["width"], a["height"], a["num_frames"]) == (b["width"], b["height"], b["num_frames"]) == (336, 192, 8)
    assert "resize_to" not in a and "pixels" not in a
    np.testing.assert_array_equal(a["coords"], b["coords"])
    assert len(a["coords"]) == 2 * (192 // 16) * (336 // 16)
    la, lb = a["latent"].astype(np.float32), b["latent"].astype(np.float32)
    assert np.linalg.norm(la - lb) / np.linalg.norm(lb) < 0.05  # measured 1.5 % (tiny, random weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_resize_matches_cpu_resize(shared_data):
    """The same pending resize on the GPU and on the CPU (and through the backend's pack on each device)."""
    from pipeline.tokenizers.atoken import frames_on

    out = decode_file(str(shared_data / "videos" / SMALL), "video", UP)
    assert out["resize_to"] == (384, 688)
    frames = torch.from_numpy(out["pixels"])
    cpu = resize_crop_frames(frames, out["resize_to"]).numpy()
    gpu = resize_crop_frames(frames.cuda(), out["resize_to"])
    assert gpu.is_cuda and gpu.dtype == torch.uint8
    diff = np.abs(gpu.cpu().numpy().astype(np.int16) - cpu)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01
    row = {"modality": "video", "pixels": out["pixels"], "resize_to": out["resize_to"]}
    on_gpu = frames_on(row, "cuda")
    assert on_gpu.is_cuda and tuple(on_gpu.shape) == cpu.shape
    assert np.abs(on_gpu.cpu().numpy().astype(np.int16) - frames_on(row).numpy()).max() <= 2
