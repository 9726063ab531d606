"""Tokenizer backends: one module per tokenizer family (`pipeline/tokenizers/<backend>.py`), chosen by the job's
`tokenize.backend`. A backend module provides:

    identity(cfg: TokenizeConfig) -> dict       # without building the model: `id` (names the store version),
                                                # `dims` (latent, fsq_groups, embed: the shard's list widths), ...
    class Model:
        def __init__(self, cfg: TokenizeConfig, device: str) -> None
        def pack(self, row: Row) -> Any         # one prepared row (pixels / voxel features) -> model input;
                                                # raises for a bad row (that row fails, the batch goes on)
        def encode(self, packed: list) -> list[dict]
            # -> per row: coords int16 [n, 4], latent fp16 [n, C], logvar fp16 | None,
            #    fsq_indices int16 | None, pooled fp16 [D]
        def reconstruct(self, record: dict, prepared: Row) -> tuple[np.ndarray, np.ndarray]
            # QA: a stored shard row -> (input, reconstruction) in [0, 1], in the same layout

A new tokenizer is one new module here; the shard schema takes its widths from `identity()["dims"]`.
"""

from __future__ import annotations

import importlib
import re

from pipeline.config import ConfigError


def backend(name: str):
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
        raise ConfigError(f"tokenize.backend: got {name!r}; expected a module name under pipeline/tokenizers")
    try:
        return importlib.import_module(f"pipeline.tokenizers.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"pipeline.tokenizers.{name}":
            raise
        raise ConfigError(f"tokenize.backend: got {name!r}; no module pipeline/tokenizers/{name}.py") from None
