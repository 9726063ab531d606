"""Building blocks: fp32 norms, MLP, self-attention with 4D RoPE (+ optional KV cache), transformer block,
attention-pooling head and the per-sample resized learned position table. Module/parameter names follow the
official checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Segments, varlen_attention
from .rope import Rope4D


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32, result cast back to the input dtype."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm32(nn.Module):
    """RMSNorm (weight only) computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head QK norm: L2-normalise each head vector, times gamma[head] * sqrt(head_dim), fp32."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.scale = math.sqrt(head_dim)
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x):  # [N, H, D]
        return (F.normalize(x.float(), dim=-1) * self.gamma.float() * self.scale).to(x.dtype)


def make_norm(dim: int, rms: bool, bias: bool = True) -> nn.Module:
    return RMSNorm32(dim, eps=1e-6) if rms else LayerNorm32(dim, eps=1e-6, elementwise_affine=True, bias=bias)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, bias=bias), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim, bias=bias)
        )

    def forward(self, x):
        return self.mlp(x)


# ----------------------------------------------------------------------------- attention context and KV cache


@dataclass
class AttnContext:
    """Per-tile attention layout shared by every layer: query segments + RoPE rotations, and (with a KV cache)
    how cached keys are merged in front of each sample's keys and which merged rows become the next cache."""

    sq: Segments
    rot_q: torch.Tensor
    sk: Segments
    rot_k: torch.Tensor
    merge_idx: torch.Tensor | None = None  # rows of cat([cache, current]) in per-sample key order
    store_idx: torch.Tensor | None = None  # rows of the merged keys kept as the next cache
    backend: str = "auto"  # varlen_attention backend: auto | flash | sdpa

    @property
    def self_attention(self) -> bool:
        """Queries and keys are the same rows (no KV cache): a block can run its fused fast path."""
        return self.sq is self.sk and self.merge_idx is None and self.store_idx is None


class KVCache:
    """Decoder K/V cache across temporal tiles: per layer (k, v) after QK-norm, before RoPE; shared coords [m, 5]."""

    def __init__(self, size: int):
        self.size = size  # latent time steps
        self.coords: torch.Tensor | None = None
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.next_coords: torch.Tensor | None = None
        self.next_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def empty(self) -> bool:
        return self.coords is None or len(self.coords) == 0

    def advance(self):
        self.coords, self.kv = self.next_coords, self.next_kv
        self.next_coords, self.next_kv = None, {}


def build_context(
    coords: torch.Tensor, rope: Rope4D, cache: KVCache | None = None, backend: str = "auto"
) -> AttnContext:
    """coords [n, 5] of the tile (b, t, x, y, z), b = global sample id, rows grouped by sample in b order."""
    b = coords[:, 0].long()
    present, lens = torch.unique_consecutive(b, return_counts=True)
    sq = Segments.from_lens(lens.tolist(), coords.device)
    rot_q = rope.rotation(coords[:, 1:])
    if cache is None:
        return AttnContext(sq, rot_q, sq, rot_q, backend=backend)
    # merge: cached rows of present samples first, then current rows, per sample
    if cache.empty:
        all_coords, merge_idx = coords, None
    else:
        cat = torch.cat([cache.coords, coords])
        is_cur = torch.cat(
            [
                torch.zeros(len(cache.coords), dtype=torch.long, device=coords.device),
                torch.ones(len(coords), dtype=torch.long, device=coords.device),
            ]
        )
        keep = torch.isin(cat[:, 0].long(), present)
        key = cat[:, 0].long() * 2 + is_cur
        key = torch.where(keep, key, torch.full_like(key, -1))
        order = torch.sort(key, stable=True).indices
        merge_idx = order[(key[order] >= 0)]
        all_coords = cat[merge_idx]
    kb = all_coords[:, 0].long()
    _, klens = torch.unique_consecutive(kb, return_counts=True)
    sk = Segments.from_lens(klens.tolist(), coords.device)
    rot_k = rope.rotation(all_coords[:, 1:])
    # next cache: per sample, the last `size` time steps of the merged keys, t rebased to 0..size-1
    store_idx = None
    if cache.size > 0:
        t = all_coords[:, 1].long()
        tmax = torch.zeros(int(kb.max()) + 1, dtype=torch.long, device=coords.device).scatter_reduce(
            0, kb, t, "amax", include_self=False
        )
        first = tmax[kb] - cache.size + 1
        store_idx = torch.nonzero(t >= first).squeeze(1)
        nxt = all_coords[store_idx].clone()
        nxt[:, 1] = (t - first)[store_idx].to(nxt.dtype)
        cache.next_coords = nxt
    return AttnContext(sq, rot_q, sk, rot_k, merge_idx, store_idx, backend)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)  # rows [q | k | v], head-major
        if qk_norm:
            self.q_rms_norm = MultiHeadRMSNorm(heads, self.head_dim)
            self.k_rms_norm = MultiHeadRMSNorm(heads, self.head_dim)
        self.qk_norm = qk_norm
        self.to_out = nn.Linear(dim, dim, bias=bias)
        self.rope = Rope4D(self.head_dim)

    def project(self, x):
        """x [N, dim] -> q, k, v [N, heads, head_dim], QK-normed, before RoPE."""
        q, k, v = self.to_qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        if self.qk_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k, v

    def forward(self, x, ctx: AttnContext, cache: KVCache | None = None, layer: int = 0):
        q, k, v = self.project(x)
        if cache is not None:
            if ctx.merge_idx is not None:
                ck, cv = cache.kv[layer]
                k, v = torch.cat([ck, k])[ctx.merge_idx], torch.cat([cv, v])[ctx.merge_idx]
            if ctx.store_idx is not None:
                cache.next_kv[layer] = (k[ctx.store_idx].detach(), v[ctx.store_idx].detach())
        q, k = self.rope(q, rot=ctx.rot_q), self.rope(k, rot=ctx.rot_k)
        out = varlen_attention(q, k, v, ctx.sq, ctx.sk, scale=1.0 / math.sqrt(self.head_dim), backend=ctx.backend)
        return self.to_out(out.reshape(x.shape[0], -1))


