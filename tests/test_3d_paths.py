"""The 3D stage's fast paths against their plain definitions: occupancy and nearest-view features against a float64
per-pixel / per-voxel reference, the compact voxel tokens (checked per row, widened on the device) against
`voxels_to_tokens` + `encode`, bad voxels recorded as failed rows, the stage's per-part timings, and (GPU, marked
`gpu`) the mesh stage and the 3D tokenize on CUDA against the CPU path."""

from pathlib import Path

import numpy as np
import pytest
import torch

from atoken.sparse import SparseBatch, Voxels, check_voxels, voxels_to_batch, voxels_to_tokens
from atoken.voxelize import FEATURE_RES, PATCH, occupied_voxels, patch_features, voxel_features
from pipeline.mesh.cameras import sphere_cameras
from pipeline.mesh.config import MeshConfig
from pipeline.mesh.load import load_mesh
from pipeline.mesh.normalize import normalize
from pipeline.mesh.render import RenderConfig, Renderer, cuda_available
from pipeline.mesh.stage import PARTS, MeshStage
from pipeline.rows import new_row
from pipeline.tokenize import Tokenize, TokenizeConfig

MESHES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "meshes"
needs_data = pytest.mark.skipif(not MESHES.is_dir(), reason="../shared/data not present")


def rendered(name: str, views: int, res: int, backend="cpu", device="cpu"):
    mesh, _ = normalize(load_mesh(MESHES / name))
    cams = sphere_cameras(views, name)
    return Renderer(RenderConfig(resolution=res, backend=backend, device=device)).render(mesh, cams), cams


def reference_voxels(depth, mask, w2c, K, grid=64) -> set:
    """Every valid pixel unprojected one at a time in float64: c2w @ (x z, y z, z, 1)."""
    B, H, W = depth.shape
    c2w = np.linalg.inv(w2c.astype(np.float64))
    b, i, j = (x.numpy() for x in mask.nonzero(as_tuple=True))
    z = depth[mask].double().numpy()
    x = ((j + 0.5) / W - K[b, 0, 2]) / K[b, 0, 0] * z
    y = ((i + 0.5) / H - K[b, 1, 2]) / K[b, 1, 1] * z
    p = np.einsum("pij,pj->pi", c2w[b, :3, :3], np.stack([x, y, z], 1)) + c2w[b, :3, 3]
    return set(map(tuple, np.clip(np.floor((p + 0.5) * grid), 0, grid - 1).astype(int).tolist()))


def reference_nearest(rgb, coords, w2c, K) -> torch.Tensor:
    """The official rule voxel by voxel: the camera nearest to the centre, its patch by grid_sample's rule."""
    table = patch_features(rgb).double().numpy()
    n = FEATURE_RES // PATCH
    out = np.zeros((len(coords), PATCH * PATCH * 3))
    centres = (coords.double().numpy() + 0.5) / 64 - 0.5
    cam = np.einsum("bij,mj->bmi", w2c[:, :3, :3].astype(np.float64), centres) + w2c[None, :, :3, 3].transpose(1, 0, 2)
    for m in range(len(coords)):
        b = int(np.argmin(cam[:, m, 2]))
        u = K[b, 0, 0] * cam[b, m, 0] / cam[b, m, 2] + K[b, 0, 2]
        v = K[b, 1, 1] * cam[b, m, 1] / cam[b, m, 2] + K[b, 1, 2]
        col, row = int(np.round(u * (n - 1))), int(np.round(v * (n - 1)))
        if 0 <= col < n and 0 <= row < n:
            out[m] = table[b, row, col]
    return torch.from_numpy(out).float()


