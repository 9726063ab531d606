"""Command line: python -m atoken encode|reconstruct FILE [--config NAME_OR_YAML --checkpoint PATH --out PATH].

Images and videos only. 3D meshes are rendered and voxelised by the pipeline (`python -m pipeline.mesh.cli`):
this package never imports `pipeline`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from .images import ImageError, load_rgb
from .video_io import VIDEO_SUFFIXES, VideoError, load_video

VIDEO_EXT = VIDEO_SUFFIXES
MESH_EXT = {".glb", ".gltf", ".obj", ".ply", ".stl", ".off"}
MESH_POINTER = (
    "3D meshes are rendered and voxelised by the pipeline: python -m pipeline.mesh.cli <encode|reconstruct> FILE"
)


def load_image(path: Path, max_side: int) -> np.ndarray:
    """Image file -> uint8 [1, H, W, 3] by the pipeline's rules (`atoken/images.py`: EXIF orientation, ICC ->
    sRGB, 16-bit, alpha, HEIC with pillow-heif); optional downscale."""
    from PIL import Image

    rgb = load_rgb(str(path))
    if max_side and max(rgb.shape[:2]) > max_side:
        im = Image.fromarray(rgb)
        s = max_side / max(im.size)
        im = im.resize((max(16, round(im.width * s)), max(16, round(im.height * s))), Image.Resampling.BICUBIC)
        rgb = np.asarray(im)
    return rgb[None]


def write_video(frames: np.ndarray, path: Path, fps: float):
    """uint8 [T, H, W, 3] -> .mp4 (PyAV) or, for other suffixes / without PyAV, a PNG strip of all frames."""
    from PIL import Image

    if path.suffix == ".mp4":
        try:
            import av

            with av.open(str(path), "w") as out:
                stream = out.add_stream("mpeg4", rate=max(1, round(fps)))
                stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
                for f in frames:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                        out.mux(packet)
                for packet in stream.encode():
                    out.mux(packet)
            return path
        except ImportError:
            path = path.with_suffix(".png")
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m atoken", description="AToken tokenizer: encode or reconstruct an image or video."
    )
    p.add_argument("command", choices=["encode", "reconstruct"])
    p.add_argument("file", type=Path)
    p.add_argument(
        "--config",
        default="tiny-c",
        help="config name (tiny-c, tiny-d, tiny, tiny-fsq, mini, atoken-soc, atoken-sod, ...) or YAML path",
    )
    p.add_argument(
        "--checkpoint", default=None, help=".pt or .safetensors (default: shipped weights of the config, else random)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output file (encode: .npz; reconstruct: .png, or .mp4/.png for video)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--max-frames", type=int, default=16, help="video: use the first N frames (0 = all)")
    p.add_argument("--max-side", type=int, default=512, help="downscale so the longer side is at most this (0 = never)")
    p.add_argument("--kv-cache-size", type=int, default=None, help="decoder KV cache in raw frames (multiple of 4)")
    args, extra = p.parse_known_args(argv)
    if args.file.suffix.lower() in MESH_EXT:  # before any other check: the file need not exist, 3D options are fine
        print(MESH_POINTER, file=sys.stderr)
        return 2
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")

    try:
        return _run(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _load(args) -> tuple[np.ndarray, float, bool]:
    """(pixels, fps, is_video); every failure to read the input becomes InputError with a readable reason."""
    is_video = args.file.suffix.lower() in VIDEO_EXT
    try:
        if is_video:
            pixels, fps = load_video(args.file, args.max_frames, args.max_side)
            return pixels, fps, True
        return load_image(args.file, args.max_side), 0.0, False
    except (ImageError, VideoError) as e:
        raise InputError(f"cannot read {args.file.name}: {e}") from None
    except Exception as e:  # whatever a decoder raises, bad input is never a traceback
        raise InputError(f"cannot read {args.file.name}: {type(e).__name__}: {e}") from None


class InputError(ValueError):
    """The input file cannot be read; the message says why."""


def _run(args) -> int:
    import torch

    from .metrics import psnr
    from .sparse import image_to_tokens, to_uint8, tokens_to_video, video_to_tokens
    from .tokenizer import Tokenizer

    if not args.file.is_file():
        raise FileNotFoundError(f"input not found: {args.file}")
    pixels, fps, is_video = _load(args)
    feats, coords = video_to_tokens(pixels) if is_video else image_to_tokens(pixels[0])
    print(f"input: {args.file.name} {'video' if is_video else 'image'} {tuple(pixels.shape)} -> {len(coords)} tokens")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = Tokenizer.from_files(args.config, args.checkpoint, device=args.device)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    ident = tok.identity()
    print(f"tokenizer: {ident['id']} ({'discrete' if tok.model.discrete else 'continuous'}, {tok.device}, {tok.dtype})")

    enc, rec = (
        tok.reconstruct([(feats, coords)]) if args.command == "reconstruct" else (tok.encode([(feats, coords)]), None)
    )
    enc = enc[0]
    for k, v in enc.items():
        print(f"  {k}: {'None' if v is None else f'{tuple(v.shape)} {v.dtype}'}")

    if args.command == "encode":
        out = args.out or Path(args.file.stem + ".tokens.npz")
        np.savez(out, **{k: v for k, v in enc.items() if v is not None})
        print(f"wrote {out}")
        return 0

    ref = tokens_to_video(feats, coords)  # the cropped / padded input as the model saw it
    got = tokens_to_video(torch.from_numpy(rec[0]), coords)
    n = 1 if not is_video else min(len(pixels), ref.shape[0])  # drop temporal padding
    ref8, got8 = to_uint8(ref[:n]), to_uint8(got[:n])
    print(f"PSNR: {psnr(torch.from_numpy(ref8), torch.from_numpy(got8), max_val=255.0):.2f} dB")
    if is_video:
        out = write_video(got8, args.out or Path(args.file.stem + ".rec.mp4"), fps or 24.0)
    else:
        from PIL import Image

        out = args.out or Path(args.file.stem + ".rec.png")
        Image.fromarray(got8[0]).save(out)
    print(f"wrote {out}")
    return 0
