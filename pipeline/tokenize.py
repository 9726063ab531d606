"""Tokenize stage: prepared pixels or voxel features -> tokens, with the job's tokenizer backend
(`pipeline/tokenizers/`, AToken by default). One model per worker: a GPU actor with `1 / actors_per_gpu` of a
GPU, or a CPU actor. Rows with a pending resize (`resize_to`: videos that upscale, decoded at native size) are
resized by the backend on the model's device before patching; the shard's width/height are the resized ones.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator

from pipeline.config import Config
from pipeline.rows import Row, Tokenized, fail
from pipeline.stage import Resources, Stage

CONSUMED = ("pixels", "resize_to", "voxel_feats", "voxel_coords", "render")


class TokenizeConfig(Config):
    IDENTITY = ("logvar",)  # the model itself is the tokenizer identity

    backend: str = "atoken"  # module pipeline/tokenizers/<backend>.py
    config: str = "tiny-c"  # named config or path to a YAML (official layout accepted)
    checkpoint: str | None = None  # .pt / .safetensors; None = the shipped tiny weights or seeded random
    device: Literal["auto", "cuda", "cpu"] = "auto"
    batch_tokens: int = Field(16384, ge=16)  # token budget per forward pass
    batch_rows: int = Field(32, ge=1)  # rows handed to one call
    actors: int = Field(1, ge=1)  # actor pool size when the cluster has no GPU
    actors_per_gpu: int = Field(2, ge=1)  # >1 overlaps one actor's CPU work with another's GPU work
    logvar: bool = False  # also store the posterior log-variance
    weights_licence: str | None = None  # the weights' licence, when it is not known (pipeline/licences.py)
    kv_cache_size: int = Field(0, ge=0)  # decoder KV cache (raw frames), used by the QA decode
    attention: Literal["auto", "cudnn", "flash", "efficient", "math", "flash-attn"] = "auto"  # auto: timed on CUDA
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the encoder blocks; auto = on CUDA

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        import importlib.util

        if not v.isidentifier() or importlib.util.find_spec(f"pipeline.tokenizers.{v}") is None:
            raise ValueError(f"no tokenizer backend module pipeline/tokenizers/{v}.py")
        return v


class Tokenize(Stage):
    name = "tokenize"
    reads = ("modality", "pixels", "resize_to", "voxel_feats", "voxel_coords", "render", "meta")
    adds = (
        "width",
        "height",
        "num_frames",
        "coords",
        "latent",
        "logvar",
        "fsq_indices",
        "pooled",
        "tokenizer",
        "preprocess",
    )

    def __init__(self, cfg: TokenizeConfig, preprocess: str, gpus: float = 0.0):
        self.cfg, self.preprocess, self.gpus = cfg, preprocess, gpus
        self.batch_size = cfg.batch_rows
        self.model = None

    def resources(self) -> Resources:
        return Resources(cpus=1.0, gpus=self.gpus)

    def setup(self) -> None:
        from pipeline.tokenizers import backend

        mod = backend(self.cfg.backend)
        device = "cuda" if self.gpus > 0 else ("cpu" if self.cfg.device == "auto" else self.cfg.device)
        self.model = mod.Model(self.cfg, device)
        self.identity = mod.identity(self.cfg)
        from pipeline.licences import weights_licence

        self.weights_licence = weights_licence(self.identity, self.cfg.weights_licence)

    def process_batch(self, rows: list[Row]) -> list[Tokenized]:
        out: list[Row | None] = [None] * len(rows)
        work = []
        for i, row in enumerate(rows):
            try:
                work.append((i, self.model.pack(row)))
            except Exception as e:  # bad pixels / voxels: recorded, never raised
                out[i] = fail(row, self.name, f"cannot pack tokens: {e}")
        if work:  # one call; the backend packs it into forward passes of at most batch_tokens tokens
            encoded = self.model.encode([tok for _, tok in work])
            for (i, _), enc in zip(work, encoded):
                out[i] = self._finish(rows[i], enc)
        return out

    def _finish(self, row: Row, enc: dict) -> Tokenized:
        out = {k: v for k, v in row.items() if k not in CONSUMED}
        if row["modality"] != "3d":
            t, h, w = pixel_shape(row)
            out.update(width=w, height=h, num_frames=t)
        if row.get("render"):  # 3D render settings travel in the shard's `meta` JSON
            out["meta"] = json.dumps({**json.loads(row.get("meta") or "{}"), "render": json.loads(row["render"])})
        out.update(
            enc, tokenizer=self.identity["id"], tokenizer_licence=self.weights_licence, preprocess=self.preprocess
        )
        return out


def pixel_shape(row: Row) -> tuple[int, int, int]:
    """(frames, height, width) the tokenizer sees: the pending resize's size where there is one."""
    t, h, w = row["pixels"].shape[:3]
    if row.get("resize_to"):
        h, w = (int(s) for s in row["resize_to"])
    return t, h, w
