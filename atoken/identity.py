"""A tokenizer's identity (config + weights) without building the model: no torch, so a caller that only needs
to know which store version a job writes (a no-op rerun, `status`) never loads it."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from .config import ALIASES, ATokenConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED = {"tiny-c": "tiny-c.safetensors", "tiny-d": "tiny-d.safetensors"}  # config name -> shipped weights file
RANDOM_SEED = 0  # weights of a model built without a checkpoint


def resolve_config(config: str | Path | ATokenConfig) -> ATokenConfig:
    return config if isinstance(config, ATokenConfig) else ATokenConfig.load(config)


def shipped_checkpoint(cfg: ATokenConfig) -> Path | None:
    """The checkpoint shipped in atoken/weights/ for this config name, if present."""
    name = SHIPPED.get(ALIASES.get(cfg.name, cfg.name))
    path = WEIGHTS_DIR / name if name else None
    return path if path is not None and path.is_file() else None


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_identity(config, checkpoint: str | Path | None = None) -> dict:
    """Stable identity of (config, weights) without building the model. checkpoint=None means the shipped weights
    of the config if present, else seeded random weights (same rule as Tokenizer.from_files)."""
    cfg = resolve_config(config)
    ckpt = Path(checkpoint) if checkpoint is not None else shipped_checkpoint(cfg)
    if ckpt is not None:
        if not ckpt.is_file():
            from .checkpoint import missing_checkpoint  # torch, but only on the way to an error

            raise FileNotFoundError(missing_checkpoint(ckpt))
        st = ckpt.stat()
        weights = _file_sha256(str(ckpt.resolve()), st.st_size, st.st_mtime_ns)
    else:
        weights = f"random-init-seed-{RANDOM_SEED}"
    arch = cfg.to_dict()
    arch.pop("name")
    digest = hashlib.sha256(json.dumps({"arch": arch, "weights": weights}, sort_keys=True).encode()).hexdigest()
    return {
        "id": f"{cfg.name}-{digest[:12]}",
        "config": cfg.name,
        "arch": arch,
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "weights_sha256": weights,
        "discrete": cfg.use_quantizer,
        "dims": {
            "latent": cfg.latent_channels,
            "fsq_groups": cfg.quantizer_num_codebooks,
            "embed": cfg.encoder_model_channels,
        },
    }
