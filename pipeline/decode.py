"""Decode stage (CPU): images with Pillow, videos with decord, both resized + centre-cropped into a resolution
bucket. Output fields: `pixels` uint8 [T, H, W, 3] (T=1 for images), `fps` (sampling rate; 0.0 for images),
`orig_width`, `orig_height` (after EXIF rotation), `num_frames` (= T).

Image conversion rules: EXIF orientation applied; ICC profiles converted to sRGB; 16-bit scaled by 255/65535
(not clipped); CMYK, palette, grayscale -> RGB 8-bit; alpha composited on a white background (`background`).
Video rules: frames sampled at min(fps, native fps) over the clip span, at most max_frames, T a multiple of 4 when
T >= 4 (shorter clips are kept: the tokenizer pads them), frame indices clamped to the frames that really exist.
Decoding runs in a killable child process (`timeout_s`, for the modalities in `isolate`; 0 = in-process), owned
by the prepare stage (`pipeline/prepare.py`).
"""
from __future__ import annotations

import io
import math
import re
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps
from pydantic import Field

from pipeline.buckets import BucketConfig, choose_bucket, make_buckets, resize_crop
from pipeline.config import Config
from pipeline.faults import maybe_fault


class DecodeError(ValueError):
    """Bad input; the message is the readable reason recorded on the row."""


class DecodeConfig(Config):
    IDENTITY = ("fps", "max_frames", "buckets", "background", "icc_to_srgb")

    fps: float = Field(8.0, gt=0)             # video sampling rate (frames per second of video time)
    max_frames: int = Field(16, ge=1)         # per clip; T is rounded down to a multiple of 4
    buckets: BucketConfig = Field(default_factory=BucketConfig)
    timeout_s: float = Field(60.0, ge=0)      # wall-clock limit per sample (0 = decode in-process, no isolation)
    isolate: tuple[Literal["image", "video"], ...] = ("video",)  # modalities decoded in a killable child
                                              # (~3-20 ms a sample; Pillow is bounded by max_pixels, decord hangs)
    background: int = Field(255, ge=0, le=255)  # gray level that alpha is composited onto (255 = white)
    icc_to_srgb: bool = True
    max_pixels: int = Field(100_000_000, ge=1)  # refuse larger images (decompression bombs)
    decoder_threads: int = Field(1, ge=0)     # decord threads per sample (parallelism comes from the pipeline)


# ---- images --------------------------------------------------------------------------------------------------

def _to_srgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK", "L"):
        return im
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im  # a broken profile: fall back to the plain conversion


def to_rgb8(im: Image.Image, background: int = 255, icc_to_srgb: bool = True) -> np.ndarray:
    """Any Pillow image -> uint8 [H, W, 3] RGB."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise DecodeError(f"{im.mode} image has non-finite values")
        if im.mode == "F" and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        elif a.min() >= 0 and a.max() <= 65535:
            a = a * (255 / 65535)  # 16-bit -> 8-bit, full range kept
        else:
            lo, hi = a.min(), a.max()
            a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
        g = np.round(a).clip(0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if icc_to_srgb:
        im = _to_srgb(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (background, background, background, 255))
        im = Image.alpha_composite(bg, rgba)
    return np.asarray(im.convert("RGB"))


def decode_image(path: str, cfg: DecodeConfig) -> dict:
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > cfg.max_pixels:
                raise DecodeError(f"image too large: {w}x{h} > max_pixels={cfg.max_pixels}")
            im.load()  # truncated or corrupt data fails here, not later
            im = ImageOps.exif_transpose(im)
            rgb = to_rgb8(im, cfg.background, cfg.icc_to_srgb)
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # Pillow's ways to say "bad file"
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None
    h, w = rgb.shape[:2]
    size = choose_bucket(h, w, make_buckets(cfg.buckets))
    out = np.asarray(resize_crop(Image.fromarray(rgb), size))[None]
    return {"pixels": np.ascontiguousarray(out), "fps": 0.0, "orig_height": h, "orig_width": w, "num_frames": 1}


# ---- videos --------------------------------------------------------------------------------------------------

def frame_count(n_available: int, max_frames: int) -> int:
    """The tokenizer's rule: a multiple of 4 when >= 4 frames; shorter clips kept as they are (it pads them)."""
    n = min(n_available, max_frames)
    return n - n % 4 if n >= 4 else max(n, 0)


