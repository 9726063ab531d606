"""Procedural training data for the tiny tokenizer, generated on the fly on the training device.

Nothing here reads image or video files: every sample is drawn from a seeded torch.Generator
(1/f-noise colour fields, "dead leaves" occluding shapes with textured fills, lines, text rendered
with Pillow's bundled font, blur/noise/contrast jitter), and videos are moving crops/zooms of such
scenes with a moving shape on top. The only optional non-procedural source is the sample photos that installed
packages ship (PACKAGE_PHOTOS: scikit-learn's china/flower, some of scikit-image's), used as random crops; only
files that are NOT in the project's test set are listed (scikit-image also ships astronaut, camera, coffee...,
which are test images). `refuse_test_images` checks a photo set against a folder by content (a test runs it on
../shared/data/images); training never reads ../shared/data unless `data.exclude_dir` names it.

Samples are float tensors in [-1, 1], images [n, H, W, 3], videos [n, T, H, W, 3].
`to_tokens` packs them into the token layout of atoken/sparse.py (feature order (pt, ph, pw, c)).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PATCH = (4, 16, 16)


@dataclass
class DataConfig:
    image_size: int = 256  # square training images
    video_size: int = 128  # square training video frames
    video_frames: int = 16  # frames per clip (multiple of 4); 16 x 128^2 = 256 tokens, like a 256^2 image
    video_ratio: float = 0.2  # fraction of samples per batch that are videos
    pan_ratio: float = 0.0  # fraction of the videos that are straight pans at 0..pan_px px/frame (real footage's
    pan_px: float = 10.0  # speeds: the demo's clips pan 8-10 px/frame; the default camera drifts ~1 px/frame)
    min_shapes: int = 20  # dead-leaves shapes per scene
    max_shapes: int = 80
    text_prob: float = 0.3  # chance that a scene gets a line of text
    package_photos: bool = True  # use the PACKAGE_PHOTOS of the installed packages
    photo_dir: str = ""  # optional folder of more training photos (every image file in it)
    exclude_dir: str = ""  # optional folder of evaluation images: refuse training photos that match one
    photo_ratio: float = 0.1  # fraction of images that are crops of those photos
    pool_size: int = 2048  # procedural images kept on the device (uint8)
    refresh: int = 64  # pool images regenerated at once (one chunk) ...
    refresh_every: int = 1  # ... every this many steps (bigger chunks amortise kernel launches on GPU)
    seed: int = 0


# ----------------------------------------------------------------------------- helpers


def _rand(gen, *shape, lo=0.0, hi=1.0):
    return torch.rand(*shape, generator=gen, device=gen.device) * (hi - lo) + lo


def _grid(h, w, device):
    """Pixel-centre coordinates, y and x each [h, w]."""
    y = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    x = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    return torch.meshgrid(y, x, indexing="ij")


def pink_noise(gen, n, c, h, w):
    """Gaussian noise with a 1/f^alpha power spectrum, alpha in [1.8, 3.2] per field, unit std. [n, c, h, w]"""
    white = torch.randn(n, c, h, w, generator=gen, device=gen.device)
    fy = torch.fft.fftfreq(h, device=gen.device).abs()[:, None]
    fx = torch.fft.rfftfreq(w, device=gen.device)[None, :]
    f = torch.sqrt(fy**2 + fx**2).clamp_min(1.0 / max(h, w))
    alpha = _rand(gen, n, c, 1, 1, lo=1.8, hi=3.2)
    spec = torch.fft.rfft2(white) * f.pow(-alpha / 2)
    out = torch.fft.irfft2(spec, s=(h, w))
    out = out - out.mean(dim=(-2, -1), keepdim=True)
    return out / out.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


def colour_field(gen, n, h, w):
    """Natural-looking colour texture: three 1/f fields mixed by a random colour matrix. [n, 3, h, w] in [0, 1]"""
    fields = pink_noise(gen, n, 3, h, w)
    mix = torch.randn(n, 3, 3, generator=gen, device=gen.device) * 0.35
    mix = mix + torch.eye(3, device=gen.device) * _rand(gen, n, 1, 1, lo=0.0, hi=0.6)
    mix[:, :, 0] += _rand(gen, n, 3, lo=0.2, hi=0.6)  # a shared luminance component
    out = torch.einsum("nij,njhw->nihw", mix, fields)
    base = _rand(gen, n, 3, 1, 1, lo=0.15, hi=0.85)
    return torch.sigmoid((torch.logit(base) + out * _rand(gen, n, 1, 1, 1, lo=0.5, hi=2.0)))


def _blur(img, sigma):
    """Per-image Gaussian blur; sigma [n] in pixels (0 = none). img [n, c, h, w]"""
    k = 7
    r = torch.arange(k, device=img.device, dtype=img.dtype) - k // 2
    s = sigma.clamp_min(1e-3)[:, None]
    g = torch.exp(-0.5 * (r[None] / s) ** 2)
    g = g / g.sum(-1, keepdim=True)  # [n, k]
    n, c, h, w = img.shape
    x = img.reshape(1, n * c, h, w)
    gk = g.repeat_interleave(c, 0)
    x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="reflect"), gk[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="reflect"), gk[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)


def text_bank(seed: int, count: int = 48, size: int = 256) -> torch.Tensor:
    """Masks [count, size, size] in [0, 1] of random strings drawn with Pillow's bundled font."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:-/&%"
    masks = []
    for _ in range(count):
        im = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(im)
        for _ in range(rng.randint(1, 4)):
            font = ImageFont.load_default(size=rng.choice([10, 12, 14, 18, 24, 32, 44, 60]))
            text = "".join(rng.choice(chars) for _ in range(rng.randint(3, 24)))
            draw.text((rng.randint(-20, size - 20), rng.randint(-10, size - 10)), text, fill=255, font=font)
        masks.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(masks))


