"""AToken's 3D Gaussian decoder (checkpoint `3d_decode_gs.pt`): per-voxel 768-d features -> 32 Gaussians per voxel.

A TRELLIS SLat-GS decoder with AToken's changes: input Linear (no bias) + sinusoidal absolute PE on (x, y, z),
12 pre-norm blocks (RMSNorm, no biases) with 3D swin-window attention (8^3 windows, odd blocks shifted by 4,
logits soft-capped at 30), a parameter-free LayerNorm (eps 1e-5) and Linear(768 -> 448) = 32 Gaussians x 14 values.
Spec: atoken-reference.md (the shared docs beside the repository) (sections 2, 3, 7.3, quirk 7). State dict: exactly the 76 official keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .layers import MLP, RMSNorm32
from .splat import Gaussians

CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "3d_decode_gs.yaml"


# ----------------------------------------------------------------------------- config


@dataclass
class GSRepresentationConfig:
    lr: dict = field(
        default_factory=lambda: {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1}
    )
    perturb_offset: bool = True
    voxel_size: float = 1.5  # offsets reach +-voxel_size/2 voxels
    num_gaussians: int = 32
    filter_2d_kernel_size: float = 0.1  # YAML "2d_filter_kernel_size" (used by the renderer)
    filter_3d_kernel_size: float = 9e-4  # YAML "3d_filter_kernel_size": minimum scale
    scaling_bias: float = 4e-3
    opacity_bias: float = 0.1
    scaling_activation: str = "softplus"

    YAML_NAMES = {"2d_filter_kernel_size": "filter_2d_kernel_size", "3d_filter_kernel_size": "filter_3d_kernel_size"}


@dataclass
class GSDecoderConfig:
    """The `model` section of configs/3d_decode_gs.yaml, with the official defaults for keys it does not set."""

    resolution: int = 64
    model_channels: int = 768
    latent_channels: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    num_head_channels: int = 64
    mlp_channels: int = 3072
    attn_mode: str = "swin"
    window_size: int = 8
    pe_mode: str = "ape"
    qk_rms_norm: bool = False
    use_bias: bool = False
    use_rms_norm: bool = True
    softcap: float = 30.0  # hard-coded in the official window attention
    representation: GSRepresentationConfig = field(default_factory=GSRepresentationConfig)

    def __post_init__(self):
        unsupported = {
            "attn_mode": "swin",
            "pe_mode": "ape",
            "qk_rms_norm": False,
            "use_bias": False,
            "use_rms_norm": True,
        }
        for k, v in unsupported.items():
            if getattr(self, k) != v:
                raise ValueError(f"GSDecoderConfig: {k}={getattr(self, k)!r} not supported (only {v!r})")
        if self.model_channels != self.num_heads * self.num_head_channels:
            raise ValueError(
                f"model_channels {self.model_channels} != num_heads {self.num_heads} x "
                f"num_head_channels {self.num_head_channels}"
            )
        if self.model_channels % 6:
            raise ValueError("model_channels must be divisible by 6 (sin/cos APE over 3 axes)")
        if self.representation.scaling_activation != "softplus":
            raise ValueError(f"scaling_activation {self.representation.scaling_activation!r} not supported")
        missing = {"_xyz", "_features_dc", "_opacity", "_scaling", "_rotation"} - set(self.representation.lr)
        if missing:
            raise ValueError(f"representation_config.lr lacks {sorted(missing)}")

    @property
    def out_channels(self) -> int:
        return self.representation.num_gaussians * 14  # xyz 3 + dc 3 + scale 3 + rot 4 + opacity 1

    @classmethod
    def from_dict(cls, d: dict) -> "GSDecoderConfig":
        d = dict(d.get("model", d))
        rep = dict(d.pop("representation_config", None) or d.pop("representation", None) or {})
        rep = {GSRepresentationConfig.YAML_NAMES.get(k, k): v for k, v in rep.items()}
        rep_known = {f.name for f in dataclasses.fields(GSRepresentationConfig)}
        known = {f.name for f in dataclasses.fields(cls)} - {"representation"}
        bad = sorted(set(rep) - rep_known) + sorted(set(d) - known - {"class_name", "pretrained"})
        if bad:
            raise ValueError(f"GSDecoderConfig: unknown keys {bad}")
        kw = {k: v for k, v in d.items() if k in known}
        return cls(**kw, representation=GSRepresentationConfig(**rep))

    @classmethod
    def from_yaml(cls, path: str | Path = CONFIG_PATH) -> "GSDecoderConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GS decoder config not found: {path}")
        with open(path) as f:
            d = yaml.safe_load(f)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a YAML mapping")
        return cls.from_dict(d)


# ----------------------------------------------------------------------------- helpers


def hammersley(dim: int, n: int, num_samples: int) -> list[float]:
    """Point n of a `num_samples`-point Hammersley set: (n / num_samples, radical inverses base 2, 3, 5, ...)."""
    primes = [2, 3, 5, 7, 11, 13][: dim - 1]
    out = [n / num_samples]
    for base in primes:
        val, f, k = 0.0, 1.0 / base, n
        while k > 0:
            val += (k % base) * f
            k //= base
            f /= base
        out.append(val)
    return out


def offset_perturbation(num_gaussians: int, voxel_size: float) -> torch.Tensor:
    """[G, 3] = atanh((2 h_k - 1) / voxel_size): spreads the 32 Gaussians of a voxel when raw offsets are 0."""
    h = torch.tensor([hammersley(3, k, num_gaussians) for k in range(num_gaussians)], dtype=torch.float32)
    return torch.atanh((h * 2 - 1) / voxel_size)


def sincos_embedding(xyz: torch.Tensor, channels: int) -> torch.Tensor:
    """Sinusoidal APE: per axis channels/6 freqs 10000^(-i/(channels/6)), [sin | cos]; axes x | y | z concatenated."""
    nf = channels // 6
    freqs = 1.0 / (10000 ** (torch.arange(nf, dtype=torch.float32, device=xyz.device) / nf))
    ang = xyz.float()[..., None] * freqs  # [N, 3, nf]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).reshape(xyz.shape[0], -1)


@dataclass
class WindowLayout:
    """Tokens grouped by swin window: `order` sorts tokens window by window; each group holds windows of similar
    size as a padded index [w, L] into the sorted tokens with a validity mask."""

    order: torch.Tensor
    groups: list[tuple[torch.Tensor, torch.Tensor]]


def window_layout(coords: torch.Tensor, window: int, shift: int, max_scores: int = 1 << 22) -> WindowLayout:
    """coords [N, 4] = (b, x, y, z). Window of a token = floor((xyz + shift) / window) within its sample.
    Groups are sized so that windows x L x L score entries stay under `max_scores` (per head)."""
    c = coords.long()
    w = torch.div(c[:, 1:] + shift, window, rounding_mode="floor")
    nwin = (w.max(0).values + 1).tolist() if len(c) else [1, 1, 1]
    key = ((c[:, 0] * nwin[0] + w[:, 0]) * nwin[1] + w[:, 1]) * nwin[2] + w[:, 2]
    order = torch.argsort(key, stable=True)
    _, lens = torch.unique_consecutive(key[order], return_counts=True)
    starts = torch.cumsum(lens, 0) - lens
    by_len = torch.argsort(lens, descending=True)
    lens_l = lens[by_len].tolist()
    groups, i = [], 0
    while i < len(lens_l):
        L = lens_l[i]
        n = max(1, min(len(lens_l) - i, max_scores // (L * L)))
        sel = by_len[i : i + n]
        ar = torch.arange(L, device=c.device)
        valid = ar[None, :] < lens[sel][:, None]
        idx = torch.where(valid, starts[sel][:, None] + ar[None, :], starts[sel][:, None])
        groups.append((idx, valid))
        i += n
    return WindowLayout(order, groups)


def window_attention(q, k, v, layout: WindowLayout, scale: float, softcap: float) -> torch.Tensor:
    """q, k, v [N, H, D]; attention inside each window with logits softcap * tanh(logits / softcap), as
    flash-attn's `softcap` does (scale applied first). SDPA cannot soft-cap, so scores are explicit."""
    qs, ks, vs = q[layout.order], k[layout.order], v[layout.order]
    out = torch.empty_like(qs)
    for idx, valid in layout.groups:
        qw, kw, vw = (t[idx].transpose(1, 2) for t in (qs, ks, vs))  # [w, H, L, D]
        s = (qw @ kw.transpose(-1, -2)).float() * scale
        s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        o = (s.softmax(-1).to(vw.dtype) @ vw).transpose(1, 2)  # [w, L, H, D]
        out[idx[valid]] = o[valid]
    res = torch.empty_like(out)
    res[layout.order] = out
    return res


