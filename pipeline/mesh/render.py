"""Render a normalised mesh from many cameras: RGB (unlit base colour), camera depth and mask, all views in one batch.

The backends only rasterize (nearest triangle id + perspective-correct barycentrics per pixel); projection and
shading (vertex-colour interpolation, bilinear wrap-around texture sampling) are shared torch code here, so the
CUDA (nvdiffrast) and CPU paths produce the same images up to edge pixels.
Output convention: OpenCV (row 0 = top), background rgb = 0 and depth = 0, depth = camera-space z.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .cameras import Cameras
from .load import MeshData
from .raster_cpu import rasterize_cpu


@dataclass
class RenderConfig:
    resolution: int = 256
    backend: str = "auto"  # auto | cuda | cpu   (auto = cuda when a GPU and nvdiffrast are present)
    device: str = "auto"  # auto | cpu | cuda[:i]  (the cpu backend may also run on a GPU device; backend auto
    # without nvdiffrast on a GPU machine does: the same torch rasterizer, on the GPU)
    cpu_chunk: int = 1 << 22  # candidate pixels per chunk in the CPU rasterizer (bounds memory)


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # float32 [B, H, W, 3] in [0, 1]
    depth: torch.Tensor  # float32 [B, H, W], 0 = background
    mask: torch.Tensor  # bool [B, H, W]
    backend: str


def cuda_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import nvdiffrast.torch  # noqa: F401
    except ImportError:
        return False
    return True


def sample_texture(stack: torch.Tensor, tex: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear, wrap-around lookup. stack [T, S, S, 3] float, tex [P] index, uv [P, 2] (v = 0 at the bottom row)."""
    S = stack.shape[1]
    x = uv[:, 0] * S - 0.5
    y = (1.0 - uv[:, 1]) * S - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1) % S, (y0 + 1) % S
    x0, y0 = x0 % S, y0 % S

    def at(yy, xx):
        return stack[tex, yy, xx]

    return (
        at(y0, x0) * (1 - fx) * (1 - fy)
        + at(y0, x1) * fx * (1 - fy)
        + at(y1, x0) * (1 - fx) * fy
        + at(y1, x1) * fx * fy
    )


def texture_stack(textures: list, device) -> torch.Tensor:
    """Resize all textures to one square size (the largest side present) and stack them: [T, S, S, 3] in [0, 1]."""
    if not textures:
        return torch.zeros(0, 1, 1, 3, device=device)
    S = max(max(t.shape[0], t.shape[1]) for t in textures)
    out = []
    for t in textures:
        x = torch.as_tensor(np.array(t, copy=True), device=device).permute(2, 0, 1)[None].float() / 255.0
        if x.shape[-2:] != (S, S):
            x = torch.nn.functional.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        out.append(x[0].permute(1, 2, 0))
    return torch.stack(out)


class Renderer:
    """Picks the backend once (and holds the nvdiffrast context); `render(mesh, cams)` does all views at once."""

    def __init__(self, cfg: RenderConfig = RenderConfig()):
        self.cfg = cfg
        backend, gpu = cfg.backend, torch.cuda.is_available()
        if backend == "auto":
            backend = "cuda" if cuda_available() else "cpu"
        dev = cfg.device
        if dev == "auto":  # auto without nvdiffrast on a GPU machine: the torch rasterizer on the GPU
            dev = "cuda" if backend == "cuda" or (cfg.backend == "auto" and gpu) else "cpu"
        self.device = torch.device(dev)
        self.backend = backend
        if backend == "cuda":
            from .raster_cuda import CudaRasterizer

            self.raster = CudaRasterizer(self.device)
        elif backend == "cpu":
            self.raster = lambda pix, z, faces, h, w: rasterize_cpu(pix, z, faces, h, w, chunk=cfg.cpu_chunk)
        else:
            raise ValueError(f"unknown render backend {backend!r} (auto | cuda | cpu)")

    @torch.no_grad()
    def render(self, mesh: MeshData, cams: Cameras) -> RenderOutput:
        dev, H = self.device, self.cfg.resolution
        W = H
        verts = torch.as_tensor(mesh.vertices, device=dev, dtype=torch.float32)
        faces = torch.as_tensor(mesh.faces, device=dev, dtype=torch.long)
        w2c = torch.as_tensor(cams.w2c, device=dev, dtype=torch.float32)
        K = torch.as_tensor(cams.intrinsics, device=dev, dtype=torch.float32)

        cam = verts[None] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]  # [B, V, 3] OpenCV camera
        z = cam[..., 2]
        zs = z.clamp_min(1e-8)
        u = K[:, None, 0, 0] * cam[..., 0] / zs + K[:, None, 0, 2]
        v = K[:, None, 1, 1] * cam[..., 1] / zs + K[:, None, 1, 2]
        pix = torch.stack([u * W, v * H], dim=-1)
        tri_id, bary = self.raster(pix, z, faces, H, W)

        mask = tri_id >= 0
        B = mask.shape[0]
        pix_idx = mask.view(-1).nonzero().squeeze(1)  # flat pixel indices (1-D gathers are fast everywhere)
        f = tri_id.view(-1).index_select(0, pix_idx)
        w = bary.reshape(-1, 3).index_select(0, pix_idx)  # [P, 3]
        corners = faces.index_select(0, f)  # [P, 3]
        b = pix_idx // (H * W)
        zc = z.reshape(-1).index_select(0, (b[:, None] * z.shape[1] + corners).view(-1)).view(-1, 3)
        depth = torch.zeros(B * H * W, device=dev)
        depth.index_copy_(0, pix_idx, (w * zc).sum(-1))

        colors = torch.as_tensor(mesh.colors, device=dev, dtype=torch.float32)
        col = (w[..., None] * colors.index_select(0, corners.view(-1)).view(-1, 3, 3)).sum(1)  # [P, 3]
        face_tex = torch.as_tensor(mesh.face_tex, device=dev, dtype=torch.long).index_select(0, f)
        textured = face_tex >= 0
        if textured.any():
            uvs = torch.as_tensor(mesh.uvs, device=dev, dtype=torch.float32)
            sel = textured.nonzero().squeeze(1)
            uv = (w[sel, :, None] * uvs.index_select(0, corners[sel].view(-1)).view(-1, 3, 2)).sum(1)
            stack = texture_stack(mesh.textures, dev)
            col[sel] = col[sel] * sample_texture(stack, face_tex[sel], uv)
        rgb = torch.zeros(B * H * W, 3, device=dev)
        rgb.index_copy_(0, pix_idx, col.clamp(0, 1))
        rgb, depth = rgb.view(B, H, W, 3), depth.view(B, H, W)
        return RenderOutput(rgb=rgb, depth=depth, mask=mask, backend=self.backend)


def render(mesh: MeshData, cams: Cameras, cfg: RenderConfig = RenderConfig()) -> RenderOutput:
    return Renderer(cfg).render(mesh, cams)
