"""The embedded default's inputs, made by the project itself: procedural photos-like images, short videos, meshes.

Nothing is downloaded. Videos are real H.264 files written with PyAV, so the demo exercises the same decode path
as a real job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _scene(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A sky/ground gradient with soft blobs, shapes, stripes and text: enough structure to judge a reconstruction."""
    y = np.linspace(0, 1, h)[:, None, None]
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    base = (top * (1 - y) + bottom * y) * np.ones((1, w, 1))
    noise = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3))
    noise = np.asarray(
        Image.fromarray(((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
        np.float32,
    )
    img = Image.fromarray(np.clip(base * 0.8 + noise * 0.2, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(4, 9)):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(8, max(9, min(h, w) // 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)
        elif shape == 1:
            draw.rectangle([x0 - r, y0 - r // 2, x0 + r, y0 + r // 2], fill=color, outline=(0, 0, 0))
        else:
            draw.line([x0, y0, x0 + r * 2, y0 + r], fill=color, width=int(rng.integers(2, 6)))
    draw.text((rng.integers(0, w // 2), rng.integers(0, h // 2)), "AToken demo", fill=(255, 255, 255))
    return img.filter(ImageFilter.SMOOTH)


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.choice([192, 256, 288])), int(rng.choice([224, 256, 320]))
        path = folder / f"image_{i:02d}.{'png' if i % 2 else 'jpg'}"
        _scene(rng, h, w).save(path, quality=92)
        paths.append(path)
    return paths


def write_videos(folder: Path, n: int, frames: int = 24, fps: int = 12, seed: int = 1) -> list[Path]:
    """Short H.264 clips: a camera panning over a larger procedural scene."""
    import av

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = 144, 192
        scene = np.asarray(_scene(rng, h + 64, w + 96))
        path = folder / f"video_{i:02d}.mp4"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": "18"}
            for f in range(frames):
                dx, dy = int(f * 96 / frames), int(f * 64 / frames * (1 if i % 2 else 0.5))
                frame = av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(scene[dy : dy + h, dx : dx + w]), format="rgb24"
                )
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        paths.append(path)
    return paths


def write_meshes(folder: Path) -> list[Path]:
    from pipeline.mesh.procedural import export_assets

    return [Path(p) for p in export_assets(folder).values()]


def make_demo_inputs(folder: Path, images: int = 6, videos: int = 3) -> Path:
    """Writes the demo inputs once; returns the folder."""
    folder = Path(folder)
    marker = folder.with_name(folder.name + ".complete")  # beside the folder, so the job does not see it
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_images(folder, images)
    write_videos(folder, videos)
    write_meshes(folder)
    marker.write_text("ok\n")
    return folder
