"""Load a mesh file (GLB/glTF/OBJ/PLY/STL) into one flat, renderable `MeshData`.

Scene graphs are flattened with their node transforms. Colour is kept as
  base colour = material factor x vertex colour (COLOR_0) x base-colour texture (sampled by UV),
the glTF rule; both renderers read the same fields.

Bad input raises `MeshError` with a readable reason:
- unreadable / malformed files (the GLB container is checked by hand, because trimesh loads some broken
  GLBs as empty scenes without complaint), OBJ faces with < 3 or out-of-range vertex references;
- glTF files whose `extensionsRequired` we cannot honour (Draco, meshopt, quantization, ...);
- empty scenes, point clouds, meshes whose triangles are all degenerate;
- non-finite vertex positions: REJECTED, not cleaned (a file with inf/nan positions is corrupt, and dropping
  the affected triangles would silently hand back part of an object).
Non-finite colours or UVs are cleaned (replaced by the material colour / UV 0) since geometry is intact.
"""

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trimesh

SUPPORTED_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl")
# Required glTF extensions that do not change geometry or base colour (safe to ignore).
IGNORABLE_REQUIRED_EXTENSIONS = {
    "KHR_lights_punctual",
    "KHR_materials_unlit",
    "KHR_materials_emissive_strength",
    "KHR_materials_specular",
    "KHR_materials_ior",
}
DEFAULT_COLOR = (0.8, 0.8, 0.8)  # colour of geometry without any material
MAX_TEXTURE_SIDE = 1024  # textures are downsized to this on load (renders are 256 px)


class MeshError(ValueError):
    """A mesh file that cannot be turned into a renderable triangle mesh; str(e) is the reason."""


@dataclass
class MeshData:
    vertices: np.ndarray  # float32 [V, 3]
    faces: np.ndarray  # int64 [F, 3]
    colors: np.ndarray  # float32 [V, 3] in [0, 1]: material factor x vertex colour
    uvs: np.ndarray  # float32 [V, 2] (OBJ convention: v = 0 is the image's bottom row)
    face_tex: np.ndarray  # int32 [F]: index into `textures`, -1 = untextured
    textures: list = field(default_factory=list)  # uint8 [H, W, 3] base-colour images
    info: dict = field(default_factory=dict)  # what loading found/cleaned (counts)

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Container checks done before trimesh sees the file


def _check_required_extensions(gltf: dict, name: str):
    required = set(gltf.get("extensionsRequired") or [])
    unsupported = sorted(required - IGNORABLE_REQUIRED_EXTENSIONS)
    if unsupported:
        raise MeshError(f"{name}: unsupported required glTF extension(s): {', '.join(unsupported)}")


