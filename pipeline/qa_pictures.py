"""QA pictures: one labelled card per sample, a grid per modality, and an `index.html` that shows them with their numbers.

Every card starts with a band naming the sample's id and its PSNR (and SSIM). Below it, cells of CELL pixels:
- image: the input above its reconstruction;
- video: FRAMES frames spread over the clip, the input row above the reconstruction row;
- 3D: rows of views of one asset (the mesh, its input voxels, the decoded voxels, ...), from the same cameras.
Each cell carries a small tag (what it shows, which frame). Text uses Pillow's default font: no font files needed.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CELL = 192
BAND = 30  # label band: two lines of the default font
FRAMES = 4  # video frames shown per clip
BACKGROUND = (0, 0, 0)
LABEL_BG, LABEL_FG, TAG_BG = (32, 32, 40), (255, 255, 255), (0, 0, 0)


@dataclass
class SampleScore:
    """One QA sample as the index lists it."""

    id: str
    modality: str
    psnr: float | None = None
    ssim: float | None = None
    picture: str | None = None  # relative to the QA folder
    error: str | None = None  # why it could not be scored

    def label(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        unit = " (voxel features)" if self.modality == "3d" else ""
        text = f"PSNR {self.psnr:.2f} dB{unit}"
        return text + (f"  SSIM {self.ssim:.3f}" if self.ssim is not None else "")


def fit(text: str, width: int, draw: ImageDraw.ImageDraw) -> str:
    """`text`, or its end after '...' when it is wider than `width` pixels (ids end with the file name)."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength("..." + text) > width:
        text = text[1:]
    return "..." + text


def label_band(width: int, lines: list[str]) -> Image.Image:
    band = Image.new("RGB", (width, BAND), LABEL_BG)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines[:2]):
        draw.text((4, 3 + 13 * i), fit(line, width - 8, draw), fill=LABEL_FG)
    return band


def cell(img: np.ndarray, tag: str | None = None, size: int = CELL) -> Image.Image:
    """A float [H, W, 3] picture in [0, 1], scaled to fit a size x size cell (centred), with a corner tag."""
    im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    scale = size / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (size, size), BACKGROUND)
    out.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    if tag:
        draw = ImageDraw.Draw(out)
        draw.rectangle([0, 0, int(draw.textlength(tag)) + 5, 13], fill=TAG_BG)
        draw.text((2, 1), tag, fill=LABEL_FG)
    return out


def card(score: SampleScore, rows: list[list[Image.Image]]) -> Image.Image:
    """The label band above rows of cells."""
    width = max(len(r) for r in rows) * CELL
    out = Image.new("RGB", (width, BAND + CELL * len(rows)), BACKGROUND)
    out.paste(label_band(width, [score.id, score.label()]), (0, 0))
    for j, row in enumerate(rows):
        for i, c in enumerate(row):
            out.paste(c, (i * CELL, BAND + j * CELL))
    return out


def image_card(score: SampleScore, ref: np.ndarray, out: np.ndarray) -> Image.Image:
    """ref/out [1, H, W, 3] (or [H, W, 3]): input above reconstruction."""
    ref, out = (x[0] if x.ndim == 4 else x for x in (ref, out))
    return card(score, [[cell(ref, "input")], [cell(out, "reconstruction")]])


def spread_frames(n: int, k: int = FRAMES) -> list[int]:
    """k frame indices spread evenly over n frames, first and last included (all of them when n <= k)."""
    return list(range(n)) if n <= k else [int(i) for i in np.linspace(0, n - 1, k).round()]


def video_card(score: SampleScore, ref: np.ndarray, out: np.ndarray) -> Image.Image:
    """ref/out [T, H, W, 3]: FRAMES frames over the clip, input row above reconstruction row."""
    picks = spread_frames(min(len(ref), len(out)))
    return card(
        score,
        [
            [cell(ref[t], f"input f{t}") for t in picks],
            [cell(out[t], f"rec f{t}") for t in picks],
        ],
    )


def views_card(score: SampleScore, rows: list[tuple[str, list[np.ndarray]]]) -> Image.Image:
    """3D: one row of views per (name, [H, W, 3] views)."""
    return card(score, [[cell(v, f"{name} v{i}") for i, v in enumerate(views)] for name, views in rows])


def grid(cards: list[Image.Image], across: bool) -> Image.Image:
    """Cards side by side (`across`, one column per sample) or one below the other."""
    w = sum(c.width for c in cards) if across else max(c.width for c in cards)
    h = max(c.height for c in cards) if across else sum(c.height for c in cards)
    out = Image.new("RGB", (w, h), BACKGROUND)
    at = 0
    for c in cards:
        out.paste(c, (at, 0) if across else (0, at))
        at += c.width if across else c.height
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _link(path: str) -> str:
    return f'<a href="{html.escape(path)}">{html.escape(path)}</a>'


def _sample_row(s: SampleScore) -> str:
    e = html.escape
    picture = f'<img src="{e(s.picture)}" alt="{e(s.id)}">' if s.picture else ""
    return (
        f'<tr class="sample"><td class="id">{e(s.id)}</td><td>{e(s.modality)}</td>'
        f'<td class="psnr">{_num(s.psnr, ".2f")}</td><td class="ssim">{_num(s.ssim, ".3f")}</td>'
        f"<td>{e(s.error or '')}{picture}</td></tr>"
    )


def index_html(results: dict, samples: list[SampleScore], grids: dict[str, str], title: str) -> str:
    """The QA page: the per-modality means, then one row per sample (id, modality, PSNR, SSIM, its card).
    Links are relative to the QA folder, so the page works wherever the folder is (local disk, S3, a copy)."""
    e = html.escape
    means = "".join(
        f"<tr><td>{e(m)}</td><td>{r.get('n', 0)}</td><td>{_num(r.get('psnr'), '.2f')}</td>"
        f"<td>{_num(r.get('ssim'), '.3f')}</td><td>{_link(grids[m]) if m in grids else ''}</td></tr>"
        for m, r in results.items()
        if isinstance(r, dict)
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>QA: {e(title)}</title><style>'
        "body{font-family:sans-serif;margin:16px;background:#fff;color:#111}"
        "table{border-collapse:collapse;margin-bottom:16px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}img{display:block;max-width:100%}"
        "</style></head><body>\n"
        f"<h1>Reconstruction QA</h1><p>{e(title)}</p>\n"
        "<p>PSNR in dB of each reconstruction against its decoded input (3D: on the 768-d voxel features). "
        "Pictures: image = input above reconstruction; video = 4 frames spread over the clip, input above "
        "reconstruction; 3D = mesh renders, then the input voxels and the decoded voxels (and the decoded "
        "Gaussians when a GS checkpoint is configured) from the same cameras.</p>\n"
        "<table><tr><th>modality</th><th>samples</th><th>mean PSNR</th><th>mean SSIM</th><th>grid</th></tr>"
        f"{means}</table>\n"
        "<table><tr><th>id</th><th>modality</th><th>PSNR</th><th>SSIM</th><th>picture</th></tr>"
        f"{''.join(_sample_row(s) for s in samples)}</table>\n</body></html>\n"
    )
