"""Tokenize stage: decoded pixels or voxel features -> AToken tokens, packed into batches by a token budget."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pipeline.rows import fail, is_ok


@dataclass
class TokenizeConfig:
    config: str = "tiny-c"          # named config or path to a YAML (official layout accepted)
    checkpoint: str | None = None     # .pt / .safetensors; None = the shipped tiny weights or seeded random
    device: str = "auto"              # auto | cuda | cpu
    batch_tokens: int = 16384         # token budget per forward pass
    batch_rows: int = 32              # rows handed to one actor call
    actors: int = 1                   # actor pool size when the cluster has no GPU
    actors_per_gpu: int = 2           # >1 overlaps one actor's CPU work with another's GPU work
    logvar: bool = False              # also store the posterior log-variance
    kv_cache_size: int = 0            # decoder KV cache (raw frames), used by the QA decode


def sample_tokens(row: dict, device="cpu"):
    """The (feats, coords4) token pair of a decoded row, per the tokenizer's packing rules. uint8 pixels go to
    `device` first, so the float conversion and patchify run there (on GPU: no CPU work per pixel)."""
    import torch

    from atoken.sparse import image_to_tokens, video_to_tokens, voxels_to_tokens

    if row["modality"] == "3d":
        return voxels_to_tokens(row["voxel_feats"].astype(np.float32), row["voxel_coords"])
    pixels = torch.from_numpy(np.ascontiguousarray(row["pixels"])).to(device)
    if row["modality"] == "image":
        return image_to_tokens(pixels[0])
    return video_to_tokens(pixels)


class Tokenize:
    """Holds one model; call it on a list of rows. The Ray actor wraps exactly this."""

    def __init__(self, cfg: TokenizeConfig):
        from atoken.tokenizer import Tokenizer

        self.cfg = cfg
        self.tokenizer = Tokenizer.from_files(cfg.config, cfg.checkpoint, device=cfg.device, max_tokens=cfg.batch_tokens)
        self.identity = self.tokenizer.identity()

    def __call__(self, rows: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(rows)
        work = []
        for i, row in enumerate(rows):
            if not is_ok(row):
                out[i] = row
                continue
            try:
                work.append((i, sample_tokens(row, self.tokenizer.device)))
            except Exception as e:  # bad pixels / voxels: recorded, never raised
                out[i] = fail(row, "tokenize", f"cannot pack tokens: {e}")
        if work:  # one call; the tokenizer packs it into forward passes of at most batch_tokens tokens
            for (i, _), enc in zip(work, self._encode([tok for _, tok in work], [rows[i] for i, _ in work])):
                out[i] = enc
        return out

    def _encode(self, samples: list, rows: list[dict]) -> list[dict]:
        try:
            encoded = self.tokenizer.encode(samples, with_logvar=self.cfg.logvar)
        except Exception as e:
            if len(samples) == 1:
                return [fail(rows[0], "tokenize", f"{type(e).__name__}: {e}")]
            # isolate the bad sample: retry one by one so the good ones in the batch are kept
            return [r for s, row in zip(samples, rows) for r in self._encode([s], [row])]
        return [self._finish(row, enc) for row, enc in zip(rows, encoded)]

    def _finish(self, row: dict, enc: dict) -> dict:
        out = {k: v for k, v in row.items() if k not in ("pixels", "voxel_feats", "voxel_coords", "path")}
        if row["modality"] != "3d":
            t, h, w, _ = row["pixels"].shape
            out.update(width=w, height=h, num_frames=t)
            if row.get("orig_size"):
                out.update(orig_height=int(row["orig_size"][0]), orig_width=int(row["orig_size"][1]))
        if out.get("render"):  # 3D render settings travel in the shard's `meta` JSON
            out["meta"] = json.dumps({**json.loads(row.get("meta") or "{}"), "render": json.loads(out.pop("render"))})
        out.update(enc)
        out["tokenizer"] = self.identity["id"]
        return out
