"""Reconstruction check: decode a sample of the cached tokens back and compare with the decoded inputs.

Inputs are fetched and decoded again by the same prepare stage, with the settings recorded in the store's
`preprocess.json` (never the job's current ones); tokens come from the committed shards (fp16 latents, or FSQ
indices for discrete tokenizers). So the check covers the whole chain: a swapped channel, a wrong patch layout or
a misplaced crop shows up as a bad PSNR.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import torch

from atoken.metrics import psnr, ssim
from pipeline.rows import is_ok, new_row


def recorded_configs(store, job):
    """The job's decode and mesh configs with the token-changing settings replaced by the recorded ones."""
    settings = store.read_json("preprocess.json").get("settings", {})
    decode = job.decode.model_validate({**job.decode.model_dump(), **settings.get("decode", {})})
    mesh = job.mesh.model_validate({**job.mesh.model_dump(), **settings.get("mesh", {})})
    return decode, mesh


def reconstruct_record(tok, rec: dict, prepare, kv_cache_size: int = 0):
    """(input, reconstruction) as float arrays in [0, 1]: [T, H, W, 3] for image/video, [M, 768] for 3D."""
    from atoken.sparse import tokens_to_video

    row = new_row(rec["id"], rec["modality"], rec["source"], uri=rec["uri"], span_start=rec.get("span_start"),
                  span_end=rec.get("span_end"))
    row = prepare([row])[0]
    if not is_ok(row):
        return None
    coords = np.asarray(rec["coords"], np.int64)
    if rec.get("fsq_indices") is not None:
        feats = tok.decode_indices([(np.asarray(rec["fsq_indices"], np.int64), coords)], kv_cache_size=kv_cache_size)[0]
    else:
        feats = tok.decode([(np.asarray(rec["latent"], np.float32), coords)], kv_cache_size=kv_cache_size)[0]
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
    """PSNR/SSIM per modality over the first `job.qa.samples` rows of each modality; writes qa.json and grids."""
    from atoken.tokenizer import Tokenizer
    from pipeline.prepare import Prepare

    decode, mesh = recorded_configs(store, job)
    tok = Tokenizer.from_files(job.tokenize.config, job.tokenize.checkpoint, device=job.tokenize.device)
    results = {}
    for modality in sorted({s.modality for s in store.shards.values()}):
        recs = []
        for path in sorted(p for p, s in store.shards.items() if s.modality == modality):
            with store.storage.open_input(path) as f:
                recs += pq.read_table(f).slice(0, job.qa.samples - len(recs)).to_pylist()
            if len(recs) >= job.qa.samples:
                break
        prepare = Prepare(job.fetch, decode, mesh, job.storage, "3d" if modality == "3d" else "media")
        scores, pairs = {"psnr": [], "ssim": []}, []
        try:
            for rec in recs:
                got = reconstruct_record(tok, rec, prepare, job.tokenize.kv_cache_size)
                if got is None:
                    continue
                ref, out = got
                scores["psnr"].append(psnr(torch.from_numpy(ref), torch.from_numpy(out)))
                if modality != "3d":
                    scores["ssim"].append(ssim(torch.from_numpy(ref), torch.from_numpy(out)))
                    pairs.append((ref[0], out[0]))
        finally:
            prepare.teardown()
        results[modality] = {"n": len(scores["psnr"]), **{k: float(np.mean(v)) for k, v in scores.items() if v}}
        if job.qa.grid and pairs:
            store.storage.write_bytes(f"qa/{modality}.png", grid_png(pairs))
    store.storage.write_bytes("qa/qa.json", json.dumps(results, indent=2).encode())
    return results


def grid_png(pairs: list[tuple[np.ndarray, np.ndarray]], cell: int = 192) -> bytes:
    """Inputs on the top row, reconstructions below, one column per sample."""
    from PIL import Image

    canvas = Image.new("RGB", (cell * len(pairs), cell * 2), (0, 0, 0))
    for i, (ref, out) in enumerate(pairs):
        for j, img in enumerate((ref, out)):
            im = Image.fromarray((img * 255).round().astype(np.uint8))
            im.thumbnail((cell, cell))
            canvas.paste(im, (i * cell, j * cell))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
