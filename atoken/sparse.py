"""Sparse 4D token layout: packed features + int coords (b, t, x, y, z), and pixel/voxel <-> token converters.

Packing rules follow the official AToken release: 4x16x16 patches, feature order (pt, ph, pw, c) with c fastest,
images padded with zero frames (mid-gray in [-1, 1]) to 4 frames, frames cut to a multiple of 4, centre crop to x16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PATCH = (4, 16, 16)
TOKEN_DIM = PATCH[0] * PATCH[1] * PATCH[2] * 3  # 3072
VOXEL_DIM = PATCH[1] * PATCH[2] * 3  # 768: one 16x16 RGB view patch per voxel
VOXEL_RES = 64
MAX_COORD = 4096  # the official tile reassembly hashes each coordinate into 12 bits


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    return x


def _check_finite(x: torch.Tensor, name: str):
    # a sum is finite iff every value is (barring overflow of huge values, which is bad input too); cheap
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x.sum(dtype=torch.float64))):
        raise ValueError(f"{name}: contains NaN or infinite values")


def _to_unit_range(x: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [0, 255] -> [-1, 1]; float input must already be in [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected uint8 or float pixels, got {x.dtype}")
    _check_finite(x, name)
    x = x.float()
    if x.numel() and (x.min() < -1.001 or x.max() > 1.001):
        raise ValueError(f"{name}: float pixels must be in [-1, 1], got range [{x.min():.3f}, {x.max():.3f}]")
    return x


def check_coords(coords: torch.Tensor, name: str = "coords"):
    if coords.numel() and (int(coords.min()) < 0 or int(coords.max()) >= MAX_COORD):
        raise ValueError(f"{name}: values must be in [0, {MAX_COORD}), got [{int(coords.min())}, {int(coords.max())}]")


# ----------------------------------------------------------------------------- pixels <-> tokens


def check_clip_shape(shape: tuple[int, ...], name: str = "video", patch=PATCH) -> None:
    """A [T, H, W, 3] clip that holds at least one patch, or a ValueError that says what is wrong."""
    if len(shape) != 4:
        raise ValueError(f"{name}: expected [T, H, W, 3], got shape {tuple(shape)}")
    if shape[-1] != 3:
        raise ValueError(f"{name}: expected 3 (RGB) channels last, got shape {tuple(shape)}")
    T, H, W, _ = shape
    if T == 0 or H == 0 or W == 0:
        raise ValueError(f"{name}: empty input of shape {tuple(shape)}")
    if H < patch[1] or W < patch[2]:
        raise ValueError(f"{name}: frames {H}x{W} are smaller than one {patch[1]}x{patch[2]} patch")


def video_to_tokens(thwc, patch=PATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H, W, 3] video (uint8 or float in [-1, 1]) -> feats [n, 3072] float32, coords [n, 4] int32 (t, x, y, z)."""
    x = _as_tensor(thwc, "video")
    check_clip_shape(tuple(x.shape), "video", patch)
    pt, ph, pw = patch
    x = _to_unit_range(x, "video")
    if len(x) < pt:  # pad with zero frames (= mid-gray in [-1, 1])
        x = torch.cat([x, x.new_zeros(pt - len(x), *x.shape[1:])])
    x = patch_view(x, patch)  # whole patches: frames beyond a multiple of pt dropped, centre crop
    nt, nh, nw = x.shape[0] // pt, x.shape[1] // ph, x.shape[2] // pw
    # (t pt) (h ph) (w pw) c -> (t h w) (pt ph pw c)
    feats = x.reshape(nt, pt, nh, ph, nw, pw, 3).permute(0, 2, 4, 1, 3, 5, 6).reshape(nt * nh * nw, -1)
    grid = torch.meshgrid(torch.arange(nt), torch.arange(nh), torch.arange(nw), torch.arange(1), indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grid], dim=1).int()
    return feats.contiguous(), coords


