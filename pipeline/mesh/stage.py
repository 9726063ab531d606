"""3D: mesh file -> normalised -> multi-view renders -> 64^3 voxels with 768-d RGB patch features.

`MeshStage.process(path, asset_id)` returns `voxel_feats` fp16 [M, 768] in [0, 1], `voxel_coords` int16 [M, 3]
(x, y, z), `num_voxels`, and `render` (every setting that determines the output). Bad input raises MeshError with a
readable reason. One MeshStage holds one renderer (and its CUDA context) for its lifetime: the prepare stage
(`pipeline/prepare.py`) keeps one per worker, and loads each file with `load_isolated` (trimesh on the CPU, in the
worker's killable child) before handing the MeshData to `process` (the GPU part: render, voxels, features).
`process(..., timings={})` fills in ms per part (device-synchronised; benchmarks/bench_3d.py reads them).
"""

import json
import time

import torch

from atoken.voxelize import GRID, occupied_voxels, voxel_features

from .cameras import sphere_cameras
from .config import MeshConfig
from .load import MeshData, MeshError, load_mesh
from .normalize import normalize
from .render import Renderer

PARTS = ("load", "normalize", "render", "voxelize", "features", "to_host")


def load_isolated(isolator, path, cfg: MeshConfig) -> MeshData:
    """`load_mesh` in `isolator`'s killable child (pipeline/isolate.py) under the job's time and memory limits:
    loading is where a hostile file costs time and memory. Raises IsolateError or MeshError."""
    return isolator.run(
        load_mesh, path, cfg.budget(), timeout_s=cfg.timeout_s, label="mesh load", memory_bytes=cfg.memory_mb << 20
    )


class _Clock:
    """ms per part into `timings` (None: does nothing, so the pipeline never waits on the device for it)."""

    def __init__(self, device: torch.device, timings: dict | None):
        self.device, self.timings = device, timings
        self.t = time.perf_counter()

    def __call__(self, part: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[part] = self.timings.get(part, 0.0) + 1e3 * (now - self.t)
        self.t = now


class MeshStage:
    """Keeps its renderer (and the nvdiffrast context) across assets; use one per worker."""

    def __init__(self, cfg: MeshConfig | None = None):
        cfg = cfg or MeshConfig()
        self.cfg = cfg
        self.renderer = Renderer(cfg.render_config())

    def describe(self) -> str:
        """The renderer and device, for the line a worker prints once at start-up."""
        return f"{renderer_name(self.renderer.backend)} on {self.renderer.device}"

    def process(self, path, asset_id: str, mesh: MeshData | None = None, timings: dict | None = None) -> dict:
        """Mesh file (or its MeshData, loaded elsewhere) -> output fields. Raises MeshError for bad input.
        `timings`: a dict that gets ms per part (PARTS), measured with a device sync after each."""
        cfg = self.cfg
        clock = _Clock(self.renderer.device, timings)
        mesh = mesh if mesh is not None else load_mesh(path, cfg.budget())
        if mesh.num_faces > cfg.max_faces:
            raise MeshError(f"{mesh.num_faces} triangles exceeds max_faces={cfg.max_faces}")
        clock("load")
        mesh, norm = normalize(mesh)
        clock("normalize")
        cams = sphere_cameras(cfg.views, asset_id, cfg.radius, cfg.fov_deg)
        out = self.renderer.render(mesh, cams)
        if not out.mask.any():
            raise MeshError("renders are empty (no triangle covers any pixel)")
        clock("render")
        coords = occupied_voxels(out.depth, out.mask, cams.w2c, cams.intrinsics)
        clock("voxelize")
        feats = voxel_features(
            out.rgb,
            coords,
            cams.w2c,
            cams.intrinsics,
            mode=cfg.feature_mode,
            depth=out.depth,
            mask=out.mask,
            visibility_tol=cfg.visibility_tol,
        )
        clock("features")
        settings = {
            "views": cfg.views,
            "resolution": cfg.resolution,
            "fov_deg": cfg.fov_deg,
            "radius": cfg.radius,
            "backend": out.backend,
            "feature_mode": cfg.feature_mode,
            "grid": GRID,
            "feature_res": 256,
            "patch": 16,
            "cameras": "hammersley sphere, per-asset offset from sha256(id); OpenCV w2c, normalised intrinsics",
            "shading": "unlit base colour",
            "normalize": norm,
            **{k: v for k, v in mesh.info.items()},
        }
        if cfg.feature_mode == "visible_mean":
            settings["visibility_tol"] = cfg.visibility_tol
        got = {
            "voxel_feats": feats.clamp_(0, 1).to(torch.float16).cpu().numpy(),
            "voxel_coords": coords.to(torch.int16).cpu().numpy(),
            "num_voxels": int(coords.shape[0]),
            "render": json.dumps(settings, sort_keys=True),
            "renderer": renderer_name(out.backend),
        }
        clock("to_host")
        return got


def renderer_name(backend: str) -> str:
    """The renderer that made the views, with its version: nvdiffrast on GPU, this package's rasterizer on CPU."""
    if backend == "cuda":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"nvdiffrast {version('nvdiffrast')}"
        except PackageNotFoundError:
            return "nvdiffrast"
    return f"pipeline.mesh cpu rasterizer (torch {torch.__version__})"