# ----------------------------------------------------------------------------- model


class WindowSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, softcap: float):
        super().__init__()
        self.heads, self.head_dim, self.softcap = heads, dim // heads, softcap
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows [q | k | v], head-major
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, layout: WindowLayout):
        q, k, v = self.to_qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        o = window_attention(q, k, v, layout, 1.0 / math.sqrt(self.head_dim), self.softcap)
        return self.to_out(o.reshape(x.shape[0], -1))


class GSBlock(nn.Module):
    def __init__(self, cfg: GSDecoderConfig):
        super().__init__()
        d = cfg.model_channels
        self.norm1 = RMSNorm32(d, eps=1e-6)
        self.attn = WindowSelfAttention(d, cfg.num_heads, cfg.softcap)
        self.norm2 = RMSNorm32(d, eps=1e-6)
        self.mlp = MLP(d, cfg.mlp_channels, bias=False)

    def forward(self, x, layout: WindowLayout):
        x = x + self.attn(self.norm1(x), layout)
        return x + self.mlp(self.norm2(x))


class GaussianDecoder(nn.Module):
    def __init__(self, cfg: GSDecoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GSDecoderConfig()
        rep = cfg.representation
        self.input_layer = nn.Linear(cfg.latent_channels, cfg.model_channels, bias=False)
        self.blocks = nn.ModuleList(GSBlock(cfg) for _ in range(cfg.num_blocks))
        self.out_layer = nn.Linear(cfg.model_channels, cfg.out_channels, bias=True)
        self.register_buffer("offset_perturbation", offset_perturbation(rep.num_gaussians, rep.voxel_size))

    @classmethod
    def from_files(
        cls, config: str | Path = CONFIG_PATH, checkpoint: str | Path | None = None, device="cpu", dtype=torch.float32
    ) -> "GaussianDecoder":
        model = cls(GSDecoderConfig.from_yaml(config))
        if checkpoint is not None:
            load_gs_weights(model, checkpoint)
        return model.to(device=device, dtype=dtype).eval()

    @staticmethod
    def _xyz_coords(coords: torch.Tensor) -> torch.Tensor:
        """Accept (b, x, y, z) or the token layout (b, t, x, y, z); return (b, x, y, z)."""
        if coords.ndim != 2 or coords.shape[1] not in (4, 5):
            raise ValueError(f"coords must be [N, 4] (b, x, y, z) or [N, 5] (b, t, x, y, z), got {tuple(coords.shape)}")
        return coords[:, [0, 2, 3, 4]] if coords.shape[1] == 5 else coords

    def forward_features(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """feats [N, 768], coords [N, 4|5] with rows of a sample contiguous -> raw per-voxel outputs [N, 448] fp32."""
        cfg = self.cfg
        coords = self._xyz_coords(coords)
        if feats.ndim != 2 or feats.shape[1] != cfg.latent_channels or feats.shape[0] != coords.shape[0]:
            raise ValueError(
                f"feats must be [N, {cfg.latent_channels}] matching coords [N, .], got "
                f"{tuple(feats.shape)} and {tuple(coords.shape)}"
            )
        if len(coords) == 0:
            raise ValueError("GS decoder: no voxels")
        b = coords[:, 0]
        if bool((b[1:] < b[:-1]).any()):
            raise ValueError("coords: rows of a sample must be contiguous and samples ordered by batch index")
        xyz = coords[:, 1:]
        if xyz.min() < 0 or xyz.max() >= cfg.resolution:
            raise ValueError(f"voxel coords must lie in [0, {cfg.resolution - 1}]")
        dtype = self.input_layer.weight.dtype
        h = self.input_layer(feats.to(dtype))
        h = (h.float() + sincos_embedding(xyz, cfg.model_channels)).to(dtype)
        ws = cfg.window_size
        layouts = [window_layout(coords, ws, 0), window_layout(coords, ws, ws // 2)]
        for i, blk in enumerate(self.blocks):
            h = blk(h, layouts[i % 2])
        h = F.layer_norm(h.float(), h.shape[-1:], eps=1e-5).to(dtype)
        return self.out_layer(h).float()

    def to_gaussians(self, raw: torch.Tensor, coords: torch.Tensor) -> list[Gaussians]:
        """Decode raw [N, 448] outputs into world-space Gaussians (aabb [-0.5, 0.5]^3), one entry per sample."""
        rep, res = self.cfg.representation, self.cfg.resolution
        coords = self._xyz_coords(coords)
        n, G = raw.shape[0], rep.num_gaussians
        raw = raw.float()
        xyz_raw, dc, sc, rot, op = torch.split(raw, [3 * G, 3 * G, 3 * G, 4 * G, G], dim=1)
        off = xyz_raw.reshape(n, G, 3) * rep.lr["_xyz"]
        if rep.perturb_offset:
            off = off + self.offset_perturbation.float()
        off = torch.tanh(off) / res * 0.5 * rep.voxel_size
        xyz = ((coords[:, 1:].float() + 0.5) / res)[:, None, :] + off - 0.5
        dc = dc.reshape(n * G, 3) * rep.lr["_features_dc"]
        scale_bias = math.log(math.expm1(rep.scaling_bias))  # softplus^-1
        scale = F.softplus(sc.reshape(n * G, 3) * rep.lr["_scaling"] + scale_bias)
        scale = torch.sqrt(scale**2 + rep.filter_3d_kernel_size**2)
        rot = rot.reshape(n * G, 4) * rep.lr["_rotation"]
        rot = F.normalize(rot + torch.tensor([1.0, 0.0, 0.0, 0.0], device=rot.device), dim=-1)
        opacity_bias = math.log(rep.opacity_bias / (1 - rep.opacity_bias))
        opacity = torch.sigmoid(op.reshape(n * G, 1) * rep.lr["_opacity"] + opacity_bias)
        xyz = xyz.reshape(n * G, 3)
        b = coords[:, 0].long()
        _, lens = torch.unique_consecutive(b, return_counts=True)
        sizes = (lens * G).tolist()
        parts = [t.split(sizes) for t in (xyz, dc, scale, rot, opacity)]
        return [Gaussians(*p) for p in zip(*parts)]

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> list[Gaussians]:
        """feats [N, 768] (the first 768 channels of AToken's decoded 3D tokens), coords [N, 4|5]."""
        return self.to_gaussians(self.forward_features(feats, coords), coords)


def load_gs_weights(model: GaussianDecoder, path: str | Path):
    """Strict load of `3d_decode_gs.pt` / `.safetensors`, dropping the training-only `lpips_loss.*` keys."""
    from .checkpoint import load_weights

    return load_weights(model, path, strict=True, drop_prefixes=("lpips_loss.",))
