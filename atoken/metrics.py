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


# ----------------------------------------------------------------------------- artefacts of the patch layout
# Clips are [T, H, W, 3] (an image is T = 1) with values in [0, 1]; AToken patches are 4 x 16 x 16.


def border_ratio(x: torch.Tensor, patch: int = 16) -> float:
    """Mean |pixel step| across patch borders (columns and rows at multiples of `patch`) over the mean step
    inside patches. ~1 for natural content; larger where a reconstruction shows the patch grid."""
    x = x.double()
    dc = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(0, 1, 3))  # step between column j and j + 1
    dr = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(0, 2, 3))
    on_c = torch.arange(1, len(dc) + 1) % patch == 0
    on_r = torch.arange(1, len(dr) + 1) % patch == 0
    if not on_c.any() or not on_r.any():
        raise ValueError(f"border_ratio: frames of {tuple(x.shape[1:3])} have no {patch}-px patch border")
    border = torch.cat([dc[on_c], dr[on_r]]).mean()
    inside = torch.cat([dc[~on_c], dr[~on_r]]).mean()
    return float(border / inside.clamp_min(1e-12))


def grid_score(rec: torch.Tensor, orig: torch.Tensor, patch: int = 16) -> float:
    """border_ratio of the reconstruction over that of the input: 1 = no patch grid added."""
    return border_ratio(rec, patch) / border_ratio(orig, patch)


def temporal_border_ratio(x: torch.Tensor, period: int = 4) -> float:
    """Mean |frame step| from frame 4k-1 to 4k (across temporal patches) over that of the steps inside them."""
    if x.shape[0] < period + 1:
        raise ValueError(f"temporal_border_ratio needs more than {period} frames, got {x.shape[0]}")
    d = (x[1:].double() - x[:-1].double()).abs().flatten(1).mean(1)  # step into frame t + 1
    on = torch.arange(1, len(d) + 1) % period == 0
    return float(d[on].mean() / d[~on].mean().clamp_min(1e-12))


def flicker_score(rec: torch.Tensor, orig: torch.Tensor, period: int = 4) -> float:
    """temporal_border_ratio of the reconstruction over that of the input: 1 = no period-4 jumps added."""
    return temporal_border_ratio(rec, period) / temporal_border_ratio(orig, period)


def frame_psnr(rec: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each frame of [T, H, W, 3] clips in [0, 1]."""
    mse = (rec.double() - orig.double()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def phase_psnr_spread(rec: torch.Tensor, orig: torch.Tensor, period: int = 4) -> float:
    """Max - min over t mod period of the mean per-frame PSNR (dB): how much quality cycles with the patch."""
    p = frame_psnr(rec, orig)
    t = torch.arange(len(p)) % period
    means = torch.stack([p[t == k].mean() for k in range(min(period, len(p)))])
    return float(means.max() - means.min())
