"""Row-level 3D stage: mesh file -> normalised -> multi-view renders -> 64^3 voxels with 768-d RGB patch features.

Adds to an ok row: `voxel_feats` fp16 [M, 768] in [0, 1], `voxel_coords` int16 [M, 3] (x, y, z),
`num_voxels`, and `render` (json: every setting that determines the output, so mixed settings are detectable).
Bad input -> status "failed", stage "mesh", error = readable reason. Rows that are not ok pass through untouched.
"""

import json
from dataclasses import asdict, dataclass

import torch

from .cameras import sphere_cameras
from .load import MeshError, load_mesh
from .normalize import normalize
from .render import RenderConfig, Renderer
from .voxelize import GRID, occupied_voxels, voxel_features

STAGE = "mesh"


@dataclass
class MeshConfig:
    views: int = 150  # TRELLIS / AToken-style sphere of cameras
    resolution: int = 256  # features always use the 256-px view (resized if this differs)
    fov_deg: float = 40.0
    radius: float = 2.0
    backend: str = "auto"  # auto | cuda | cpu
    device: str = "auto"
    feature_mode: str = "nearest"  # nearest (official) | visible_mean
    visibility_tol: float = 2.0  # voxel sizes, visible_mean only
    max_faces: int = 5_000_000  # larger meshes fail with a clear reason instead of exhausting memory

    def render_config(self) -> RenderConfig:
        return RenderConfig(resolution=self.resolution, backend=self.backend, device=self.device)


def _failed(row: dict, reason: str) -> dict:
    return {**row, "status": "failed", "stage": STAGE, "error": reason}


class MeshStage:
    """Callable stage that keeps its renderer (and the nvdiffrast context) across rows; use one per worker."""

    def __init__(self, cfg: MeshConfig = MeshConfig()):
        if cfg.feature_mode not in ("nearest", "visible_mean"):
            raise ValueError(f"feature_mode must be nearest or visible_mean, got {cfg.feature_mode!r}")
        self.cfg = cfg
        self.renderer = Renderer(cfg.render_config())

    def process(self, path, asset_id: str) -> dict:
        """Mesh file -> output fields. Raises MeshError for bad input."""
        cfg = self.cfg
        mesh = load_mesh(path)
        if mesh.num_faces > cfg.max_faces:
            raise MeshError(f"{mesh.num_faces} triangles exceeds max_faces={cfg.max_faces}")
        mesh, norm = normalize(mesh)
        cams = sphere_cameras(cfg.views, asset_id, cfg.radius, cfg.fov_deg)
        out = self.renderer.render(mesh, cams)
        if not out.mask.any():
            raise MeshError("renders are empty (no triangle covers any pixel)")
        coords = occupied_voxels(out.depth, out.mask, cams.w2c, cams.intrinsics)
        feats = voxel_features(out.rgb, coords, cams.w2c, cams.intrinsics, mode=cfg.feature_mode,
                               depth=out.depth, mask=out.mask, visibility_tol=cfg.visibility_tol)
        settings = {
            "views": cfg.views, "resolution": cfg.resolution, "fov_deg": cfg.fov_deg, "radius": cfg.radius,
            "backend": out.backend, "feature_mode": cfg.feature_mode, "grid": GRID, "feature_res": 256, "patch": 16,
            "cameras": "hammersley sphere, per-asset offset from sha256(id); OpenCV w2c, normalised intrinsics",
            "shading": "unlit base colour", "normalize": norm, **{k: v for k, v in mesh.info.items()},
        }
        if cfg.feature_mode == "visible_mean":
            settings["visibility_tol"] = cfg.visibility_tol
        return {
            "voxel_feats": feats.clamp(0, 1).to(torch.float16).cpu().numpy(),
            "voxel_coords": coords.to(torch.int16).cpu().numpy(),
            "num_voxels": int(coords.shape[0]),
            "render": json.dumps(settings, sort_keys=True),
        }

    def __call__(self, row: dict) -> dict:
        if row.get("status", "ok") != "ok":
            return row
        path = row.get("path")
        if not path:
            return _failed(row, "row has no local mesh path (fetch stage missing?)")
        try:
            fields = self.process(path, str(row.get("id", path)))
        except MeshError as e:
            return _failed(row, str(e))
        except torch.cuda.OutOfMemoryError as e:
            return _failed(row, f"out of GPU memory while rendering/voxelising: {e}")
        except Exception as e:  # unexpected: still recorded per sample, never a crash of the whole job
            return _failed(row, f"{type(e).__name__}: {e}")
        return {**row, **fields, "status": "ok", "stage": STAGE, "error": None}


def mesh_to_voxels(row: dict, cfg: MeshConfig = MeshConfig(), stage: MeshStage | None = None) -> dict:
    """Functional form of MeshStage; pass `stage` to reuse a renderer across rows."""
    return (stage or MeshStage(cfg))(row)


def config_dict(cfg: MeshConfig) -> dict:
    return asdict(cfg)
