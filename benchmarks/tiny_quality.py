"""Quality of tiny-c/-d weights: PSNR on a photo folder and patch-grid / 4-frame-flicker scores on the demo videos.

The photos are read and sized as by the trainer's evaluator (atoken.train.load_eval_photos: the pipeline's
loader, EXIF, ICC -> sRGB, 16-bit; 256^2 centre crop). The videos are the demo's own (pipeline.demo_samples),
decoded as the demo job decodes them (jobs/demo.yaml: 8 fps, 16 frames). Scores (atoken/metrics.py), each the
reconstruction's value over the input's, so 1.0 = no artefact added:
  grid    = |pixel step| across 16-px patch borders / inside patches;
  flicker = |frame step| from frame 4k-1 to 4k / inside the 4-frame temporal patches;
and spread = max - min of the mean frame PSNR over t mod 4 (dB).

    python benchmarks/tiny_quality.py --model new:atoken/weights --model old:/tmp/old-weights \
        --photos ../shared/data/images --out benchmarks/results/tiny-quality.json \
        --picture docs/images/tiny-before-after.png
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atoken.metrics import flicker_score, frame_psnr, grid_score, phase_psnr_spread, psnr  # noqa: E402
from atoken.sparse import tokens_to_video, video_to_tokens  # noqa: E402
from atoken.tokenizer import Tokenizer  # noqa: E402
from atoken.train import load_eval_photos  # noqa: E402
from pipeline.decode import DecodeConfig, decode_file  # noqa: E402
from pipeline.demo_samples import write_videos  # noqa: E402

PICTURE_PHOTOS = ("astronaut.png", "coffee.png", "prairie_falcon.jpg")


def demo_clips(folder: Path) -> dict[str, np.ndarray]:
    """The demo's videos as the demo job decodes them: uint8 [16, H, W, 3]."""
    import yaml

    cfg = DecodeConfig(**yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())["decode"])
    return {p.name: decode_file(str(p), "video", cfg)["pixels"] for p in write_videos(folder, 3)}


def reconstruct(tok: Tokenizer, clip: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> the reconstruction as float [T, H, W, 3] in [0, 1], 8-bit rounded."""
    feats, coords = video_to_tokens(clip)
    _, (rec,) = tok.reconstruct([(feats, coords)])
    v = tokens_to_video(rec, coords)[: len(clip)]
    return ((v.clamp(-1, 1) + 1) * 127.5).round().numpy() / 255.0


def score(tok: Tokenizer, photos, clips) -> tuple[dict, dict]:
    res, recs = {"photos": {}, "videos": {}}, {}
    for name, x in photos:
        orig = (x.numpy() + 1) / 2
        rec = reconstruct(tok, np.round(orig * 255).astype(np.uint8)[None])
        recs[name] = rec[0]
        res["photos"][name] = psnr(torch.from_numpy(rec[0]), torch.from_numpy(orig))
    for name, clip in clips.items():
        orig = torch.from_numpy(clip.astype(np.float64) / 255.0)
        rec = torch.from_numpy(reconstruct(tok, clip))
        recs[name] = rec.numpy()
        res["videos"][name] = {
            "psnr": psnr(rec, orig),
            "grid": grid_score(rec, orig),
            "flicker": flicker_score(rec, orig),
            "phase_psnr_spread_db": phase_psnr_spread(rec, orig),
            "frame_psnr": [round(float(p), 2) for p in frame_psnr(rec, orig)],
        }
    p = list(res["photos"].values())
    v = list(res["videos"].values())
    res["mean"] = {
        "photo_psnr": float(np.mean(p)),
        "video_psnr": float(np.mean([r["psnr"] for r in v])),
        "grid": float(np.mean([r["grid"] for r in v])),
        "flicker": float(np.mean([r["flicker"] for r in v])),
        "phase_psnr_spread_db": float(np.mean([r["phase_psnr_spread_db"] for r in v])),
        "photo_grid": float(
            np.mean([grid_score(torch.from_numpy(recs[n][None]), (x[None] + 1) / 2) for n, x in photos])
        ),
    }
    return res, recs


def picture(path: Path, photos, clips, rows: dict[str, dict], res: dict[str, dict]):
    """Columns: 3 photos, then frames 3-6 of the first demo video (one temporal patch border between 3 and 4);
    rows: the input, then each model's reconstruction with its PSNR."""
    from PIL import Image, ImageDraw

    photo = {n: (x.numpy() + 1) / 2 for n, x in photos}
    vname = sorted(clips)[0]
    cols = [(n, lambda r, n=n: r[n]) for n in PICTURE_PHOTOS if n in photo]
    cols += [(f"{vname} frame {t}", lambda r, t=t: r[vname][t]) for t in (3, 4, 5, 6)]
    cell, label_h = 192, 14

    def tile(a: np.ndarray, text: str) -> Image.Image:
        im = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)).resize((cell, cell), Image.LANCZOS)
        out = Image.new("RGB", (cell, cell + label_h), (255, 255, 255))
        out.paste(im, (0, label_h))
        ImageDraw.Draw(out).text((2, 1), text, fill=(0, 0, 0))
        return out

    inputs = photo | {vname: clips[vname].astype(np.float64) / 255.0}
    grid = [[tile(get(inputs), f"input {name}"[:32]) for name, get in cols]]
    for label, recs in rows.items():
        line = []
        for name, get in cols:
            if name in photo:
                text = f"{label}: {res[label]['photos'][name]:.2f} dB"
            else:
                t = int(name.rsplit(" ", 1)[1])
                text = f"{label}: {res[label]['videos'][vname]['frame_psnr'][t]:.2f} dB"
            line.append(tile(get(recs), text))
        grid.append(line)
    sheet = Image.new("RGB", (cell * len(cols), (cell + label_h) * len(grid)), (255, 255, 255))
    for i, line in enumerate(grid):
        for j, t in enumerate(line):
            sheet.paste(t, (j * cell, i * (cell + label_h)))
    path.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours keep the PNG small (< 300 KB) and show the artefacts as they are
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="LABEL:DIR holding tiny-c/-d.safetensors")
    ap.add_argument("--photos", required=True, help="photo folder (e.g. ../shared/data/images)")
    ap.add_argument("--stages", default="c,d")
    ap.add_argument(
        "--clips",
        default=None,
        help="the demo clips as decoded, from an .npz (written when it does not exist): for a machine without "
        "the video decoders",
    )
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--picture", default=None, help="PNG: inputs and the continuous reconstructions of each model")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    photos = load_eval_photos(Path(args.photos), 256)
    if args.clips and Path(args.clips).is_file():
        with np.load(args.clips) as z:
            clips = {k: z[k] for k in sorted(z.files)}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            clips = demo_clips(Path(tmp))
        if args.clips:
            np.savez_compressed(args.clips, **clips)
    results, rows, cres = {}, {}, {}
    for spec in args.model:
        label, folder = spec.split(":", 1)
        for stage in args.stages.split(","):
            ckpt = Path(folder) / f"tiny-{stage}.safetensors"
            tok = Tokenizer.from_files(f"tiny-{stage}", ckpt, device="cpu", compile=False)
            r, recs = score(tok, photos, clips)
            results[f"{label}-{stage}"] = r
            print(f"{label}-{stage} ({ckpt}): " + ", ".join(f"{k} {v:.3f}" for k, v in r["mean"].items()), flush=True)
            if stage == "c":
                rows[label], cres[label] = recs, r
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.picture:
        picture(Path(args.picture), photos, clips, rows, cres)
    return results


if __name__ == "__main__":
    main()
