"""4D rotary position embedding over (t, x, y, z), as in the official AToken release.

Quirks kept for checkpoint parity: per axis head_dim // 8 frequencies 10000^(-i / head_dim) (exponent i/d, not 2i/d),
angles concatenated t|x|y|z, rotations on interleaved channel pairs (2j, 2j+1), same angles for every head, fp32.
"""

import torch
from torch import nn


class Rope4D(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 8:
            raise ValueError(f"4D RoPE needs head_dim divisible by 8, got {head_dim}")
        self.head_dim = head_dim
        n = head_dim // 8
        freqs = theta ** (-torch.arange(n, dtype=torch.float64) / head_dim)
        self.register_buffer("freqs", freqs.float(), persistent=False)  # not in the checkpoint

    def rotation(self, pos: torch.Tensor) -> torch.Tensor:
        """pos [N, 4] (t, x, y, z) -> (cos, sin) of the angles, stacked [2, N, head_dim // 2]."""
        angles = (pos.float()[:, :, None] * self.freqs.to(pos.device)[None, None, :]).reshape(pos.shape[0], -1)
        return torch.stack([angles.cos(), angles.sin()])

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, rot: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, H, D]; rotate by coords pos [N, 4] (or precomputed rot); fp32 inside, returns x.dtype.
        Real arithmetic on (real, imag) channel pairs, so torch.compile can fuse it."""
        if rot is None:
            rot = self.rotation(pos)
        cos, sin = rot[0][:, None, :], rot[1][:, None, :]
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).to(x.dtype)
