"""Inference wrapper used by the pipeline: batched, packed encode/decode with numpy in and out."""

from __future__ import annotations

import itertools
import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .accel import accelerate
from .checkpoint import load_weights
from .identity import RANDOM_SEED, resolve_config, shipped_checkpoint, tokenizer_identity
from .model import AToken
from .sparse import SparseBatch, clip_tokens, clips_to_batch, patch_view, voxels_to_batch


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _chunks(sizes: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of sample indices whose token sum stays within max_tokens (an oversize sample alone)."""
    groups, cur, total = [], [], 0
    for i, n in enumerate(sizes):
        if cur and total + n > max_tokens:
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    return groups + [cur] if cur else groups


def _length_order(sizes: list[int]) -> list[int]:
    """Sample indices grouped by length (stable), so each forward pass holds as few distinct lengths as possible."""
    return sorted(range(len(sizes)), key=lambda i: sizes[i])


class Tokenizer:
    """AToken on a device: bf16 on GPU, fp32 on CPU (norms, RoPE, FSQ always fp32 inside their kernels).
    On CUDA the attention kernel is timed and picked, and the encoder blocks are compiled (`atoken.accel`);
    `attention` / `compile` override that."""

    def __init__(
        self,
        model: AToken,
        device="auto",
        dtype: torch.dtype | None = None,
        max_tokens: int = 65536,
        identity: dict | None = None,
        attention: str = "auto",
        compile: bool | None = None,
    ):
        self.device = pick_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.cfg = model.cfg
        self.max_tokens = max_tokens
        self._identity = identity
        self.accel = accelerate(self.model, self.device, self.dtype, attention, compile)
        if self.accel.compiled:
            self.accel.compile_s = self._warm_up()

    def _warm_up(self) -> float:
        """Compile now (seconds), on two small synthetic samples, rather than in the first real batch."""
        n = 4 * 16 * 16
        coords = torch.stack(torch.meshgrid(*(torch.arange(k) for k in (4, 16, 16, 1)), indexing="ij"), -1)
        coords = coords.reshape(n, 4)
        feats = torch.zeros(n, self.cfg.in_channels)
        t0 = time.perf_counter()
        self.encode([(feats, coords), (feats[:256], coords[:256])])
        return time.perf_counter() - t0

    @classmethod
    def from_files(
        cls, config="tiny-c", checkpoint: str | Path | None = None, device="auto", dtype=None, **kw
    ) -> "Tokenizer":
        """config: name or YAML path (official layout). checkpoint None: the shipped weights of the config if present,
        else seeded random weights (with a warning)."""
        cfg = resolve_config(config)
        ckpt = Path(checkpoint) if checkpoint is not None else shipped_checkpoint(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = AToken(cfg)
        if ckpt is not None:
            load_weights(model, ckpt, strict=True)
        else:
            warnings.warn(f"no checkpoint for config {cfg.name!r}: using random weights (seed {RANDOM_SEED})")
        return cls(model, device, dtype, identity=tokenizer_identity(cfg, ckpt), **kw)

    def identity(self) -> dict:
        if self._identity is None:  # built from a model object: hash its weights
            h = hashlib.sha256()
            for k, v in self.model.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().tobytes())
            arch = self.cfg.to_dict()
            arch.pop("name")
            digest = hashlib.sha256(
                json.dumps({"arch": arch, "weights": h.hexdigest()}, sort_keys=True).encode()
            ).hexdigest()
            self._identity = {
                "id": f"{self.cfg.name}-{digest[:12]}",
                "config": self.cfg.name,
                "arch": arch,
                "checkpoint": None,
                "weights_sha256": h.hexdigest(),
                "discrete": self.cfg.use_quantizer,
                "dims": {
                    "latent": self.cfg.latent_channels,
                    "fsq_groups": self.cfg.quantizer_num_codebooks,
                    "embed": self.cfg.encoder_model_channels,
                },
            }
        return self._identity

    @torch.inference_mode()
    def encode(self, samples: list, with_logvar: bool = True) -> list[dict]:
        """samples: list of (feats [n, 3072], coords [n, 4]). One packed forward per chunk of <= max_tokens tokens.
        Returns per sample: coords int16 [n,4], latent fp16 [n,48] (the posterior mean), logvar fp16 [n,48] (or
        None), fsq_indices int16 [n,8] (discrete configs, else None), pooled fp16 [D]."""
        out: list[dict | None] = [None] * len(samples)
        order = _length_order([len(s[1]) for s in samples])
        for chunk in _chunks([len(samples[i][1]) for i in order], self.max_tokens):
            group = [order[j] for j in chunk]
            batch = SparseBatch.pack([samples[i] for i in group], channels=self.cfg.in_channels)
            for i, enc in zip(group, self.encode_batch(batch.to(self.device, self.dtype), with_logvar)):
                out[i] = enc
        return out

    @torch.inference_mode()
    def encode_clips(self, clips: list[np.ndarray], with_logvar: bool = True) -> list[dict]:
        """clips: uint8 [T, H, W, 3] arrays (an image is T = 1), or uint8 tensors already on the device. Same output
        as encode() on their tokens, but clips of one shape travel to the device as one pinned uint8 copy and are
        patchified there in one go."""
        out: list[dict | None] = [None] * len(clips)
        for part, batch in self.clip_batches(clips):
            for i, enc in zip(part, self.encode_batch(batch, with_logvar)):
                out[i] = enc
        return out

    @torch.inference_mode()
    def encode_voxels(self, voxels: list, with_logvar: bool = True) -> list[dict]:
        """voxels: checked 3D samples (`sparse.check_voxels`: [M, 768] features as stored, fp16 in the pipeline).
        Same output as encode() on their voxels_to_tokens, in the same forward passes, but the features travel to
        the device compact (a quarter of the 3072-d tokens' bytes in fp32, one pinned copy per pass) and are
        widened there, with no 3072-d host tensor, concatenation or re-check."""
        out: list[dict | None] = [None] * len(voxels)
        order = _length_order([len(v) for v in voxels])
        for chunk in _chunks([len(voxels[i]) for i in order], self.max_tokens):
            group = [order[j] for j in chunk]
            batch = voxels_to_batch([voxels[i] for i in group], self.device, self.dtype, token_dim=self.cfg.in_channels)
            for i, enc in zip(group, self.encode_batch(batch, with_logvar)):
                out[i] = enc
        return out

    def clip_batches(self, clips: list[np.ndarray]):
        """Yield (clip indices, SparseBatch on the device) per forward pass of at most max_tokens tokens, shortest
        clips first. Each shape in a pass travels as one pinned uint8 copy of its kept pixels (patch_view); clips
        that are tensors on the device already (resized there) are stacked there."""
        views = [patch_view(c) for c in clips]
        shapes = [tuple(v.shape) for v in views]
        order = sorted(range(len(views)), key=lambda i: (clip_tokens(shapes[i]), shapes[i]))
        pin = self.device.type == "cuda"
        for chunk in _chunks([clip_tokens(views[i].shape) for i in order], self.max_tokens):
            part = [order[j] for j in chunk]
            pieces, first = [], 0
            for shape, same in itertools.groupby(part, key=lambda i: shapes[i]):
                same = list(same)
                if any(isinstance(views[i], torch.Tensor) for i in same):
                    dev = torch.stack([torch.as_tensor(views[i]).to(self.device) for i in same])
                else:
                    host = torch.empty((len(same), *shape), dtype=torch.uint8, pin_memory=pin)
                    for k, i in enumerate(same):
                        host[k].numpy()[...] = views[i]
                    dev = host.to(self.device, non_blocking=pin)
                pieces.append(clips_to_batch(dev, dtype=self.dtype, first=first))
                first += len(same)
            yield part, SparseBatch(torch.cat([p.feats for p in pieces]), torch.cat([p.coords for p in pieces]))

    @torch.inference_mode()
    def encode_batch(self, batch: SparseBatch, with_logvar: bool) -> list[dict]:
        """One packed forward pass on the device -> per-sample host arrays (see encode)."""
        with self.accel.context():
            enc = self.model.encode(batch)
        mean = enc.mean.float()
        indices = self.model.quantize(mean)[1].to(torch.int16).cpu().numpy() if self.model.discrete else None
        cols = {
            "coords": batch.coords[:, 1:].to(torch.int16).cpu().numpy(),
            "latent": mean.half().cpu().numpy(),
            "logvar": enc.logvar.half().cpu().numpy() if with_logvar else None,
            "fsq_indices": indices,
        }
        pooled = enc.pooled.float().half().cpu().numpy()
        bounds = np.cumsum([0] + enc.seqlens)
        return [
            {k: (None if v is None else v[a:b]) for k, v in cols.items()} | {"pooled": pooled[j]}
            for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]

    @torch.inference_mode()
    def decode(self, samples: list, kv_cache_size: int | None = None) -> list[np.ndarray]:
        """samples: list of (latent [n, 48], coords [n, 4]) -> list of feats float32 [n, 3072] (model pixel scale)."""
        out = []
        for group in _chunks([len(s[1]) for s in samples], self.max_tokens):
            batch = SparseBatch.pack([samples[i] for i in group], channels=self.cfg.latent_channels).to(self.device)
            rec = self.model.decode(batch.feats.float(), batch.coords, kv_cache_size=kv_cache_size)
            out += [r.numpy() for r in batch.split(rec.float().cpu())]
        return out

    def decode_indices(self, samples: list, kv_cache_size: int | None = None) -> list[np.ndarray]:
        """samples: list of (indices [n, 8], coords [n, 4]) for discrete configs."""
        to_codes = self.model.indices_to_codes
        codes = [(to_codes(torch.as_tensor(np.asarray(i)).long().to(self.device)).cpu().numpy(), c) for i, c in samples]
        return self.decode(codes, kv_cache_size)

    def reconstruct(self, samples: list) -> tuple[list[dict], list[np.ndarray]]:
        """Encode, then decode the deterministic latent (posterior mean, or FSQ codes for discrete configs)."""
        enc = self.encode(samples)
        if self.model.discrete:
            rec = self.decode_indices([(e["fsq_indices"].astype(np.int64), e["coords"].astype(np.int64)) for e in enc])
        else:
            rec = self.decode([(e["latent"].astype(np.float32), e["coords"].astype(np.int64)) for e in enc])
        return enc, rec
