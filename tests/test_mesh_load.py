"""Loading real mesh files (../shared/data) into MeshData, or rejecting them with a specific reason."""

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import trimesh

from pipeline.mesh.config import MeshConfig
from pipeline.mesh.load import MeshError, load_mesh
from pipeline.mesh.normalize import normalize
from pipeline.mesh.procedural import export_assets
from pipeline.mesh.stage import MeshStage

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MESHES, BAD = DATA / "meshes", DATA / "bad"
needs_data = pytest.mark.skipif(not MESHES.is_dir(), reason="../shared/data not present")


def check_normalised(mesh):
    m, norm = normalize(mesh)
    used = m.vertices[np.unique(m.faces)]
    lo, hi = used.min(0), used.max(0)
    assert m.num_faces > 0
    assert np.isfinite(m.vertices).all()
    assert (lo >= -0.5 - 1e-6).all() and (hi <= 0.5 + 1e-6).all()
    assert abs((hi - lo).max() - 1.0) < 1e-5  # largest extent is exactly 1
    np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-5)  # bbox centred
    assert norm["scale"] > 0
    return m


# file -> (expected triangles after cleaning, expected geometries (node instances), extra check)
LOADS = {
    "Box.glb": (12, 1, None),
    "BoxBadNormals.glb": (12, 1, None),
    "BoxTextured.glb": (12, 1, "texture"),
    "BoxVertexColors.glb": (12, 1, "varied_colors"),
    "cubevc.glb": (48, 1, "magenta"),  # COLOR_0 is magenta everywhere
    "nested.glb": (36, 3, None),
    "ShapeCollection.glb": (None, 7, None),  # 6 meshes, one instanced twice: 7 node instances
    "no_indices_3storybuilding.glb": (72, 3, None),
    "alien.glb": (292 - 7, 18, "dropped7"),
    "cakeBirthday.glb": (None, 42, "varied_colors"),
    "AlphaBlendModeTest.glb": (None, 9, "texture"),
    "DepthOfFieldExample.glb": (None, 16, "texture"),  # extensionsRequired KHR_lights_punctual is harmless
    "fuze.obj": (1000, 1, "texture"),  # texture file name 'fuze uv.jpg' has a space
    "spot.obj": (5856, 1, None),
    "soup.stl": (100, 1, None),
    "cycloidal.ply": (43368, 1, "white"),  # per-vertex colours, all white
    "joined_tetrahedra.obj": (8, 1, None),
    "nancolor.obj": (12, 1, "finite_colors"),
    "wallhole.obj": (66 - 11, 1, None),  # '\' line continuations, 11 degenerate faces, missing mtl
}

REJECTS = {
    "BoxMeshopt.glb": "EXT_meshopt_compression",
    "BoxWithInfinites.glb": "non-finite vertex positions",
    "points_emptyface.ply": "point cloud",
    "empty_nodes.glb": "empty scene",
}

BAD_FILES = {
    "chunk_too_big.glb": "malformed GLB",
    "empty.ply": "empty file",
    "empty_file.glb": "empty file",
    "invalid_json_chunk.glb": "JSON chunk does not parse",
    "invalid_magic.glb": "bad magic",
    "length_mismatch.glb": "header length",
    "unaligned_chunk.glb": "not 4-byte aligned",
    "notenoughindices.obj": "has 2 vertices",
}


