"""AToken: sparse 4D transformer encoder (SigLIP2 shape) -> 48-d Gaussian latent (+ optional FSQ) -> decoder.

Videos are processed in temporal tiles of 16 raw frames (4 latent steps) with t rebased per tile; the encoder's
tiles are independent and the pooling head + `proj` run on the reassembled sequence. The decoder optionally
carries a K/V cache across tiles (`kv_cache_size`, raw frames)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Segments
from .config import ATokenConfig
from .fsq import FSQ
from .layers import AttentionPoolingHead, KVCache, LearnedPositionEmbedder, TransformerBlock, build_context, make_norm
from .sparse import SparseBatch


def _tap(taps: dict | None, name: str, x: torch.Tensor, coords: torch.Tensor):
    """Debug taps: append (tile by tile) a detached fp32 copy and the tile-local coords the layer saw."""
    if taps is None:
        return
    for key, val in ((name, x.detach().float()), (f"{name}_coords", coords.detach())):
        taps[key] = torch.cat([taps[key], val]) if key in taps else val


def temporal_tiles(coords: torch.Tensor, window: int, stride: int):
    """Yield (t_start, rows) over the batch's global t range; rows=None means the whole batch fits one tile."""
    t = coords[:, 1]
    lo, hi = int(t.min()), int(t.max())
    if hi - lo < window and stride >= window:
        yield lo, None
        return
    for start in range(lo, hi + 1, stride):
        rows = torch.nonzero((t >= start) & (t < start + window)).squeeze(1)
        if len(rows):
            yield start, rows


class Encoder(nn.Module):
    def __init__(self, cfg: ATokenConfig):
        super().__init__()
        D, H, M = cfg.encoder_model_channels, cfg.encoder_num_heads, cfg.encoder_mlp_channels
        bias, rms = cfg.encoder_use_bias, cfg.encoder_use_rms_norm
        self.pos_embedder = LearnedPositionEmbedder(D, cfg.pos_table_size)
        self.input_layer = nn.Linear(cfg.in_channels, D, bias=bias)
        self.blocks = nn.ModuleList(
            TransformerBlock(D, H, M, bias, rms, cfg.encoder_qk_rms_norm) for _ in range(cfg.encoder_num_blocks)
        )
        self.post_layernorm = make_norm(D, rms)
        self.head = AttentionPoolingHead(D, H, M)
        self.attention_backend = "auto"  # varlen_attention backend (atoken.accel picks it per device)

    def forward(self, feats, coords, taps=None):
        """One temporal tile: feats [n, C], tile-local coords [n, 5] -> post-LayerNorm tokens [n, D]."""
        ctx = build_context(coords, self.blocks[0].attn.rope, backend=self.attention_backend)
        h = self.input_layer(feats) + self.pos_embedder(coords, ctx.sq).to(feats.dtype)
        _tap(taps, "enc_embed", h, coords)
        for i, block in enumerate(self.blocks):
            h = block(h, ctx)
            if i == 0:
                _tap(taps, "enc_block0", h, coords)
        return self.post_layernorm(h)


class Decoder(nn.Module):
    def __init__(self, cfg: ATokenConfig):
        super().__init__()
        D, H, M = cfg.decoder_model_channels, cfg.decoder_num_heads, cfg.decoder_mlp_channels
        bias, rms = cfg.decoder_use_bias, cfg.decoder_use_rms_norm
        self.pos_embedder = LearnedPositionEmbedder(D, cfg.pos_table_size)
        self.input_layer = nn.Linear(cfg.latent_channels, D, bias=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(D, H, M, bias, rms, cfg.decoder_qk_rms_norm) for _ in range(cfg.decoder_num_blocks)
        )
        self.out_norm = make_norm(D, rms)
        self.out_layer = nn.Linear(D, cfg.out_channels, bias=False)  # unbounded pixel patch (no tanh)

    def forward(self, latent, coords, cache: KVCache | None = None, taps=None):
        ctx = build_context(coords, self.blocks[0].attn.rope, cache)
        h = self.input_layer(latent) + self.pos_embedder(coords, ctx.sq).to(latent.dtype)
        _tap(taps, "dec_embed", h, coords)
        for i, block in enumerate(self.blocks):
            h = block(h, ctx, cache, i)
            if i == 0:
                _tap(taps, "dec_block0", h, coords)
        return self.out_layer(self.out_norm(h))


