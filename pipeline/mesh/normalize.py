"""Normalise a mesh into the unit cube [-0.5, 0.5]^3: bbox centre to the origin, largest extent to 1 (TRELLIS rule)."""

from dataclasses import replace

import numpy as np

from .load import MeshData, MeshError


def normalize(mesh: MeshData) -> tuple[MeshData, dict]:
    """Return the normalised mesh and the transform {"scale", "offset"} with v_norm = (v + offset) * scale."""
    v = mesh.vertices[np.unique(mesh.faces)].astype(np.float64)  # bounds of the used vertices only
    lo, hi = v.min(axis=0), v.max(axis=0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise MeshError(f"cannot normalise: bounding box extent is {extent}")
    offset = -(lo + hi) / 2
    scale = 1.0 / extent
    verts = (mesh.vertices.astype(np.float64) + offset) * scale
    verts = np.clip(verts, -0.5, 0.5)  # only rounding noise is clipped (unused vertices are never drawn)
    out = replace(mesh, vertices=verts.astype(np.float32))
    return out, {"scale": scale, "offset": offset.tolist()}
