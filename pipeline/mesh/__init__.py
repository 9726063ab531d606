"""3D stages: load -> normalise -> cameras -> render (nvdiffrast CUDA or CPU) -> 64^3 voxels + patch features."""

from atoken.voxelize import occupied_voxels, patch_features, voxel_features

from .cameras import Cameras, sphere_cameras
from .load import MeshData, MeshError, load_mesh
from .normalize import normalize
from .render import RenderConfig, Renderer, RenderOutput, render
from .stage import MeshConfig, MeshStage

__all__ = [
    "Cameras",
    "sphere_cameras",
    "MeshData",
    "MeshError",
    "load_mesh",
    "normalize",
    "RenderConfig",
    "Renderer",
    "RenderOutput",
    "render",
    "MeshConfig",
    "MeshStage",
    "occupied_voxels",
    "patch_features",
    "voxel_features",
]
