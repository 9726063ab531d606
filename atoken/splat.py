"""A small pure-PyTorch 3D Gaussian splat renderer (CPU or GPU, no CUDA extension).

It follows the 3DGS / mip-splatting rasterizer that the official GS decoder is trained with:
  1. project each Gaussian centre with an OpenCV world->camera matrix and normalized intrinsics
     (fx = fy = 0.5 / tan(fov/2), cx = cy = 0.5; pixel i has its centre at i + 0.5 in [0, W) units),
  2. EWA splatting: 2D covariance = J W Sigma W^T J^T, with the 1.3 x FoV clamp of the Jacobian,
  3. the 2D filter: add `kernel_size` (0.1 px^2) to the 2D variance and scale the opacity by
     sqrt(det before / det after) (mip-splatting's compensation),
  4. sort by camera depth, bin into 16x16 pixel tiles, and alpha-composite front to back on a black
     background: alpha = min(0.99, opacity * exp(-0.5 d^T conic d)), skipped below 1/255, a pixel stops
     once its transmittance would fall below 1e-4.
Tiles are processed one at a time and each tile's Gaussians in depth-ordered chunks, carrying transmittance,
so memory stays bounded for 64^3-scale assets (hundreds of thousands of Gaussians).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metrics import psnr  # noqa: F401 (re-exported for renders)

SH_C0 = 0.28209479177387814  # degree-0 spherical harmonic


@dataclass
class Gaussians:
    """One asset's Gaussians in world space (the GS decoder's output)."""

    xyz: torch.Tensor  # [G, 3] centres
    color_dc: torch.Tensor  # [G, 3] SH degree-0 coefficients (colour = 0.5 + SH_C0 * dc, clamped >= 0)
    scale: torch.Tensor  # [G, 3] standard deviations along the local axes (activated)
    rotation: torch.Tensor  # [G, 4] unit quaternions (w, x, y, z)
    opacity: torch.Tensor  # [G, 1] in (0, 1)

    def __len__(self):
        return self.xyz.shape[0]

    @property
    def rgb(self) -> torch.Tensor:
        return (0.5 + SH_C0 * self.color_dc).clamp_min(0.0)

    def to(self, *args, **kwargs) -> "Gaussians":
        return Gaussians(
            *(t.to(*args, **kwargs) for t in (self.xyz, self.color_dc, self.scale, self.rotation, self.opacity))
        )


@dataclass
class Camera:
    w2c: torch.Tensor  # [4, 4] OpenCV world->camera (x right, y down, z forward)
    intrinsics: torch.Tensor  # [3, 3] normalized (image spans [0, 1] x [0, 1])


@dataclass
class RenderConfig:
    resolution: int = 512  # square image, H = W
    near: float = 0.2  # Gaussians closer than this (camera z) are culled, as in the 3DGS rasterizer
    kernel_size: float = 0.1  # 2D filter variance in px^2
    mip_compensation: bool = True  # scale opacity by sqrt(det(cov2d) / det(cov2d + filter))
    tile: int = 16  # tile edge in pixels
    first_chunk: int = 128  # Gaussians per tile composited at once: the first chunk, doubling up to `chunk`
    chunk: int = 2048


@dataclass
class RenderOutput:
    image: torch.Tensor  # [H, W, 3] float, black background
    alpha: torch.Tensor  # [H, W] accumulated opacity = 1 - final transmittance


def intrinsics_from_fov(fov_rad: float) -> torch.Tensor:
    f = 0.5 / math.tan(fov_rad / 2)
    return torch.tensor([[f, 0.0, 0.5], [0.0, f, 0.5], [0.0, 0.0, 1.0]])


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """OpenCV world->camera matrix of a camera at `eye` looking at `target` (z-up world)."""
    eye, target, up = (torch.as_tensor(v, dtype=torch.float32) for v in (eye, target, up))
    z = F.normalize(target - eye, dim=0)
    x = F.normalize(torch.linalg.cross(z, up), dim=0)
    y = torch.linalg.cross(z, x)
    w2c = torch.eye(4)
    w2c[:3, :3] = torch.stack([x, y, z])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return w2c


def orbit_cameras(n: int, radius: float = 2.0, fov_deg: float = 40.0, pitch_deg: float = 20.0) -> list[Camera]:
    """`n` cameras evenly spaced in yaw around the z axis, all looking at the origin."""
    intr = intrinsics_from_fov(math.radians(fov_deg))
    pitch = math.radians(pitch_deg)
    cams = []
    for i in range(n):
        yaw = 2 * math.pi * i / n
        eye = (
            radius * math.sin(yaw) * math.cos(pitch),
            radius * math.cos(yaw) * math.cos(pitch),
            radius * math.sin(pitch),
        )
        cams.append(Camera(look_at(eye), intr.clone()))
    return cams


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """[G, 4] (w, x, y, z) -> [G, 3, 3]; normalizes first."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)


