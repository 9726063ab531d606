"""Small coloured meshes the project makes itself (demo assets, tests, benchmarks), exported to GLB at run time."""

from pathlib import Path

import numpy as np
import trimesh
from PIL import Image


def vertex_colored_torus(sections: int = 48) -> trimesh.Trimesh:
    """A torus whose vertex colours vary with the angle around it."""
    m = trimesh.creation.torus(
        major_radius=1.0, minor_radius=0.35, major_sections=sections, minor_sections=sections // 2
    )
    ang = np.arctan2(m.vertices[:, 1], m.vertices[:, 0])
    rgb = np.stack([0.5 + 0.5 * np.cos(ang), 0.5 + 0.5 * np.cos(ang + 2.1), 0.5 + 0.5 * np.cos(ang + 4.2)], 1)
    m.visual = trimesh.visual.ColorVisuals(m, vertex_colors=(rgb * 255).astype(np.uint8))
    return m


def checker_image(size: int = 64, cells: int = 8) -> Image.Image:
    ij = np.indices((size, size)) // (size // cells)
    red = ((ij[0] + ij[1]) % 2).astype(bool)
    img = np.zeros((size, size, 3), np.uint8)
    img[red] = (220, 40, 40)
    img[~red] = (240, 240, 240)
    img[: size // cells, : size // cells] = (30, 60, 220)  # one blue corner cell: orientation is checkable
    return Image.fromarray(img)


def textured_cube() -> trimesh.Trimesh:
    """A unit cube with a checker texture, each face mapped to the whole image (unmerged corners)."""
    box = trimesh.creation.box(extents=(1, 1, 1))
    v = box.vertices[box.faces].reshape(-1, 3)
    faces = np.arange(len(v)).reshape(-1, 3)
    # planar UVs per face: drop the axis of the face normal
    n = np.abs(box.face_normals).argmax(1).repeat(3)
    keep = np.array([[1, 2], [0, 2], [0, 1]])[n]
    uv = np.take_along_axis(v, keep, axis=1) + 0.5
    mat = trimesh.visual.material.PBRMaterial(baseColorTexture=checker_image())
    return trimesh.Trimesh(v, faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=mat), process=False)


def colored_icosphere(subdivisions: int = 3) -> trimesh.Trimesh:
    """An icosphere with a constant material colour (the factor-colour case); subdivide for size tests."""
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    mat = trimesh.visual.material.PBRMaterial(baseColorFactor=[40, 160, 90, 255])
    m.visual = trimesh.visual.TextureVisuals(material=mat)
    return m


ASSETS = {"torus_vc": vertex_colored_torus, "cube_tex": textured_cube, "sphere_factor": colored_icosphere}


def export_assets(out_dir, names=tuple(ASSETS)) -> dict:
    """Write the named assets as GLB files into out_dir; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = out_dir / f"{name}.glb"
        trimesh.Scene(ASSETS[name]()).export(str(path))
        paths[name] = path
    return paths
