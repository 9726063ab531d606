"""Image files -> uint8 RGB arrays, the one loader shared by the CLI, the photo evaluator and the data pipeline.

Rules: EXIF orientation applied; ICC profiles converted to sRGB; 16-bit scaled by 255/65535 (not clipped); CMYK,
palette, grayscale -> RGB 8-bit; alpha composited on a `background` gray. HEIC/HEIF needs the optional
`pillow-heif` package (`pip install atoken-cache[heif]`); without it a HEIC file fails with a message saying so.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms, ImageOps

IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".jpe",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
    ".pbm",
    ".pnm",
    ".gif",
    ".avif",
    ".heic",
    ".heif",
}
HEIF_MISSING = "HEIC/HEIF needs the optional package pillow-heif: pip install 'atoken-cache[heif]' (or pillow-heif)"
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")


class ImageError(ValueError):
    """Bad or unreadable image; the message is a readable reason."""


def heif_available() -> bool:
    """Registers pillow-heif's opener with Pillow when it is installed (idempotent)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


_ICC_CACHED_BYTES = 1 << 20  # larger (rare, or hostile) profiles are not kept: a long-lived decoder's memory


def _build_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """The profile -> sRGB transform that profileToProfile builds (same intent and flags)."""
    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.ImageCmsTransform(src, ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")), mode, "RGB")


_cached_srgb_transform = lru_cache(maxsize=32)(_build_srgb_transform)


def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """Built once per (profile, mode) while the profile is small: a build costs ~7 ms, more than most decodes (a
    broken profile raises, and is not cached)."""
    if len(icc) > _ICC_CACHED_BYTES:
        return _build_srgb_transform(icc, mode)
    return _cached_srgb_transform(icc, mode)


def _to_srgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK", "L"):
        return im
    try:
        return _srgb_transform(bytes(icc), im.mode).apply(im)
    except (ImageCms.PyCMSError, OSError, TypeError, ValueError):
        return im  # a broken profile: fall back to the plain conversion


def to_rgb8(im: Image.Image, background: int = 255, icc_to_srgb: bool = True) -> np.ndarray:
    """Any Pillow image -> uint8 [H, W, 3] RGB."""
    return np.asarray(to_rgb8_image(im, background, icc_to_srgb))


def to_rgb8_image(im: Image.Image, background: int = 255, icc_to_srgb: bool = True) -> Image.Image:
    """to_rgb8 as an RGB Pillow image (the same pixels), for callers that resize next: no array round trip."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ImageError(f"{im.mode} image has non-finite values")
        if im.mode == "F" and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        elif a.min() >= 0 and a.max() <= 65535:
            a = a * (255 / 65535)  # 16-bit -> 8-bit, full range kept
        else:
            lo, hi = a.min(), a.max()
            a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
        g = np.round(a).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(g[..., None], 3, axis=2))
    if icc_to_srgb:
        im = _to_srgb(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (background, background, background, 255))
        im = Image.alpha_composite(bg, rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def decoded_bytes(im: Image.Image) -> int:
    """What decoding `im` takes, from its header (Pillow opens lazily): width x height x bands x bytes a sample."""
    mode = im.mode
    per = 2 if mode.startswith("I;16") else 4 if mode in ("I", "F", "I;32") else 1
    return im.size[0] * im.size[1] * len(im.getbands()) * per


def load_rgb(
    path: str,
    background: int = 255,
    icc_to_srgb: bool = True,
    max_pixels: int = 100_000_000,
    max_bytes: int | None = None,
) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] by the rules above; ImageError with a readable reason for bad input.
    `max_bytes`: refuse, before decoding, an image whose decoded samples would take more."""
    return np.asarray(load_rgb_image(path, background, icc_to_srgb, max_pixels, max_bytes))


def load_rgb_image(
    path: str,
    background: int = 255,
    icc_to_srgb: bool = True,
    max_pixels: int = 100_000_000,
    max_bytes: int | None = None,
) -> Image.Image:
    """load_rgb as a loaded RGB Pillow image (the same pixels)."""
    heif = heif_available()
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if is_heif(head) and not heif:
            raise ImageError(HEIF_MISSING)
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image too large: {w}x{h} > max_pixels={max_pixels}")
            need = decoded_bytes(im)
            if max_bytes is not None and need > max_bytes:
                raise ImageError(
                    f"image too large to decode: {w}x{h} {im.mode} needs {need / 2**20:.0f} MiB "
                    f"> max_image_bytes={max_bytes / 2**20:.0f} MiB"
                )
            im.load()  # truncated or corrupt data fails here, not later
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of the decoded pixels
            return to_rgb8_image(im, background, icc_to_srgb)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # Pillow's ways to say "bad file"
        raise ImageError(f"{type(exc).__name__}: {exc}") from None