def project(g: Gaussians, cam: Camera, cfg: RenderConfig):
    """Screen-space Gaussians: means [G,2] (pixel-centre units), conics [G,3], opacity [G], depth [G],
    radius [G] (px) and a visibility mask [G]."""
    H = W = cfg.resolution
    dev = g.xyz.device
    w2c, K = cam.w2c.to(dev, torch.float32), cam.intrinsics.to(dev, torch.float32)
    R, t = w2c[:3, :3], w2c[:3, 3]
    p = g.xyz.float() @ R.T + t
    z = p[:, 2]
    visible = z > cfg.near
    zs = torch.where(visible, z, torch.ones_like(z))
    fx, fy, cx, cy = K[0, 0] * W, K[1, 1] * H, K[0, 2] * W, K[1, 2] * H
    mean = torch.stack([fx * p[:, 0] / zs + cx - 0.5, fy * p[:, 1] / zs + cy - 0.5], dim=-1)
    # EWA: Jacobian of the perspective projection, x/z and y/z clamped to 1.3 x the half FoV
    limx, limy = 1.3 * (W / 2) / fx, 1.3 * (H / 2) / fy
    tx = (p[:, 0] / zs).clamp(-limx, limx) * zs
    ty = (p[:, 1] / zs).clamp(-limy, limy) * zs
    zero = torch.zeros_like(zs)
    J = torch.stack([fx / zs, zero, -fx * tx / zs**2, zero, fy / zs, -fy * ty / zs**2], -1).reshape(-1, 2, 3)
    M = quat_to_rotmat(g.rotation.float()) * g.scale.float()[:, None, :]  # R S
    cov3d = M @ M.transpose(1, 2)
    T = J @ R
    cov2d = T @ cov3d @ T.transpose(1, 2)
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    # 2D filter with mip-splatting's opacity compensation
    det0 = (a * c - b * b).clamp_min(1e-6)
    a, c = a + cfg.kernel_size, c + cfg.kernel_size
    det = a * c - b * b
    opacity = g.opacity.float().reshape(-1)
    if cfg.mip_compensation:
        coef = torch.sqrt(det0 / (det.clamp_min(1e-6) + 1e-6) + 1e-6)
        opacity = opacity * torch.where((det0 > 1e-6) & (det > 1e-6), coef, zero)
    visible &= det > 0
    dets = torch.where(visible, det, torch.ones_like(det))
    conic = torch.stack([c / dets, -b / dets, a / dets], dim=-1)
    mid = 0.5 * (a + c)
    radius = torch.ceil(3 * torch.sqrt(torch.clamp_min(mid + torch.sqrt((mid * mid - det).clamp_min(0.1)), 0)))
    return mean, conic, opacity, z, radius, visible


