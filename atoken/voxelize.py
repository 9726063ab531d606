"""Multi-view renders -> active 64^3 voxels and their 768-d RGB patch features (AToken §7.1 recipe), in torch.

Occupancy: every rendered depth pixel is unprojected to a world point (pixel centres; the official script uses
i/H without the half-pixel offset, a 1/2-pixel shift we do not copy); voxel index = floor((p + 0.5) * 64) clipped
to 0..63; active voxels are the unique indices, returned in argwhere ('ij') order as (x, y, z).

Features: each 256-px view (resized if rendered at another size) is cut into 16x16 patches -> a [16, 16, 768]
map with channel order (p1, p2, c). A voxel centre is projected with the OpenCV w2c + normalised intrinsics.
- "nearest" (official): the view with the smallest camera depth of the voxel centre, no visibility test (one
  [M, views] depth matmul and an argmin, then one gather per voxel: no loop); the
  patch map is sampled like `grid_sample(mode="nearest", align_corners=True, padding zeros)` at uv * 2 - 1, i.e.
  patch index round(uv * 15) (half to even), zeros when outside.
- "visible_mean": mean of the same patch samples over the views where the voxel is visible: inside the frame and
  its centre's depth <= rendered depth at its pixel + tolerance (in voxel sizes). Voxels visible in no view fall
  back to "nearest".
All views are processed at once (no Python loop over views or voxels); works on CPU and CUDA.
"""

import torch
import torch.nn.functional as F

GRID = 64
FEATURE_RES = 256
PATCH = 16


def _cam_tensors(w2c, K, device):
    return (
        torch.as_tensor(w2c, device=device, dtype=torch.float32),
        torch.as_tensor(K, device=device, dtype=torch.float32),
    )


def _world_components(depth: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor):
    """World x, y, z [B, H, W] of every pixel centre of every view at its depth, as camera centre + depth x ray
    (R^T [x, y, 1] per pixel), over dense views: no per-pixel 3x3 gathers. Background pixels give garbage that
    callers mask out."""
    B, H, W = depth.shape
    dev = depth.device
    u = (torch.arange(W, device=dev, dtype=torch.float32) + 0.5) / W
    v = (torch.arange(H, device=dev, dtype=torch.float32) + 0.5) / H
    x = (u[None] - K[:, 0, 2, None]) / K[:, 0, 0, None]  # [B, W]: camera x / z of each column
    y = (v[None] - K[:, 1, 2, None]) / K[:, 1, 1, None]  # [B, H]
    R, t = w2c[:, :3, :3], w2c[:, :3, 3]
    centre = -(R.transpose(1, 2) @ t[..., None])[..., 0]  # [B, 3]
    out = []
    for i in range(3):
        ray = (R[:, 0, i, None] * x)[:, None, :] + (R[:, 1, i, None] * y + R[:, 2, i, None])[:, :, None]
        out.append(ray.mul_(depth).add_(centre[:, i, None, None]))
    return out


def unproject_depth(depth: torch.Tensor, mask: torch.Tensor, w2c, K) -> torch.Tensor:
    """World points [P, 3] of all valid depth pixels of all views (view, row, column order)."""
    w2c, K = _cam_tensors(w2c, K, depth.device)
    return torch.stack([c[mask] for c in _world_components(depth, w2c, K)], -1)


def occupied_voxels(depth: torch.Tensor, mask: torch.Tensor, w2c, K, grid: int = GRID) -> torch.Tensor:
    """Active voxel indices long [M, 3] (x, y, z), sorted in 'ij' order."""
    w2c, K = _cam_tensors(w2c, K, depth.device)
    lin = None
    for c in _world_components(depth, w2c, K):  # linear voxel index of each pixel (exact in float32: < 2^24)
        i = c.add_(0.5).mul_(grid).floor_().clamp_(0, grid - 1)
        lin = i if lin is None else lin.mul_(grid).add_(i)
    lin = torch.where(mask, lin, float(grid**3)).long()  # background pixels: one spare cell, dropped below
    occ = torch.zeros(grid**3 + 1, dtype=torch.bool, device=depth.device)
    occ[lin] = True
    return occ[:-1].view(grid, grid, grid).nonzero()


