"""Voxels as a mesh: each occupied cell of a grid^3 over [-0.5, 0.5]^3 as a box of its colour, with only the faces
that no neighbour hides, so the 3D stage's renderer can draw a voxel set from any camera (QA pictures)."""

import numpy as np

from .load import MeshData

# the 6 faces of the unit cube: (neighbour offset, 4 corners in order around the face)
_FACES = [
    ((-1, 0, 0), [(0, 0, 0), (0, 1, 0), (0, 1, 1), (0, 0, 1)]),
    ((1, 0, 0), [(1, 0, 0), (1, 0, 1), (1, 1, 1), (1, 1, 0)]),
    ((0, -1, 0), [(0, 0, 0), (0, 0, 1), (1, 0, 1), (1, 0, 0)]),
    ((0, 1, 0), [(0, 1, 0), (1, 1, 0), (1, 1, 1), (0, 1, 1)]),
    ((0, 0, -1), [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)]),
    ((0, 0, 1), [(0, 0, 1), (0, 1, 1), (1, 1, 1), (1, 0, 1)]),
]


def voxel_mesh(coords: np.ndarray, rgb: np.ndarray, grid: int = 64) -> MeshData:
    """coords int [M, 3] (x, y, z) in [0, grid), rgb float [M, 3] in [0, 1] -> MeshData of the visible box faces."""
    coords = np.asarray(coords, np.int64)
    rgb = np.asarray(rgb, np.float32)
    if coords.ndim != 2 or coords.shape[1] != 3 or rgb.shape != (len(coords), 3) or not len(coords):
        raise ValueError(f"voxels: expected coords [M, 3] and rgb [M, 3], M > 0; got {coords.shape}, {rgb.shape}")
    if coords.min() < 0 or coords.max() >= grid:
        raise ValueError(f"voxel coords must lie in [0, {grid - 1}]")
    occ = np.zeros((grid + 2,) * 3, bool)  # one empty cell of margin on each side
    occ[tuple((coords + 1).T)] = True
    verts, colors = [], []
    for offset, corners in _FACES:
        n = coords + 1 + np.asarray(offset)
        keep = ~occ[tuple(n.T)]
        base = coords[keep][:, None, :] + np.asarray(corners)[None]  # [Q, 4, 3] grid units
        verts.append(base.reshape(-1, 3))
        colors.append(np.repeat(rgb[keep], 4, axis=0))
    v = np.concatenate(verts).astype(np.float32) / grid - 0.5
    q = np.arange(len(v) // 4)[:, None] * 4
    faces = np.concatenate([q + [0, 1, 2], q + [0, 2, 3]]).astype(np.int64)
    return MeshData(
        vertices=v,
        faces=faces,
        colors=np.concatenate(colors).clip(0, 1),
        uvs=np.zeros((len(v), 2), np.float32),
        face_tex=np.full(len(faces), -1, np.int32),
        info={"voxels": int(len(coords))},
    )
