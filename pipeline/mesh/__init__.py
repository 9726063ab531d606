"""3D stages: load -> normalise -> cameras -> render (nvdiffrast CUDA or CPU) -> 64^3 voxels + patch features.

One module each: `config` (MeshConfig, without torch: what a job file validates), `load` (MeshData, MeshError,
load_mesh), `normalize`, `cameras` (Cameras, sphere_cameras), `render` (RenderConfig, Renderer, render) and
`stage` (MeshStage); the voxeliser is `atoken.voxelize`. The package itself imports nothing.
"""
