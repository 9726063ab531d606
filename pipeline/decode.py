"""Decode stage (CPU): images with Pillow (`atoken/images.py`, shared with the tokenizer CLI), videos with decord
(PyAV when decord cannot open a container), both fitted to a resolution bucket. Output fields (`SAMPLE_FIELDS`):
`pixels` uint8 [T, H, W, 3] (T=1 for images), `fps` (sampling rate; 0.0 for images), `orig_width`, `orig_height`
(after rotation), `num_frames` (= T), `upscaled`, and for videos the window actually tokenized: `window_start`,
`window_end` (seconds of the file), `window_index`, `span_clamped` (the requested span ran past the file's end and
was cut to it), `media_duration` (the file's length in seconds), and `resize_to` (below).

Sizes: the bucket closest in aspect ratio; a source smaller than its bucket is not upscaled unless
`upscale: true`: it is kept at native resolution, centre-cropped to the bucket's aspect ratio with sides rounded
down to multiples of 16. A video that upscales (`upscale: true`, source smaller than its bucket) is decoded at
native size and its frames travel as they are, with `resize_to` = the bucket: the tokenizer resizes them on its
device (`defer_upscale`, by default where the tokenizer has a GPU: fewer bytes through the object store, and no
decoder time spent on upscaling). Videos that downscale are resized by the decoder (that shrinks the bytes);
`resize_to` is None for every other sample, except with `image_resize: device`: images that downscale (up to
`DEVICE_RESIZE_MAX_AREA` x their bucket's area) travel at native size with `resize_to` set, resized on the
tokenizer's device as well (the decoder's CPU time per image drops by its resize, ~40 %).
Images: EXIF orientation, ICC -> sRGB, 16-bit, alpha rules in `atoken/images.py`.
Videos: frames sampled at min(fps, native fps), at most max_frames, T a multiple of 4 when T >= 4 (shorter clips
are kept: the tokenizer pads them). A clip longer than one window gives the first window (`windows: first`), the
centred one (`centre`), or consecutive windows (`all`, at most `max_windows`). Filters (`min_side`, `min_frames`,
`min_duration_s`) raise DecodeSkip: the sample is recorded `skipped` with the rule. Decoding runs in a killable
child process (`timeout_s`, for the modalities in `isolate`; 0 = in-process) with a memory cap (`memory_mb`),
owned by the prepare stage; images are also refused from their header (`max_pixels`, `max_image_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from atoken.images import ImageError, load_rgb, load_rgb_image, to_rgb8  # noqa: F401  (load_rgb, to_rgb8: re-exported)
from atoken.video_io import clean_decoder_error  # readable reasons, shared with the tokenizer CLI
from pipeline.buckets import BucketConfig, choose_bucket, cover_size, make_buckets, resize_crop
from pipeline.config import Config
from pipeline.faults import maybe_fault

SAMPLE_FIELDS = (
    "pixels",
    "fps",
    "num_frames",
    "orig_width",
    "orig_height",
    "upscaled",
    "window_start",
    "window_end",
    "window_index",
    "span_clamped",
    "media_duration",
    "resize_to",
)


class DecodeError(ValueError):
    """Bad input; the message is the readable reason recorded on the row."""


class DecodeSkip(DecodeError):
    """A sample a job rule leaves out (a filter, no upscaling); recorded as skipped with the rule."""


class DecodeConfig(Config):
    IDENTITY = ("fps", "max_frames", "buckets", "background", "icc_to_srgb", "upscale", "windows", "max_windows")

    fps: float = Field(8.0, gt=0)  # video sampling rate (frames per second of video time)
    max_frames: int = Field(16, ge=1)  # per window; T is rounded down to a multiple of 4
    buckets: BucketConfig = Field(default_factory=BucketConfig)
    upscale: bool = False  # upscale sources smaller than their bucket (else native size)
    windows: Literal["first", "centre", "all"] = "first"  # which window(s) of a clip longer than one window
    max_windows: int = Field(4, ge=1)  # cap for windows: all
    min_side: int = Field(0, ge=0)  # filter: skip sources whose shorter side is smaller (0 = off)
    min_frames: int = Field(0, ge=0)  # filter: skip videos giving fewer frames per window (0 = off)
    min_duration_s: float = Field(0.0, ge=0)  # filter: skip clips shorter than this, after clamping (0 = off)
    timeout_s: float = Field(60.0, ge=0)  # wall-clock limit per sample (0 = decode in-process, no isolation)
    isolate: tuple[Literal["image", "video"], ...] = ("image", "video")  # modalities decoded in a killable
    # child (~3-20 ms a sample), under timeout_s and memory_mb
    memory_mb: int = Field(4096, ge=0)  # memory cap of that child: address space it may add (0 = none)
    max_attempts: int = Field(2, ge=1)  # a sample whose worker died this often while on it is failed
    max_image_bytes: int = Field(1 << 30, ge=1)  # refuse images whose decoded samples (from the header) are larger
    background: int = Field(255, ge=0, le=255)  # gray level that alpha is composited onto (255 = white)
    icc_to_srgb: bool = True
    max_pixels: int = Field(100_000_000, ge=1)  # refuse larger images (decompression bombs)
    decoder_threads: int = Field(1, ge=0)  # decord threads per sample (parallelism comes from the pipeline)
    # videos that upscale: decode at native size and resize on the tokenizer's device ("on"), or in the decoder
    # ("off"); "auto": on when the tokenizer has a GPU (the job decides: `for_tokenizer`), off on CPU, where the
    # decoder's scaler costs less than torch's. Where the resize runs, not what it makes (the two agree within a
    # few grey levels): not part of IDENTITY
    defer_upscale: Literal["auto", "on", "off"] = "auto"
    # images that downscale: resized by the decoder (Pillow, the default) or, "device", decoded at native size and
    # resized on the tokenizer's device like the videos above (torch bicubic: within a few grey levels of Pillow,
    # mean < 0.2 on the test images), which takes the resize (~40 % of an image's decode time) off the CPUs; a
    # source over DEVICE_RESIZE_MAX_AREA x its bucket's area is still resized by the decoder (bytes per row).
    # Where the resize runs, not what it makes: not part of IDENTITY
    image_resize: Literal["decoder", "device"] = "decoder"


# ---- sizes ---------------------------------------------------------------------------------------------------


def target_size(h: int, w: int, cfg: DecodeConfig) -> tuple[tuple[int, int], bool]:
    """((height, width) fed to the tokenizer, resample). The bucket closest in aspect ratio, reached by resampling
    when the source covers it (or `upscale: true`); else the native-resolution crop at the bucket's aspect ratio,
    sides rounded down to multiples of the patch size (resample False: a plain crop)."""
    size = choose_bucket(h, w, make_buckets(cfg.buckets))
    if max(size[0] / h, size[1] / w) <= 1 or cfg.upscale:
        return size, True
    m, r = cfg.buckets.multiple, size[0] / size[1]
    ch, cw = (w * r, w) if h / w > r else (h, h / r)
    native = (int(ch + 1e-6) // m * m, int(cw + 1e-6) // m * m)
    if min(native) < m:
        raise DecodeSkip(f"source {w}x{h} is smaller than one {m}x{m} patch (decode.upscale: false)")
    return native, False


def _centre_crop(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    top, left = (a.shape[-3] - size[0]) // 2, (a.shape[-2] - size[1]) // 2
    return np.ascontiguousarray(a[..., top : top + size[0], left : left + size[1], :])


def _check_side(h: int, w: int, cfg: DecodeConfig) -> None:
    if cfg.min_side and min(h, w) < cfg.min_side:
        raise DecodeSkip(f"filter decode.min_side={cfg.min_side}: source is {w}x{h}")


def _upscaled(h: int, w: int, size: tuple[int, int], resample: bool) -> bool:
    return resample and max(size[0] / h, size[1] / w) > 1


# ---- images --------------------------------------------------------------------------------------------------


def decode_image(path: str, cfg: DecodeConfig) -> dict:
    try:  # a Pillow image until the resize: no array round trip before it
        im = load_rgb_image(path, cfg.background, cfg.icc_to_srgb, cfg.max_pixels, cfg.max_image_bytes)
    except ImageError as exc:
        raise DecodeError(str(exc)) from None
    w, h = im.size
    _check_side(h, w, cfg)
    size, resample = target_size(h, w, cfg)
    defer = resample and image_defers_resize(h, w, size, cfg)
    if defer:
        out = np.asarray(im)
    else:
        out = np.asarray(resize_crop(im, size)) if resample else _centre_crop(np.asarray(im), size)
    return {
        "pixels": np.ascontiguousarray(out[None]),
        "fps": 0.0,
        "orig_height": h,
        "orig_width": w,
        "num_frames": 1,
        "upscaled": _upscaled(h, w, size, resample),
        "resize_to": (int(size[0]), int(size[1])) if defer else None,
    }


DEVICE_RESIZE_MAX_AREA = 16  # image_resize: device: larger sources (x the bucket's area) are resized by the decoder


def image_defers_resize(h: int, w: int, size: tuple[int, int], cfg: DecodeConfig) -> bool:
    """An image that downscales whose resize is left to the tokenizer's device (`image_resize: device`); upscales
    (small sources: cheap on the CPU) stay with the decoder."""
    down = not _upscaled(h, w, size, True) and (h, w) != tuple(size)
    return cfg.image_resize == "device" and down and h * w <= DEVICE_RESIZE_MAX_AREA * size[0] * size[1]


# ---- windows -------------------------------------------------------------------------------------------------


def frame_count(n_available: int, max_frames: int) -> int:
    """The tokenizer's rule: a multiple of 4 when >= 4 frames; shorter clips kept as they are (it pads them)."""
    n = min(n_available, max_frames)
    return n - n % 4 if n >= 4 else max(n, 0)


