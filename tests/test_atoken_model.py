"""AToken model behaviour on CPU: FSQ, RoPE, packing, tiling, KV cache, converters, bad input, Tokenizer."""

import numpy as np
import pytest
import torch

from atoken.config import ATokenConfig
from atoken.fsq import FSQ
from atoken.identity import tokenizer_identity
from atoken.model import AToken
from atoken.sparse import SparseBatch, image_to_tokens, tokens_to_image, tokens_to_video
from atoken.sparse import video_to_tokens, voxels_to_tokens
from atoken.tokenizer import Tokenizer
from atoken.attention import Segments, varlen_attention
from atoken.rope import Rope4D


def make_model(name="tiny", seed=0):
    torch.manual_seed(seed)
    model = AToken(ATokenConfig.named(name)).eval()
    with torch.no_grad():  # non-trivial norm gains so that every parameter matters
        for n, p in model.named_parameters():
            if n.endswith(("norm1.weight", "norm2.weight", "gamma", "out_norm.weight")):
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model("tiny")


@pytest.fixture(scope="module")
def model_fsq():
    return make_model("tiny-fsq")


def rand_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, w, 3, generator=g) * 2 - 1


def rand_video(t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(t, h, w, 3, generator=g) * 2 - 1


def rand_voxels(m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.randperm(64**3, generator=g)[:m]
    coords = torch.stack([coords // 4096, coords // 64 % 64, coords % 64], 1)
    return torch.rand(m, 768, generator=g), coords


# ----------------------------------------------------------------------------- FSQ


def test_fsq_indices_codes_roundtrip_all_codes():
    fsq = FSQ(48, 8, 4096)
    idx = torch.arange(4096)[:, None].expand(4096, 8)
    codes = fsq.indices_to_codes(idx)
    assert codes.shape == (4096, 48)
    assert set(codes.unique().tolist()) == {-1.0, -0.5, 0.0, 0.5}
    assert torch.equal(fsq.codes_to_indices(codes.reshape(4096, 8, 6)).long(), idx)
    # quantizing a code reproduces it, and its index (codes are fixed points of FSQ after the inverse bound)
    again, idx2 = fsq(torch.atanh((codes * 2 + 0.5) / 1.5015) - torch.atanh(torch.tensor(0.5 / 1.5015)))
    assert torch.equal(again, codes) and torch.equal(idx2.long(), idx)


def test_fsq_indices_in_range_for_any_input():
    fsq = FSQ(48, 8, 4096)
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 10.0, 1e4, 1e30):
        codes, idx = fsq(torch.randn(500, 48, generator=g) * scale)
        assert idx.dtype == torch.int32 and idx.shape == (500, 8)
        assert int(idx.min()) >= 0 and int(idx.max()) <= 4095
        assert set(codes.unique().tolist()) <= {-1.0, -0.5, 0.0, 0.5}
    _, idx = fsq(torch.full((1, 48), 1e30))
    assert idx.tolist() == [[4095] * 8]
    _, idx = fsq(torch.full((1, 48), -1e30))
    assert idx.tolist() == [[0] * 8]
    with pytest.raises(ValueError, match="indices must be in"):
        fsq.indices_to_codes(torch.tensor([[4096] * 8]))


# ----------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_relative_position():
    rope = Rope4D(72)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(30, 2, 72, generator=g), torch.randn(30, 2, 72, generator=g)
    pos = torch.randint(0, 40, (30, 4), generator=g)

    def scores(p):
        return torch.einsum("ihd,jhd->hij", rope(q, p), rope(k, p))

    base = scores(pos)
    for shift in ([3, 0, 0, 0], [0, 17, 0, 0], [0, 0, 5, 0], [0, 0, 0, 63], [2, 9, 11, 1]):
        assert torch.allclose(scores(pos + torch.tensor(shift)), base, atol=1e-4)
    moved = pos.clone()
    moved[0, 1] += 1  # one token moves: its scores change
    assert not torch.allclose(scores(moved)[:, 0], base[:, 0], atol=1e-3)
    assert torch.allclose(rope.freqs, 10000 ** (-torch.arange(9) / 72))


# ----------------------------------------------------------------------------- attention


def test_varlen_attention_paths_agree_with_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    # dense (equal lengths), per-length groups (few lengths), padded + key mask (many lengths)
    for lens in ([5, 9, 1, 7, 5], [6, 6, 6], list(range(1, 12))):
        seg = Segments.from_lens(lens, "cpu")
        q, k, v = (torch.randn(sum(lens), 2, 8, generator=g) for _ in range(3))
        got = varlen_attention(q, k, v, seg, seg)
        want = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    *(x[a:b].transpose(0, 1) for x in (q, k, v))
                ).transpose(0, 1)
                for a, b in zip(seg.cu[:-1].tolist(), seg.cu[1:].tolist())
            ]
        )
        assert torch.allclose(got, want, atol=1e-5)
    # cross-attention layout (pooling head): one query per sample over ragged keys
    sq, sk = Segments.from_lens([1, 1, 1], "cpu"), Segments.from_lens([4, 2, 7], "cpu")
    q, k, v = torch.randn(3, 2, 8, generator=g), torch.randn(13, 2, 8, generator=g), torch.randn(13, 2, 8, generator=g)
    got = varlen_attention(q, k, v, sq, sk)
    for i, (a, b) in enumerate(zip(sk.cu[:-1].tolist(), sk.cu[1:].tolist())):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[i : i + 1].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
        )
        assert torch.allclose(got[i], want.transpose(0, 1)[0], atol=1e-5)