def voxel_centers(coords: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    return (coords.float() + 0.5) / grid - 0.5


def patch_features(rgb: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] in [0, 1] -> [B, 16, 16, 768] patch map (channel order p1, p2, c) of the 256-px view."""
    if rgb.shape[1:3] != (FEATURE_RES, FEATURE_RES):
        x = F.interpolate(
            rgb.permute(0, 3, 1, 2),
            size=(FEATURE_RES, FEATURE_RES),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        rgb = x.clamp(0, 1).permute(0, 2, 3, 1)
    B, n = rgb.shape[0], FEATURE_RES // PATCH
    x = rgb.reshape(B, n, PATCH, n, PATCH, 3).permute(0, 1, 3, 2, 4, 5)  # b, row, col, p1, p2, c
    return x.reshape(B, n, n, PATCH * PATCH * 3)


def patch_colors(feats: torch.Tensor) -> torch.Tensor:
    """Voxel features [M, 768] (channel order p1, p2, c) -> each voxel's mean patch colour [M, 3]."""
    if feats.ndim != 2 or feats.shape[1] != PATCH * PATCH * 3:
        raise ValueError(f"voxel features: expected [M, {PATCH * PATCH * 3}], got {tuple(feats.shape)}")
    return feats.float().reshape(len(feats), PATCH * PATCH, 3).mean(1)


def _project(centers: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor):
    """centres [M, 3] -> camera depth [B, M], u [B, M], v [B, M] (normalised image coords)."""
    cam = centers[None] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
    z = cam[..., 2]
    zs = z.clamp_min(1e-8)
    u = K[:, None, 0, 0] * cam[..., 0] / zs + K[:, None, 0, 2]
    v = K[:, None, 1, 1] * cam[..., 1] / zs + K[:, None, 1, 2]
    return z, u, v


def _patch_index(u: torch.Tensor, v: torch.Tensor, n: int = FEATURE_RES // PATCH):
    """grid_sample(nearest, align_corners=True) index rule: round(uv * (n - 1)), valid when inside 0..n-1."""
    col = torch.round(u * (n - 1)).long()
    row = torch.round(v * (n - 1)).long()
    valid = (col >= 0) & (col < n) & (row >= 0) & (row < n)
    return row.clamp(0, n - 1), col.clamp(0, n - 1), valid


def _nearest_patches(rgb: torch.Tensor, centers: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor, n: int):
    """The "nearest" rule, vectorised over voxels: camera depth of every centre in every view ([M, B], one
    matmul), the nearest view per voxel, the projection into that view only, and its 16x16 patch gathered
    straight from the renders as 16 contiguous pixel rows (no [B, 16, 16, 768] patch map unless the views must be
    resized to 256 px)."""
    R, t = w2c[:, :3, :3], w2c[:, :3, 3]
    z = centers @ R[:, 2].T + t[:, 2]  # [M, B]
    nearest = z.argmin(1)  # [M]
    cam = (R[nearest] @ centers[:, :, None])[..., 0] + t[nearest]  # [M, 3], in the chosen view
    Kn = K[nearest]
    zs = cam[:, 2].clamp_min(1e-8)
    u = Kn[:, 0, 0] * cam[:, 0] / zs + Kn[:, 0, 2]
    v = Kn[:, 1, 1] * cam[:, 1] / zs + Kn[:, 1, 2]
    row, col, valid = _patch_index(u, v, n)
    H, W = rgb.shape[1:3]
    if (H, W) == (FEATURE_RES, FEATURE_RES):  # the patch's 16 image rows of 16 pixels (48 contiguous floats each)
        p1 = torch.arange(PATCH, device=rgb.device)
        idx = (((nearest * n + row) * PATCH)[:, None] + p1) * n + col[:, None]  # [M, 16] into [B*H*W/16, 48]
        out = rgb.reshape(-1, PATCH * 3).index_select(0, idx.view(-1)).view(len(centers), -1)  # (p1, p2, c)
    else:
        out = patch_features(rgb)[nearest, row, col]
    return out.mul_(valid[:, None])  # a fresh gather: in place


def voxel_features(
    rgb: torch.Tensor,
    coords: torch.Tensor,
    w2c,
    K,
    mode: str = "nearest",
    depth: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    visibility_tol: float = 2.0,
    grid: int = GRID,
) -> torch.Tensor:
    """Features float32 [M, 768] in [0, 1] for voxel `coords` [M, 3]."""
    if mode not in ("nearest", "visible_mean"):
        raise ValueError(f"unknown feature mode {mode!r} (nearest | visible_mean)")
    if mode == "visible_mean" and (depth is None or mask is None):
        raise ValueError("visible_mean needs the rendered depth and mask")
    dev = rgb.device
    w2c, K = _cam_tensors(w2c, K, dev)
    centers = voxel_centers(coords.to(dev), grid)
    n = FEATURE_RES // PATCH
    out = _nearest_patches(rgb, centers, w2c, K, n)
    if mode == "nearest":
        return out
    feats = patch_features(rgb)  # [B, n, n, 768]
    B = feats.shape[0]
    table = feats.reshape(B * n * n, -1)
    z, u, v = _project(centers, w2c, K)  # [B, M]
    row, col, valid = _patch_index(u, v, n)
    M = coords.shape[0]
    H, W = depth.shape[1:]
    pi = torch.floor(v * H).long()
    pj = torch.floor(u * W).long()
    inframe = (pi >= 0) & (pi < H) & (pj >= 0) & (pj < W)
    pi, pj = pi.clamp(0, H - 1), pj.clamp(0, W - 1)
    bidx = torch.arange(B, device=dev)[:, None]
    seen = mask[bidx, pi, pj] & (z <= depth[bidx, pi, pj] + visibility_tol / grid)
    vis = inframe & seen & valid  # [B, M]
    count = vis.sum(0)  # [M]
    bb, mm = vis.nonzero(as_tuple=True)
    cols = (bb * n + row[bb, mm]) * n + col[bb, mm]
    weights = 1.0 / count[mm].float()
    Wm = torch.sparse_coo_tensor(torch.stack([mm, cols]), weights, (M, B * n * n), check_invariants=False)
    mean = torch.sparse.mm(Wm, table)
    return torch.where((count > 0)[:, None], mean, out)
