"""Training losses and image metrics for the AToken trainer.

- L1 on pixels (per token, as the paper's "normalised per patch" reconstruction loss).
- Gram-matrix loss on the features of a small FIXED network. The paper does not name its network; we use a
  frozen, randomly initialised conv net built from a fixed seed (random conv features carry texture statistics,
  needs no download, identical on every machine). Gram matrices are normalised by C*H*W.
- KL of the diagonal Gaussian posterior against N(0, I): 0.5 * sum(mean^2 + var - 1 - logvar), mean over tokens.
- LPIPS only when the `lpips` package AND its backbone weights are already on disk (never downloads).
- PSNR / SSIM on [-1, 1] images (reported on the [0, 1] scale, i.e. the usual 8-bit PSNR).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import psnr_per_image as psnr, ssim_per_image as ssim  # noqa: F401 (re-exported)


def l1_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (rec.float() - target.float()).abs().mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over channels, averaged over tokens."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()


class GramNet(nn.Module):
    """Frozen random conv features at 4 scales (1/2 .. 1/16). Weights come from a fixed seed, are not trained and
    are not saved: the same network is rebuilt on every machine."""

    def __init__(self, widths=(32, 64, 96, 128), seed: int = 1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, cin = [], 3
        for w in widths:
            conv = nn.Conv2d(cin, w, 4, stride=2, padding=1)
            fan_in = cin * 16
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                conv.bias.zero_()
            layers.append(conv)
            cin = w
        self.convs = nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, 3, H, W] in [-1, 1] -> list of feature maps."""
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            feats.append(x)
        return feats


def gram(f: torch.Tensor) -> torch.Tensor:
    b, c, h, w = f.shape
    f = f.float().reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


class GramLoss(nn.Module):
    """sum over scales of mean ||G(phi_l(x)) - G(phi_l(x_hat))||^2 (per Gram entry)."""

    def __init__(self, seed: int = 1234):
        super().__init__()
        self.net = GramNet(seed=seed)

    def forward(self, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ft = [gram(f) for f in self.net(target)]
        fr = [gram(f) for f in self.net(rec)]
        return sum(F.mse_loss(a, b, reduction="sum") / a.shape[0] for a, b in zip(fr, ft))


def lpips_if_available(device, log=print):
    """An LPIPS(VGG) module when `lpips` and its weights are on disk; else None (logged). Never downloads."""
    try:
        import lpips
    except ImportError:
        log("losses: LPIPS skipped (package `lpips` not installed; weights cannot be downloaded here)")
        return None
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    if not any(hub.glob("vgg16-*.pth")):
        log(f"losses: LPIPS skipped (VGG16 weights not found under {hub}; no download attempted)")
        return None
    net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)
    log("losses: LPIPS(VGG) enabled")
    return net


# ----------------------------------------------------------------------------- metrics
