"""Reconstruction check: decode a sample of the cached tokens back and compare with the decoded inputs.

Inputs are re-read through the same fetch + decode stages (the fetch cache makes that free), tokens come from the
written shards (fp16 latents, or FSQ indices for discrete tokenizers), so the check covers the whole chain:
a swapped channel, a wrong patch layout or a misplaced crop shows up as a bad PSNR.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from atoken.metrics import psnr, ssim
from pipeline.rows import is_ok


def _descriptor(rec: dict) -> dict:
    span = None if rec.get("span_start") is None else [rec["span_start"], rec["span_end"]]
    return {"id": rec["id"], "modality": rec["modality"], "source": rec["source"], "uri": rec["uri"],
            "caption": rec.get("caption"), "span": span, "status": "ok", "stage": "source", "error": None}


def reconstruct_record(tok, rec: dict, job) -> tuple[np.ndarray, np.ndarray] | None:
    """(input, reconstruction) as float arrays in [0, 1]: [T, H, W, 3] for image/video, [M, 768] for 3D."""
    from atoken.sparse import tokens_to_video
    from pipeline.fetch import fetch_row

    row = fetch_row(_descriptor(rec), job.fetch)
    if rec["modality"] == "3d":
        from pipeline.mesh.stage import mesh_to_voxels
        row = mesh_to_voxels(row, job.mesh)
    else:
        from pipeline.decode import decode_row
        row = decode_row(row, job.decode)
    if not is_ok(row):
        return None
    coords = np.asarray(rec["coords"], np.int64)
    if rec.get("fsq_indices") is not None:
        feats = tok.decode_indices([(np.asarray(rec["fsq_indices"], np.int64), coords)],
                                   kv_cache_size=job.tokenize.kv_cache_size)[0]
    else:
        feats = tok.decode([(np.asarray(rec["latent"], np.float32), coords)],
                           kv_cache_size=job.tokenize.kv_cache_size)[0]
    feats = torch.from_numpy(feats)
    if rec["modality"] == "3d":
        ref = np.asarray(row["voxel_feats"], np.float32)
        return ref, ((feats[:, :ref.shape[1]].numpy() + 1) / 2).clip(0, 1)
    rec_frames = ((tokens_to_video(feats, torch.as_tensor(coords)).numpy() + 1) / 2).clip(0, 1)
    ref = row["pixels"].astype(np.float32) / 255.0
    t = min(len(ref), len(rec_frames)) if rec["modality"] == "video" else 1
    h, w = rec_frames.shape[1:3]
    top, left = (ref.shape[1] - h) // 2, (ref.shape[2] - w) // 2  # the tokenizer's centre crop
    return ref[:t, top:top + h, left:left + w], rec_frames[:t]


def run_qa(store, job) -> dict:
    """PSNR/SSIM per modality over the first `job.qa.samples` ids of each modality; writes qa.json and grids."""
    import pyarrow.parquet as pq

    from atoken.tokenizer import Tokenizer

    tok = Tokenizer.from_files(job.tokenize.config, job.tokenize.checkpoint, device=job.tokenize.device)
    results, qa_dir = {}, store.dir / "qa"
    qa_dir.mkdir(exist_ok=True)
    for modality in sorted({s["modality"] for s in store.state.shards}):
        files = sorted((store.dir / "data" / modality).glob("*.parquet"))
        recs = []
        for f in files:
            recs += pq.read_table(f).slice(0, job.qa.samples - len(recs)).to_pylist()
            if len(recs) >= job.qa.samples:
                break
        scores, pairs = {"psnr": [], "ssim": []}, []
        for rec in recs:
            got = reconstruct_record(tok, rec, job)
            if got is None:
                continue
            ref, out = got
            scores["psnr"].append(psnr(torch.from_numpy(ref), torch.from_numpy(out)))
            if modality != "3d":
                scores["ssim"].append(ssim(torch.from_numpy(ref), torch.from_numpy(out)))
                pairs.append((ref[0], out[0]))
        results[modality] = {"n": len(scores["psnr"]),
                             **{k: float(np.mean(v)) for k, v in scores.items() if v}}
        if job.qa.grid and pairs:
            write_grid(pairs, qa_dir / f"{modality}.png")
    (qa_dir / "qa.json").write_text(json.dumps(results, indent=2))
    return results


def write_grid(pairs: list[tuple[np.ndarray, np.ndarray]], path: Path, cell: int = 192) -> None:
    """Inputs on the top row, reconstructions below, one column per sample."""
    from PIL import Image

    canvas = Image.new("RGB", (cell * len(pairs), cell * 2), (0, 0, 0))
    for i, (ref, out) in enumerate(pairs):
        for j, img in enumerate((ref, out)):
            im = Image.fromarray((img * 255).round().astype(np.uint8))
            im.thumbnail((cell, cell))
            canvas.paste(im, (i * cell, j * cell))
    canvas.save(path)
