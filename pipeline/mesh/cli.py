"""`python -m pipeline.mesh.cli encode|reconstruct MESH`: mesh -> multi-view voxel features -> 3D tokens, and for
reconstruct -> decoded voxels -> Gaussian decoder -> splatted views, with PSNR against the mesh's own renders.

The mesh side (load, normalise, cameras, render, voxelise) is this package's 3D stage; the tokenizer and the
Gaussian decoder come from `atoken`. `add_mesh_commands(subparsers)` registers the same thing as a `mesh`
sub-command of another argparse CLI (`... mesh encode|reconstruct MESH`).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

ERRORS = (ValueError, FileNotFoundError, OSError, RuntimeError)  # -> "error: ..." on stderr, exit code 2


def add_mesh_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The mesh file and the options `python -m atoken` took for meshes."""
    p.add_argument("file", type=Path, help="mesh file (.glb, .gltf, .obj, .ply, .stl)")
    p.add_argument(
        "--config",
        default="tiny-c",
        help="tokenizer config name (tiny-c, tiny-d, tiny, tiny-fsq, mini, atoken-soc, atoken-sod, ...) or YAML path",
    )
    p.add_argument(
        "--checkpoint", default=None, help=".pt or .safetensors (default: shipped weights of the config, else random)"
    )
    p.add_argument("--out", type=Path, default=None, help="output file (encode: .npz; reconstruct: .png grid)")
    p.add_argument("--device", default="auto")
    p.add_argument("--views", type=int, default=150, help="views rendered to build the voxel features")
    p.add_argument("--eval-views", type=int, default=8, help="reconstruct: views compared with the splatted Gaussians")
    p.add_argument(
        "--gs-config", default=None, help="Gaussian decoder YAML (default: atoken/configs/3d_decode_gs.yaml)"
    )
    p.add_argument("--gs-checkpoint", default=None, help="Gaussian decoder weights (3d_decode_gs.pt); default random")
    return p


def _add_actions(sub) -> None:
    for action, text in (
        ("encode", "mesh -> voxel features -> tokens (.npz)"),
        ("reconstruct", "tokens -> decoded voxels -> Gaussians; PSNR vs mesh renders, PNG grid"),
    ):
        add_mesh_arguments(sub.add_parser(action, help=text, description=text))


def add_mesh_commands(subparsers) -> argparse.ArgumentParser:
    """Registers `mesh encode|reconstruct MESH [options]` on an argparse subparsers object.

    The parsed namespace gets `fn` (as in `pipeline/cli.py`): `args.fn(args)` runs it and returns the exit code.
    """
    m = subparsers.add_parser(
        "mesh",
        help="3D mesh -> AToken 3D tokens (encode) or Gaussian reconstruction",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_actions(m.add_subparsers(dest="command", required=True, metavar="{encode,reconstruct}"))
    m.set_defaults(fn=cmd_mesh)
    return m


def cmd_mesh(args) -> int:
    """Runs a parsed `encode|reconstruct` namespace; errors become one `error: ...` line and exit code 2."""
    try:
        if not args.file.is_file():
            raise FileNotFoundError(f"input not found: {args.file}")
        return run_mesh(args)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_mesh(args) -> int:
    import torch

    from atoken.metrics import psnr
    from atoken.sparse import voxels_to_tokens
    from atoken.tokenizer import Tokenizer

    from .cameras import sphere_cameras
    from .load import load_mesh
    from .normalize import normalize
    from .render import RenderConfig as MeshRenderConfig
    from .render import Renderer
    from .load import MeshError
    from .stage import MeshConfig, MeshStage

    cfg = MeshConfig(views=args.views)
    try:
        row = MeshStage(cfg).process(str(args.file), args.file.name)
    except MeshError as exc:
        raise ValueError(f"{args.file.name}: {exc}") from None
    feats, coords = voxels_to_tokens(row["voxel_feats"].astype(np.float32), row["voxel_coords"])
    print(
        f"input: {args.file.name} mesh -> {row['num_voxels']} active voxels of 64^3 ({args.views} views) "
        f"-> {len(coords)} tokens"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = Tokenizer.from_files(args.config, args.checkpoint, device=args.device)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"tokenizer: {tok.identity()['id']} ({'discrete' if tok.model.discrete else 'continuous'}, {tok.device})")
    enc, rec = (
        tok.reconstruct([(feats, coords)]) if args.command == "reconstruct" else (tok.encode([(feats, coords)]), None)
    )
    for k, v in enc[0].items():
        print(f"  {k}: {'None' if v is None else f'{tuple(v.shape)} {v.dtype}'}")
    if args.command == "encode":
        out = args.out or Path(args.file.stem + ".tokens.npz")
        np.savez(out, **{k: v for k, v in enc[0].items() if v is not None})
        print(f"wrote {out}")
        return 0

    # decoded voxel features (first 768 channels, in [-1, 1]) -> Gaussians -> the same views as the mesh renders
    from atoken import splat
    from atoken.gs_decoder import CONFIG_PATH, GaussianDecoder

    if args.gs_checkpoint is None:
        print(
            "warning: no --gs-checkpoint: the Gaussian decoder has random weights (PSNR is meaningless)",
            file=sys.stderr,
        )
    gs = GaussianDecoder.from_files(args.gs_config or CONFIG_PATH, args.gs_checkpoint, device=tok.device)
    vox = torch.from_numpy(rec[0][:, :768]).float().to(tok.device)
    gcoords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords[:, 1:].int()], 1).to(tok.device)
    with torch.inference_mode():
        gaussians = gs(vox, gcoords)[0]
    mesh, _ = normalize(load_mesh(args.file))
    cams = sphere_cameras(args.eval_views, args.file.name + "/eval", cfg.radius, cfg.fov_deg)
    ref = Renderer(MeshRenderConfig(resolution=256, device="cpu")).render(mesh, cams).rgb.float().cpu()
    scores, grid = [], []
    for i in range(len(cams)):
        cam = splat.Camera(
            torch.from_numpy(cams.w2c[i]).float().to(tok.device),
            torch.from_numpy(cams.intrinsics[i]).float().to(tok.device),
        )
        img = splat.render(gaussians, cam, splat.RenderConfig(resolution=256)).image.float().clamp(0, 1).cpu()
        scores.append(psnr(ref[i], img))
        grid.append(np.concatenate([ref[i].numpy(), img.numpy()], axis=0))
    print(
        f"PSNR over {len(cams)} views (Gaussian splats vs mesh renders): {np.mean(scores):.2f} dB "
        f"(per view: {json.dumps([round(s, 2) for s in scores])})"
    )
    from PIL import Image

    out = args.out or Path(args.file.stem + ".rec.png")
    Image.fromarray((np.concatenate(grid, axis=1) * 255).round().astype(np.uint8)).save(out)
    print(f"wrote {out} (top: mesh renders, bottom: decoded Gaussians)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.mesh.cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_actions(p.add_subparsers(dest="command", required=True, metavar="{encode,reconstruct}"))
    return cmd_mesh(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