def sample_indices(n_total: int, native_fps: float, fps: float, max_frames: int,
                   span: list[float] | None = None) -> tuple[np.ndarray, float]:
    """Frame indices for sampling [start, end) at min(fps, native_fps), and that rate."""
    if n_total <= 0:
        raise DecodeError("video has no frames")
    if not (math.isfinite(native_fps) and native_fps > 0):
        raise DecodeError(f"video reports no usable frame rate ({native_fps})")
    duration = n_total / native_fps
    start, end = (0.0, duration) if span is None else (float(span[0]), float(span[1]))
    if not end > start or start < 0:
        raise DecodeError(f"bad span [{start}, {end}]")
    if start >= duration:
        raise DecodeError(f"span [{start:g}, {end:g}]s starts after the video ends ({duration:.3f}s)")
    end = min(end, duration)
    rate = min(fps, native_fps)
    n = frame_count(max(1, math.floor((end - start) * rate + 1e-6)), max_frames)
    if n < 4:  # a clip too short for one latent step at this rate: take up to 4 native frames across it
        n = frame_count(min(4, max(1, math.floor((end - start) * native_fps + 1e-6))), max_frames)
        rate = n / (end - start)
    times = start + np.arange(n) / rate
    idx = np.clip(np.floor(times * native_fps + 1e-6).astype(np.int64), 0, n_total - 1)
    return idx, rate


_DECORD_NOISE = re.compile(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ")


def clean_decoder_error(exc: BaseException) -> str:
    """decord errors carry C++ source locations and stack traces: keep the message."""
    msg = _DECORD_NOISE.sub("", str(exc)).split("Stack trace")[0].strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _readable_upto(vr, hi: int, lookback: int = 64) -> int | None:
    """Highest frame index <= hi that decodes (containers sometimes over-report their frame count)."""
    for i in range(hi, max(-1, hi - lookback), -1):
        try:
            vr[i]
            return i
        except Exception:
            continue
    return None


def _cover_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) that covers the bucket `size` at the source aspect ratio (then centre-cropped)."""
    scale = max(size[0] / h, size[1] / w)
    return max(size[0], round(h * scale)), max(size[1], round(w * scale))


def _get_batch(vr, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import decord
    try:
        return vr.get_batch(idx.tolist()).asnumpy(), idx
    except decord.DECORDError:
        last = _readable_upto(vr, int(idx.max()))  # over-reported length: clamp to what exists
        if last is None or last == int(idx.max()):
            raise
        idx = np.minimum(idx, last)
        return vr.get_batch(idx.tolist()).asnumpy(), idx


def decode_video(path: str, cfg: DecodeConfig, span: list[float] | None = None) -> dict:
    """Frames sampled per `cfg`, scaled by the decoder itself (ffmpeg) to cover the bucket, then centre-cropped.
    Where decord cannot scale a stream (e.g. rotated ones), frames are decoded at full size and resized here."""
    import decord  # package decord2
    try:
        probe = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=cfg.decoder_threads)
        n_total, native = len(probe), float(probe.get_avg_fps())
        h, w = probe[0].shape[:2]
        idx, rate = sample_indices(n_total, native, cfg.fps, cfg.max_frames, span)
        size = choose_bucket(h, w, make_buckets(cfg.buckets))
        rh, rw = _cover_size(h, w, size)
        try:
            scaled = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=cfg.decoder_threads, width=rw, height=rh)
            frames, idx = _get_batch(scaled, idx)
        except decord.DECORDError:
            frames, idx = _get_batch(probe, idx)
    except (decord.DECORDError, RuntimeError, IndexError) as exc:
        raise DecodeError(clean_decoder_error(exc)) from None
    if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3:
        raise DecodeError(f"decoder returned frames of shape {frames.shape}, expected [{len(idx)}, H, W, 3]")
    if frames.shape[1:3] != (rh, rw):  # the decoder ignored the requested size: resize here
        frames = np.stack([np.asarray(resize_crop(Image.fromarray(f), (rh, rw))) for f in frames])
    top, left = (rh - size[0]) // 2, (rw - size[1]) // 2
    out = np.ascontiguousarray(frames[:, top:top + size[0], left:left + size[1]])
    return {"pixels": out, "fps": float(rate), "orig_height": int(h), "orig_width": int(w),
            "num_frames": int(out.shape[0]), "frame_indices": idx.astype(np.int32)}


# ---- entry point (runs in the isolated child) ---------------------------------------------------------------------------------------------

def decode_file(path: str, modality: str, cfg: DecodeConfig, span: tuple[float, float] | None = None) -> dict:
    maybe_fault("decode_child")  # runs in the isolated child: the reliability suite's hang/crash point
    if modality == "image":
        return decode_image(path, cfg)
    if modality == "video":
        return decode_video(path, cfg, span)
    raise DecodeError(f"decode handles image and video, not {modality!r}")