# ----------------------------------------------------------------------------- packing and converters


def test_image_packing_rules():
    img = rand_image(40, 70)
    feats, coords = image_to_tokens(img)
    assert feats.shape == (2 * 4, 3072) and coords.shape == (8, 4)
    assert coords.tolist()[:5] == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 3, 0], [0, 1, 0, 0]]
    video = tokens_to_video(feats, coords)
    assert video.shape == (4, 32, 64, 3)
    assert torch.equal(video[0], img[4:36, 3:67])  # centre crop rows 4..35, cols 3..66
    assert torch.equal(video[1:], torch.zeros(3, 32, 64, 3))  # zero (mid-gray) temporal padding
    assert torch.equal(tokens_to_image(feats, coords), img[4:36, 3:67])
    # channel order (pt, ph, pw, c), c fastest
    assert torch.equal(feats[0, :3], img[4, 3]) and torch.equal(feats[0, 3:6], img[4, 4])
    u8 = (torch.rand(40, 70, 3) * 255).to(torch.uint8)
    assert torch.allclose(image_to_tokens(u8.numpy())[0], image_to_tokens(u8.float() / 127.5 - 1)[0])


def test_video_truncated_to_multiple_of_4_and_padded():
    v = rand_video(22, 32, 48)
    feats, coords = video_to_tokens(v)
    assert coords[:, 0].max() == 4 and len(coords) == 5 * 2 * 3  # 22 -> 20 frames = 5 latent steps
    assert torch.equal(tokens_to_video(feats, coords), v[:20])
    feats, coords = video_to_tokens(rand_video(3, 16, 16))
    assert len(coords) == 1 and torch.equal(tokens_to_video(feats, coords)[3], torch.zeros(16, 16, 3))


