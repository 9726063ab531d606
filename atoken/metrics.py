"""Reconstruction metrics: PSNR and SSIM (Gaussian window 11/1.5, K1 0.01, K2 0.03; Wang et al. 2004).

`psnr_per_image` / `ssim_per_image` take batches [B, 3, H, W] in [-1, 1] (the model's pixel scale) and return one
value per image (training and evaluation); `psnr` / `ssim` take two images or videos [..., H, W, 3] in [0, 1] and
return one float (reports, the pipeline's QA stage, the CLI).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(-1, 1) + 1) / 2


def psnr_per_image(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [B, 3, H, W] images in [-1, 1] (on the [0, 1] scale; rec clamped)."""
    mse = (_unit(rec) - _unit(target)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim_per_image(rec: torch.Tensor, target: torch.Tensor, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of [B, C, H, W] images in [-1, 1], mean over channels and the valid window positions."""
    a, b = _unit(rec), _unit(target)
    if min(a.shape[-2:]) < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win}, got {tuple(a.shape[-2:])}")
    r = torch.arange(win, device=a.device, dtype=torch.float32) - win // 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    c = a.shape[1]
    k = (g[:, None] * g[None, :]).expand(c, 1, win, win)

    def blur(x):
        return F.conv2d(x, k, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0) -> float:
    """PSNR in dB of two arrays with values in [0, max_val] (any shape, equal shapes)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(max_val**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two images or videos [..., H, W, 3] with values in [0, 1]."""

    def to_batch(x):
        return x.float().reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2) * 2 - 1

    return ssim_per_image(to_batch(a), to_batch(b)).mean().item()