def check_glb(path: Path) -> dict:
    """Validate the GLB container (header, chunk sizes, JSON) and return the glTF JSON."""
    data = path.read_bytes()
    name = path.name
    if len(data) < 12:
        raise MeshError(f"{name}: malformed GLB: file is {len(data)} bytes, shorter than the 12-byte header")
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF":
        raise MeshError(f"{name}: malformed GLB: bad magic {magic!r}")
    if version != 2:
        raise MeshError(f"{name}: unsupported GLB version {version}")
    if length != len(data):
        raise MeshError(f"{name}: malformed GLB: header length {length} != file size {len(data)}")
    offset, chunks = 12, []
    while offset < len(data):
        if offset + 8 > len(data):
            raise MeshError(f"{name}: malformed GLB: truncated chunk header at byte {offset}")
        clen, ctype = struct.unpack_from("<II", data, offset)
        if clen % 4:
            raise MeshError(f"{name}: malformed GLB: chunk length {clen} is not 4-byte aligned")
        if offset + 8 + clen > len(data):
            raise MeshError(f"{name}: malformed GLB: chunk of {clen} bytes runs past the end of the file")
        chunks.append((ctype, data[offset + 8 : offset + 8 + clen]))
        offset += 8 + clen
    if not chunks or chunks[0][0] != 0x4E4F534A:  # 'JSON'
        raise MeshError(f"{name}: malformed GLB: first chunk is not JSON")
    try:
        gltf = json.loads(chunks[0][1].decode("utf-8").rstrip(" \x00"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MeshError(f"{name}: malformed GLB: JSON chunk does not parse ({e})") from None
    if not isinstance(gltf, dict):
        raise MeshError(f"{name}: malformed GLB: JSON chunk is not an object")
    _check_required_extensions(gltf, name)
    return gltf


def check_gltf(path: Path) -> dict:
    try:
        gltf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MeshError(f"{path.name}: malformed glTF JSON ({e})") from None
    if not isinstance(gltf, dict):
        raise MeshError(f"{path.name}: malformed glTF: top level is not an object")
    _check_required_extensions(gltf, path.name)
    return gltf


def _obj_lines(path: Path):
    """(line number, tokens) of an OBJ file, joining lines continued with a trailing backslash."""
    pending, start = [], None
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip()
            if start is None:
                start = lineno
            if line.endswith("\\"):
                pending.append(line[:-1])
                continue
            pending.append(line)
            yield start, " ".join(pending).split()
            pending, start = [], None
    if pending:
        yield start, " ".join(pending).split()


def check_obj(path: Path) -> tuple[int, int]:
    """Reject OBJ faces that trimesh would silently repair or drop: < 3 corners or bad vertex indices.
    Returns (vertices, triangles)."""
    num_v = num_f = 0
    for lineno, parts in _obj_lines(path):
        if not parts:
            continue
        if parts[0] == "v":
            num_v += 1
        elif parts[0] == "f":
            refs = parts[1:]
            num_f += max(0, len(refs) - 2)
            if len(refs) < 3:
                raise MeshError(
                    f"{path.name}: malformed OBJ: face on line {lineno} has {len(refs)} vertices (needs >= 3)"
                )
            for r in refs:
                try:
                    i = int(r.split("/")[0])
                except ValueError:
                    raise MeshError(f"{path.name}: malformed OBJ: bad face reference {r!r} on line {lineno}") from None
                if i == 0 or i > num_v or -i > num_v:
                    raise MeshError(
                        f"{path.name}: malformed OBJ: face on line {lineno} references vertex {i}, only {num_v} defined"
                    )
    return num_v, num_f


# ----------------------------------------------------------------------------------------------------------
# Size budget, from the header (glTF accessors, PLY/STL headers, OBJ counts) before the full load


@dataclass
class MeshBudget:
    max_faces: int | None = None
    max_vertices: int | None = None
    max_bytes: int | None = None


def _gltf_counts(gltf: dict) -> tuple[int, int]:
    """(vertices, triangles) a glTF asks for: every mesh primitive's POSITION / indices accessor counts, once
    per node that instances the mesh (a mesh without nodes counts once)."""
    accessors, meshes = gltf.get("accessors") or [], gltf.get("meshes") or []

    def count(i):
        try:
            return max(0, int(accessors[int(i)].get("count") or 0))
        except (IndexError, TypeError, ValueError, AttributeError):
            return 0

    per_mesh = []
    for m in meshes:
        v = f = 0
        for p in (m.get("primitives") or []) if isinstance(m, dict) else []:
            if not isinstance(p, dict):
                continue
            n = count((p.get("attributes") or {}).get("POSITION", -1))
            v += n
            f += (count(p["indices"]) if "indices" in p else n) // 3
        per_mesh.append((v, f))
    uses = [n.get("mesh") for n in gltf.get("nodes") or [] if isinstance(n, dict) and "mesh" in n]
    picked = [per_mesh[u] for u in uses if isinstance(u, int) and 0 <= u < len(per_mesh)] or per_mesh
    return sum(v for v, _ in picked), sum(f for _, f in picked)


def _ply_counts(path: Path) -> tuple[int, int]:
    v = f = 0
    with open(path, "rb") as fh:
        for _ in range(200):
            line = fh.readline(1 << 12)
            if not line or line.strip() == b"end_header":
                break
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"element" and parts[2].isdigit():
                if parts[1] == b"vertex":
                    v = int(parts[2])
                elif parts[1] == b"face":
                    f = int(parts[2])
    return v, f


def _stl_counts(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(84)
    if len(head) == 84 and not head[:5].lower() == b"solid":
        n = struct.unpack_from("<I", head, 80)[0]
        return 3 * n, n
    return 0, size // 200  # ASCII: ~200 bytes a facet; the byte budget bounds it too


def check_budget(path: Path, budget: MeshBudget, gltf: dict | None = None, counts=None) -> None:
    """Refuse, before trimesh reads it, a mesh whose file, vertex or triangle count exceeds the budget."""
    name, size = path.name, path.stat().st_size
    if budget.max_bytes is not None and size > budget.max_bytes:
        raise MeshError(f"{name}: file of {size / 2**20:.1f} MiB exceeds max_bytes={budget.max_bytes / 2**20:.0f} MiB")
    suffix = path.suffix.lower()
    if counts is None:
        counts = (
            _gltf_counts(gltf)
            if gltf is not None
            else _ply_counts(path)
            if suffix == ".ply"
            else _stl_counts(path)
            if suffix == ".stl"
            else (0, 0)
        )
    v, f = counts
    if budget.max_faces is not None and f > budget.max_faces:
        raise MeshError(f"{name}: {f} triangles exceeds max_faces={budget.max_faces} (from the file's header)")
    if budget.max_vertices is not None and v > budget.max_vertices:
        raise MeshError(f"{name}: {v} vertices exceeds max_vertices={budget.max_vertices} (from the file's header)")


# ----------------------------------------------------------------------------------------------------------
# Visual extraction


def _rgb01(c, default=DEFAULT_COLOR) -> np.ndarray:
    if c is None:
        return np.asarray(default, np.float32)
    c = np.asarray(c, np.float64).reshape(-1)[:3]
    if c.size < 3:
        return np.asarray(default, np.float32)
    if c.max() > 1.0 + 1e-6:  # uint8 colour
        c = c / 255.0
    return np.clip(c, 0, 1).astype(np.float32)


def _image_rgb(img) -> np.ndarray:
    """PIL image -> uint8 [H, W, 3]; alpha is dropped (as the official recipe drops it)."""
    if max(img.size) > MAX_TEXTURE_SIDE:
        s = MAX_TEXTURE_SIDE / max(img.size)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _geometry_visuals(g, textures: list, tex_ids: dict):
    """Per-vertex colour [V,3], uv [V,2] and texture index (or -1) for one trimesh.Trimesh."""
    n = len(g.vertices)
    colors = np.broadcast_to(np.asarray(DEFAULT_COLOR, np.float32), (n, 3)).copy()
    uvs = np.zeros((n, 2), np.float32)
    tex = -1
    vis = getattr(g, "visual", None)
    kind = getattr(vis, "kind", None)
    if kind == "vertex":
        colors = np.asarray(vis.vertex_colors, np.float32)[:, :3] / 255.0
    elif kind == "texture":
        mat = vis.material
        image = getattr(mat, "baseColorTexture", None)
        if image is None:
            image = getattr(mat, "image", None)
        if hasattr(mat, "baseColorFactor"):  # PBR: factor defaults to 1 when absent
            factor = _rgb01(mat.baseColorFactor, default=(1, 1, 1))
        else:  # OBJ SimpleMaterial: Kd, unless a map_Kd texture is present
            factor = _rgb01(getattr(mat, "diffuse", None)) if image is None else np.ones(3, np.float32)
        colors = np.broadcast_to(factor, (n, 3)).copy()
        vcol = getattr(vis, "vertex_attributes", {}).get("color")  # glTF COLOR_0 next to a material
        if vcol is not None and len(vcol) == n:
            vcol = np.asarray(vcol, np.float32)[:, :3]
            colors = colors * (vcol / 255.0 if vcol.max() > 1.0 + 1e-6 else vcol)
        if image is not None and vis.uv is not None and len(vis.uv) == n:
            uvs = np.asarray(vis.uv, np.float32)
            key = id(image)
            if key not in tex_ids:
                tex_ids[key] = len(textures)
                textures.append(_image_rgb(image))
            tex = tex_ids[key]
    return colors, uvs, tex


def _flatten(scene: trimesh.Scene, name: str) -> tuple[list, int]:
    """Scene graph -> list of (vertices float64 world, faces, geometry) and the number of point-cloud points."""
    parts, points = [], 0
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        g = scene.geometry.get(geom_name)
        if g is None:
            continue
        if isinstance(g, trimesh.PointCloud):
            points += len(g.vertices)
            continue
        if not isinstance(g, trimesh.Trimesh) or len(g.faces) == 0:
            points += len(getattr(g, "vertices", []))
            continue
        v = np.asarray(g.vertices, np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported by load_mesh
            v = v @ np.asarray(transform, np.float64)[:3, :3].T + np.asarray(transform, np.float64)[:3, 3]
        parts.append((v, np.asarray(g.faces, np.int64), g))
    return parts, points


# ----------------------------------------------------------------------------------------------------------


def load_mesh(path, budget: MeshBudget | None = None) -> MeshData:
    """Load `path` into MeshData (world coordinates, not normalised). Raises MeshError on bad input, and on a
    mesh over `budget` before loading it."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise MeshError(f"{name}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise MeshError(f"{name}: unsupported mesh format {suffix!r} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise MeshError(f"{name}: empty file (0 bytes)")
    gltf = counts = None
    if budget is not None and budget.max_bytes is not None:
        check_budget(path, MeshBudget(max_bytes=budget.max_bytes), counts=(0, 0))  # before reading it at all
    if suffix == ".glb":
        gltf = check_glb(path)
    elif suffix == ".gltf":
        gltf = check_gltf(path)
    elif suffix == ".obj":
        counts = check_obj(path)
    if budget is not None:
        check_budget(path, budget, gltf, counts)

    logging.getLogger("trimesh").setLevel(logging.ERROR)
    try:
        scene = trimesh.load(str(path), force="scene", process=False)
    except Exception as e:  # trimesh raises many types for broken files
        raise MeshError(f"{name}: could not parse {suffix[1:].upper()} ({type(e).__name__}: {e})") from None

    parts, points = _flatten(scene, name)
    if not parts:
        if points:
            raise MeshError(f"{name}: point cloud without triangles ({points} points)")
        raise MeshError(f"{name}: empty scene (no triangle geometry)")

    textures, tex_ids = [], {}
    verts, faces, colors, uvs, face_tex, base = [], [], [], [], [], 0
    for v, f, g in parts:
        c, uv, t = _geometry_visuals(g, textures, tex_ids)
        verts.append(v)
        faces.append(f + base)
        colors.append(c)
        uvs.append(uv)
        face_tex.append(np.full(len(f), t, np.int32))
        base += len(v)
    v = np.concatenate(verts)
    f = np.concatenate(faces)
    c = np.concatenate(colors)
    uv = np.concatenate(uvs)
    ft = np.concatenate(face_tex)
    info = {"num_geometries": len(parts), "input_faces": int(len(f))}

    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        raise MeshError(f"{name}: non-finite vertex positions ({int(bad.sum())} of {len(v)} vertices)")
    valid_idx = ((f >= 0) & (f < len(v))).all(axis=1)
    f, ft = f[valid_idx], ft[valid_idx]
    # Degenerate = (near) zero area, relative to the object's size.
    extent = float(np.ptp(v, axis=0).max()) if len(v) else 0.0
    tri = v[f]
    area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    keep = area2 > max(extent, 1e-30) ** 2 * 1e-12
    info["dropped_faces"] = int(len(valid_idx) - keep.sum())
    if not keep.any():
        raise MeshError(f"{name}: all {len(valid_idx)} triangles are degenerate (zero area)")
    f, ft = f[keep], ft[keep]

    nonfinite_col = ~np.isfinite(c).all(axis=1)
    if nonfinite_col.any():
        c[nonfinite_col] = DEFAULT_COLOR
        info["cleaned_colors"] = int(nonfinite_col.sum())
    nonfinite_uv = ~np.isfinite(uv).all(axis=1)
    if nonfinite_uv.any():
        uv[nonfinite_uv] = 0.0
        info["cleaned_uvs"] = int(nonfinite_uv.sum())

    return MeshData(
        vertices=v.astype(np.float32),
        faces=f.astype(np.int64),
        colors=np.clip(c, 0, 1).astype(np.float32),
        uvs=uv.astype(np.float32),
        face_tex=ft.astype(np.int32),
        textures=textures,
        info=info,
    )