# Sample photos inside installed packages, by package and path in it. NOT listed (they are in the test set):
# scikit-image's astronaut, brick, camera, cell, chelsea, clock_motion, coffee, coins, hubble_deep_field, logo,
# retina, rocket, text; matplotlib's grace_hopper. tests/test_train.py compares these files with the test set.
PACKAGE_PHOTOS = {
    "sklearn": ("datasets/images/china.jpg", "datasets/images/flower.jpg"),
    "skimage": (
        "data/grass.png",
        "data/gravel.png",
        "data/ihc.png",
        "data/moon.png",
        "data/page.png",
        "data/motorcycle_left.png",
        "data/motorcycle_right.png",
        "data/color.png",
    ),
}


def package_photo_paths() -> list[Path]:
    """The PACKAGE_PHOTOS files of the packages that are installed (found without importing them)."""
    import importlib.util

    out = []
    for pkg, files in PACKAGE_PHOTOS.items():
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        out += [root / f for f in files if (root / f).is_file()]
    return out


def photo_paths(cfg: DataConfig) -> list[Path]:
    from .images import IMAGE_SUFFIXES

    paths = package_photo_paths() if cfg.package_photos else []
    if cfg.photo_dir:
        folder = Path(cfg.photo_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"data.photo_dir {folder} is not a directory")
        paths += sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths


def fingerprint(rgb: np.ndarray) -> np.ndarray:
    """A 32 x 32 grey thumbnail, zero mean and unit norm: equal for copies of a photo at any size or format."""
    from PIL import Image

    g = np.asarray(Image.fromarray(rgb).convert("L").resize((32, 32), Image.Resampling.BOX), np.float64).ravel()
    g = g - g.mean()
    return g / max(np.linalg.norm(g), 1e-9)