@needs_data
@pytest.mark.parametrize("name", sorted(LOADS))
def test_real_meshes_load(name):
    faces, geoms, extra = LOADS[name]
    mesh = load_mesh(MESHES / name)
    if faces is not None:
        assert mesh.num_faces == faces
    assert mesh.info["num_geometries"] == geoms
    assert mesh.colors.shape == (len(mesh.vertices), 3) and mesh.colors.min() >= 0 and mesh.colors.max() <= 1
    assert mesh.face_tex.shape == (mesh.num_faces,)
    if extra == "texture":
        assert mesh.textures and (mesh.face_tex >= 0).any()
        assert all(t.dtype == np.uint8 and t.ndim == 3 and t.shape[2] == 3 for t in mesh.textures)
        assert max(t.std() for t in mesh.textures) > 1  # real images, not a constant placeholder
    if extra == "varied_colors":
        assert mesh.colors.std(0).max() > 0.05
    if extra == "dropped7":
        assert mesh.info["dropped_faces"] == 7
    if extra == "magenta":
        np.testing.assert_allclose(mesh.colors, np.broadcast_to([1, 0, 1], mesh.colors.shape))
    if extra == "white":
        np.testing.assert_allclose(mesh.colors, 1.0)
    if extra == "finite_colors":
        # trimesh turns the NaN vertex colour into black; the other 7 keep the file's values
        assert np.isfinite(mesh.colors).all()
        np.testing.assert_allclose(mesh.colors[0], [0.5365, 0.9971, 0.5398], atol=3e-3)
    check_normalised(mesh)


@needs_data
def test_fuze_texture_is_the_jpg():
    mesh = load_mesh(MESHES / "fuze.obj")
    assert mesh.textures[0].shape[:2] == (1024, 1024)
    assert (mesh.face_tex == 0).all()


@needs_data
def test_vertex_colors_next_to_material():
    """BoxVertexColors has COLOR_0 *and* a material: colour = factor x COLOR_0, not the plain factor."""
    mesh = load_mesh(MESHES / "BoxVertexColors.glb")
    assert len(np.unique(np.round(mesh.colors, 3), axis=0)) > 3


@needs_data
def test_scene_graph_transforms_applied():
    """nested.glb holds 3 identical boxes placed by nested node transforms: they must not overlap."""
    mesh = load_mesh(MESHES / "nested.glb")
    centres = [mesh.vertices[mesh.faces[i * 12 : (i + 1) * 12]].reshape(-1, 3).mean(0) for i in range(3)]
    d = [np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(d) > 1e-3


@needs_data
@pytest.mark.parametrize("name", sorted(REJECTS))
def test_real_meshes_rejected(name):
    with pytest.raises(MeshError, match=REJECTS[name]):
        load_mesh(MESHES / name)


@needs_data
def test_every_bad_mesh_file_is_covered():
    found = {p.name for p in BAD.iterdir() if p.suffix.lower() in (".glb", ".ply", ".obj", ".gltf", ".stl")}
    assert found == set(BAD_FILES)


@needs_data
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_recorded_as_failed(name):
    with pytest.raises(MeshError, match=BAD_FILES[name]):
        load_mesh(BAD / name)
    with pytest.raises(MeshError, match=BAD_FILES[name]):
        MeshStage(MeshConfig(views=4, resolution=64, backend="cpu")).process(BAD / name, name)


# ---------------------------------------------------------------------------------------------------------
# Variants built here: external buffers, data URIs, strips, huge coordinates, required Draco


def _box():
    return trimesh.creation.box(extents=(1.0, 2.0, 3.0))


def test_gltf_external_bin(tmp_path):
    files = trimesh.exchange.gltf.export_gltf(trimesh.Scene(_box()))
    assert any(k.endswith(".bin") for k in files)
    for k, v in files.items():
        (tmp_path / k).write_bytes(v)
    mesh = load_mesh(tmp_path / "model.gltf")
    assert mesh.num_faces == 12
    m = check_normalised(mesh)
    ext = np.ptp(m.vertices, 0)
    np.testing.assert_allclose(ext, [1 / 3, 2 / 3, 1], atol=1e-6)


def test_gltf_data_uri(tmp_path):
    files = trimesh.exchange.gltf.export_gltf(trimesh.Scene(_box()), embed_buffers=True)
    assert list(files) == ["model.gltf"] and b"data:application/octet-stream;base64" in files["model.gltf"]
    (tmp_path / "box.gltf").write_bytes(files["model.gltf"])
    assert load_mesh(tmp_path / "box.gltf").num_faces == 12


def _write_glb(path, gltf: dict, binary: bytes):
    js = json.dumps(gltf).encode()
    js += b" " * (-len(js) % 4)
    binary += b"\x00" * (-len(binary) % 4)
    body = struct.pack("<II", len(js), 0x4E4F534A) + js + struct.pack("<II", len(binary), 0x004E4942) + binary
    path.write_bytes(struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body)


def _strip_gltf(extra=None):
    # A unit square as a 4-vertex triangle strip (mode 5) -> 2 triangles.
    pos = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float32)
    idx = np.array([0, 1, 2, 3], np.uint16)
    binary = pos.tobytes() + idx.tobytes()
    gltf = {
        "asset": {"version": "2.0"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1, "mode": 5}]}],
        "buffers": [{"byteLength": len(binary)}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": 48},
            {"buffer": 0, "byteOffset": 48, "byteLength": 8},
        ],
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": 4, "type": "VEC3", "min": [0, 0, 0], "max": [1, 1, 0]},
            {"bufferView": 1, "componentType": 5123, "count": 4, "type": "SCALAR"},
        ],
    }
    gltf.update(extra or {})
    return gltf, binary


