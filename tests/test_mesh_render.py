"""Cameras and the renderers: analytic silhouettes and depth of a cube, textures, vertex colours, determinism."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from pipeline.mesh.cameras import Cameras, intrinsics_from_fov, look_at, sphere_cameras
from pipeline.mesh.load import MeshData, load_mesh
from pipeline.mesh.normalize import normalize
from pipeline.mesh.procedural import checker_image, export_assets
from pipeline.mesh.raster_cpu import rasterize_cpu
from pipeline.mesh.render import RenderConfig, Renderer, cuda_available

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MESHES = DATA / "meshes"
needs_data = pytest.mark.skipif(not MESHES.is_dir(), reason="../shared/data not present")


def unit_cube() -> MeshData:
    box = trimesh.creation.box(extents=(1, 1, 1))
    n = len(box.vertices)
    return MeshData(
        box.vertices.astype(np.float32),
        box.faces.astype(np.int64),
        np.full((n, 3), 0.5, np.float32),
        np.zeros((n, 2), np.float32),
        np.full(len(box.faces), -1, np.int32),
        [],
    )


def cams_at(eyes, fov=40.0) -> Cameras:
    eyes = np.asarray(eyes, float)
    return Cameras(look_at(eyes).astype(np.float32), intrinsics_from_fov(fov, len(eyes)), fov, 2.0)


def raycast_box(cams: Cameras, res: int):
    """Analytic depth (camera z) of the [-0.5, 0.5]^3 box per pixel centre; 0 where the ray misses."""
    out = []
    j, i = np.meshgrid(np.arange(res), np.arange(res))
    for w2c, K in zip(cams.w2c.astype(np.float64), cams.intrinsics.astype(np.float64)):
        d_cam = np.stack(
            [((j + 0.5) / res - K[0, 2]) / K[0, 0], ((i + 0.5) / res - K[1, 2]) / K[1, 1], np.ones_like(j, float)], -1
        )  # z = 1 along the ray
        R, t = w2c[:3, :3], w2c[:3, 3]
        o = -R.T @ t
        d = d_cam @ R  # world direction, = R^T d_cam
        with np.errstate(divide="ignore", invalid="ignore"):
            t0, t1 = (-0.5 - o) / d, (0.5 - o) / d
        tmin = np.nanmax(np.minimum(t0, t1), -1)
        tmax = np.nanmin(np.maximum(t0, t1), -1)
        hit = tmax >= tmin
        out.append(np.where(hit, tmin, 0.0))  # t is the camera z because d_cam has z = 1
    return np.stack(out)


def test_cameras_geometry_and_determinism():
    cams = sphere_cameras(32, "asset-1", radius=2.0, fov_deg=40.0)
    R = cams.w2c[:, :3, :3].astype(np.float64)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(R), 1, atol=1e-5)
    centres = cams.c2w[:, :3, 3]
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 2.0, atol=1e-5)
    # the origin is straight ahead of every camera (image centre, depth = radius)
    np.testing.assert_allclose(cams.w2c[:, :3, 3], np.broadcast_to([0, 0, 2.0], (32, 3)), atol=1e-5)
    assert math.isclose(cams.intrinsics[0, 0, 0], 0.5 / math.tan(math.radians(20)), rel_tol=1e-6)
    # directions spread over the whole sphere
    assert centres[:, 1].min() < -1.5 and centres[:, 1].max() > 1.5
    again = sphere_cameras(32, "asset-1")
    np.testing.assert_array_equal(cams.w2c, again.w2c)
    other = sphere_cameras(32, "asset-2")
    assert not np.allclose(cams.w2c, other.w2c)


def test_cube_front_view_analytic_silhouette_and_depth():
    res = 96
    cams = cams_at([[0, 0, 2.0]])
    out = Renderer(RenderConfig(resolution=res, backend="cpu")).render(unit_cube(), cams)
    f = 0.5 / math.tan(math.radians(20))
    half = f * 0.5 / 1.5  # front face at distance 1.5
    c = (np.arange(res) + 0.5) / res
    inside = np.abs(c - 0.5) <= half
    expected = inside[:, None] & inside[None, :]
    np.testing.assert_array_equal(out.mask[0].numpy(), expected)
    d = out.depth[0].numpy()
    np.testing.assert_allclose(d[expected], 1.5, atol=1e-5)
    assert (d[~expected] == 0).all()
    np.testing.assert_allclose(out.rgb[0].numpy()[expected], 0.5, atol=1e-6)
    assert (out.rgb[0].numpy()[~expected] == 0).all()


def test_cube_oblique_views_match_raycast():
    """Perspective-correct depth: every covered pixel's depth equals the analytic ray/box hit."""
    res = 64
    cams = sphere_cameras(12, "oblique")
    out = Renderer(RenderConfig(resolution=res, backend="cpu")).render(unit_cube(), cams)
    ref = raycast_box(cams, res)
    mask = out.mask.numpy()
    agree = (mask == (ref > 0)).mean()
    assert agree > 0.995  # only pixels whose centre grazes an edge may differ
    both = mask & (ref > 0)
    np.testing.assert_allclose(out.depth.numpy()[both], ref[both], atol=2e-4)