@dataclass(frozen=True)
class Window:
    index: int
    start: float  # seconds into the file
    end: float  # start + frames / rate, never past the (clamped) span end
    rate: float  # frames per second of video time
    frames: np.ndarray  # int64 frame indices


@dataclass(frozen=True)
class Plan:
    windows: list[Window]
    clamped: bool  # the requested span ran past the file's end
    duration: float  # the file's length (frames / native fps)
    clip: float  # the clip's length after clamping to the file (seconds)


def plan_windows(
    n_total: int, native_fps: float, fps: float, max_frames: int, span=None, mode: str = "first", max_windows: int = 1
) -> Plan:
    """The windows sampled from [start, end) at min(fps, native_fps): each `frame_count` frames long."""
    if n_total <= 0:
        raise DecodeError("video has no frames")
    if not (math.isfinite(native_fps) and native_fps > 0):
        raise DecodeError(f"video reports no usable frame rate ({native_fps})")
    duration = n_total / native_fps
    start, end = (0.0, duration) if span is None else (float(span[0]), float(span[1]))
    if not (math.isfinite(start) and math.isfinite(end)) or not end > start or start < 0:
        raise DecodeError(f"bad span [{start}, {end}]")
    if start >= duration:
        raise DecodeError(f"span [{start:g}, {end:g}]s starts after the video ends ({duration:.3f}s)")
    clamped = end > duration + 1.0 / native_fps  # one frame of slack: rounding in the metadata
    end = min(end, duration)
    rate = min(fps, native_fps)
    n = frame_count(max(1, math.floor((end - start) * rate + 1e-6)), max_frames)
    if n < 4:  # a clip too short for one latent step at this rate: take up to 4 native frames across it
        n = frame_count(min(4, max(1, math.floor((end - start) * native_fps + 1e-6))), max_frames)
        rate = n / (end - start)
    length = n / rate
    if mode == "centre":
        starts = [start + max(0.0, (end - start) - length) / 2]
    elif mode == "all":
        count = max(1, min(max_windows, math.floor((end - start) / length + 1e-6)))
        starts = [start + k * length for k in range(count)]
    else:
        starts = [start]
    wins = []
    for k, s in enumerate(starts):
        times = s + np.arange(n) / rate
        idx = np.clip(np.floor(times * native_fps + 1e-6).astype(np.int64), 0, n_total - 1)
        wins.append(Window(k, round(s, 6), round(min(s + length, end), 6), float(rate), idx))
    return Plan(wins, clamped, duration, end - start)