def clip_tokens(shape: tuple[int, ...], patch=PATCH) -> int:
    """Tokens of one [T, H, W, 3] clip under video_to_tokens' rules (zero-frame padding, centre crop)."""
    T, H, W = shape[:3]
    return max(T // patch[0], 1) * (H // patch[1]) * (W // patch[2])


def patch_view(clip, patch=PATCH):
    """The part of a [T, H, W, 3] clip that video_to_tokens keeps (whole patches, centre crop), as a view."""
    T, H, W = clip.shape[:3]
    h, w = H // patch[1] * patch[1], W // patch[2] * patch[2]
    top, left = (H - h) // 2, (W - w) // 2
    return clip[: T // patch[0] * patch[0] if T >= patch[0] else T, top : top + h, left : left + w]


def clips_to_batch(
    clips: torch.Tensor, patch=PATCH, dtype: torch.dtype = torch.float32, first: int = 0
) -> "SparseBatch":
    """B same-shape uint8 clips [B, T, H, W, 3] -> one SparseBatch of samples first..first+B-1, made where the clips
    are (the GPU, in the pipeline). The batched form of video_to_tokens: the same tokens in the same order, with no
    per-sample host work or sync. Uint8 pixels are finite and the coordinates are valid by construction."""
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"clips: expected uint8 [B, T, H, W, 3], got {clips.dtype} {tuple(clips.shape)}")
    if len(clips) == 0:
        raise ValueError("clips: no clips")
    check_clip_shape(tuple(clips.shape[1:]), "clips", patch)
    B, T = clips.shape[:2]
    pt, ph, pw = patch
    x = patch_view(clips.movedim(0, 3), patch).movedim(3, 0).float().div_(127.5).sub_(1.0)
    if T < pt:  # zero frames (mid-gray), as video_to_tokens
        x = torch.cat([x, x.new_zeros(B, pt - T, *x.shape[2:])], dim=1)
    nt, nh, nw = x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw
    n = nt * nh * nw
    feats = x.reshape(B, nt, pt, nh, ph, nw, pw, 3).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(B * n, -1).to(dtype)
    dev = clips.device
    grid = torch.meshgrid(
        torch.arange(nt, device=dev), torch.arange(nh, device=dev), torch.arange(nw, device=dev), indexing="ij"
    )
    one = torch.stack([g.reshape(-1) for g in grid] + [torch.zeros(n, dtype=torch.long, device=dev)], dim=1)
    b = torch.arange(first, first + B, device=dev).repeat_interleave(n)[:, None]
    return SparseBatch(feats, torch.cat([b, one.repeat(B, 1)], dim=1).int())


def image_to_tokens(hwc, patch=PATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, W, 3] image -> tokens of a 4-frame clip (the image + 3 zero frames)."""
    x = _as_tensor(hwc, "image")
    if x.ndim != 3:
        raise ValueError(f"image: expected [H, W, 3], got shape {tuple(x.shape)}")
    if x.shape[-1] != 3:
        raise ValueError(f"image: expected 3 (RGB) channels last, got shape {tuple(x.shape)}")
    return video_to_tokens(x[None], patch)


@dataclass
class Voxels:
    """One 3D sample before widening: feats [M, 768] in [0, 1] (fp16 or fp32, as stored), coords [M, 3] (x, y, z).
    `voxels_to_batch` widens many of them to 3072-d tokens where the model is (a 4x smaller copy than tokens)."""

    feats: torch.Tensor
    coords: torch.Tensor

    def __len__(self) -> int:
        return len(self.feats)


def check_voxels(feats, coords3) -> Voxels:
    """Validated voxels: feats [M, 768] in [0, 1] (finite), integer coords [M, 3] in [0, 63]; a ValueError that
    says what is wrong otherwise. One min/max pass over the features, in their own dtype; no copy."""
    f, c = _as_tensor(feats, "voxel feats"), _as_tensor(coords3, "voxel coords")
    if f.ndim != 2 or f.shape[1] != VOXEL_DIM:
        raise ValueError(f"voxel feats: expected [M, {VOXEL_DIM}], got shape {tuple(f.shape)}")
    if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] != f.shape[0]:
        raise ValueError(f"voxel coords: expected [{f.shape[0]}, 3], got shape {tuple(c.shape)}")
    if f.shape[0] == 0:
        raise ValueError("voxels: no active voxels")
    if c.is_floating_point():
        raise ValueError(f"voxel coords: expected integers, got {c.dtype}")
    if not f.is_floating_point():
        f = f.float()
    lo, hi = (int(v) for v in torch.aminmax(c))
    if lo < 0 or hi >= VOXEL_RES:
        raise ValueError(f"voxel coords: must be in [0, {VOXEL_RES - 1}], got [{lo}, {hi}]")
    lo, hi = (float(v) for v in torch.aminmax(f))  # NaN propagates into both; inf is out of range
    if lo != lo or hi != hi or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise ValueError("voxel feats: contains NaN or infinite values")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"voxel feats: must be in [0, 1], got [{lo:.3f}, {hi:.3f}]")
    return Voxels(f, c)


def voxels_to_tokens(feats, coords3, token_dim: int = TOKEN_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """3D voxels: feats [M, 768] in [0, 1], coords [M, 3] (x, y, z) in [0, 63] -> feats [M, 3072], coords (1, x, y, z)."""
    v = check_voxels(feats, coords3)
    out = v.feats.new_zeros(len(v), token_dim, dtype=torch.float32)
    out[:, :VOXEL_DIM] = v.feats.float() * 2 - 1
    coords = torch.cat([torch.ones_like(v.coords[:, :1]), v.coords], dim=1).int()
    return out, coords


def voxels_to_batch(
    samples: list[Voxels], device=None, dtype: torch.dtype = torch.float32, first: int = 0, token_dim: int = TOKEN_DIM
) -> "SparseBatch":
    """Checked voxel samples -> one SparseBatch of samples first..first+len-1 on `device`: the batched form of
    voxels_to_tokens (the same tokens, values and order). The compact features travel as one copy (pinned on
    CUDA) and are widened to `token_dim` on the device."""
    if not samples:
        raise ValueError("voxels: no samples")
    if token_dim < VOXEL_DIM:
        raise ValueError(f"voxels: {VOXEL_DIM}-d features do not fit {token_dim}-d tokens")
    device = torch.device(device or "cpu")
    pin = device.type == "cuda"
    n = [len(v) for v in samples]
    fdt = torch.float16 if all(v.feats.dtype == torch.float16 for v in samples) else torch.float32
    host_f = torch.empty((sum(n), VOXEL_DIM), dtype=fdt, pin_memory=pin)
    host_c = torch.empty((sum(n), 5), dtype=torch.int32, pin_memory=pin)
    host_c[:, 1] = 1
    host_c[:, 0] = torch.arange(first, first + len(n), dtype=torch.int32).repeat_interleave(torch.tensor(n))
    at = 0
    for v, k in zip(samples, n):
        host_f[at : at + k] = v.feats
        host_c[at : at + k, 2:] = v.coords
        at += k
    f = host_f.to(device, non_blocking=pin)
    feats = torch.zeros((sum(n), token_dim), dtype=dtype, device=device)
    feats[:, :VOXEL_DIM] = (f.float() * 2 - 1).to(dtype)
    return SparseBatch(feats, host_c.to(device, non_blocking=pin))


def tokens_to_video(feats, coords4, patch=PATCH) -> torch.Tensor:
    """feats [n, C], coords [n, 4] (t, x, y, z) -> video [T, H, W, 3] (float, model scale). Missing tokens are 0.

    The temporal patch size is inferred from C (3072 -> 4 frames, 768 -> 1 frame)."""
    f, c = _as_tensor(feats, "feats").float(), _as_tensor(coords4, "coords").long()
    if f.ndim != 2 or c.ndim != 2 or c.shape != (f.shape[0], 4) or f.shape[0] == 0:
        raise ValueError(
            f"tokens_to_video: expected feats [n, C] and coords [n, 4], got {tuple(f.shape)}, {tuple(c.shape)}"
        )
    _, ph, pw = patch
    if f.shape[1] % (ph * pw * 3):
        raise ValueError(f"tokens_to_video: feature width {f.shape[1]} is not a multiple of {ph * pw * 3}")
    pt = f.shape[1] // (ph * pw * 3)
    nt, nh, nw = (int(c[:, i].max()) + 1 for i in range(3))
    grid = f.new_zeros(nt, nh, nw, pt, ph, pw, 3)
    grid[c[:, 0], c[:, 1], c[:, 2]] = f.reshape(-1, pt, ph, pw, 3)
    return grid.permute(0, 3, 1, 4, 2, 5, 6).reshape(nt * pt, nh * ph, nw * pw, 3)


def tokens_to_image(feats, coords4, patch=PATCH) -> torch.Tensor:
    """Image tokens -> [H, W, 3] (first frame; the temporal padding is dropped)."""
    return tokens_to_video(feats, coords4, patch)[0]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float -> uint8 [0, 255] numpy."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------- packed batch


@dataclass
class SparseBatch:
    """Packed variable-length batch: feats [N, C], coords [N, 5] int32 (b, t, x, y, z); samples contiguous, ordered by b."""

    feats: torch.Tensor
    coords: torch.Tensor

    @classmethod
    def pack(cls, samples, channels: int | None = None) -> "SparseBatch":
        """samples: list of (feats [n, C], coords [n, 4]). Validates shapes, finiteness and coordinate range."""
        if len(samples) == 0:
            raise ValueError("SparseBatch.pack: no samples")
        feats, coords = [], []
        for i, sample in enumerate(samples):
            if not isinstance(sample, (tuple, list)) or len(sample) != 2:
                raise ValueError(f"sample {i}: expected a (feats, coords) pair")
            f, c = _as_tensor(sample[0], f"sample {i} feats"), _as_tensor(sample[1], f"sample {i} coords")
            if f.ndim != 2 or f.shape[0] == 0:
                raise ValueError(f"sample {i}: feats must be a non-empty [n, C] array, got shape {tuple(f.shape)}")
            if channels is not None and f.shape[1] != channels:
                raise ValueError(f"sample {i}: feats have {f.shape[1]} channels, expected {channels}")
            if feats and f.shape[1] != feats[0].shape[1]:
                raise ValueError(f"sample {i}: feats have {f.shape[1]} channels, sample 0 has {feats[0].shape[1]}")
            if c.ndim != 2 or c.shape != (f.shape[0], 4):
                raise ValueError(f"sample {i}: coords must be [{f.shape[0]}, 4] (t, x, y, z), got {tuple(c.shape)}")
            if c.is_floating_point():
                raise ValueError(f"sample {i}: coords must be integers, got {c.dtype}")
            _check_finite(f, f"sample {i} feats")
            check_coords(c, f"sample {i} coords")
            feats.append(f)
            coords.append(torch.cat([torch.full_like(c[:, :1], i), c], dim=1).int().to(f.device))
        return cls(torch.cat(feats), torch.cat(coords))

    @property
    def batch_size(self) -> int:
        return int(self.coords[-1, 0]) + 1 if len(self.coords) else 0

    @property
    def seqlens(self) -> torch.Tensor:
        return torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.nn.functional.pad(self.seqlens.cumsum(0), (1, 0)).int()

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Cut a per-token tensor [N, ...] into one piece per sample."""
        return list(torch.split(x, self.seqlens.tolist()))

    def to(self, device=None, dtype=None) -> "SparseBatch":
        return SparseBatch(self.feats.to(device=device, dtype=dtype), self.coords.to(device=device))

    def replace(self, feats: torch.Tensor) -> "SparseBatch":
        return SparseBatch(feats, self.coords)

    def __len__(self) -> int:
        return len(self.feats)
