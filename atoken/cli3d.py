"""`python -m atoken encode|reconstruct MESH`: mesh -> multi-view voxel features -> 3D tokens, and for reconstruct
-> decoded voxels -> Gaussian decoder -> splatted views, with PSNR against the mesh's own renders.

The mesh side (load, normalise, cameras, render, voxelise) is the pipeline's 3D stage, imported lazily: the
tokenizer package itself does not depend on the pipeline.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch


def run_3d(args) -> int:
    from pipeline.mesh.cameras import sphere_cameras
    from pipeline.mesh.load import load_mesh
    from pipeline.mesh.normalize import normalize
    from pipeline.mesh.render import RenderConfig as MeshRenderConfig
    from pipeline.mesh.render import Renderer
    from pipeline.mesh.stage import MeshConfig, mesh_to_voxels
    from pipeline.rows import new_row

    from .metrics import psnr
    from .sparse import voxels_to_tokens
    from .tokenizer import Tokenizer

    cfg = MeshConfig(views=args.views)
    row = mesh_to_voxels({**new_row(args.file.name, "3d", "cli", uri=str(args.file)), "path": str(args.file)}, cfg)
    if row["status"] != "ok":
        raise ValueError(f"{args.file.name}: {row['error']}")
    feats, coords = voxels_to_tokens(row["voxel_feats"].astype(np.float32), row["voxel_coords"])
    print(f"input: {args.file.name} mesh -> {row['num_voxels']} active voxels of 64^3 ({args.views} views) "
          f"-> {len(coords)} tokens")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = Tokenizer.from_files(args.config, args.checkpoint, device=args.device)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"tokenizer: {tok.identity()['id']} ({'discrete' if tok.model.discrete else 'continuous'}, {tok.device})")
    enc, rec = tok.reconstruct([(feats, coords)]) if args.command == "reconstruct" else (tok.encode([(feats, coords)]), None)
    for k, v in enc[0].items():
        print(f"  {k}: {'None' if v is None else f'{tuple(v.shape)} {v.dtype}'}")
    if args.command == "encode":
        out = args.out or Path(args.file.stem + ".tokens.npz")
        np.savez(out, **{k: v for k, v in enc[0].items() if v is not None})
        print(f"wrote {out}")
        return 0

    # decoded voxel features (first 768 channels, in [-1, 1]) -> Gaussians -> the same views as the mesh renders
    from . import splat
    from .gs_decoder import CONFIG_PATH, GaussianDecoder

    if args.gs_checkpoint is None:
        print("warning: no --gs-checkpoint: the Gaussian decoder has random weights (PSNR is meaningless)",
              file=sys.stderr)
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
        cam = splat.Camera(torch.from_numpy(cams.w2c[i]).float().to(tok.device),
                           torch.from_numpy(cams.intrinsics[i]).float().to(tok.device))
        img = splat.render(gaussians, cam, splat.RenderConfig(resolution=256)).image.float().clamp(0, 1).cpu()
        scores.append(psnr(ref[i], img))
        grid.append(np.concatenate([ref[i].numpy(), img.numpy()], axis=0))
    print(f"PSNR over {len(cams)} views (Gaussian splats vs mesh renders): {np.mean(scores):.2f} dB "
          f"(per view: {json.dumps([round(s, 2) for s in scores])})")
    from PIL import Image

    out = args.out or Path(args.file.stem + ".rec.png")
    Image.fromarray((np.concatenate(grid, axis=1) * 255).round().astype(np.uint8)).save(out)
    print(f"wrote {out} (top: mesh renders, bottom: decoded Gaussians)")
    return 0