def sample_indices(
    n_total: int, native_fps: float, fps: float, max_frames: int, span: list[float] | None = None
) -> tuple[np.ndarray, float]:
    """Frame indices of the first window of [start, end), and its rate."""
    w = plan_windows(n_total, native_fps, fps, max_frames, span).windows[0]
    return w.frames, w.rate


# ---- videos --------------------------------------------------------------------------------------------------


def _readable_upto(vr, hi: int, lookback: int = 64) -> int | None:
    """Highest frame index <= hi that decodes (containers sometimes over-report their frame count)."""
    for i in range(hi, max(-1, hi - lookback), -1):
        try:
            vr[i]
            return i
        except Exception:
            continue
    return None


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


class _PyAVReader:
    """Frames of a file by index with PyAV, for containers decord cannot open (no duration, Ogg, ...)."""

    def __init__(self, path: str, max_frames_scan: int = 100_000):
        import av

        with av.open(path) as c:
            if not c.streams.video:
                raise DecodeError("no video stream in the file")
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate or s.base_rate
            self.fps = float(rate) if rate else float("nan")
            self.n = sum(1 for p in c.demux(s) if p.size and p.pts is not None)  # packets: no decode
            if self.n > max_frames_scan:
                raise DecodeError(f"video has more than {max_frames_scan} frames")
            self.height, self.width = s.codec_context.height, s.codec_context.width
        self.path = path

    def frames(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import av

        want, got, last = set(int(i) for i in idx), {}, None
        top = max(want)
        with av.open(self.path) as c:
            for k, frame in enumerate(c.decode(video=0)):  # one pass, keeping only the wanted frames
                last = (k, frame)
                if k in want:
                    got[k] = frame.to_ndarray(format="rgb24")
                if k >= top:
                    break
        if not got and last is None:
            raise DecodeError("video has no decodable frames")
        if last is not None and last[0] not in got:
            got[last[0]] = last[1].to_ndarray(format="rgb24")
        have = np.array(sorted(got))
        idx = np.array([have[have <= i].max() if (have <= i).any() else have.min() for i in idx], np.int64)
        return np.stack([got[int(i)] for i in idx]), idx


def _open_decord(path: str, threads: int):
    import decord  # package decord2

    # ffmpeg's own lines about a damaged stream ("[h264 @ 0x...] Invalid NAL unit size") go straight to fd 2: the
    # user's console when QA decodes on the driver. What the run records is the sample's outcome and reason.
    decord.logging.set_level(decord.logging.QUIET)
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
    h, w = vr[0].shape[:2]
    return vr, len(vr), float(vr.get_avg_fps()), h, w


def for_tokenizer(cfg: DecodeConfig, gpu: bool) -> DecodeConfig:
    """`cfg` with `defer_upscale: auto` decided for a tokenizer on a GPU (on) or on the CPU (off)."""
    if cfg.defer_upscale != "auto":
        return cfg
    return cfg.model_copy(update={"defer_upscale": "on" if gpu else "off"})


def defers_resize(h: int, w: int, size: tuple[int, int], resample: bool, cfg: DecodeConfig) -> bool:
    """A video whose resize is left to the tokenizer: it upscales, and `defer_upscale` is not off (an undecided
    "auto", as when decoding outside a job, defers)."""
    return cfg.defer_upscale != "off" and _upscaled(h, w, size, resample)


def resize_placement(cfg: DecodeConfig) -> str:
    """Where this job's resizes run, in words (printed once per decode worker)."""
    down = "videos that downscale are resized by the decoder (CPU)"
    if cfg.image_resize == "device":
        images = f"; images are resized on the tokenizer's device (up to {DEVICE_RESIZE_MAX_AREA}x their bucket's area)"
    else:
        images = "; images are resized by the decoder (CPU)"
    if not cfg.upscale:
        return f"{down}; smaller ones are kept at native size (upscale: false){images}"
    if cfg.defer_upscale != "off":
        return f"{down}; videos that upscale are decoded at native size and resized on the tokenizer's device{images}"
    return f"{down}; videos that upscale are resized by the decoder too (defer_upscale: off){images}"


def decode_video(path: str, cfg: DecodeConfig, span: list[float] | None = None) -> dict:
    """Frames of each window, scaled by the decoder itself (ffmpeg) to cover the target size, then centre-cropped;
    a video that upscales is kept at native size instead, with `resize_to` set (`defers_resize`). Where decord
    cannot scale a stream (e.g. rotated ones), frames are decoded at full size and resized here; where it cannot
    open the file at all, PyAV reads it. Returns window 0's fields, and `more_windows`."""
    import decord

    pyav = None
    try:
        try:
            probe, n_total, native, h, w = _open_decord(path, cfg.decoder_threads)
        except (decord.DECORDError, RuntimeError, IndexError) as exc:
            try:
                pyav = _PyAVReader(path)
            except Exception:
                pyav = None
            if pyav is None or pyav.n == 0:
                raise exc from None  # neither reads it: decord's reason is the one reported
            probe, n_total, native, h, w = None, pyav.n, pyav.fps, pyav.height, pyav.width
        plan = plan_windows(n_total, native, cfg.fps, cfg.max_frames, span, cfg.windows, cfg.max_windows)
        _check_filters(plan, h, w, cfg)
        size, resample = target_size(h, w, cfg)
        defer = defers_resize(h, w, size, resample, cfg)
        rh, rw = cover_size(h, w, size) if resample and not defer else (h, w)
        idx = np.concatenate([win.frames for win in plan.windows])
        if pyav is not None:
            frames, idx = pyav.frames(idx)
        elif (rh, rw) == (h, w):  # native size: the reader already open
            frames, idx = _get_batch(probe, idx)
        else:
            try:
                scaled = decord.VideoReader(
                    path, ctx=decord.cpu(0), num_threads=cfg.decoder_threads, width=rw, height=rh
                )
                frames, idx = _get_batch(scaled, idx)
            except decord.DECORDError:
                frames, idx = _get_batch(probe, idx)
    except DecodeError:
        raise
    except (decord.DECORDError, RuntimeError, IndexError, OSError, ValueError) as exc:
        raise DecodeError(clean_decoder_error(exc)) from None
    except Exception as exc:  # PyAV's errors (av.FFmpegError subclasses OSError/ValueError on most versions)
        raise DecodeError(clean_decoder_error(exc)) from None
    if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3:
        raise DecodeError(f"decoder returned frames of shape {frames.shape}, expected [{len(idx)}, H, W, 3]")
    if frames.shape[1:3] != (rh, rw):  # the decoder ignored the requested size: resize here
        frames = np.stack([np.asarray(resize_crop(Image.fromarray(f), (rh, rw))) for f in frames])
    out = frames if defer else _centre_crop(frames, size)
    common = {
        "orig_height": int(h),
        "orig_width": int(w),
        "upscaled": _upscaled(h, w, size, resample),
        "resize_to": (int(size[0]), int(size[1])) if defer else None,
        "span_clamped": plan.clamped,
        "media_duration": round(plan.duration, 6),
    }
    samples, at = [], 0
    for win in plan.windows:
        n = len(win.frames)
        samples.append(
            {
                **common,
                "pixels": np.ascontiguousarray(out[at : at + n]),
                "fps": win.rate,
                "num_frames": n,
                "frame_indices": idx[at : at + n].astype(np.int32),
                "window_start": win.start,
                "window_end": win.end,
                "window_index": win.index,
            }
        )
        at += n
    return {**samples[0], "more_windows": samples[1:]}


def _check_filters(plan: Plan, h: int, w: int, cfg: DecodeConfig) -> None:
    _check_side(h, w, cfg)
    got = len(plan.windows[0].frames)
    if cfg.min_frames and got < cfg.min_frames:
        raise DecodeSkip(f"filter decode.min_frames={cfg.min_frames}: the clip gives {got} frames")
    if cfg.min_duration_s and plan.clip + 1e-6 < cfg.min_duration_s:
        raise DecodeSkip(f"filter decode.min_duration_s={cfg.min_duration_s:g}: the clip is {plan.clip:.3f}s")


# ---- entry point (runs in the isolated child) ---------------------------------------------------------------------------------------------


def decode_file(path: str, modality: str, cfg: DecodeConfig, span: tuple[float, float] | None = None) -> dict:
    maybe_fault("decode_child")  # runs in the isolated child: the reliability suite's hang/crash point
    if modality == "image":
        return decode_image(path, cfg)
    if modality == "video":
        return decode_video(path, cfg, span)
    raise DecodeError(f"decode handles image and video, not {modality!r}")