def test_glb_triangle_strip(tmp_path):
    gltf, binary = _strip_gltf()
    _write_glb(tmp_path / "strip.glb", gltf, binary)
    mesh = load_mesh(tmp_path / "strip.glb")
    assert mesh.num_faces == 2
    # the two strip triangles cover the whole square: total area 1
    tri = mesh.vertices[mesh.faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
    assert abs(area - 1.0) < 1e-6


def test_glb_required_draco_rejected(tmp_path):
    gltf, binary = _strip_gltf(
        {"extensionsUsed": ["KHR_draco_mesh_compression"], "extensionsRequired": ["KHR_draco_mesh_compression"]}
    )
    _write_glb(tmp_path / "draco.glb", gltf, binary)
    with pytest.raises(MeshError, match="KHR_draco_mesh_compression"):
        load_mesh(tmp_path / "draco.glb")
    # the same JSON as a .gltf with a data-URI buffer
    gltf["buffers"][0]["uri"] = "data:application/octet-stream;base64," + base64.b64encode(binary).decode()
    (tmp_path / "draco.gltf").write_text(json.dumps(gltf))
    with pytest.raises(MeshError, match="KHR_draco_mesh_compression"):
        load_mesh(tmp_path / "draco.gltf")


@pytest.mark.parametrize("suffix", [".ply", ".stl", ".obj"])
def test_huge_coordinates(tmp_path, suffix):
    m = _box()
    m.apply_scale(1e5)
    m.apply_translation([3e6, -2e6, 1e6])
    path = tmp_path / f"huge{suffix}"
    m.export(str(path))
    mesh = check_normalised(load_mesh(path))
    np.testing.assert_allclose(np.ptp(mesh.vertices, 0), [1 / 3, 2 / 3, 1], atol=1e-4)


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "x.fbx").write_bytes(b"abc")
    with pytest.raises(MeshError, match="unsupported mesh format"):
        load_mesh(tmp_path / "x.fbx")
    with pytest.raises(MeshError, match="not found"):
        load_mesh(tmp_path / "nope.glb")
    (tmp_path / "garbage.ply").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(MeshError):
        load_mesh(tmp_path / "garbage.ply")


def test_only_degenerate_triangles(tmp_path):
    v = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 0, 0]], float)  # collinear / repeated points
    trimesh.Trimesh(v, [[0, 1, 2], [0, 3, 1]], process=False).export(str(tmp_path / "deg.ply"))
    with pytest.raises(MeshError, match="degenerate"):
        load_mesh(tmp_path / "deg.ply")


def test_procedural_assets_roundtrip(tmp_path):
    paths = export_assets(tmp_path)
    assert set(paths) == {"torus_vc", "cube_tex", "sphere_factor"}
    torus = load_mesh(paths["torus_vc"])
    assert torus.colors.std(0).max() > 0.1  # vertex colours survive GLB export
    cube = load_mesh(paths["cube_tex"])
    assert len(cube.textures) == 1 and (cube.face_tex == 0).all()
    sphere = load_mesh(paths["sphere_factor"])
    np.testing.assert_allclose(sphere.colors[0], np.array([40, 160, 90]) / 255, atol=1e-3)
    for m in (torus, cube, sphere):
        check_normalised(m)