@torch.no_grad()
def render(g: Gaussians, cam: Camera, cfg: RenderConfig | None = None) -> RenderOutput:
    cfg = cfg or RenderConfig()
    H = W = cfg.resolution
    dev = g.xyz.device
    mean, conic, opacity, depth, radius, visible = project(g, cam, cfg)
    rgb = g.rgb.float()

    # tile rectangle of each Gaussian's 3-sigma disc (same rule as the 3DGS rasterizer's getRect)
    ts = cfg.tile
    ntx, nty = math.ceil(W / ts), math.ceil(H / ts)
    x0 = ((mean[:, 0] - radius) / ts).floor().clamp(0, ntx).long()
    x1 = ((mean[:, 0] + radius + ts - 1) / ts).floor().clamp(0, ntx).long()
    y0 = ((mean[:, 1] - radius) / ts).floor().clamp(0, nty).long()
    y1 = ((mean[:, 1] + radius + ts - 1) / ts).floor().clamp(0, nty).long()
    nx, ny = x1 - x0, y1 - y0
    keep = visible & (nx > 0) & (ny > 0) & (radius > 0)
    idx = torch.nonzero(keep).squeeze(1)
    idx = idx[torch.argsort(depth[idx])]  # front to back

    # one (tile, Gaussian) pair per covered tile, ordered by tile then depth
    cnt = (nx * ny)[idx]
    gid = torch.repeat_interleave(idx, cnt)
    rank = torch.repeat_interleave(torch.arange(len(idx), device=dev), cnt)
    local = torch.arange(len(gid), device=dev) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
    tile_x = x0[gid] + local % nx[gid]
    tile_y = y0[gid] + torch.div(local, nx[gid], rounding_mode="floor")
    tile_id = tile_y * ntx + tile_x
    order = torch.argsort(tile_id * max(len(idx), 1) + rank)
    gid, tile_id = gid[order], tile_id[order]
    counts = torch.bincount(tile_id, minlength=ntx * nty).tolist()

    image = torch.zeros(nty * ts, ntx * ts, 3, device=dev)
    trans = torch.ones(nty * ts, ntx * ts, device=dev)
    py, px = torch.meshgrid(
        torch.arange(ts, device=dev, dtype=torch.float32),
        torch.arange(ts, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    pix = torch.stack([px.reshape(-1), py.reshape(-1)], dim=-1)  # [P, 2] (x, y) inside a tile
    start = 0
    for t, n in enumerate(counts):
        if n == 0:
            continue
        ty, tx = divmod(t, ntx)
        p = pix + torch.tensor([tx * ts, ty * ts], device=dev, dtype=torch.float32)
        T = torch.ones(len(p), device=dev)
        C = torch.zeros(len(p), 3, device=dev)
        done = torch.zeros(len(p), dtype=torch.bool, device=dev)
        s, k = start, cfg.first_chunk  # chunks grow, so tiles behind an opaque surface stop early and cheaply
        while s < start + n:
            ids = gid[s : min(s + k, start + n)]
            T, C, done = _composite(p, mean[ids], conic[ids], opacity[ids], rgb[ids], T, C, done)
            if bool(done.all()):
                break
            s, k = s + k, min(2 * k, cfg.chunk)
        start += n
        image[ty * ts : (ty + 1) * ts, tx * ts : (tx + 1) * ts] = C.reshape(ts, ts, 3)
        trans[ty * ts : (ty + 1) * ts, tx * ts : (tx + 1) * ts] = T.reshape(ts, ts)
    return RenderOutput(image=image[:H, :W], alpha=1 - trans[:H, :W])


def _composite(pix, mean, conic, opacity, rgb, T, C, done):
    """Front-to-back compositing of K depth-sorted Gaussians over P pixels, continuing from (T, C, done)."""
    d = mean[None, :, :] - pix[:, None, :]  # [P, K, 2]
    power = -0.5 * (conic[:, 0] * d[..., 0] ** 2 + conic[:, 2] * d[..., 1] ** 2) - conic[:, 1] * d[..., 0] * d[..., 1]
    alpha = torch.clamp_max(opacity * torch.exp(power), 0.99)
    alpha = torch.where((power <= 0) & (alpha >= 1 / 255) & ~done[:, None], alpha, torch.zeros_like(alpha))
    # a Gaussian is skipped (and the pixel done) once it would push transmittance below 1e-4
    included = T[:, None] * torch.cumprod(1 - alpha, dim=1) >= 1e-4
    done = done | ((alpha > 0) & ~included).any(dim=1)
    alpha = alpha * included
    one_minus = 1 - alpha
    before = T[:, None] * torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), one_minus[:, :-1]], 1), dim=1)
    C = C + (alpha * before) @ rgb
    T = T * one_minus.prod(dim=1)
    return T, C, done
