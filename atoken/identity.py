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
SIDECAR_MIN_BYTES = 64 << 20  # checkpoints at least this large get their hash remembered beside them


def resolve_config(config: str | Path | ATokenConfig) -> ATokenConfig:
    return config if isinstance(config, ATokenConfig) else ATokenConfig.load(config)


def shipped_checkpoint(cfg: ATokenConfig) -> Path | None:
    """The checkpoint shipped in atoken/weights/ for this config name, if present."""
    name = SHIPPED.get(ALIASES.get(cfg.name, cfg.name))
    path = WEIGHTS_DIR / name if name else None
    return path if path is not None and path.is_file() else None


def sidecar(path: Path) -> Path:
    """Where a checkpoint's hash is remembered: `<file>.sha256.json`, with the size and mtime it was taken at."""
    return path.with_name(path.name + ".sha256.json")


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, remembered beside it (a multi-GB checkpoint takes seconds to hash, on every run);
    the sidecar counts only while the file keeps the size and mtime it records."""
    side = sidecar(Path(path))
    stamp = {"size": size, "mtime_ns": mtime_ns}
    try:
        rec = json.loads(side.read_text())
        if {k: rec.get(k) for k in stamp} == stamp and len(str(rec.get("sha256", ""))) == 64:
            return rec["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if size >= SIDECAR_MIN_BYTES:  # small files hash faster than a sidecar is worth
        tmp = side.with_name(side.name + ".tmp")
        try:
            tmp.write_text(json.dumps({**stamp, "sha256": digest}))
            tmp.replace(side)
        except OSError:  # a read-only checkpoint folder: hash again next time
            tmp.unlink(missing_ok=True)
    return digest


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
