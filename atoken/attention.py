"""Packed variable-length attention: tokens of different samples never attend to each other.

Backends, picked per call: flash_attn_varlen_func (CUDA, fp16/bf16, when importable); dense SDPA when every sample
has the same length (a plain reshape, no mask); one dense SDPA call per distinct length when there are few;
otherwise SDPA on a zero-padded [B, L] batch with a key-padding mask.
The sample layout (`Segments`) is computed once per forward and shared by all layers (one host sync, not one per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # optional fast path on GPU
    from flash_attn import flash_attn_varlen_func
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_varlen_func = None


MAX_LENGTH_GROUPS = 8  # ragged self-attention: up to this many distinct lengths run as dense per-length batches


@dataclass
class Segments:
    """Sample boundaries of a packed sequence."""

    cu: torch.Tensor  # int32 [B+1], on the tokens' device
    lens: list[int]
    seg: torch.Tensor  # sample id per row
    pos: torch.Tensor  # position within its sample per row
    groups: list | None = field(default=None, repr=False)  # cache of length_groups()

    @classmethod
    def from_lens(cls, lens: list[int], device) -> "Segments":
        lens_t = torch.tensor(lens, dtype=torch.long, device=device)
        cu = F.pad(lens_t.cumsum(0), (1, 0))
        n = int(sum(lens))
        seg = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t, output_size=n)
        pos = torch.arange(n, device=device) - cu[:-1][seg]
        return cls(cu.int(), list(lens), seg, pos)

    @classmethod
    def from_batch_ids(cls, b: torch.Tensor, batch_size: int) -> "Segments":
        """b: sample id per row, rows of a sample contiguous and ordered."""
        return cls.from_lens(torch.bincount(b.long(), minlength=batch_size).tolist(), b.device)

    @property
    def batch_size(self) -> int:
        return len(self.lens)

    @property
    def max_len(self) -> int:
        return max(self.lens) if self.lens else 0

    @property
    def uniform(self) -> bool:
        return len(set(self.lens)) <= 1

    def length_groups(self) -> list[tuple[int, torch.Tensor]]:
        """(length, row indices) per distinct sample length; computed once and reused by every layer."""
        if self.groups is None:
            lens = torch.tensor(self.lens, device=self.seg.device)
            self.groups = [(n, torch.nonzero(lens[self.seg] == n).squeeze(1)) for n in sorted(set(self.lens))]
        return self.groups

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(self.batch_size, self.max_len, *x.shape[1:])
        out[self.seg, self.pos] = x
        return out


def varlen_attention(q, k, v, sq: Segments, sk: Segments, scale: float | None = None, backend: str = "auto"):
    """q [Nq, H, D] laid out by sq; k, v [Nk, H, D] laid out by sk (same samples). Returns [Nq, H, D].
    backend: auto (flash-attn when importable on CUDA), flash (always), sdpa (never flash-attn; PyTorch SDPA, whose
    kernel the caller may pin with torch.nn.attention.sdpa_kernel)."""
    if sq.batch_size != sk.batch_size:
        raise ValueError("varlen_attention: query and key layouts have different sample counts")
    if any(lq > 0 and lk == 0 for lq, lk in zip(sq.lens, sk.lens)):
        raise ValueError("varlen_attention: a sample with queries has no keys")
    use_flash = backend == "flash" or (
        backend == "auto"
        and flash_attn_varlen_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    )
    if use_flash:
        return flash_attn_varlen_func(q, k, v, sq.cu, sk.cu, sq.max_len, sk.max_len, softmax_scale=scale)

    B, (H, D) = sq.batch_size, q.shape[1:]
    if sq.uniform and sk.uniform:  # equal lengths: a dense batch
        qd = q.reshape(B, sq.max_len, H, D).transpose(1, 2)
        kd = k.reshape(B, sk.max_len, H, D).transpose(1, 2)
        vd = v.reshape(B, sk.max_len, H, D).transpose(1, 2)
        out = F.scaled_dot_product_attention(qd, kd, vd, scale=scale)
        return out.transpose(1, 2).reshape(q.shape)

    if sq is sk and len(set(sq.lens)) <= MAX_LENGTH_GROUPS:  # few distinct lengths: one dense call per length
        out = torch.empty_like(q)
        for n, rows in sq.length_groups():
            qd, kd, vd = (x[rows].reshape(-1, n, H, D).transpose(1, 2) for x in (q, k, v))
            out[rows] = F.scaled_dot_product_attention(qd, kd, vd, scale=scale).transpose(1, 2).reshape(-1, H, D)
        return out

    # ragged: pad to [B, L] and mask padded keys (padded query rows still see valid keys, so no NaN)
    qd, kd, vd = sq.pad(q).transpose(1, 2), sk.pad(k).transpose(1, 2), sk.pad(v).transpose(1, 2)
    key_ok = torch.zeros(B, sk.max_len, dtype=torch.bool, device=q.device)
    key_ok[sk.seg, sk.pos] = True
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=key_ok[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[sq.seg, sq.pos]