def test_voxel_packing():
    f, c = rand_voxels(10)
    feats, coords = voxels_to_tokens(f, c)
    assert feats.shape == (10, 3072) and torch.equal(feats[:, 768:], torch.zeros(10, 2304))
    assert torch.allclose(feats[:, :768], f * 2 - 1)
    assert torch.equal(coords[:, 0], torch.ones(10, dtype=torch.int32)) and torch.equal(coords[:, 1:], c.int())


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        image_to_tokens(torch.zeros(32, 32, 4))
    with pytest.raises(ValueError, match="expected \\[H, W, 3\\]"):
        image_to_tokens(torch.zeros(32, 32))
    with pytest.raises(ValueError, match="empty"):
        image_to_tokens(np.zeros((0, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        video_to_tokens(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        image_to_tokens(np.zeros((10, 32, 3), np.uint8))
    nan = rand_image(32, 32)
    nan[3, 4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        image_to_tokens(nan)
    with pytest.raises(ValueError, match="in \\[-1, 1\\]"):
        image_to_tokens(torch.full((32, 32, 3), 200.0))
    f, c = rand_voxels(5)
    with pytest.raises(ValueError, match="\\[0, 63\\]"):
        voxels_to_tokens(f, c + torch.tensor([0, 0, 64]))
    with pytest.raises(ValueError, match="\\[0, 63\\]"):
        voxels_to_tokens(f, c - 100)
    with pytest.raises(ValueError, match="expected \\[M, 768\\]"):
        voxels_to_tokens(f[:, :700], c)
    feats, coords = image_to_tokens(rand_image(32, 32))
    for bad in (-1, 4096):
        c2 = coords.clone()
        c2[0, 2] = bad
        with pytest.raises(ValueError, match="must be in \\[0, 4096\\)"):
            SparseBatch.pack([(feats, c2)])
    f2 = feats.clone()
    f2[1, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        SparseBatch.pack([(f2, coords)])
    with pytest.raises(ValueError, match="channels, expected 3072"):
        SparseBatch.pack([(feats[:, :100], coords)], channels=3072)
    with pytest.raises(ValueError, match="no samples"):
        SparseBatch.pack([])


# ----------------------------------------------------------------------------- model


def _samples():
    return [
        image_to_tokens(rand_image(48, 80, seed=1)),
        video_to_tokens(rand_video(9, 32, 32, seed=2)),
        voxels_to_tokens(*rand_voxels(30, seed=3)),
        image_to_tokens(rand_image(64, 32, seed=4)),
    ]


def test_shapes_image_video_3d(model, model_fsq):
    samples = _samples()
    batch = SparseBatch.pack(samples)
    n = sum(len(c) for _, c in samples)
    for m in (model, model_fsq):
        with torch.no_grad():
            enc = m.encode(batch)
            assert enc.mean.shape == enc.logvar.shape == (n, 48) and enc.mean.dtype == torch.float32
            assert enc.pooled.shape == (4, 144) and enc.tokens.shape == (n, 144)
            latent = m.quantize(enc.mean)[0] if m.discrete else enc.mean
            rec = m.decode(latent, batch.coords)
        assert rec.shape == (n, 3072) and torch.isfinite(rec).all()
        assert torch.allclose(enc.pooled_norm.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="no quantizer"):
        model.quantize(torch.zeros(2, 48))


def test_packed_equals_alone(model):
    """No attention across samples: packing changes nothing (ragged and equal-length batches)."""
    samples = _samples()
    for group in (samples, [samples[0], image_to_tokens(rand_image(48, 80, seed=9))]):
        batch = SparseBatch.pack(group)
        with torch.no_grad():
            enc = model.encode(batch)
            rec = model.decode(enc.mean, batch.coords)
            for i, s in enumerate(group):
                alone = SparseBatch.pack([s])
                e1 = model.encode(alone)
                r1 = model.decode(e1.mean, alone.coords)
                assert torch.allclose(batch.split(enc.mean)[i], e1.mean, atol=1e-5)
                assert torch.allclose(batch.split(enc.logvar)[i], e1.logvar, atol=1e-5)
                assert torch.allclose(enc.pooled[i], e1.pooled[0], atol=1e-5)
                assert torch.allclose(batch.split(rec)[i], r1, atol=1e-4)


def test_20_frame_video_is_tiled_4_plus_1(model):
    video = rand_video(22, 32, 32, seed=5)
    batch = SparseBatch.pack([video_to_tokens(video)])
    assert len(batch) == 5 * 4  # 22 -> 20 frames -> 5 latent steps of 2x2 tokens
    taps = {}
    with torch.no_grad():
        enc = model.encode(batch, taps=taps)
        model.decode(enc.mean, batch.coords, taps=taps)
        # the 5th latent step is its own tile with t rebased to 0
        assert taps["enc_embed_coords"][:, 1].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [0] * 4
        assert taps["dec_embed_coords"][:, 1].tolist() == taps["enc_embed_coords"][:, 1].tolist()
        # encoder tiles are independent: the first 16 frames alone give the same tokens as tile 0
        head = model.encode(SparseBatch.pack([video_to_tokens(video[:16])]))
        assert torch.allclose(enc.tokens[:16], head.tokens, atol=1e-5)
        # frames 16..19 alone = the last tile
        tail = model.encode(SparseBatch.pack([video_to_tokens(video[16:20])]))
        assert torch.allclose(enc.tokens[16:], tail.tokens, atol=1e-5)
        # ... but pooling and proj see the whole video
        assert not torch.allclose(enc.pooled, head.pooled, atol=1e-3)


def test_decoder_kv_cache(model):
    video = rand_video(32, 32, 32, seed=6)
    batch = SparseBatch.pack([video_to_tokens(video), video_to_tokens(rand_video(16, 32, 32, seed=7))])
    with torch.no_grad():
        latent = model.encode(batch).mean
        plain = model.decode(latent, batch.coords)
        assert torch.equal(model.decode(latent, batch.coords, kv_cache_size=0), plain)
        taps = {}
        cached = model.decode(latent, batch.coords, kv_cache_size=4, taps=taps)
    assert cached.shape == plain.shape and torch.isfinite(cached).all()
    t = batch.coords[:, 1]
    first = t < 4
    assert torch.allclose(cached[first], plain[first], atol=1e-5)  # first tile sees no cache
    assert not torch.allclose(cached[~first], plain[~first], atol=1e-3)  # later tiles attend to cached K/V
    # the second tile's tokens are shifted behind the 1 cached latent step: t = 1..4
    second = taps["dec_embed_coords"][first.sum() :, 1]
    assert second.min() == 1 and second.max() == 4
    with pytest.raises(ValueError, match="multiple of 4"):
        model.decode(latent, batch.coords, kv_cache_size=3)


# ----------------------------------------------------------------------------- config and tokenizer


def test_configs(tmp_path):
    so = ATokenConfig.named("so400m-d")
    assert so.use_quantizer and so.encoder_num_blocks == 27 and so.decoder_qk_rms_norm and not so.encoder_qk_rms_norm
    assert ATokenConfig.named("soc-s1").latent_channels == 32
    mini = ATokenConfig.named("mini")
    assert (mini.encoder_model_channels, mini.encoder_num_heads, mini.encoder_mlp_channels) == (144, 2, 288)
    flat = tmp_path / "flat.yaml"
    flat.write_text("latent_channels: 48\nencoder_num_blocks: 1\ndecoder_num_blocks: 1\n")
    assert ATokenConfig.from_yaml(flat).encoder_num_blocks == 1
    with pytest.raises(ValueError, match="unknown config"):
        ATokenConfig.named("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  model_cfg:\n    arch_cfg:\n      encoder_model_channels: 100\n      encoder_num_heads: 3\n"
    )
    with pytest.raises(ValueError, match="not divisible"):
        ATokenConfig.from_yaml(bad)


def test_tokenizer_encode_decode(model_fsq):
    tok = Tokenizer(model_fsq, device="cpu", max_tokens=40)  # forces several packed chunks
    samples = _samples()
    out = tok.encode(samples)
    big = Tokenizer(model_fsq, device="cpu").encode(samples)
    assert len(out) == 4
    for (_, coords), o, b in zip(samples, out, big):
        n = len(coords)
        assert o["coords"].dtype == np.int16 and o["coords"].shape == (n, 4)
        assert np.array_equal(o["coords"], coords.numpy())
        assert o["latent"].dtype == np.float16 and o["latent"].shape == (n, 48)
        assert o["logvar"].shape == (n, 48)
        assert o["fsq_indices"].dtype == np.int16 and o["fsq_indices"].shape == (n, 8) and o["fsq_indices"].min() >= 0
        assert o["pooled"].dtype == np.float16 and o["pooled"].shape == (144,)
        assert np.allclose(o["latent"], b["latent"], atol=2e-3) and np.array_equal(o["fsq_indices"], b["fsq_indices"])
    rec = tok.decode_indices([(o["fsq_indices"], o["coords"]) for o in out])
    assert [r.shape for r in rec] == [(len(c), 3072) for _, c in samples]
    assert tok.identity() == tok.identity() and tok.identity()["dims"] == {"latent": 48, "fsq_groups": 8, "embed": 144}


def test_large_checkpoint_hash_is_remembered_beside_it(tmp_path):
    """A no-op rerun must not re-hash a multi-GB checkpoint: the hash is kept in `<file>.sha256.json` and used only
    while the file keeps its size and mtime."""
    import hashlib
    import json
    import os

    from atoken import identity

    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(identity.SIDECAR_MIN_BYTES)
    real = hashlib.sha256(big.read_bytes()).hexdigest()
    assert tokenizer_identity("tiny", big)["weights_sha256"] == real
    side = identity.sidecar(big)
    rec = json.loads(side.read_text())
    assert rec["sha256"] == real and rec["size"] == big.stat().st_size
    side.write_text(json.dumps({**rec, "sha256": "f" * 64}))  # a remembered hash is used as is ...
    identity._file_sha256.cache_clear()
    assert tokenizer_identity("tiny", big)["weights_sha256"] == "f" * 64
    st = big.stat()
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # ... until the file changes
    identity._file_sha256.cache_clear()
    assert tokenizer_identity("tiny", big)["weights_sha256"] == real
    assert json.loads(side.read_text())["sha256"] == real
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"x" * 1000)
    tokenizer_identity("tiny", small)
    assert not identity.sidecar(small).exists()  # small files are simply hashed


def test_tokenizer_from_files(tmp_path):
    from atoken.checkpoint import load_weights, save_weights

    t1 = Tokenizer.from_files("tiny", device="cpu")
    t2 = Tokenizer.from_files("tiny", device="cpu")
    assert t1.identity()["id"] == t2.identity()["id"] == tokenizer_identity("tiny")["id"]
    samples = [image_to_tokens(rand_image(32, 48))]
    assert np.array_equal(t1.encode(samples)[0]["latent"], t2.encode(samples)[0]["latent"])  # same (seeded) weights
    save_weights(t1.model, tmp_path / "w.safetensors")
    t3 = Tokenizer.from_files("tiny", tmp_path / "w.safetensors", device="cpu")
    assert np.array_equal(t3.encode(samples)[0]["latent"], t1.encode(samples)[0]["latent"])
    assert t3.identity()["id"] == tokenizer_identity("tiny", tmp_path / "w.safetensors")["id"]
    assert t3.identity()["id"] != tokenizer_identity("tiny-fsq", tmp_path / "w.safetensors")["id"]
    with pytest.raises(
        ValueError, match="shape mismatches .*mlp.mlp.0.weight: checkpoint \\(576, 144\\) vs model \\(288, 144\\)"
    ):
        load_weights(AToken(ATokenConfig.named("mini")), tmp_path / "w.safetensors")
