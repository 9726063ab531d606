"""A vectorised z-buffer triangle rasterizer in pure PyTorch (CPU, or any device), same outputs as nvdiffrast.

Input is already projected: pixel coordinates `pix` [B, V, 2] as (x = column, y = row), continuous, with pixel
(i, j) centred at (j + 0.5, i + 0.5), and camera depth `z` [B, V]. Output per pixel: the id of the nearest
triangle (-1 = empty) and its perspective-correct barycentrics (weights of the triangle's 3 corners).

How: every (view, triangle) pair gets its pixel bounding box, cut into 16x16 tiles; tiles entirely outside an
edge are culled; the rest are bucketed by their exact size, and each bucket is expanded into a
dense [n, h, w] grid of candidate pixels in chunks (bounded memory, no Python loop over triangles; views are
processed in groups so that large meshes stay within memory). Coverage is an edge-function test at pixel centres; the depth test packs
(depth bits, triangle id) into one int64 key and keeps the per-pixel minimum with `scatter_reduce`, which is
deterministic (ties go to the lower triangle id). Triangles with a corner at z <= near are dropped (cannot happen
for normalised meshes seen from radius >= 1).
"""

import torch

_EMPTY = torch.iinfo(torch.int64).max


def _edge(ax, ay, bx, by, px, py):
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def _barycentrics(p, x, y):
    """Screen-space barycentrics of points (x, y) in triangles p [..., 3, 2]; returns (b0, b1, b2, area)."""
    x0, y0, x1, y1, x2, y2 = p[..., 0, 0], p[..., 0, 1], p[..., 1, 0], p[..., 1, 1], p[..., 2, 0], p[..., 2, 1]
    area = _edge(x0, y0, x1, y1, x2, y2)
    w0 = _edge(x1, y1, x2, y2, x, y)
    w1 = _edge(x2, y2, x0, y0, x, y)
    w2 = _edge(x0, y0, x1, y1, x, y)
    return w0 / area, w1 / area, w2 / area, area


def _edge_coeffs(tp: torch.Tensor) -> torch.Tensor:
    """Affine barycentric functions b_i(x, y) = a_i x + b_i y + c_i of triangles tp [n, 3, 2] -> [n, 3, 3]."""
    area = _edge(tp[:, 0, 0], tp[:, 0, 1], tp[:, 1, 0], tp[:, 1, 1], tp[:, 2, 0], tp[:, 2, 1])
    coeffs = []
    for i in range(3):  # b_i = edge(p_j, p_k, q) / area with (j, k) the opposite edge
        j, k = (i + 1) % 3, (i + 2) % 3
        xj, yj, xk, yk = tp[:, j, 0], tp[:, j, 1], tp[:, k, 0], tp[:, k, 1]
        coeffs.append(torch.stack([-(yk - yj), xk - xj, -(xk - xj) * yj + (yk - yj) * xj], -1) / area[:, None])
    return torch.stack(coeffs, 1)


