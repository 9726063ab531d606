"""Video files -> uint8 frames for the CLI, and readable reasons for decoder errors (shared with the pipeline).

decord reads most files; where it cannot open one (no container duration, Ogg, ...), PyAV reads it. Decoder
errors carry C++ source locations, assertion text and stack traces: `clean_decoder_error` keeps a readable
reason first and the decoder's own words, shortened, after it.
"""

from __future__ import annotations

import re

import numpy as np

VIDEO_SUFFIXES = {
    ".mp4",
    ".webm",
    ".mov",
    ".avi",
    ".mkv",
    ".m4v",
    ".ts",
    ".mts",
    ".m2ts",
    ".flv",
    ".ogv",
    ".mpg",
    ".mpeg",
    ".3gp",
}
_NOISE = re.compile(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ")
_MEANINGS = (  # raw decoder texts -> what they mean to a user
    (
        re.compile(r"buffer source|avfilter|Error parsing|Invalid data|invalid NAL|decode_slice|corrupt", re.I),
        "corrupt or truncated video stream",
    ),
    (re.compile(r"seek", re.I), "video stream cannot be read or seeked (corrupt or truncated)"),
    (re.compile(r"broken metadata|measure duration|frame-count", re.I), "container metadata is broken"),
    (re.compile(r"No such file|cannot find|not found", re.I), "file not found"),
    (re.compile(r"Unknown format|open input|not open", re.I), "not a video container the decoder can open"),
)


class VideoError(ValueError):
    """Bad or unreadable video; the message is a readable reason."""


def clean_decoder_error(exc: BaseException) -> str:
    """e.g. 'corrupt or truncated video stream (decoder: Cannot create buffer source)'."""
    msg = _NOISE.sub("", str(exc)).split("Stack trace")[0].strip()
    detail = re.sub(r"^Check failed: .*?\)\s*(>=|==|!=|<=|<|>)\s*[-\w.]+\s*\([^)]*\)\s*", "", msg).strip() or msg
    detail = re.sub(r"^\[[^\]]*\]\s*", "", detail)[:160]  # the file path decord prepends
    for pattern, meaning in _MEANINGS:
        if pattern.search(msg):
            return f"{meaning} (decoder: {detail})" if detail else meaning
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _size(h: int, w: int, max_side: int) -> tuple[int, int]:
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        return max(16, round(h * s)), max(16, round(w * s))
    return -1, -1


def _pyav_frames(path: str, max_frames: int, max_side: int) -> tuple[np.ndarray, float]:
    import av

    with av.open(path) as c:
        if not c.streams.video:
            raise VideoError("no video stream in the file")
        s = c.streams.video[0]
        rate = float(s.average_rate or s.guessed_rate or 24)
        frames = []
        for f in c.decode(video=0):
            h, w = _size(f.height, f.width, max_side)
            frames.append(f.to_ndarray(format="rgb24", **({"width": w, "height": h} if h > 0 else {})))
            if max_frames and len(frames) >= max_frames:
                break
    if not frames:
        raise VideoError("video has no decodable frames")
    return np.stack(frames), rate


def load_video(path, max_frames: int, max_side: int) -> tuple[np.ndarray, float]:
    """Video file -> uint8 [T, H, W, 3] (the first max_frames frames; optional downscale) and its frame rate.
    VideoError with a readable reason for bad input."""
    import decord

    path = str(path)
    try:
        try:
            probe = decord.VideoReader(path)
            H, W = probe[0].shape[:2]
        except (decord.DECORDError, RuntimeError, IndexError) as exc:
            try:
                return _pyav_frames(path, max_frames, max_side)
            except Exception:
                raise exc from None  # neither reads it: decord's reason is reported
        h, w = _size(H, W, max_side)
        vr = decord.VideoReader(path, width=w, height=h)
        n = min(len(vr), max_frames) if max_frames else len(vr)
        return vr.get_batch(list(range(n))).asnumpy(), float(vr.get_avg_fps())
    except VideoError:
        raise
    except Exception as exc:  # decord / PyAV errors of every kind: the input's fault, told as such
        raise VideoError(clean_decoder_error(exc)) from None
