"""Resolution buckets: every image/video is resized and centre-cropped to the (h, w) bucket closest in aspect
ratio. Sides are multiples of 16 (the tokenizer's patch size) within [min_side, max_side].

One rule, three places it runs: `resize_crop` (Pillow, images and frames the decoder could not scale), the video
decoder itself (ffmpeg's bicubic scaler, to `cover_size`), and `resize_crop_frames` (torch, on the tokenizer's
device: videos that upscale travel at native size and are resized there)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from pipeline.config import Config


class BucketConfig(Config):
    IDENTITY = ("area", "min_side", "max_side", "multiple", "buckets")

    area: int = Field(256 * 256, ge=16 * 16)  # target pixel count of derived buckets
    min_side: int = Field(128, ge=16)
    max_side: int = Field(512, ge=16)
    multiple: int = Field(16, ge=1)
    buckets: tuple[tuple[int, int], ...] | None = None  # explicit (h, w) list; overrides the derived one

    @model_validator(mode="after")
    def _check(self):
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")
        make_buckets(self)  # explicit buckets are checked here, before any work
        return self


def make_buckets(cfg: BucketConfig) -> list[tuple[int, int]]:
    """Explicit buckets (validated) or the set of (h, w) with h*w ~= area, sorted by aspect ratio."""
    if cfg.buckets:
        out = [(int(h), int(w)) for h, w in cfg.buckets]
        for h, w in out:
            if h <= 0 or w <= 0 or h % cfg.multiple or w % cfg.multiple or max(h, w) > cfg.max_side:
                raise ValueError(
                    f"bucket {(h, w)} must be positive multiples of {cfg.multiple} "
                    f"with sides <= max_side={cfg.max_side}"
                )
        return sorted(set(out), key=lambda hw: hw[0] / hw[1])
    m = cfg.multiple
    out = set()
    for h in range(math.ceil(cfg.min_side / m) * m, math.isqrt(cfg.area) + 1, m):
        w = max(m, round(cfg.area / h / m) * m)
        if cfg.min_side <= w <= cfg.max_side:
            out |= {(h, w), (w, h)}  # landscape and portrait alike
    if not out:
        raise ValueError(f"no buckets for {cfg}")
    return sorted(out, key=lambda hw: hw[0] / hw[1])


def choose_bucket(h: int, w: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """Bucket whose aspect ratio is closest (in log space) to h / w."""
    if h <= 0 or w <= 0:
        raise ValueError(f"invalid size {h}x{w}")
    r = math.log(h / w)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - r), -hw[0] * hw[1]))


def cover_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) that covers the bucket `size` at the source aspect ratio (then centre-cropped to it)."""
    scale = max(size[0] / h, size[1] / w)
    return max(size[0], round(h * scale)), max(size[1], round(w * scale))


def resize_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so `img` covers size=(h, w), then centre-crop to exactly (h, w). Bicubic with antialiasing."""
    bh, bw = size
    w, h = img.size
    rh, rw = cover_size(h, w, size)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def resize_crop_array(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """resize_crop for one uint8 [H, W, 3] array."""
    return np.asarray(resize_crop(Image.fromarray(frame), size))


def resize_crop_frames(frames, size: tuple[int, int]):
    """resize_crop for uint8 frames [T, H, W, 3] (a torch tensor) on their own device: torch bicubic with
    antialiasing (Pillow's kernel, a = -0.5), the same centre crop, rounded back to uint8 [T, h, w, 3]."""
    import torch
    import torch.nn.functional as F

    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"resize: expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    bh, bw = int(size[0]), int(size[1])
    h, w = frames.shape[1:3]
    rh, rw = cover_size(h, w, (bh, bw))
    x = frames.permute(0, 3, 1, 2).float()
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (rh - bh) // 2, (rw - bw) // 2
    x = x[:, :, top : top + bh, left : left + bw]
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
