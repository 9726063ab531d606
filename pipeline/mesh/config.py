"""The 3D stage's job settings. No torch or trimesh here: a job file is validated (and a no-op rerun decided)
without loading them; `MeshStage` (stage.py) does the work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from pipeline.config import Config

if TYPE_CHECKING:
    from .load import MeshBudget
    from .render import RenderConfig


class MeshConfig(Config):
    IDENTITY = ("views", "resolution", "fov_deg", "radius", "feature_mode", "visibility_tol")

    views: int = Field(150, ge=1)  # TRELLIS / AToken-style sphere of cameras
    resolution: int = Field(256, ge=16)  # features always use the 256-px view (resized if this differs)
    fov_deg: float = Field(40.0, gt=0, lt=180)
    radius: float = Field(2.0, gt=0)
    backend: Literal["auto", "cuda", "cpu"] = "auto"
    device: str = "auto"
    feature_mode: Literal["nearest", "visible_mean"] = "nearest"  # nearest (official) | visible_mean
    visibility_tol: float = Field(2.0, gt=0)  # voxel sizes, visible_mean only
    max_faces: int = Field(5_000_000, ge=1)  # larger meshes fail with a clear reason instead of exhausting memory
    max_vertices: int = Field(10_000_000, ge=1)  # checked, like max_faces, from the header before loading
    max_file_mb: int = Field(1024, ge=1)  # larger files are refused unread
    timeout_s: float = Field(120.0, ge=0)  # wall-clock limit of loading one file, in a killable child (0: in-process)
    memory_mb: int = Field(8192, ge=0)  # memory cap of that child (0 = none)

    def budget(self) -> MeshBudget:
        from .load import MeshBudget

        return MeshBudget(max_faces=self.max_faces, max_vertices=self.max_vertices, max_bytes=self.max_file_mb << 20)

    def render_config(self) -> RenderConfig:
        from .render import RenderConfig

        return RenderConfig(resolution=self.resolution, backend=self.backend, device=self.device)
