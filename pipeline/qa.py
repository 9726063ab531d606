"""Reconstruction check: decode a sample of the cached tokens back and compare with the decoded inputs.

Inputs are fetched and decoded again by the same prepare stage, with the settings recorded in the store's
`preprocess.json` (never the job's current ones); tokens come from the committed shards (fp16 latents, or FSQ
indices for discrete tokenizers). So the check covers the whole chain: a swapped channel, a wrong patch layout or
a misplaced crop shows up as a bad PSNR. The pictures and the page a person looks at are drawn by
`pipeline/qa_pictures.py` (3D views: `pipeline/qa_3d.py`) and written beside qa.json in the store's qa/ folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import torch

from atoken.metrics import psnr, ssim
from pipeline.qa_pictures import SampleScore, grid, image_card, index_html, png_bytes, video_card, views_card
from pipeline.rows import describe, is_ok, new_row
from pipeline.store import DamagedFile, read_parquet, sha256_of


def recorded_configs(store, job):
    """The job's decode and mesh configs with the token-changing settings replaced by the recorded ones."""
    settings = store.read_json("preprocess.json").get("settings", {})
    decode = job.decode.model_validate({**job.decode.model_dump(), **settings.get("decode", {})})
    mesh = job.mesh.model_validate({**job.mesh.model_dump(), **settings.get("mesh", {})})
    return decode, mesh


def prepare_record(rec: dict, prepare) -> dict:
    """The shard row's input, fetched and decoded again (the tokenized window, when a clip had several)."""
    start, end = rec.get("span_start"), rec.get("span_end")
    if rec.get("window_start") is not None:  # the window that was tokenized (one of several, with windows: all)
        start, end = rec["window_start"], rec["window_end"]
    row = new_row(rec["id"], rec["modality"], rec["source"], uri=rec["uri"], span_start=start, span_end=end)
    return prepare([row])[0]


def shard_records(store, modality: str, limit: int, damaged: list) -> list[dict]:
    """The first `limit` rows of a modality's committed shards; a damaged shard is noted in `damaged`, not read."""
    recs = []
    for path in sorted(p for p, s in store.shards.items() if s.modality == modality):
        try:  # never an unverified shard: its bytes match the commit record, and its page checksums
            if sha256_of(store.storage, path) != store.shards[path].sha256:
                raise DamagedFile(f"{store.storage.uri(path)}: sha256 differs from the commit record")
            recs += read_parquet(store.storage, path).slice(0, limit - len(recs)).to_pylist()
        except OSError as exc:
            damaged.append(f"{exc}")
            continue
        if len(recs) >= limit:
            break
    return recs


def sample_card(score: SampleScore, rec: dict, row: dict, ref: np.ndarray, out: np.ndarray, views3d):
    """The sample's labelled picture (pipeline/qa_pictures.py)."""
    if score.modality == "image":
        return image_card(score, ref, out)
    if score.modality == "video":
        return video_card(score, ref, out)
    out_coords = np.asarray(rec["coords"], np.int64)[:, 1:]  # (1, x, y, z) tokens -> (x, y, z)
    rows = views3d.rows(rec["id"], row["mesh"], (row["voxel_coords"], ref), (out_coords, out))
    return views_card(score, rows)


def run_qa(store, job) -> dict:
    """PSNR/SSIM per modality over the first `job.qa.samples` rows of each modality. Writes qa/qa.json and, with
    `qa.grid`, a labelled card per sample (qa/samples/), a grid per modality (qa/<modality>.png) and
    qa/index.html, which shows them all with their numbers; all through the store's storage (local or S3)."""
    from pipeline.prepare import Prepare
    from pipeline.qa_3d import ThreeDViews
    from pipeline.tokenizers import backend

    decode, mesh = recorded_configs(store, job)
    model = backend(job.tokenize.backend).Model(job.tokenize, job.tokenize.device)
    results, damaged, samples, grids = {}, [], [], {}
    for modality in sorted({s.modality for s in store.shards.values()}):
        recs = shard_records(store, modality, job.qa.samples, damaged)
        is3d = modality == "3d"
        prepare = Prepare(
            job.fetch, decode, mesh, job.storage, "3d" if is3d else "media", keep_mesh=is3d and job.qa.grid
        )
        views3d = (
            ThreeDViews(mesh, gs_config=job.qa.gs_config, gs_checkpoint=job.qa.gs_checkpoint)
            if is3d and job.qa.grid
            else None
        )
        scores, cards = {"psnr": [], "ssim": []}, []
        try:
            for k, rec in enumerate(recs):
                score = SampleScore(rec["id"], modality)
                samples.append(score)
                row = prepare_record(rec, prepare)
                if not is_ok(row):  # listed in the index with its reason, not left out
                    score.error = f"{row['stage']}: {row['reason']}"
                    continue
                ref, out = model.reconstruct(rec, row)
                score.psnr = psnr(torch.from_numpy(ref), torch.from_numpy(out))
                scores["psnr"].append(score.psnr)
                if not is3d:
                    score.ssim = ssim(torch.from_numpy(ref), torch.from_numpy(out))
                    scores["ssim"].append(score.ssim)
                if job.qa.grid:
                    try:  # a picture that cannot be drawn is noted on the page; the numbers stand
                        cards.append(sample_card(score, rec, row, ref, out, views3d))
                    except Exception as exc:  # noqa: BLE001 - e.g. out of memory while rendering
                        score.error = f"picture: {describe(exc)}"
                        continue
                    score.picture = f"samples/{modality}-{k:02d}.png"
                    store.storage.write_bytes(f"qa/{score.picture}", png_bytes(cards[-1]))
        finally:
            prepare.teardown()
        results[modality] = {"n": len(scores["psnr"]), **{k: float(np.mean(v)) for k, v in scores.items() if v}}
        if cards:
            grids[modality] = f"{modality}.png"
            store.storage.write_bytes(f"qa/{grids[modality]}", png_bytes(grid(cards, across=modality == "image")))
    page = index_html(results, samples, grids, f"{store.uri} (tokenizer {job.tokenize.config})")
    store.storage.write_bytes("qa/index.html", page.encode())
    if damaged:  # reported, not read: `verify --repair` un-commits them
        results["damaged_shards"] = damaged
    store.storage.write_bytes(
        "qa/qa.json", json.dumps({**results, "samples": [asdict(s) for s in samples]}, indent=2).encode()
    )
    return {**results, "page": store.storage.uri("qa/index.html")}