@dataclass
class EncodeOutput:
    mean: torch.Tensor  # [N, latent] fp32 (posterior mean = deterministic latent)
    logvar: torch.Tensor  # [N, latent] fp32
    pooled: torch.Tensor  # [B, D] attention-pooled embedding (not normalised)
    tokens: torch.Tensor  # [N, D] post-LayerNorm encoder tokens ("x_no_proj")
    seqlens: list[int]  # tokens per sample (host ints)

    @property
    def pooled_norm(self) -> torch.Tensor:
        return F.normalize(self.pooled.float(), dim=-1)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior sample mean + std * eps (what the official continuous `inference` decodes)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * eps


class AToken(nn.Module):
    def __init__(self, cfg: ATokenConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.proj = nn.Linear(cfg.encoder_model_channels, 2 * cfg.latent_channels, bias=False)  # [mean | logvar]
        self.quantizer = (
            FSQ(cfg.quantizer_feature_dim, cfg.quantizer_num_codebooks, cfg.quantizer_codebook_size)
            if cfg.use_quantizer
            else None
        )
        self.decoder = Decoder(cfg) if cfg.use_decoder else None

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    @property
    def discrete(self) -> bool:
        return self.quantizer is not None

    def encode(self, batch: SparseBatch, taps: dict | None = None) -> EncodeOutput:
        feats, coords = batch.feats.to(self.dtype), batch.coords
        tile = self.cfg.tile_latent_frames
        tokens = None
        for start, rows in temporal_tiles(coords, tile, tile):
            c = coords if rows is None else coords[rows]
            c = c.clone()
            c[:, 1] -= start  # rebase t per tile
            h = self.encoder(feats if rows is None else feats[rows], c, taps)
            if rows is None:
                tokens = h
            else:
                tokens = h.new_empty(len(coords), h.shape[1]) if tokens is None else tokens
                tokens[rows] = h
        seg = Segments.from_batch_ids(coords[:, 0], batch.batch_size)
        pooled = self.encoder.head(tokens, seg)
        mean, logvar = self.proj(tokens).float().chunk(2, dim=-1)
        return EncodeOutput(mean, logvar, pooled, tokens, seg.lens)

    def quantize(self, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean [N, 48] -> (codes [N, 48] fp32, indices [N, 8] int32). Discrete configs only."""
        if self.quantizer is None:
            raise ValueError(f"config {self.cfg.name!r} has no quantizer (use_quantizer: False)")
        return self.quantizer(mean)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        if self.quantizer is None:
            raise ValueError(f"config {self.cfg.name!r} has no quantizer (use_quantizer: False)")
        return self.quantizer.indices_to_codes(indices)

    def decode(
        self, latent: torch.Tensor, coords: torch.Tensor, kv_cache_size: int | None = None, taps: dict | None = None
    ):
        """latent [N, 48], coords [N, 5] -> feats [N, out_channels]. kv_cache_size in raw frames (default: config)."""
        if self.decoder is None:
            raise ValueError("this model was built with use_decoder: False")
        if latent.ndim != 2 or latent.shape[1] != self.cfg.latent_channels or coords.shape != (latent.shape[0], 5):
            raise ValueError(
                f"decode: expected latent [N, {self.cfg.latent_channels}] and coords [N, 5], got {tuple(latent.shape)}, {tuple(coords.shape)}"
            )
        pt = self.cfg.patch_size[0]
        kv = self.cfg.kv_cache_size if kv_cache_size is None else kv_cache_size
        if kv % pt:
            raise ValueError(f"kv_cache_size is in raw frames and must be a multiple of {pt}, got {kv}")
        k, stride = kv // pt, self.cfg.decode_stride_latent_frames
        cache = KVCache(k) if k > 0 else None
        latent = latent.to(self.dtype)
        out = None
        for start, rows in temporal_tiles(coords, stride, stride):
            c = (coords if rows is None else coords[rows]).clone()
            c[:, 1] -= start
            if cache is not None and not cache.empty:
                c[:, 1] += k  # cached steps occupy t = 0..k-1
            h = self.decoder(latent if rows is None else latent[rows], c, cache, taps)
            if cache is not None:
                cache.advance()
            if rows is None:
                out = h
            else:
                out = h.new_empty(len(coords), h.shape[1]) if out is None else out
                out[rows] = h
        return out

    def forward(self, batch: SparseBatch, sample: bool = False) -> dict:
        """Reconstruct: encode -> (mean | posterior sample | FSQ codes) -> decode."""
        enc = self.encode(batch)
        if self.discrete:
            latent, indices = self.quantize(enc.mean)
        else:
            latent, indices = (enc.sample() if sample else enc.mean), None
        rec = self.decode(latent, batch.coords)
        return {"rec": rec, "latent": latent, "indices": indices, "enc": enc}
