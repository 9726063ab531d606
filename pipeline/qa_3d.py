"""3D QA views: one asset seen from a few cameras as its mesh, its input voxels and its decoded voxels.

Everything goes through the 3D stage's renderer (`pipeline/mesh/render.py`: nvdiffrast on GPU, the CPU rasterizer
otherwise), from the same cameras: the mesh, then the input and the decoded voxels as boxes of their feature
patch's mean colour (`pipeline/mesh/voxel_mesh.py`). Voxels and mesh share the unit cube, so the rows line up
pixel for pixel. With a Gaussian decoder checkpoint configured, the decoded features also go through it and its
Gaussians, drawn by `atoken/splat.py`, make a fourth row.
"""

from __future__ import annotations

import numpy as np
import torch

from atoken import splat
from atoken.voxelize import patch_colors
from pipeline.mesh.cameras import sphere_cameras
from pipeline.mesh.load import MeshData
from pipeline.mesh.normalize import normalize
from pipeline.mesh.render import RenderConfig, Renderer
from pipeline.mesh.voxel_mesh import voxel_mesh

VIEWS = 4


class ThreeDViews:
    """Holds the renderer (and the GS decoder, when configured) for all assets of one QA run."""

    def __init__(
        self,
        mesh_cfg,
        resolution: int = 192,
        views: int = VIEWS,
        gs_config: str | None = None,
        gs_checkpoint: str | None = None,
    ):
        self.cfg, self.resolution, self.views = mesh_cfg, resolution, views
        self.renderer = Renderer(RenderConfig(resolution=resolution, backend=mesh_cfg.backend, device=mesh_cfg.device))
        self.device = self.renderer.device
        self.gs = None
        if gs_checkpoint:
            from atoken.gs_decoder import CONFIG_PATH, GaussianDecoder

            self.gs = GaussianDecoder.from_files(gs_config or CONFIG_PATH, gs_checkpoint, device=self.device)

    def rows(
        self,
        asset_id: str,
        mesh: MeshData,
        voxels_in: tuple[np.ndarray, np.ndarray],
        voxels_out: tuple[np.ndarray, np.ndarray],
    ) -> list[tuple[str, list[np.ndarray]]]:
        """[(name, views [H, W, 3] float in [0, 1])] for the mesh, the input and the decoded voxels (and splats).
        voxels_*: (coords [M, 3] (x, y, z) of the 64^3 grid, features [M, 768] in [0, 1])."""
        mesh, _ = normalize(mesh)
        cams = sphere_cameras(self.views, f"{asset_id}/qa", self.cfg.radius, self.cfg.fov_deg)
        ref = self.renderer.render(mesh, cams).rgb.float().cpu().numpy()
        rows = [("mesh", list(ref))]
        for name, (coords, feats) in (("input voxels", voxels_in), ("decoded voxels", voxels_out)):
            rgb = patch_colors(torch.from_numpy(np.asarray(feats, np.float32))).numpy()
            rows.append((name, list(self.renderer.render(voxel_mesh(coords, rgb), cams).rgb.float().cpu().numpy())))
        if self.gs is not None:
            cameras = [
                splat.Camera(torch.from_numpy(cams.w2c[i]).float(), torch.from_numpy(cams.intrinsics[i]).float())
                for i in range(len(cams.w2c))
            ]
            rows.append(("GS splats", self._splat(self._decode_gaussians(*voxels_out), cameras)))
        return rows

    def _decode_gaussians(self, coords: np.ndarray, feats: np.ndarray) -> splat.Gaussians:
        """Decoded voxel features (in [0, 1] here, [-1, 1] for the decoder) -> the GS decoder's Gaussians."""
        c = torch.as_tensor(np.asarray(coords, np.int64), device=self.device)
        c4 = torch.cat([torch.zeros(len(c), 1, dtype=torch.long, device=self.device), c], 1)
        x = torch.as_tensor(np.asarray(feats, np.float32), device=self.device) * 2 - 1
        with torch.inference_mode():
            return self.gs(x, c4)[0]

    def _splat(self, g: splat.Gaussians, cameras: list[splat.Camera]) -> list[np.ndarray]:
        cfg = splat.RenderConfig(resolution=self.resolution)
        return [splat.render(g.to(self.device), cam, cfg).image.float().clamp(0, 1).cpu().numpy() for cam in cameras]