@needs_data
@pytest.mark.parametrize("name", ["spot.obj", "BoxTextured.glb", "wallhole.obj"])
def test_occupancy_and_nearest_features_match_the_per_pixel_definition(name):
    out, cams = rendered(name, 6, 96)
    coords = occupied_voxels(out.depth, out.mask, cams.w2c, cams.intrinsics)
    got = set(map(tuple, coords.tolist()))
    want = reference_voxels(out.depth, out.mask, cams.w2c, cams.intrinsics)
    # float32 vs float64: a pixel within rounding of a voxel boundary may land in the neighbour (a few in 10^4)
    assert len(got ^ want) <= max(2, len(want) // 2000) and len(got) > 500
    assert torch.equal(coords, coords[np.lexsort(coords.numpy().T[::-1])])  # 'ij' order
    for res in (96, FEATURE_RES):  # resized to 256 px first; the 256-px views gathered directly
        out, cams = rendered(name, 6, res)
        sub = coords[:: max(1, len(coords) // 300)]
        feats = voxel_features(out.rgb, sub, cams.w2c, cams.intrinsics)
        ref = reference_nearest(out.rgb, sub, cams.w2c, cams.intrinsics)
        same = (feats - ref).abs().amax(1) < 1e-6
        assert same.float().mean() >= 0.99 and feats.abs().sum() > 0  # a tie of two views may pick the other


def rand_voxels(m, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    lin = torch.randperm(64**3, generator=g)[:m]
    coords = torch.stack([lin // 4096, lin // 64 % 64, lin % 64], 1).to(torch.int16)
    return torch.rand(m, 768, generator=g).to(dtype), coords


def test_voxels_to_batch_is_voxels_to_tokens_packed():
    samples = [rand_voxels(m, s, dt) for m, s, dt in ((30, 0, torch.float16), (7, 1, torch.float32), (1, 2, None))]
    samples[2] = (samples[2][0].float(), samples[2][1])
    for first in (0, 5):
        batch = voxels_to_batch([check_voxels(f, c) for f, c in samples], first=first)
        want = SparseBatch.pack([voxels_to_tokens(f, c) for f, c in samples])
        assert torch.equal(batch.feats, want.feats)
        assert torch.equal(batch.coords[:, 1:], want.coords[:, 1:])
        assert torch.equal(batch.coords[:, 0], want.coords[:, 0] + first)
    half = voxels_to_batch([check_voxels(*samples[0])], dtype=torch.bfloat16)
    assert half.feats.dtype == torch.bfloat16 and torch.equal(half.feats, want.feats[:30].bfloat16())


def test_check_voxels_reports_what_is_wrong():
    f, c = rand_voxels(20, 3)
    v = check_voxels(f, c)
    assert isinstance(v, Voxels) and len(v) == 20 and v.feats.data_ptr() == f.data_ptr()  # no copy
    for bad, match in (
        (lambda f, c: (f.index_fill(0, torch.tensor([4]), float("nan")), c), "NaN or infinite"),
        (lambda f, c: (f.index_fill(0, torch.tensor([4]), float("inf")), c), "NaN or infinite"),
        (lambda f, c: (f + 0.5, c), "must be in \\[0, 1\\]"),
        (lambda f, c: (f, c + 50), "\\[0, 63\\]"),
        (lambda f, c: (f[:, :700], c), "expected \\[M, 768\\]"),
        (lambda f, c: (f, c[:5]), "expected \\[20, 3\\]"),
        (lambda f, c: (f[:0], c[:0]), "no active voxels"),
        (lambda f, c: (f, c.float()), "expected integers"),
    ):
        with pytest.raises(ValueError, match=match):
            check_voxels(*bad(f, c))


@pytest.fixture(scope="module")
def tiny_tokenize():
    stage = Tokenize(TokenizeConfig(config="tiny-c", batch_tokens=64), "pp-test")
    stage.setup()
    return stage


def row_3d(id_, feats, coords):
    return {**new_row(id_, "3d", "test"), "voxel_feats": feats.numpy(), "voxel_coords": coords.numpy()}


def test_3d_rows_tokenize_as_voxels_to_tokens_would(tiny_tokenize):
    """The tokenize stage's 3D path (checked compact voxels, widened where the model is) gives the tokens the
    3072-d host path gives, in several forward passes (batch_tokens 64), for read-only (unpickled) arrays too;
    a bad row is recorded failed and the others go on."""
    rows = [row_3d(f"v{i}", *rand_voxels(m, i)) for i, m in enumerate((40, 3, 70, 25))]
    rows[1]["voxel_feats"].setflags(write=False)
    bad = row_3d("bad", *rand_voxels(10, 9))
    bad["voxel_feats"] = bad["voxel_feats"].copy()
    bad["voxel_feats"][2, 3] = np.nan
    out = tiny_tokenize([rows[0], bad, *rows[1:]])
    assert (out[1]["status"], out[1]["stage"]) == ("failed", "tokenize") and "NaN" in out[1]["reason"]
    got = [r for r in out if r["id"] != "bad"]
    tk = tiny_tokenize.model.tokenizer
    want = tk.encode([voxels_to_tokens(r["voxel_feats"].astype(np.float32), r["voxel_coords"]) for r in rows])
    for r, w in zip(got, want):
        assert r["status"] == "ok" and "voxel_feats" not in r
        for k in ("coords", "latent", "pooled"):
            assert np.array_equal(r[k], w[k]), k


@needs_data
def test_stage_timings_per_part_leave_the_output_alone():
    stage = MeshStage(MeshConfig(views=4, resolution=64, backend="cpu"))
    t = {}
    timed = stage.process(MESHES / "spot.obj", "spot", timings=t)
    plain = stage.process(MESHES / "spot.obj", "spot")
    assert set(t) == set(PARTS) and all(v >= 0 for v in t.values())
    for k in ("voxel_feats", "voxel_coords", "render"):
        assert np.array_equal(timed[k], plain[k]) if k != "render" else timed[k] == plain[k]
    assert "on cpu" in stage.describe()


def test_renderer_device_choice():
    assert Renderer(RenderConfig(backend="cpu")).device.type == "cpu"  # explicit cpu stays on the CPU
    auto = Renderer(RenderConfig())
    assert auto.backend == ("cuda" if cuda_available() else "cpu")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # no nvdiffrast: torch raster, GPU


# ---- GPU: the 3D actor's path (nvdiffrast, features and tokens on CUDA) against the CPU path ---------------------


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CUDA + nvdiffrast")
@needs_data
@pytest.mark.parametrize("name", ["BoxTextured.glb", "spot.obj", "DepthOfFieldExample.glb", "cycloidal.ply"])
def test_gpu_mesh_stage_matches_cpu(name):
    """Tolerance: voxel sets agree to Jaccard >= 0.97 (edge pixels of the two rasterizers), and on the voxels
    both have, the features differ by <= 0.03 on average (edge pixels inside patches)."""
    cfg = dict(views=24, resolution=256)
    gpu = MeshStage(MeshConfig(**cfg, backend="cuda")).process(MESHES / name, name)
    cpu = MeshStage(MeshConfig(**cfg, backend="cpu", device="cpu")).process(MESHES / name, name)
    key = lambda c: (c.astype(np.int64) * [4096, 64, 1]).sum(1)  # noqa: E731
    kg, kc = key(gpu["voxel_coords"]), key(cpu["voxel_coords"])
    both, ig, ic = np.intersect1d(kg, kc, return_indices=True)
    assert len(both) / len(np.union1d(kg, kc)) >= 0.97
    diff = np.abs(gpu["voxel_feats"][ig].astype(np.float32) - cpu["voxel_feats"][ic].astype(np.float32))
    assert diff.mean() <= 0.03
    assert gpu["renderer"].startswith("nvdiffrast") and not cpu["renderer"].startswith("nvdiffrast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_voxel_tokens_match_the_host_path():
    """On CUDA (bf16), widening on the device gives the same batch as the 3072-d host tokens sent over, so the
    same encoder output (to bf16 noise: 2e-2), and the latents track the fp32 CPU ones (Pearson r > 0.99)."""
    from atoken.tokenizer import Tokenizer

    samples = [rand_voxels(m, i) for i, m in enumerate((500, 37, 1200))]
    gpu = Tokenizer.from_files("tiny-c", device="cuda", compile=False)
    cpu = Tokenizer.from_files("tiny-c", device="cpu")
    fast = gpu.encode_voxels([check_voxels(f, c) for f, c in samples], with_logvar=False)
    host = gpu.encode([voxels_to_tokens(f, c) for f, c in samples], with_logvar=False)
    ref = cpu.encode([voxels_to_tokens(f, c) for f, c in samples], with_logvar=False)
    for a, b, r in zip(fast, host, ref):
        assert np.array_equal(a["coords"], b["coords"]) and np.array_equal(a["coords"], r["coords"])
        np.testing.assert_allclose(a["latent"].astype(np.float32), b["latent"].astype(np.float32), atol=2e-2)
        x, y = a["latent"].astype(np.float64).ravel(), r["latent"].astype(np.float64).ravel()
        assert np.corrcoef(x, y)[0, 1] > 0.99
