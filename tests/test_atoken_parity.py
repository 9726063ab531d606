"""Parity with the official AToken implementation (reduced width reference vectors, fp32 CPU), and the full-size
So400M key set / shapes / parameter count built on the meta device."""

import json

import numpy as np
import pytest
import torch

from atoken.checkpoint import load_state_dict, load_weights, read_state_dict
from atoken.config import ATokenConfig
from atoken.model import AToken
from atoken.sparse import SparseBatch, image_to_tokens, tokens_to_video, video_to_tokens, voxels_to_tokens

ATOL = 1e-4
CONFIGS = {"soc": "mini", "sod": "mini-fsq"}


@pytest.fixture(scope="module", params=["soc", "sod"])
def ref(request, reference_dir):
    """(reference arrays, our model strict-loaded with the official state dict)."""
    name = request.param
    arrays = np.load(reference_dir / f"atoken-{name}_blocks2_w144.npz")
    model = AToken(ATokenConfig.named(CONFIGS[name])).eval()
    load_weights(model, reference_dir / f"atoken-{name}_blocks2_w144_state_dict.pt", strict=True)
    return name, arrays, model


def pack_raw(arrays, group) -> SparseBatch:
    """Our own packing of the recorded raw inputs."""
    if group == "img":
        return SparseBatch.pack([image_to_tokens(arrays["img.raw0"]), image_to_tokens(arrays["img.raw1"])])
    if group == "vid":
        return SparseBatch.pack([video_to_tokens(arrays["vid.raw"])])
    return SparseBatch.pack([voxels_to_tokens(arrays["3d.raw_feats"], arrays["3d.raw_coords"])])


def run_all(model, batch, image: bool):
    taps = {}
    with torch.no_grad():
        enc = model.encode(batch, taps=taps)
        out = {
            "z": torch.cat([enc.mean, enc.logvar], 1),
            "pooled": enc.pooled,
            "pooled_norm": enc.pooled_norm,
            "x_no_proj": enc.tokens,
            "dec_mean": model.decode(enc.mean, batch.coords, taps=taps),
        }
        if model.discrete:
            codes, indices = model.quantize(enc.mean)
            out.update(fsq_codes=codes, fsq_indices=indices, dec_fsq=model.decode(codes, batch.coords))
    for name, rec in (("dec_mean", "rec_mean"), ("dec_fsq", "rec_fsq")):
        if name in out:  # back to frames [T, 3, H, W] per sample; images keep the first frame
            for i, (f, c) in enumerate(zip(batch.split(out[name]), batch.split(batch.coords))):
                frames = tokens_to_video(f, c[:, 1:])
                out[f"{rec}_{i}"] = (frames[:1] if image else frames).permute(0, 3, 1, 2)
    return out, taps