def attention_inputs(block: "TransformerBlock", x, rot):
    """Everything before a block's attention kernel: norm1, qkv, QK-norm, RoPE. Plain tensor code (no host-side
    layout), so `torch.compile` fuses it into a few kernels; compiled once, reused by every block."""
    attn = block.attn
    q, k, v = attn.project(block.norm1(x))
    return attn.rope(q, rot=rot), attn.rope(k, rot=rot), v


def attention_outputs(block: "TransformerBlock", x, out):
    """Everything after it: out-projection, residual, norm2, MLP, residual."""
    x = x + block.attn.to_out(out.reshape(x.shape[0], -1))
    return x + block.mlp(block.norm2(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, bias: bool, rms: bool, qk_norm: bool):
        super().__init__()
        self.norm1 = make_norm(dim, rms)
        self.attn = SelfAttention(dim, heads, bias, qk_norm)
        self.norm2 = make_norm(dim, rms)
        self.mlp = MLP(dim, mlp_dim, bias)
        self.fused = (attention_inputs, attention_outputs)  # swapped for compiled versions by atoken.accel

    def forward(self, x, ctx: AttnContext, cache: KVCache | None = None, layer: int = 0):
        if cache is None and ctx.self_attention:  # the same arithmetic, split around the attention kernel
            pre, post = self.fused
            q, k, v = pre(self, x, ctx.rot_q)
            scale = 1.0 / math.sqrt(self.attn.head_dim)
            return post(self, x, varlen_attention(q, k, v, ctx.sq, ctx.sk, scale=scale, backend=ctx.backend))
        x = x + self.attn(self.norm1(x), ctx, cache, layer)
        return x + self.mlp(self.norm2(x))


class PoolingAttention(nn.Module):
    """Cross-attention of one query per sample over that sample's tokens (no RoPE, no QK-norm)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)  # rows [k | v]
        self.to_out = nn.Linear(dim, dim)

    def forward(self, q, x, sq: Segments, sk: Segments):
        q = self.to_q(q).view(q.shape[0], self.heads, self.head_dim)
        k, v = self.to_kv(x).view(x.shape[0], 2, self.heads, self.head_dim).unbind(1)
        out = varlen_attention(q, k, v, sq, sk, scale=1.0 / math.sqrt(self.head_dim))
        return self.to_out(out.reshape(q.shape[0], -1))


class AttentionPoolingHead(nn.Module):
    """SigLIP MAP head: learned probe attends over a sample's tokens; then x + mlp(layernorm(x)) -> [B, dim]."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(dim) * 0.02)
        self.attention = PoolingAttention(dim, heads)
        self.layernorm = LayerNorm32(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim, bias=True)

    def forward(self, x, sk: Segments):
        B = sk.batch_size
        sq = Segments.from_lens([1] * B, x.device)
        probe = self.probe.to(x.dtype)[None].expand(B, -1)
        h = self.attention(probe, x, sq, sk)
        return h + self.mlp(self.layernorm(h))


class LearnedPositionEmbedder(nn.Module):
    """16x16 learned 2D table, resized per sample to its (max_x+1, max_y+1) (bilinear, antialiased) and gathered at
    (x, y). t and z are ignored (3D voxels get the (x, y) entry too)."""

    def __init__(self, dim: int, table: int = 16):
        super().__init__()
        self.table = table
        self.position_embedding = nn.Embedding(table * table, dim)

    def forward(self, coords: torch.Tensor, seg: Segments) -> torch.Tensor:
        """coords [n, 5]; seg: layout of the n rows. Returns [n, dim] in the table's dtype."""
        x, y = coords[:, 2].long(), coords[:, 3].long()
        B = seg.batch_size
        zeros = torch.zeros(B, dtype=torch.long, device=coords.device)
        hx = zeros.scatter_reduce(0, seg.seg, x + 1, "amax")
        hy = zeros.scatter_reduce(0, seg.seg, y + 1, "amax")
        size = torch.stack([hx, hy], dim=1)
        w = self.position_embedding.weight
        grid = w.float().reshape(self.table, self.table, -1).permute(2, 0, 1)[None]  # [1, D, 16, 16]
        out = w.new_empty(len(coords), w.shape[1])
        sizes, inv = torch.unique(size, dim=0, return_inverse=True)
        row_size = inv[seg.seg]
        for i, (h, wd) in enumerate(sizes.tolist()):
            table = F.interpolate(grid, size=(h, wd), mode="bilinear", align_corners=False, antialias=True)[0]
            rows = torch.nonzero(row_size == i).squeeze(1)
            out[rows] = table[:, x[rows], y[rows]].T.to(w.dtype)
        return out