def rasterize_cpu(
    pix: torch.Tensor,
    z: torch.Tensor,
    faces: torch.Tensor,
    height: int,
    width: int,
    near: float = 1e-3,
    chunk: int = 1 << 21,
    max_pairs: int = 1 << 21,
):
    """Return tri_id long [B, H, W] (-1 = background) and bary float32 [B, H, W, 3]."""
    group = max(1, max_pairs // max(1, faces.shape[0]))
    outs = [
        _rasterize_views(pix[i : i + group], z[i : i + group], faces, height, width, near, chunk)
        for i in range(0, pix.shape[0], group)
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _rasterize_views(pix, z, faces, height, width, near, chunk, tile: int = 16):
    B, dev = pix.shape[0], pix.device
    faces = faces.long()
    num_faces = faces.shape[0]
    tp = pix[:, faces].double()  # [B, F, 3, 2]
    tz = z[:, faces].float()  # [B, F, 3]
    zbuf = torch.full((B * height * width,), _EMPTY, dtype=torch.int64, device=dev)

    # Pixel index range covered by each (view, triangle): centre j + 0.5 inside [min x, max x].
    lo = torch.ceil(tp.amin(2) - 0.5).clamp_min(0)
    hi = torch.floor(tp.amax(2) - 0.5)
    hi = torch.minimum(hi, torch.tensor([width - 1, height - 1], device=dev, dtype=hi.dtype))
    size = hi - lo + 1  # [B, F, 2] (w, h)
    area = _edge(*tp[..., 0, :].unbind(-1), *tp[..., 1, :].unbind(-1), *tp[..., 2, :].unbind(-1))
    ok = (size > 0).all(-1) & (tz > near).all(-1) & torch.isfinite(tp).all(-1).all(-1) & (area != 0)
    bi, fi = ok.nonzero(as_tuple=True)
    lo, size = lo[bi, fi].long(), size[bi, fi].long()
    coef = _edge_coeffs(tp[bi, fi])  # [n, 3, 3]

    # Work items: (pair, tile). Boxes larger than `tile` are cut into tile x tile pieces.
    ntile = (size + tile - 1) // tile  # [n, 2]
    count = ntile[:, 0] * ntile[:, 1]
    item_pair = torch.repeat_interleave(torch.arange(len(bi), device=dev), count)
    first = torch.cumsum(count, 0) - count
    k = torch.arange(item_pair.numel(), device=dev) - first[item_pair]
    tx, ty = k % ntile[item_pair, 0], k // ntile[item_pair, 0]
    x0 = lo[item_pair, 0] + tx * tile
    y0 = lo[item_pair, 1] + ty * tile
    x1 = torch.minimum(x0 + tile, lo[item_pair, 0] + size[item_pair, 0])  # exclusive
    y1 = torch.minimum(y0 + tile, lo[item_pair, 1] + size[item_pair, 1])
    # Cull tiles that lie entirely outside one edge (max of an affine function is at a corner).
    c = coef[item_pair]
    xa, xb = (x0 + 0.5).double()[:, None], (x1 - 0.5).double()[:, None]
    ya, yb = (y0 + 0.5).double()[:, None], (y1 - 0.5).double()[:, None]
    best = c[..., 2] + torch.maximum(c[..., 0] * xa, c[..., 0] * xb) + torch.maximum(c[..., 1] * ya, c[..., 1] * yb)
    keep = (best >= 0).all(-1)
    item_pair, x0, y0, x1, y1 = item_pair[keep], x0[keep], y0[keep], x1[keep], y1[keep]
    coef = coef.float()

    # Bucket items by their exact extent (<= tile x tile), then expand each bucket to dense pixel grids.
    key = (x1 - x0) * 64 + (y1 - y0)
    for kk in torch.unique(key).tolist():
        bw, bh = kk // 64, kk % 64
        sel = (key == kk).nonzero(as_tuple=True)[0]
        step = max(1, chunk // (bw * bh))
        dx = torch.arange(bw, device=dev)
        dy = torch.arange(bh, device=dev)
        for s in range(0, sel.numel(), step):
            it = sel[s : s + step]
            p = item_pair[it]
            px = x0[it, None] + dx  # [n, bw]
            py = y0[it, None] + dy  # [n, bh]
            cx, cy = (px.float() + 0.5)[:, None, :], (py.float() + 0.5)[:, :, None]
            cf = coef[p]
            w = [
                cf[:, i, 0, None, None] * cx + (cf[:, i, 1, None, None] * cy + cf[:, i, 2, None, None])
                for i in range(3)
            ]  # 3 x [n, bh, bw]
            inside = (w[0] >= 0) & (w[1] >= 0) & (w[2] >= 0)
            inside &= (px < x1[it, None])[:, None, :] & (py < y1[it, None])[:, :, None]
            idx = inside.view(-1).nonzero().squeeze(1)  # flat indices: 1-D gathers are much faster on CPU
            if idx.numel() == 0:
                continue
            n_i, r = idx // (bh * bw), idx % (bh * bw)
            y_i, x_i = r // bw, r % bw
            pp = p[n_i]
            b, f = bi[pp], fi[pp]
            q = torch.stack([torch.take(w[0], idx), torch.take(w[1], idx), torch.take(w[2], idx)], -1)
            q = q / tz.view(-1, 3).index_select(0, b * num_faces + f)
            depth = 1.0 / q.sum(-1)
            keyv = (depth.float().view(torch.int32).long() << 32) | f
            pidx = (b * height + torch.take(py, n_i * bh + y_i)) * width + torch.take(px, n_i * bw + x_i)
            zbuf.scatter_reduce_(0, pidx, keyv, reduce="amin")

    # Recompute the perspective-correct barycentrics of each pixel's winning triangle.
    zbuf = zbuf.view(B, height, width)
    covered = zbuf != _EMPTY
    tri_id = torch.where(covered, zbuf & 0xFFFFFFFF, torch.full_like(zbuf, -1))
    bary = torch.zeros(B, height, width, 3, device=dev)
    pix_idx = covered.view(-1).nonzero().squeeze(1)
    f = tri_id.view(-1).index_select(0, pix_idx)
    b, r = pix_idx // (height * width), pix_idx % (height * width)
    y, x = r // width, r % width
    bf = b * num_faces + f
    b0, b1, b2, _ = _barycentrics(tp.view(-1, 3, 2).index_select(0, bf), x.double() + 0.5, y.double() + 0.5)
    q = torch.stack([b0, b1, b2], -1).float() / tz.view(-1, 3).index_select(0, bf)
    bary.view(-1, 3).index_copy_(0, pix_idx, q / q.sum(-1, keepdim=True))
    return tri_id, bary
