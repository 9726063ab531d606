"""Finite scalar quantization (FSQ) as used by AToken-So/D: 8 groups x 6 dims x 4 levels -> 8 indices in [0, 4095].

Per dim: bounded = tanh(z + shift) * half_l - offset with half_l = (L-1)(1+1e-3)/2, offset 0.5 (even L),
shift = atanh(offset / half_l); code = round(bounded) / (L // 2). Always computed in fp32.
"""

import math

import torch
from torch import nn


def levels_from_codebook_size(codebook_size: int) -> list[int]:
    """4096 -> [4] * 6 (2 bits per dim), as the official quantizer picks it."""
    bits = int(math.log2(codebook_size))
    if 2**bits != codebook_size or bits % 2:
        raise ValueError(f"FSQ codebook size must be 4**k, got {codebook_size}")
    return [4] * (bits // 2)


class FSQ(nn.Module):
    def __init__(self, dim: int = 48, num_codebooks: int = 8, codebook_size: int = 4096, eps: float = 1e-3):
        super().__init__()
        levels = levels_from_codebook_size(codebook_size)
        if dim != num_codebooks * len(levels):
            raise ValueError(f"FSQ dim {dim} != num_codebooks {num_codebooks} x {len(levels)} dims")
        self.dim, self.num_codebooks, self.codebook_size, self.eps = dim, num_codebooks, codebook_size, eps
        lv = torch.tensor(levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), 0)
        # non-persistent: the official checkpoint stores no quantizer tensors
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        half_l = (self.levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [N, dim] -> (codes [N, dim] in {-1, -0.5, 0, 0.5}, indices [N, num_codebooks] int32)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ: expected {self.dim} channels, got {z.shape[-1]}")
        with torch.autocast(z.device.type, enabled=False):
            zg = z.float().reshape(*z.shape[:-1], self.num_codebooks, -1)
            bounded = self.bound(zg)
            q = torch.round(bounded)
            q = bounded + (q - bounded).detach()  # straight-through estimator (training)
            codes = q / (self.levels // 2)
            indices = self.codes_to_indices(codes)
        return codes.reshape(z.shape), indices

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., G, d] -> indices [..., G] int32."""
        half = self.levels // 2
        digits = (codes * half + half).round().long()
        return (digits * self.basis).sum(-1).int()

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [N, num_codebooks] -> codes [N, dim] float32."""
        if indices.shape[-1] != self.num_codebooks:
            raise ValueError(f"FSQ: expected {self.num_codebooks} indices per token, got {indices.shape[-1]}")
        idx = indices.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(
                f"FSQ: indices must be in [0, {self.codebook_size}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        digits = (idx[..., None] // self.basis) % self.levels.long()
        half = self.levels // 2
        codes = (digits.float() - half) / half
        return codes.reshape(*indices.shape[:-1], self.dim)
