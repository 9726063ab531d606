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
import torch

from atoken.metrics import psnr, ssim
from pipeline.rows import is_ok, new_row
from pipeline.store import DamagedFile, read_parquet, sha256_of


def recorded_configs(store, job):
    """The job's decode and mesh configs with the token-changing settings replaced by the recorded ones."""
    settings = store.read_json("preprocess.json").get("settings", {})
    decode = job.decode.model_validate({**job.decode.model_dump(), **settings.get("decode", {})})
    mesh = job.mesh.model_validate({**job.mesh.model_dump(), **settings.get("mesh", {})})
    return decode, mesh


def reconstruct_record(model, rec: dict, prepare):
    """(input, reconstruction) as float arrays in [0, 1]: [T, H, W, 3] for image/video, [M, 768] for 3D."""
    start, end = rec.get("span_start"), rec.get("span_end")
    if rec.get("window_start") is not None:  # the window that was tokenized (one of several, with windows: all)
        start, end = rec["window_start"], rec["window_end"]
    row = new_row(rec["id"], rec["modality"], rec["source"], uri=rec["uri"], span_start=start, span_end=end)
    row = prepare([row])[0]
    return model.reconstruct(rec, row) if is_ok(row) else None


def run_qa(store, job) -> dict:
    """PSNR/SSIM per modality over the first `job.qa.samples` rows of each modality; writes qa.json and grids."""
    from pipeline.prepare import Prepare
    from pipeline.tokenizers import backend

    decode, mesh = recorded_configs(store, job)
    model = backend(job.tokenize.backend).Model(job.tokenize, job.tokenize.device)
    results, damaged = {}, []
    for modality in sorted({s.modality for s in store.shards.values()}):
        recs = []
        for path in sorted(p for p, s in store.shards.items() if s.modality == modality):
            try:  # never an unverified shard: its bytes match the commit record, and its page checksums
                if sha256_of(store.storage, path) != store.shards[path].sha256:
                    raise DamagedFile(f"{store.storage.uri(path)}: sha256 differs from the commit record")
                recs += read_parquet(store.storage, path).slice(0, job.qa.samples - len(recs)).to_pylist()
            except OSError as exc:
                damaged.append(f"{exc}")
                continue
            if len(recs) >= job.qa.samples:
                break
        prepare = Prepare(job.fetch, decode, mesh, job.storage, "3d" if modality == "3d" else "media")
        scores, pairs = {"psnr": [], "ssim": []}, []
        try:
            for rec in recs:
                got = reconstruct_record(model, rec, prepare)
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
    if damaged:  # reported, not read: `verify --repair` un-commits them
        results["damaged_shards"] = damaged
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
