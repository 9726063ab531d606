"""nvdiffrast CUDA rasterizer (PyPI `diffrp-nvdiffrast`, import `nvdiffrast.torch`) with the project's plugin loader.

Loader fix: on torch >= 2.9, nvdiffrast's `_get_plugin` builds its CUDA plugin with
`torch.utils.cpp_extension.load(...)` and then re-imports it by name (`importlib.import_module`), which fails with
`ModuleNotFoundError: nvdiffrast_plugin_...`. `load_plugin` below makes the same build call (same sources, flags
and plugin name, so the build cache in TORCH_EXTENSIONS_DIR is shared), keeps the module object that
`cpp_extension` returns, and hands it to nvdiffrast through its own plugin cache (`ops._cached_plugin[False]`),
so every `dr.*` call uses it. nvdiffrast itself is not patched or copied.

Licence: nvdiffrast is NVIDIA Source Code License (non-commercial); the CPU rasterizer is the fallback.
"""

import os

import torch


def load_plugin():
    """Build (first time, ~30 s) or load the nvdiffrast CUDA plugin; return the `nvdiffrast.torch` module."""
    import nvdiffrast
    import nvdiffrast.torch as dr
    import nvdiffrast.torch.ops as ops
    import torch.utils.cpp_extension as cpp

    if ops._cached_plugin.get(False) is not None:
        return dr
    name = ops.sanitize_name(f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}")
    src_dir = os.path.dirname(ops.__file__)
    sources = [
        "../common/cudaraster/impl/Buffer.cpp",
        "../common/cudaraster/impl/CudaRaster.cpp",
        "../common/cudaraster/impl/RasterImpl.cu",
        "../common/cudaraster/impl/RasterImpl.cpp",
        "../common/common.cpp",
        "../common/rasterize.cu",
        "../common/interpolate.cu",
        "../common/texture.cu",
        "../common/texture.cpp",
        "../common/antialias.cu",
        "torch_bindings.cpp",
        "torch_rasterize.cpp",
        "torch_interpolate.cpp",
        "torch_texture.cpp",
        "torch_antialias.cpp",
    ]
    build_dir = cpp._get_build_directory(name, False)
    try:  # already built: load the .so from the build directory
        module = cpp._import_module_from_library(name, build_dir, True)
    except ImportError:
        module = cpp.load(
            name=name,
            sources=[os.path.join(src_dir, s) for s in sources],
            extra_cflags=["-DNVDR_TORCH"],
            extra_cuda_cflags=["-DNVDR_TORCH", "-lineinfo"],
            with_cuda=True,
            verbose=False,
        )
    ops._cached_plugin[False] = module
    return dr


class CudaRasterizer:
    """Holds one `RasterizeCudaContext`; `__call__` has the same contract as `raster_cpu.rasterize_cpu`."""

    def __init__(self, device="cuda", near: float = 0.1, far: float = 10.0):
        self.dr = load_plugin()
        self.device = torch.device(device)
        self.ctx = self.dr.RasterizeCudaContext(device=self.device)
        self.near, self.far = near, far

    @torch.no_grad()
    def __call__(self, pix: torch.Tensor, z: torch.Tensor, faces: torch.Tensor, height: int, width: int):
        """pix [B, V, 2] pixel coords (x = col, y = row), z [B, V] camera depth -> (tri_id [B,H,W], bary [B,H,W,3])."""
        if faces.shape[0] >= 1 << 24:
            raise ValueError(f"{faces.shape[0]} triangles: nvdiffrast triangle ids are exact only below 2^24")
        n, f = self.near, self.far
        z = z.float()
        # Clip space whose NDC x, y map linearly to our pixel coordinates: nvdiffrast's output row 0 is NDC y = -1,
        # so y_ndc = 2 * row / H - 1 keeps row 0 at the top of the OpenCV image (no flip needed).
        x_ndc = 2.0 * pix[..., 0].float() / width - 1.0
        y_ndc = 2.0 * pix[..., 1].float() / height - 1.0
        z_clip = z * (f + n) / (f - n) - 2.0 * f * n / (f - n)
        pos = torch.stack([x_ndc * z, y_ndc * z, z_clip, z], dim=-1).contiguous()
        tri = faces.to(device=self.device, dtype=torch.int32).contiguous()
        rast, _ = self.dr.rasterize(self.ctx, pos, tri, resolution=(height, width), grad_db=False)
        tri_id = rast[..., 3].long() - 1  # 0 = empty in nvdiffrast
        u, v = rast[..., 0], rast[..., 1]  # perspective-correct weights of corners 0 and 1
        bary = torch.stack([u, v, 1.0 - u - v], dim=-1) * (tri_id >= 0)[..., None]
        return tri_id, bary
