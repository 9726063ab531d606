"""Resolution buckets: every image/video is resized and centre-cropped to the (h, w) bucket closest in aspect
ratio. Sides are multiples of 16 (the tokenizer's patch size) within [min_side, max_side]."""

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


def resize_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so `img` covers size=(h, w), then centre-crop to exactly (h, w). Bicubic with antialiasing."""
    bh, bw = size
    w, h = img.size
    scale = max(bh / h, bw / w)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def resize_crop_array(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """resize_crop for one uint8 [H, W, 3] array."""
    return np.asarray(resize_crop(Image.fromarray(frame), size))
