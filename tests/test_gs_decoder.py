"""3D Gaussian decoder (atoken/gs_decoder.py) and the pure-PyTorch splat renderer (atoken/splat.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from atoken.gs_decoder import (
    GaussianDecoder,
    GSDecoderConfig,
    load_gs_weights,
    offset_perturbation,
    window_attention,
    window_layout,
)
from atoken.splat import (
    SH_C0,
    Camera,
    Gaussians,
    RenderConfig,
    intrinsics_from_fov,
    look_at,
    orbit_cameras,
    psnr,
    render,
)

N_KEYS, N_VALUES = 76, 85_887_520


def small_cfg(**kw) -> GSDecoderConfig:
    base = dict(model_channels=48, latent_channels=16, num_blocks=2, num_heads=2, num_head_channels=24, mlp_channels=96)
    base.update(kw)
    return GSDecoderConfig(**base)


def voxel_coords(xyz, b=0) -> torch.Tensor:
    xyz = torch.as_tensor(xyz, dtype=torch.long).reshape(-1, 3)
    return torch.cat([torch.full((len(xyz), 1), b, dtype=torch.long), xyz], dim=1)


def random_voxels(n, seed, batch=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for b in range(batch):
        xyz = torch.randint(0, 64, (n, 3), generator=g).unique(dim=0)
        parts.append(voxel_coords(xyz, b))
    return torch.cat(parts)


# ----------------------------------------------------------------------------- checkpoint layout


def test_official_key_set_and_sizes_on_meta():
    with torch.device("meta"):
        m = GaussianDecoder(GSDecoderConfig.from_yaml())
    sd = m.state_dict()
    assert len(sd) == N_KEYS
    assert sum(v.numel() for v in sd.values()) == N_VALUES
    expected = {
        "offset_perturbation": (32, 3),
        "input_layer.weight": (768, 768),
        "out_layer.weight": (448, 768),
        "out_layer.bias": (448,),
    }
    for n in range(12):
        p = f"blocks.{n}."
        expected.update(
            {
                p + "norm1.weight": (768,),
                p + "norm2.weight": (768,),
                p + "attn.to_qkv.weight": (2304, 768),
                p + "attn.to_out.weight": (768, 768),
                p + "mlp.mlp.0.weight": (3072, 768),
                p + "mlp.mlp.2.weight": (768, 3072),
            }
        )
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_yaml_config_matches_official_values():
    cfg = GSDecoderConfig.from_yaml()
    assert (cfg.resolution, cfg.model_channels, cfg.num_blocks, cfg.num_heads, cfg.window_size) == (64, 768, 12, 12, 8)
    rep = cfg.representation
    assert rep.lr["_rotation"] == 0.1 and rep.lr["_xyz"] == 1.0
    assert (rep.num_gaussians, rep.voxel_size, rep.filter_2d_kernel_size, rep.filter_3d_kernel_size) == (
        32,
        1.5,
        0.1,
        9e-4,
    )
    assert (rep.scaling_bias, rep.opacity_bias, cfg.out_channels) == (4e-3, 0.1, 448)


def test_config_rejects_unknown_and_unsupported():
    with pytest.raises(ValueError, match="unknown keys"):
        GSDecoderConfig.from_dict({"model": {"resolution": 64, "bogus": 1}})
    with pytest.raises(ValueError, match="attn_mode"):
        GSDecoderConfig(attn_mode="full")
    with pytest.raises(ValueError, match="num_heads"):
        GSDecoderConfig(num_heads=10)


def test_offset_perturbation_is_hammersley():
    p = offset_perturbation(32, 1.5)
    # k=0: h=(0, 0, 0); k=1: h=(1/32, 1/2, 1/3); k=3: h=(3/32, 3/4, 1/9 + ... = radical inverse base 3 of 3 = 1/9)
    for k, h in [(0, (0, 0, 0)), (1, (1 / 32, 0.5, 1 / 3)), (3, (3 / 32, 0.75, 1 / 9))]:
        want = torch.atanh((torch.tensor(h, dtype=torch.float64) * 2 - 1) / 1.5).float()
        torch.testing.assert_close(p[k], want)
    assert GaussianDecoder(small_cfg()).state_dict()["offset_perturbation"].shape == (32, 3)


def test_strict_loading_drops_lpips_and_rejects_missing_or_extra(tmp_path):
    torch.manual_seed(0)
    src = GaussianDecoder(small_cfg())
    sd = src.state_dict()
    ckpt = dict(sd, **{"lpips_loss.net.lin0.model.1.weight": torch.zeros(1, 64, 1, 1)})
    torch.save(ckpt, tmp_path / "gs.pt")
    dst = GaussianDecoder(small_cfg())
    load_gs_weights(dst, tmp_path / "gs.pt")
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k

    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.to_out.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="blocks.1.attn.to_out.weight"):
        load_gs_weights(GaussianDecoder(small_cfg()), tmp_path / "missing.pt")

    torch.save(dict(sd, **{"blocks.9.norm1.weight": torch.ones(48)}), tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected keys"):
        load_gs_weights(GaussianDecoder(small_cfg()), tmp_path / "extra.pt")


# ----------------------------------------------------------------------------- forward and decoding


def test_forward_gives_gaussians_in_expected_ranges():
    torch.manual_seed(0)
    m = GaussianDecoder(small_cfg()).eval()
    with torch.no_grad():
        m.out_layer.weight.normal_(0, 0.5)  # a trained-looking head, not the zero init
    coords = random_voxels(40, seed=1, batch=2)
    feats = torch.randn(len(coords), 16) * 3
    with torch.no_grad():
        out = m(feats, coords)
    assert len(out) == 2
    for b, g in enumerate(out):
        c = coords[coords[:, 0] == b, 1:]
        assert g.xyz.shape == (len(c) * 32, 3) and g.color_dc.shape == (len(c) * 32, 3)
        assert g.scale.shape == (len(c) * 32, 3) and g.rotation.shape == (len(c) * 32, 4)
        assert g.opacity.shape == (len(c) * 32, 1)
        centre = ((c.float() + 0.5) / 64 - 0.5).repeat_interleave(32, dim=0)
        assert ((g.xyz - centre).abs() <= 0.75 / 64 + 1e-6).all()
        assert ((g.opacity > 0) & (g.opacity < 1)).all()
        torch.testing.assert_close(g.rotation.norm(dim=-1), torch.ones(len(g.rotation)))
        assert (g.scale >= 9e-4).all()
        assert g.color_dc.std() > 0.1  # the head's output actually reaches the colours


def test_zero_head_decodes_to_official_defaults():
    """With out_layer = 0 every raw value is 0, so each parameter equals its bias, checkable by hand (section 7.3)."""
    m = GaussianDecoder(small_cfg()).eval()
    with torch.no_grad():
        m.out_layer.weight.zero_()
        m.out_layer.bias.zero_()
    coords = voxel_coords([[0, 0, 0], [63, 10, 5]])
    with torch.no_grad():
        (g,) = m(torch.randn(2, 16), coords)
    h = torch.tensor([[k / 32, 0.0, 0.0] for k in range(32)])
    h[:, 1:] = torch.tanh(offset_perturbation(32, 1.5))[:, 1:] * 1.5 / 2 + 0.5  # invert the stored atanh
    want_off = (h * 2 - 1) * 0.5 / 64  # tanh(atanh((2h-1)/1.5)) * 0.75 / 64
    centre = (coords[:, 1:].float() + 0.5) / 64 - 0.5
    torch.testing.assert_close(g.xyz, (centre[:, None] + want_off).reshape(-1, 3))
    torch.testing.assert_close(g.opacity, torch.full((64, 1), 0.1))
    torch.testing.assert_close(g.scale, torch.full((64, 3), math.sqrt(0.004**2 + 9e-4**2)))
    torch.testing.assert_close(g.rotation, torch.tensor([1.0, 0, 0, 0]).expand(64, 4))
    torch.testing.assert_close(g.rgb, torch.full((64, 3), 0.5))


def test_full_size_decoder_runs_on_a_few_voxels():
    m = GaussianDecoder.from_files().eval()
    coords = voxel_coords([[30, 30, 30], [31, 30, 30], [40, 2, 7]])
    with torch.no_grad():
        raw = m.forward_features(torch.randn(3, 768), coords)
    assert raw.shape == (3, 448) and torch.isfinite(raw).all()


def test_token_layout_coords_are_accepted():
    m = GaussianDecoder(small_cfg(num_blocks=1)).eval()
    c4 = voxel_coords([[1, 2, 3], [4, 5, 6]])
    c5 = torch.cat([c4[:, :1], torch.ones(2, 1, dtype=torch.long), c4[:, 1:]], dim=1)  # (b, t=1, x, y, z)
    f = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_features(f, c4), m.forward_features(f, c5))


def test_bad_inputs_raise_clear_errors():
    m = GaussianDecoder(small_cfg(num_blocks=1))
    with pytest.raises(ValueError, match=r"feats must be \[N, 16\]"):
        m(torch.randn(2, 15), voxel_coords([[0, 0, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        m(torch.randn(1, 16), voxel_coords([[64, 0, 0]]))
    with pytest.raises(ValueError, match="coords must be"):
        m(torch.randn(1, 16), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no voxels"):
        m(torch.randn(0, 16), torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ordered by batch index"):
        m(torch.randn(2, 16), torch.cat([voxel_coords([[0, 0, 0]], 1), voxel_coords([[0, 0, 0]], 0)]))


# ----------------------------------------------------------------------------- swin windows


def test_tokens_attend_only_within_their_window():
    torch.manual_seed(0)
    m = GaussianDecoder(small_cfg(num_blocks=1)).eval()  # block 0: unshifted 8^3 windows
    a = [[0, 0, 0], [3, 5, 7], [7, 7, 7]]  # window (0, 0, 0)
    b = [[8, 0, 0], [12, 3, 1]]  # window (1, 0, 0)
    coords = voxel_coords(a + b)
    f = torch.randn(5, 16)
    with torch.no_grad():
        base = m.forward_features(f, coords)
        f2 = f.clone()
        f2[3] += 5.0  # perturb a token of window B
        moved_b = m.forward_features(f2, coords)
        f3 = f.clone()
        f3[0] += 5.0  # perturb a token of window A
        moved_a = m.forward_features(f3, coords)
    torch.testing.assert_close(moved_b[:3], base[:3], rtol=0, atol=1e-6)  # window A untouched
    assert (moved_b[4] - base[4]).abs().max() > 1e-3  # its own window partner changed
    assert (moved_a[1:3] - base[1:3]).abs().max() > 1e-3
    torch.testing.assert_close(moved_a[3:], base[3:], rtol=0, atol=1e-6)


def test_odd_blocks_use_windows_shifted_by_four():
    """x = 3 | 7 | 8 on one row: block 0 windows {3, 7} {8}; block 1 (shift 4) windows {3} {7, 8}."""
    torch.manual_seed(0)
    coords = voxel_coords([[3, 0, 0], [7, 0, 0], [8, 0, 0]])
    f = torch.randn(3, 16)
    f2 = f.clone()
    f2[2] += 5.0  # perturb x = 8
    for blocks, a_changes in ((1, False), (2, True)):
        m = GaussianDecoder(small_cfg(num_blocks=blocks)).eval()
        with torch.no_grad():
            base, moved = m.forward_features(f, coords), m.forward_features(f2, coords)
        assert ((moved[1] - base[1]).abs().max() > 1e-3) == a_changes  # x = 7 only sees x = 8 in the shifted block
        torch.testing.assert_close(moved[0], base[0], rtol=0, atol=1e-6)  # x = 3 never does


def test_shifted_windows_move_the_boundary():
    coords = voxel_coords([[3, 0, 0], [4, 0, 0], [11, 0, 0], [12, 0, 0]])
    # unshifted: {3,4} in window 0 and {11,12} in window 1; shifted by 4: {3}, {4,11}, {12}
    sizes = lambda lay: sorted(int(v.sum()) for _, valid in lay.groups for v in valid)  # noqa: E731
    assert sizes(window_layout(coords, 8, 0)) == [2, 2]
    assert sizes(window_layout(coords, 8, 4)) == [1, 1, 2]


def test_window_attention_matches_dense_masked_reference():
    """Grouped/padded window attention == full attention with a same-window mask and the softcap, for 2 samples."""
    torch.manual_seed(0)
    coords = torch.cat(
        [
            voxel_coords(torch.randint(0, 20, (150, 3)).unique(dim=0), 0),
            voxel_coords(torch.randint(0, 20, (90, 3)).unique(dim=0), 1),
        ]
    )
    N, H, D = len(coords), 2, 8
    q, k, v = (torch.randn(N, H, D) * 3 for _ in range(3))
    for shift in (0, 4):
        lay = window_layout(coords, 8, shift, max_scores=64)  # tiny budget: many groups
        assert len(lay.groups) > 3
        out = window_attention(q, k, v, lay, scale=D**-0.5, softcap=30.0)
        win = torch.div(coords[:, 1:] + shift, 8, rounding_mode="floor")
        key = torch.cat([coords[:, :1], win], 1)
        same = (key[:, None, :] == key[None, :, :]).all(-1)
        s = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
        s = (30 * torch.tanh(s / 30)).masked_fill(~same, float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the cap matters for large logits: the uncapped result differs
    s_uncapped = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
    assert s_uncapped.abs().max() > 30


# ----------------------------------------------------------------------------- splat renderer


def one_gaussian(xyz, rgb, scale, opacity) -> Gaussians:
    dc = (torch.tensor(rgb, dtype=torch.float32) - 0.5) / SH_C0
    return Gaussians(
        torch.tensor([xyz], dtype=torch.float32),
        dc[None],
        torch.full((1, 3), float(scale)),
        torch.tensor([[1.0, 0, 0, 0]]),
        torch.tensor([[opacity]]),
    )


def cat(*gs: Gaussians) -> Gaussians:
    return Gaussians(
        *(torch.cat([getattr(g, f) for g in gs]) for f in ("xyz", "color_dc", "scale", "rotation", "opacity"))
    )


def front_camera(dist=2.0, fov_deg=40.0) -> Camera:
    return Camera(look_at((0.0, -dist, 0.0)), intrinsics_from_fov(math.radians(fov_deg)))


def test_single_gaussian_renders_the_analytic_blob():
    res, dist, s, op = 65, 2.0, 0.1, 0.8
    cfg = RenderConfig(resolution=res)
    out = render(one_gaussian([0, 0, 0], [0.2, 0.6, 1.0], s, op), front_camera(dist), cfg)
    f = 0.5 / math.tan(math.radians(20)) * res  # focal length in pixels
    var = (f * s / dist) ** 2  # projected variance (px^2)
    var_f = var + cfg.kernel_size  # plus the 2D filter
    peak = op * math.sqrt(var**2 / var_f**2)  # mip compensation sqrt(det0/det1)
    c = res // 2  # the optical axis hits the centre of pixel 32
    assert out.alpha.argmax().item() == c * res + c
    torch.testing.assert_close(out.image[c, c], torch.tensor([0.2, 0.6, 1.0]) * peak, rtol=1e-4, atol=1e-5)
    # radial profile along the centre row: peak * exp(-r^2 / (2 var_f)) where alpha >= 1/255, else 0
    r = torch.arange(res, dtype=torch.float32) - c
    a = peak * torch.exp(-(r**2) / (2 * var_f))
    want = torch.where(a >= 1 / 255, a, torch.zeros_like(a))
    torch.testing.assert_close(out.alpha[c], want, rtol=1e-4, atol=1e-5)
    half = (out.alpha > peak / 2).sum().item()  # area above half max ~ pi * 2 ln2 * var_f
    assert abs(half - math.pi * 2 * math.log(2) * var_f) < 0.1 * half
    assert out.alpha[0].max() == 0 and out.image.min() >= 0


def test_gaussians_occlude_by_depth_regardless_of_input_order():
    red = one_gaussian([0, 0, 0], [1, 0, 0], 0.2, 0.999)  # nearer (camera at y = -2)
    blue = one_gaussian([0, 0.5, 0], [0, 0, 1], 0.2, 0.999)
    cfg = RenderConfig(resolution=33)
    c = 16
    for g in (cat(red, blue), cat(blue, red)):
        px = render(g, front_camera(), cfg).image[c, c]
        assert px[0] > 0.95 and px[2] < 0.02, px
    behind = one_gaussian([0, 1.0, 0], [1, 0, 0], 0.2, 0.999)  # now red is behind blue
    px = render(cat(behind, blue), front_camera(), cfg).image[c, c]
    assert px[2] > 0.95 and px[0] < 0.02, px


def test_orbit_cameras_look_at_the_origin():
    cams = orbit_cameras(6, radius=2.0, fov_deg=40)
    assert len(cams) == 6
    for cam in cams:
        R, t = cam.w2c[:3, :3], cam.w2c[:3, 3]
        torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-6, rtol=0)
        torch.testing.assert_close(t, torch.tensor([0.0, 0.0, 2.0]), atol=1e-6, rtol=0)  # origin 2 units ahead
        assert cam.intrinsics[0, 0].item() == pytest.approx(0.5 / math.tan(math.radians(20)))
    eyes = torch.stack([-(c.w2c[:3, :3].T @ c.w2c[:3, 3]) for c in cams])
    assert len(torch.unique(eyes.round(decimals=4), dim=0)) == 6


def test_decoded_voxel_block_renders_where_the_voxels_are():
    """Decoder -> renderer: a 4^3 block of voxels at the centre, zero head = small grey Gaussians."""
    m = GaussianDecoder(small_cfg(num_blocks=1)).eval()
    with torch.no_grad():
        m.out_layer.weight.zero_()
        m.out_layer.bias.zero_()
        m.out_layer.bias[416:448] = 5.0  # opaque
    r = torch.arange(30, 34)
    xyz = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        (g,) = m(torch.randn(len(xyz), 16), voxel_coords(xyz))
    out = render(g, orbit_cameras(1, fov_deg=10, pitch_deg=0)[0], RenderConfig(resolution=48))
    # the block spans [-1/32, 1/32]^3: ~ +-4.3 px around the image centre (23.5) at distance ~2
    assert out.alpha[21:27, 21:27].min() > 0.95
    assert out.alpha[:14].max() == 0 and out.alpha[:, 34:].max() == 0
    torch.testing.assert_close(out.image[23, 23], torch.full((3,), 0.5), atol=0.03, rtol=0)


def test_psnr():
    a = torch.zeros(4, 4, 3)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(a, torch.zeros(4, 4))


# ----------------------------------------------------------------------------- GPU paths (run by the lead on a GPU box)


@pytest.mark.gpu
def test_gpu_bf16_decoder_matches_cpu_fp32():
    """bf16 through 12 random-weight blocks drifts per element, so compare the raw head output as a whole."""
    torch.manual_seed(0)
    m = GaussianDecoder.from_files().eval()
    with torch.no_grad():
        m.out_layer.weight.normal_(0, 0.02)
    coords = random_voxels(2000, seed=3, batch=2)
    feats = torch.randn(len(coords), 768)
    with torch.no_grad():
        ref = m.forward_features(feats, coords)
        gpu = m.to("cuda", torch.bfloat16).forward_features(feats.cuda(), coords.cuda()).float().cpu()
    rel = (gpu - ref).norm() / ref.norm()
    assert rel < 0.05, f"relative error {rel:.4f}"
    assert torch.corrcoef(torch.stack([gpu.flatten(), ref.flatten()]))[0, 1] > 0.99


@pytest.mark.gpu
def test_gpu_render_matches_cpu():
    g = Gaussians(
        torch.rand(5000, 3) - 0.5,
        torch.randn(5000, 3),
        torch.full((5000, 3), 0.01),
        F.normalize(torch.randn(5000, 4), dim=-1),
        torch.rand(5000, 1),
    )
    cam = orbit_cameras(3)[1]
    cfg = RenderConfig(resolution=128)
    ref, gpu = render(g, cam, cfg), render(g.to("cuda"), cam, cfg)
    assert psnr(gpu.image.cpu().clamp(0, 1), ref.image.clamp(0, 1)) > 50