def refuse_test_images(photos: dict[str, np.ndarray], test_dir: Path, threshold: float = 0.9) -> None:
    """ValueError if a training photo (name -> uint8 RGB) matches an image of test_dir by content
    (correlation of the thumbnails above threshold, also flipped or rotated)."""
    from .images import IMAGE_SUFFIXES, load_rgb

    test = {p.name: load_rgb(str(p)) for p in sorted(Path(test_dir).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    prints = {n: fingerprint(v) for n, v in test.items()}
    bad = []
    for name, rgb in photos.items():
        views = [rgb, rgb[:, ::-1], rgb[::-1], rgb.transpose(1, 0, 2)]
        fps = [fingerprint(np.ascontiguousarray(v)) for v in views]
        for tname, tfp in prints.items():
            c = max(float(f @ tfp) for f in fps)
            if c > threshold:
                bad.append(f"{name} ~ {tname} (correlation {c:.3f})")
    if bad:
        raise ValueError(f"training photos that are test images of {test_dir}: {'; '.join(bad)}")


def load_photos(cfg: DataConfig) -> dict[str, np.ndarray]:
    """Training photos (name -> uint8 [H, W, 3]), checked against data.exclude_dir when that is set."""
    from .images import load_rgb

    photos = {f"{p.parent.name}/{p.name}": load_rgb(str(p)) for p in photo_paths(cfg)}
    if cfg.exclude_dir and photos:
        refuse_test_images(photos, Path(cfg.exclude_dir))
    return photos


def package_photos(cfg: DataConfig | None = None) -> list[torch.Tensor]:
    """The training photos as [3, H, W] in [0, 1]; [] when no package ships any and no photo_dir is set."""
    return [
        torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0
        for im in load_photos(cfg or DataConfig()).values()
    ]


# ----------------------------------------------------------------------------- scenes


class SceneGenerator:
    """Seeded procedural images and videos on one device."""

    def __init__(self, cfg: DataConfig, device: str | torch.device = "cpu", log=print):
        self.cfg = cfg
        self.device = torch.device(device)
        self.text = text_bank(cfg.seed, size=max(cfg.image_size, cfg.video_size)).to(self.device)
        self.photos = [p.to(self.device) for p in package_photos(cfg)]
        if self.photos:
            log(f"train_data: {len(self.photos)} package/folder photos for {cfg.photo_ratio:.0%} of the images")
        else:
            log("train_data: no package photos installed (scikit-learn, scikit-image); procedural scenes only")

    def generator(self, step: int, salt: int = 0) -> torch.Generator:
        """A fresh generator for one batch: the data stream is a pure function of (seed, step)."""
        g = torch.Generator(device=self.device)
        g.manual_seed((self.cfg.seed * 1_000_003 + step * 7919 + salt) % (2**63))
        return g

    def scenes(self, gen, n: int, h: int, w: int) -> torch.Tensor:
        """n procedural scenes [n, 3, h, w] in [0, 1]."""
        cfg, dev = self.cfg, self.device
        img = colour_field(gen, n, h, w)
        tex = colour_field(gen, n, h, w)  # texture source for shape fills
        yy, xx = _grid(h, w, dev)
        k = int(torch.randint(cfg.min_shapes, cfg.max_shapes + 1, (1,), generator=gen, device=dev))
        rmin, rmax = 2.0, 0.5 * max(h, w)
        for _ in range(k):
            # radius density ~ r^-2 between rmin and rmax ("dead leaves", biased to large shapes)
            u = _rand(gen, n, 1, 1)
            r = 1.0 / (u / rmax + (1 - u) / rmin)
            cy, cx = _rand(gen, n, 1, 1, hi=h), _rand(gen, n, 1, 1, hi=w)
            th = _rand(gen, n, 1, 1, hi=math.pi)
            dy, dx = yy - cy, xx - cx
            u_ = dx * torch.cos(th) + dy * torch.sin(th)
            v_ = -dx * torch.sin(th) + dy * torch.cos(th)
            aspect = _rand(gen, n, 1, 1, lo=0.3, hi=1.0)
            kind = torch.randint(0, 3, (n, 1, 1), generator=gen, device=dev)
            d_ell = (torch.sqrt(u_**2 + (v_ / aspect) ** 2) - r) * aspect
            d_rect = torch.maximum(u_.abs() - r, v_.abs() - r * aspect)
            d_line = torch.where(u_.abs() <= r, v_.abs(), torch.sqrt((u_.abs() - r) ** 2 + v_**2)) - _rand(
                gen, n, 1, 1, lo=0.5, hi=2.5
            )
            d = torch.where(kind == 0, d_ell, torch.where(kind == 1, d_rect, d_line))
            soft = _rand(gen, n, 1, 1, lo=0.3, hi=1.2) * torch.where(_rand(gen, n, 1, 1) < 0.1, 4.0, 1.0)
            alpha = torch.sigmoid(-d / soft)[:, None]  # [n, 1, h, w]
            # fill: flat colour + linear gradient + a grating or a texture crop
            col = _rand(gen, n, 3, 1, 1)
            gdir = torch.randn(n, 3, 1, 1, generator=gen, device=dev) * 0.3
            fill = col + gdir * (u_ / r.clamp_min(1.0)).clamp(-1, 1)[:, None]
            freq = _rand(gen, n, 1, 1, lo=0.05, hi=0.6)
            grating = torch.sin(freq * v_ + _rand(gen, n, 1, 1, hi=6.3))[:, None]
            gamp = _rand(gen, n, 1, 1, 1, hi=0.3) * (_rand(gen, n, 1, 1, 1) < 0.3)
            tamp = _rand(gen, n, 1, 1, 1, hi=0.8) * (_rand(gen, n, 1, 1, 1) < 0.5)
            fill = (
                fill
                + gamp * grating * torch.randn(n, 3, 1, 1, generator=gen, device=dev)
                + tamp * (tex.roll(int(torch.randint(1, 1000, (1,), generator=gen, device=dev)), 0) - 0.5)
            )
            img = img * (1 - alpha) + fill.clamp(0, 1) * alpha
        img = self._text(gen, img)
        # global jitter: blur some, saturation, contrast/gamma, sensor-like noise
        sigma = _rand(gen, n, hi=1.5) * (_rand(gen, n) < 0.3)
        img = _blur(img, sigma)
        # saturation: photos are far less colourful than random colour fields; some scenes fully grey
        lum = (img * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        sat = _rand(gen, n, 1, 1, 1, lo=0.2, hi=1.1) * (_rand(gen, n, 1, 1, 1) > 0.15)
        img = lum + sat * (img - lum)
        gamma = torch.exp(torch.randn(n, 1, 1, 1, generator=gen, device=dev) * 0.25)
        img = img.clamp(1e-4, 1).pow(gamma)
        noise = _rand(gen, n, 1, 1, 1, hi=0.03) * (_rand(gen, n, 1, 1, 1) < 0.3)
        img = img + noise * torch.randn(img.shape, generator=gen, device=dev)
        return img.clamp(0, 1)

    def _text(self, gen, img):
        n, _, h, w = img.shape
        pick = torch.randint(0, len(self.text), (n,), generator=gen, device=self.device)
        m = self.text[pick][:, None, :h, :w]
        m = m * (_rand(gen, n, 1, 1, 1) < self.cfg.text_prob)
        col = _rand(gen, n, 3, 1, 1)
        return img * (1 - m) + col * m

    def _photo_crops(self, gen, n, size):
        """Random crops (scale, flip, colour jitter) of the bundled photos. [n, 3, size, size]"""
        out = []
        for _ in range(n):
            p = self.photos[int(torch.randint(0, len(self.photos), (1,), generator=gen, device=self.device))]
            _, ph, pw = p.shape
            s = min(ph, pw, max(64, int(min(ph, pw) * float(_rand(gen, 1, lo=0.25, hi=1.0)))))
            y = int(torch.randint(0, ph - s + 1, (1,), generator=gen, device=self.device))
            x = int(torch.randint(0, pw - s + 1, (1,), generator=gen, device=self.device))
            crop = F.interpolate(
                p[None, :, y : y + s, x : x + s],
                size=(size, size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
            if float(_rand(gen, 1)) < 0.5:
                crop = crop.flip(-1)
            crop = crop * _rand(gen, 3, 1, 1, lo=0.8, hi=1.2) + _rand(gen, 1, 1, 1, lo=-0.1, hi=0.1)
            out.append(crop.clamp(0, 1))
        return torch.stack(out)

    # ------------------------------------------------------------------ public

    def images(self, gen, n: int, size: int | None = None) -> torch.Tensor:
        """n fresh images [n, S, S, 3] in [-1, 1]."""
        s = size or self.cfg.image_size
        img = self.scenes(gen, n, s, s)
        n_photo = int(round(n * self.cfg.photo_ratio)) if self.photos else 0
        if n_photo:
            img[:n_photo] = self._photo_crops(gen, n_photo, s)
        return img.permute(0, 2, 3, 1) * 2 - 1

    def _pans(self, gen, n, t, zoom, shift, rot):
        """Replaces the camera of `pan_ratio` of the clips with a straight pan at a uniform 0..pan_px output
        px/frame in a random direction, zoomed in (0.4-0.5 of the source) so that the whole path stays on it."""
        cfg, dev, s = self.cfg, self.device, self.cfg.video_size
        pan = _rand(gen, n, 1) < cfg.pan_ratio
        z = _rand(gen, n, 1, lo=0.4, hi=0.5)
        px = _rand(gen, n, 1, hi=cfg.pan_px)
        ang = _rand(gen, n, 1, hi=2 * math.pi)
        step = (px * 2 * z / s).clamp(max=1.9 * (1 - z) / max(t - 1, 1))  # normalised source units per frame
        k = torch.arange(t, device=dev, dtype=torch.float32)[None] - (t - 1) / 2  # [1, T], centred
        path = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * (step * k)[:, None]  # [n, 2, T]
        return (
            torch.where(pan, z.expand_as(zoom), zoom),
            torch.where(pan[:, :, None], path, shift),
            torch.where(pan, torch.zeros_like(rot), rot),
        )

    def videos(self, gen, src: torch.Tensor) -> torch.Tensor:
        """Clips [n, T, s, s, 3] in [-1, 1] from source images src [n, 3, S, S] in [0, 1] (S >= 1.5 s works best):
        a moving, zooming, slightly rotating camera over the image, plus a moving disc."""
        cfg, dev = self.cfg, self.device
        n, s, t = src.shape[0], cfg.video_size, cfg.video_frames
        tt = torch.arange(t, device=dev, dtype=torch.float32)[None, :] / max(t - 1, 1)  # [1, T] in [0, 1]
        zoom0 = _rand(gen, n, 1, lo=0.5, hi=0.66)
        zoom = zoom0 * torch.exp(torch.randn(n, 1, generator=gen, device=dev) * 0.15 * tt)
        shift0 = _rand(gen, n, 2, 1, lo=-0.3, hi=0.3)
        vel = torch.randn(n, 2, 1, generator=gen, device=dev) * 0.15
        shift = (shift0 + vel * tt[:, None]).clamp(-0.33, 0.33)  # [n, 2, T]
        rot = torch.randn(n, 1, generator=gen, device=dev) * 0.1 * tt
        if cfg.pan_ratio > 0:  # drawn after the default camera's numbers: pan_ratio 0 keeps the old stream
            zoom, shift, rot = self._pans(gen, n, t, zoom, shift, rot)
        cos, sin = torch.cos(rot) * zoom, torch.sin(rot) * zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], -2
        )  # [n, T, 2, 3]
        grid = F.affine_grid(theta.reshape(n * t, 2, 3), (n * t, 3, s, s), align_corners=False)
        frames = F.grid_sample(
            src.repeat_interleave(t, 0), grid, mode="bilinear", padding_mode="reflection", align_corners=False
        ).reshape(n, t, 3, s, s)
        # one moving disc per clip (70% of clips)
        yy, xx = _grid(s, s, dev)
        c = _rand(gen, n, 2, 1, hi=s) + torch.randn(n, 2, 1, generator=gen, device=dev) * s * 0.3 * tt[:, None]
        r = _rand(gen, n, 1, 1, 1, lo=4, hi=s / 4)
        d = torch.sqrt((yy - c[:, 0, :, None, None]) ** 2 + (xx - c[:, 1, :, None, None]) ** 2) - r
        alpha = torch.sigmoid(-d / 0.7)[:, :, None] * (_rand(gen, n, 1, 1, 1, 1) < 0.7)
        frames = frames * (1 - alpha) + _rand(gen, n, 1, 3, 1, 1) * alpha
        return frames.permute(0, 1, 3, 4, 2).clamp(0, 1) * 2 - 1


class TrainStream:
    """The training batches: a pool of procedural images on the device, `refresh` of them regenerated every
    `refresh_every` steps,
    batches sampled from the pool with flips/rotations; videos are camera moves over pool images.

    Batch `step` is a pure function of (seed, step): the pool a step sees is rebuilt from the steps that last
    refreshed each chunk, so resuming at any step gives the same batches as an uninterrupted run."""

    def __init__(self, cfg: DataConfig, device="cpu", log=print):
        pool_size, refresh = cfg.pool_size, cfg.refresh
        if refresh <= 0 or pool_size % refresh:
            raise ValueError(f"data.pool_size {pool_size} must be a positive multiple of data.refresh {refresh}")
        if cfg.video_frames % 4 or cfg.image_size % 16 or cfg.video_size % 16:
            raise ValueError("data: video_frames must be a multiple of 4, image_size and video_size multiples of 16")
        self.gen_ = SceneGenerator(cfg, device, log=log)
        self.cfg, self.device = cfg, torch.device(device)
        self.refresh, self.chunks, self.every = refresh, pool_size // refresh, max(1, cfg.refresh_every)
        s = cfg.image_size
        self.pool = torch.empty(pool_size, s, s, 3, dtype=torch.uint8, device=self.device)
        self.next_step: int | None = None

    def _fill(self, chunk: int, gen):
        img = self.gen_.images(gen, self.refresh)
        sl = slice(chunk * self.refresh, (chunk + 1) * self.refresh)
        self.pool[sl] = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def _rebuild(self, step: int):
        """Pool state after the refresh of `step`: refreshes happen at steps r * every and replace chunk
        r % chunks; chunk j holds the images of its last refresh at or before `step`, or its initial images."""
        m = step // self.every
        for j in range(self.chunks):
            r = m - ((m - j) % self.chunks)
            self._fill(j, self.gen_.generator(r * self.every, salt=2) if r >= 0 else self.gen_.generator(j, salt=1))

    def batch(self, step: int, batch_size: int):
        """(images [ni, S, S, 3], videos [nv, T, s, s, 3] or None), float in [-1, 1]."""
        if self.next_step != step:
            self._rebuild(step)
        elif step % self.every == 0:
            self._fill((step // self.every) % self.chunks, self.gen_.generator(step, salt=2))
        self.next_step = step + 1
        gen = self.gen_.generator(step, salt=3)
        nv = int(round(batch_size * self.cfg.video_ratio))
        ni = batch_size - nv
        idx = torch.randint(0, len(self.pool), (batch_size,), generator=gen, device=self.device)
        x = self.pool[idx]
        k = torch.randint(0, 8, (batch_size,), generator=gen, device=self.device)
        x = _dihedral_batch(x, k)
        x = x.float() / 127.5 - 1
        videos = None
        if nv:
            videos = self.gen_.videos(gen, (x[ni:].permute(0, 3, 1, 2) + 1) / 2)
        return x[:ni], videos


def _dihedral_batch(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per image one of the 8 flips/rotations of square images x [B, H, W, C], chosen by k [B] in [0, 8)."""
    k = k.view(-1, 1, 1, 1)
    x = torch.where(k & 1 > 0, x.flip(-2), x)
    x = torch.where(k & 2 > 0, x.flip(-3), x)
    return torch.where(k & 4 > 0, x.transpose(-2, -3), x)


# ----------------------------------------------------------------------------- tokens


def to_tokens(x: torch.Tensor, b0: int = 0):
    """Patchify [n, T, H, W, 3] (T padded with zeros to a multiple of 4; H, W multiples of 16) into
    feats [n*L, 3072] in (pt, ph, pw, c) order and coords int32 [n*L, 5] = (b, t, x=row, y=col, 0)."""
    pt, ph, pw = PATCH
    n, t, h, w, c = x.shape
    if t % pt:
        x = torch.cat([x, x.new_zeros(n, pt - t % pt, h, w, c)], 1)
        t = x.shape[1]
    gt, gh, gw = t // pt, h // ph, w // pw
    feats = x.reshape(n, gt, pt, gh, ph, gw, pw, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(n * gt * gh * gw, -1)
    ib, it, ih, iw = torch.meshgrid(*(torch.arange(k, device=x.device) for k in (n, gt, gh, gw)), indexing="ij")
    coords = torch.stack([ib + b0, it, ih, iw, torch.zeros_like(ib)], -1).reshape(-1, 5).to(torch.int32)
    return feats, coords


def from_tokens(feats: torch.Tensor, n: int, t: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `to_tokens` for n equal-size samples; returns [n, t, h, w, 3] (padding frames dropped)."""
    pt, ph, pw = PATCH
    tp = -(-t // pt) * pt
    gt, gh, gw = tp // pt, h // ph, w // pw
    x = feats.reshape(n, gt, gh, gw, pt, ph, pw, 3).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, tp, h, w, 3)
    return x[:, :t]
