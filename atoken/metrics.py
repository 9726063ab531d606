"""Reconstruction metrics on images in [0, 1]: PSNR and SSIM (Gaussian window, Wang et al. 2004)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(max_val ** 2 / mse)).item()


def ssim(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of [..., H, W, C] images (channels averaged), 11x11 Gaussian window, valid region only."""
    x = a.double().reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2)
    y = b.double().reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2)
    c = x.shape[1]
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window)
    blur = lambda t: F.conv2d(t, k, groups=c)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}")
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean().item()