def test_chunking_does_not_change_the_result():
    cube = unit_cube()
    cams = sphere_cameras(6, "chunks")
    a = Renderer(RenderConfig(resolution=48, backend="cpu")).render(cube, cams)
    verts = torch.as_tensor(cube.vertices)
    w2c = torch.as_tensor(cams.w2c)
    cam = verts[None] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
    K = torch.as_tensor(cams.intrinsics)
    pix = (
        torch.stack(
            [K[:, None, 0, 0] * cam[..., 0] / cam[..., 2] + 0.5, K[:, None, 1, 1] * cam[..., 1] / cam[..., 2] + 0.5], -1
        )
        * 48
    )
    tri, bary = rasterize_cpu(pix, cam[..., 2], torch.as_tensor(cube.faces), 48, 48, chunk=64, max_pairs=12)
    np.testing.assert_array_equal((tri >= 0).numpy(), a.mask.numpy())
    assert torch.allclose(bary.sum(-1)[tri >= 0], torch.ones(()), atol=1e-5)


def test_sphere_silhouette_area():
    sphere = trimesh.creation.icosphere(subdivisions=4)  # 5120 triangles
    n = len(sphere.vertices)
    mesh = MeshData(
        sphere.vertices.astype(np.float32),
        sphere.faces.astype(np.int64),
        np.ones((n, 3), np.float32),
        np.zeros((n, 2), np.float32),
        np.full(len(sphere.faces), -1, np.int32),
        [],
    )
    mesh, _ = normalize(mesh)
    res = 128
    out = Renderer(RenderConfig(resolution=res, backend="cpu")).render(mesh, sphere_cameras(4, "s"))
    f = 0.5 / math.tan(math.radians(20))
    r = f * math.tan(math.asin(0.5 / 2.0))  # projected radius of a radius-0.5 sphere at distance 2
    expected = math.pi * r * r
    frac = out.mask.float().mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(frac, expected, rtol=0.03)  # polygonal sphere is slightly smaller


@needs_data
def test_textured_box_renders_texture():
    mesh, _ = normalize(load_mesh(MESHES / "BoxTextured.glb"))
    out = Renderer(RenderConfig(resolution=128, backend="cpu")).render(mesh, sphere_cameras(6, "tex"))
    px = out.rgb[out.mask].numpy()
    assert px.std(0).max() > 0.1  # the Cesium logo texture, not a flat colour
    assert len(np.unique((px * 16).astype(int), axis=0)) > 20


def test_checker_texture_colours(tmp_path):
    mesh, _ = normalize(load_mesh(export_assets(tmp_path, ["cube_tex"])["cube_tex"]))
    out = Renderer(RenderConfig(resolution=128, backend="cpu")).render(mesh, cams_at([[0, 0, 2.0], [2.0, 0, 0]]))
    px = out.rgb[out.mask].numpy()
    img = np.asarray(checker_image()) / 255.0
    red, white = img[8, 0], img[8, 8]  # the two checker colours
    near_red = np.linalg.norm(px - red, axis=1) < 0.1
    near_white = np.linalg.norm(px - white, axis=1) < 0.1
    assert near_red.mean() > 0.3 and near_white.mean() > 0.3  # both colours, about half each


@needs_data
def test_vertex_colours_render():
    mesh, _ = normalize(load_mesh(MESHES / "BoxVertexColors.glb"))
    out = Renderer(RenderConfig(resolution=64, backend="cpu")).render(mesh, sphere_cameras(4, "vc"))
    px = out.rgb[out.mask].numpy()
    assert px.std(0).max() > 0.05


def test_render_determinism():
    cube = unit_cube()
    r = Renderer(RenderConfig(resolution=64, backend="cpu"))
    a = r.render(cube, sphere_cameras(5, "d"))
    b = r.render(cube, sphere_cameras(5, "d"))
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.depth, b.depth)


def test_large_mesh_renders():
    sphere = trimesh.creation.icosphere(subdivisions=6)  # 81,920 triangles
    n = len(sphere.vertices)
    mesh = MeshData(
        sphere.vertices.astype(np.float32),
        sphere.faces.astype(np.int64),
        np.ones((n, 3), np.float32),
        np.zeros((n, 2), np.float32),
        np.full(len(sphere.faces), -1, np.int32),
        [],
    )
    mesh, _ = normalize(mesh)
    out = Renderer(RenderConfig(resolution=64, backend="cpu")).render(mesh, sphere_cameras(2, "big"))
    assert out.mask.float().mean() > 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CUDA + nvdiffrast")
@pytest.mark.parametrize("name", ["BoxTextured.glb", "cubevc.glb", "spot.obj", "fuze.obj"])
def test_cuda_matches_cpu(name, shared_data):
    mesh, _ = normalize(load_mesh(shared_data / "meshes" / name))
    cams = sphere_cameras(16, name)
    cpu = Renderer(RenderConfig(resolution=256, backend="cpu", device="cuda")).render(mesh, cams)
    gpu = Renderer(RenderConfig(resolution=256, backend="cuda")).render(mesh, cams)
    agree = (cpu.mask == gpu.mask).float().mean().item()
    assert agree >= 0.99
    both = cpu.mask & gpu.mask
    assert (cpu.depth[both] - gpu.depth[both]).abs().median() < 1e-4
    assert (cpu.rgb[both] - gpu.rgb[both]).abs().mean() < 0.02