@pytest.mark.parametrize("group", ["img", "vid", "3d"])
def test_packing_matches_official(ref, group):
    _, arrays, _ = ref
    batch = pack_raw(arrays, group)
    np.testing.assert_array_equal(batch.coords.numpy(), arrays[f"{group}.coords"])
    np.testing.assert_allclose(batch.feats.numpy(), arrays[f"{group}.feats"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("group", ["img", "vid", "3d"])
def test_outputs_match_official(ref, group):
    name, arrays, model = ref
    out, taps = run_all(model, pack_raw(arrays, group), image=group == "img")
    errors, checked = {}, []
    for key in arrays.files:
        g, _, what = key.partition(".")
        if g != group or what in ("raw", "raw0", "raw1", "raw_feats", "raw_coords", "feats", "coords"):
            continue
        got = taps.get(what, out.get(what))
        assert got is not None, f"{name}/{key}: output not produced"
        got, want = got.detach().double().numpy(), arrays[key].astype(np.float64)
        assert got.shape == want.shape, f"{name}/{key}: shape {got.shape} vs {want.shape}"
        checked.append(what)
        if what == "fsq_indices":
            continue
        errors[what] = float(np.abs(got - want).max())
    bad = {k: v for k, v in errors.items() if v > ATOL}
    assert not bad, f"{name}/{group}: max abs error above {ATOL}: {bad}\nall: {json.dumps(errors, indent=1)}"
    expected = {
        "z",
        "pooled",
        "pooled_norm",
        "x_no_proj",
        "dec_mean",
        "enc_embed",
        "enc_block0",
        "dec_embed",
        "dec_block0",
    }
    assert expected <= set(checked)
    if group != "3d":
        assert any(c.startswith("rec_mean_") for c in checked)
    if name == "sod":
        assert {"fsq_codes", "fsq_indices", "dec_fsq"} <= set(checked)
        got_idx, want_idx = out["fsq_indices"].numpy(), arrays[f"{group}.fsq_indices"]
        mismatch = got_idx != want_idx
        if mismatch.any():  # allowed only where the bounded value sits within ~1e-4 of a rounding boundary
            bounded = model.quantizer.bound(out["z"][:, :48].reshape(-1, 8, 6)).numpy()
            dist = np.abs(bounded - np.floor(bounded) - 0.5).min(-1)
            assert (dist[mismatch] < 1e-4).all(), f"{name}/{group}: FSQ indices differ away from a boundary"


def test_state_dict_keys_match_reference(ref, reference_dir):
    name, _, model = ref
    sd = read_state_dict(reference_dir / f"atoken-{name}_blocks2_w144_state_dict.pt")
    assert set(sd) == set(model.state_dict())
    assert len(sd) == 63


# ----------------------------------------------------------------------------- full size (meta device)

FULL = {"atoken-soc": 845_738_048, "atoken-sod": 845_738_048, "atoken-soc-s1": 845_682_752}


def meta_model(name):
    with torch.device("meta"):
        return AToken(ATokenConfig.named(name))


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_key_set(name):
    model = meta_model(name)
    sd = model.state_dict()
    assert len(sd) == 563
    assert sum(v.numel() for v in sd.values()) == FULL[name]
    assert sum(1 for k in sd if k.startswith("encoder.")) == 342
    assert sum(1 for k in sd if k.startswith("encoder.head.")) == 13
    assert sum(1 for k in sd if k.startswith("decoder.")) == 220
    latent = 32 if name.endswith("s1") else 48
    shapes = {
        "encoder.pos_embedder.position_embedding.weight": (256, 1152),
        "encoder.input_layer.weight": (1152, 3072),
        "encoder.input_layer.bias": (1152,),
        "encoder.blocks.26.attn.to_qkv.weight": (3456, 1152),
        "encoder.blocks.26.attn.to_qkv.bias": (3456,),
        "encoder.blocks.0.mlp.mlp.0.weight": (4304, 1152),
        "encoder.blocks.0.mlp.mlp.2.bias": (1152,),
        "encoder.post_layernorm.bias": (1152,),
        "encoder.head.probe": (1152,),
        "encoder.head.attention.to_q.weight": (1152, 1152),
        "encoder.head.attention.to_kv.weight": (2304, 1152),
        "encoder.head.attention.to_out.bias": (1152,),
        "encoder.head.layernorm.weight": (1152,),
        "encoder.head.mlp.mlp.0.weight": (4304, 1152),
        "proj.weight": (2 * latent, 1152),
        "decoder.pos_embedder.position_embedding.weight": (256, 1152),
        "decoder.input_layer.weight": (1152, latent),
        "decoder.blocks.26.norm1.weight": (1152,),
        "decoder.blocks.26.attn.to_qkv.weight": (3456, 1152),
        "decoder.blocks.0.attn.q_rms_norm.gamma": (16, 72),
        "decoder.blocks.0.attn.k_rms_norm.gamma": (16, 72),
        "decoder.blocks.0.mlp.mlp.2.weight": (1152, 4304),
        "decoder.out_norm.weight": (1152,),
        "decoder.out_layer.weight": (3072, 1152),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    for absent in (
        "proj.bias",
        "decoder.input_layer.bias",
        "decoder.out_layer.bias",
        "decoder.blocks.0.norm1.bias",
        "decoder.blocks.0.attn.to_qkv.bias",
        "encoder.blocks.27.norm1.weight",
    ):
        assert absent not in sd


def _meta_state_dict(model):
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}


def test_full_size_strict_load_and_clear_errors():
    model = meta_model("atoken-sod")
    sd = _meta_state_dict(model)
    assert load_state_dict(model, sd, strict=True, assign=True) == ([], [])

    missing = dict(sd)
    del missing["decoder.blocks.13.attn.k_rms_norm.gamma"]
    with pytest.raises(ValueError, match=r"missing keys \(1\).*decoder\.blocks\.13\.attn\.k_rms_norm\.gamma"):
        load_state_dict(meta_model("atoken-sod"), missing, strict=True, assign=True)

    extra = dict(sd, **{"encoder.head.extra_bias": torch.empty(3, device="meta")})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\).*encoder\.head\.extra_bias"):
        load_state_dict(meta_model("atoken-sod"), extra, strict=True, assign=True)

    wrong = dict(sd, **{"proj.weight": torch.empty(64, 1152, device="meta")})
    with pytest.raises(ValueError, match=r"shape mismatches.*proj\.weight"):
        load_state_dict(meta_model("atoken-sod"), wrong, strict=True, assign=True)


def test_checkpoint_formats_and_drop_rule(tmp_path, reference_dir):
    """.safetensors and .pt load the same; lpips_loss.* keys are dropped; non-flat files get a clear error."""
    from safetensors.torch import save_file

    sd = read_state_dict(reference_dir / "atoken-soc_blocks2_w144_state_dict.pt")
    save_file(
        dict(sd, **{"lpips_loss.net.lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}), str(tmp_path / "w.safetensors")
    )
    model = AToken(ATokenConfig.named("mini"))
    load_weights(model, tmp_path / "w.safetensors")
    assert torch.equal(model.proj.weight, sd["proj.weight"])
    with pytest.raises(ValueError, match="unexpected keys.*lpips_loss"):
        load_weights(AToken(ATokenConfig.named("mini")), tmp_path / "w.safetensors", drop_prefixes=())
    torch.save({"model": sd}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="flat state dict"):
        load_weights(model, tmp_path / "nested.pt")
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "absent.pt")


@pytest.mark.gpu
@pytest.mark.parametrize("group", ["img", "vid", "3d"])
def test_gpu_bf16_close_to_reference(ref, group):
    """On CUDA in bf16 (flash-attn when installed, else SDPA): close to the fp32 reference (bf16 tolerance)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    name, arrays, model = ref
    gpu = AToken(model.cfg).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(model.state_dict())
    batch = pack_raw(arrays, group).to("cuda")
    with torch.no_grad():
        enc = gpu.encode(batch)
        dec = gpu.decode(enc.mean, batch.coords)
    for what, got in (("z", torch.cat([enc.mean, enc.logvar], 1)), ("pooled_norm", enc.pooled_norm), ("dec_mean", dec)):
        want = torch.from_numpy(arrays[f"{group}.{what}"])
        err = (got.float().cpu() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err < 0.05 * scale + 1e-2, f"{name}/{group}/{what}: max abs error {err} (scale {scale})"
