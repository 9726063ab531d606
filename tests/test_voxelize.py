"""Voxelisation (64^3 occupancy from depth) and the 768-d patch features, `MeshStage.process`, and the 3D branch
of the prepare stage (fetch + mesh in one call)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atoken.voxelize import _patch_index, occupied_voxels, patch_features, voxel_features
from pipeline.decode import DecodeConfig
from pipeline.fetch import FetchConfig
from pipeline.mesh.config import MeshConfig
from pipeline.mesh.load import MeshError
from pipeline.mesh.stage import MeshStage
from pipeline.mesh.cameras import intrinsics_from_fov, look_at
from pipeline.mesh.procedural import export_assets
from pipeline.prepare import Prepare
from pipeline.rows import fail, new_row

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MESHES = DATA / "meshes"
needs_data = pytest.mark.skipif(not MESHES.is_dir(), reason="../shared/data not present")
SHELL = 64**3 - 62**3  # voxels on the surface of a full 64^3 cube


@pytest.fixture(scope="module")
def stage16():
    return MeshStage(MeshConfig(views=16, resolution=128, backend="cpu"))  # features still use 256-px views


def row(path, id_="a"):
    return new_row(id_, "3d", "test", uri=None if path is None else str(path))


@needs_data
def test_cube_voxels_are_the_surface_shell(stage16):
    out = stage16.process(MESHES / "Box.glb", "cube")
    c = out["voxel_coords"]
    assert c.dtype == np.int16 and c.shape[1] == 3 and out["num_voxels"] == len(c)
    assert c.min() >= 0 and c.max() <= 63
    on_shell = ((c == 0) | (c == 63)).any(1)
    assert on_shell.all()  # nothing inside the cube
    assert 0.9 * SHELL <= len(c) <= SHELL  # 16 views see almost all of the shell
    assert len(np.unique(c, axis=0)) == len(c)
    order = np.lexsort((c[:, 2], c[:, 1], c[:, 0]))  # argwhere 'ij' order
    np.testing.assert_array_equal(order, np.arange(len(c)))
    f = out["voxel_feats"]
    assert f.dtype == np.float16 and f.shape == (len(c), 768)
    assert f.min() >= 0 and f.max() <= 1
    # Box.glb is red (204, 0, 0): lit pixels of every patch are red, background zeros
    px = f.astype(np.float32).reshape(-1, 256, 3)
    lit = px.max(-1) > 0
    assert lit.mean() > 0.5
    assert px[..., 1:].max() < 0.01  # no green or blue anywhere
    assert abs(np.median(px[lit][:, 0]) - 0.8) < 0.01  # renders at 128 px are resized to 256: edges blend


@needs_data
def test_modes_and_determinism():
    path = MESHES / "BoxTextured.glb"
    near = MeshStage(MeshConfig(views=8, resolution=128, backend="cpu"))
    vis = MeshStage(MeshConfig(views=8, resolution=128, backend="cpu", feature_mode="visible_mean"))
    a, b = near.process(path, "x"), near.process(path, "x")
    np.testing.assert_array_equal(a["voxel_coords"], b["voxel_coords"])
    np.testing.assert_array_equal(a["voxel_feats"], b["voxel_feats"])
    assert a["render"] == b["render"]
    c = vis.process(path, "x")
    np.testing.assert_array_equal(a["voxel_coords"], c["voxel_coords"])  # same cameras -> same voxels
    assert c["voxel_feats"].min() >= 0 and c["voxel_feats"].max() <= 1
    assert not np.array_equal(a["voxel_feats"], c["voxel_feats"])
    settings = json.loads(c["render"])
    assert settings["feature_mode"] == "visible_mean" and settings["views"] == 8 and settings["resolution"] == 128
    for key in ("fov_deg", "radius", "backend", "normalize", "grid"):
        assert key in settings
    d = near.process(path, "y")  # another id -> other cameras
    assert d["num_voxels"] != a["num_voxels"] or not np.array_equal(d["voxel_feats"], a["voxel_feats"])


def test_patch_feature_channel_order():
    img = torch.zeros(1, 256, 256, 3)
    img[0, 16 * 2 + 3, 16 * 5 + 7, 1] = 1.0  # patch (2, 5), inside-patch pixel (p1=3, p2=7), channel 1
    feats = patch_features(img)
    assert feats.shape == (1, 16, 16, 768)
    hot = (feats[0] == 1).nonzero().tolist()
    assert hot == [[2, 5, (3 * 16 + 7) * 3 + 1]]


def test_patch_index_matches_grid_sample():
    torch.manual_seed(0)
    uv = torch.rand(2, 500) * 1.2 - 0.1
    fmap = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16) + 1
    grid = (uv.T * 2 - 1).view(1, 1, 500, 2)
    ref = F.grid_sample(fmap, grid, mode="nearest", align_corners=True, padding_mode="zeros").view(-1)
    row, col, valid = _patch_index(uv[0], uv[1])
    mine = torch.where(valid, fmap.view(-1)[row * 16 + col], torch.zeros(()))
    torch.testing.assert_close(mine, ref)


def test_occupancy_from_synthetic_depth():
    """A flat depth map of one camera unprojects onto a plane -> voxels with one constant index."""
    w2c = look_at(np.array([[0.0, 0.0, 2.0]]))
    K = intrinsics_from_fov(40.0, 1)
    depth = torch.full((1, 32, 32), 2.0 - 0.25)  # plane z = 0.25
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 8:24, 8:24] = True
    c = occupied_voxels(depth, mask, w2c, K)
    assert (c[:, 2] == int((0.25 + 0.5) * 64)).all()
    assert len(c) > 20


def test_visible_mean_skips_occluded_views():
    """Two cameras facing one voxel; the nearer one sees an occluder in front of it."""
    eyes = np.array([[0.0, 0.0, 1.5], [0.0, 0.0, -2.0]])
    w2c, K = look_at(eyes), intrinsics_from_fov(40.0, 2)
    coords = torch.tensor([[32, 32, 32]])  # centre (1/128, 1/128, 1/128) ~ origin
    rgb = torch.zeros(2, 256, 256, 3)
    rgb[0, ..., 0] = 1.0  # view 0 sees red (the occluder)
    rgb[1, ..., 2] = 1.0  # view 1 sees blue (the voxel's own surface)
    depth = torch.stack([torch.full((256, 256), 0.5), torch.full((256, 256), 2.0)])  # view 0: something at 0.5
    mask = torch.ones(2, 256, 256, dtype=torch.bool)
    near = voxel_features(rgb, coords, w2c, K, "nearest").view(256, 3)
    vis = voxel_features(rgb, coords, w2c, K, "visible_mean", depth=depth, mask=mask).view(256, 3)
    assert torch.all(near[:, 0] == 1) and torch.all(near[:, 2] == 0)  # official rule: nearest camera, no test
    assert torch.all(vis[:, 2] == 1) and torch.all(vis[:, 0] == 0)  # visibility-aware: the unoccluded view
    # both visible -> the mean of both
    depth[0] = 2.0
    both = voxel_features(rgb, coords, w2c, K, "visible_mean", depth=depth, mask=mask).view(256, 3)
    torch.testing.assert_close(both[:, 0], torch.full((256,), 0.5))
    torch.testing.assert_close(both[:, 2], torch.full((256,), 0.5))


@needs_data
def test_stage_failures_and_passthrough(tmp_path, stage16):
    (tmp_path / "junk.glb").write_bytes(b"glTF" + b"\x00" * 40)
    with pytest.raises(MeshError, match="GLB"):
        stage16.process(tmp_path / "junk.glb", "junk")
    with pytest.raises(ValueError):
        MeshStage(MeshConfig(feature_mode="mean"))
    # the prepare stage's 3D branch: failures become failed rows with the reason, failed rows pass through
    prep = Prepare(FetchConfig(), DecodeConfig(), MeshConfig(views=4, resolution=64, backend="cpu"), branch="3d")
    try:
        earlier = fail(row(tmp_path / "x.glb", "earlier"), "source", "404")
        out = prep([earlier, row(None, "nouri"), row(tmp_path / "junk.glb", "junk"), row(MESHES / "Box.glb", "ok")])
        assert out[0] is earlier
        assert (out[1]["status"], out[1]["stage"], out[1]["reason"]) == ("failed", "fetch", "empty uri")
        assert (out[2]["status"], out[2]["stage"]) == ("failed", "mesh") and "GLB" in out[2]["reason"]
        assert "voxel_feats" not in out[2]
        assert (out[3]["status"], out[3]["stage"], out[3]["reason"]) == ("ok", "mesh", None)
        assert out[3]["num_voxels"] == len(out[3]["voxel_coords"]) > 0 and "mesh" in out[3]["timings"]
    finally:
        prep.teardown()


def test_procedural_assets_through_the_stage(tmp_path):
    stage = MeshStage(MeshConfig(views=6, resolution=128, backend="cpu"))
    for name, path in export_assets(tmp_path).items():
        out = stage.process(path, name)
        assert out["num_voxels"] > 1000
        assert out["voxel_feats"].astype(np.float32).max() > 0.1
