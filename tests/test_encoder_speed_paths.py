"""The encoder's GPU speed paths (atoken.accel) give the same tokens as the plain eager model: compiled vs eager in
bf16, bf16 vs an fp32 reference, and every attention kernel that runs on the device. The CPU test checks that the
compiled code is the same arithmetic (fp32, within fp16 storage rounding) and that it does not recompile per block
or per batch size."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from atoken.config import ATokenConfig
from atoken.model import AToken
from atoken.tokenizer import Tokenizer

SOC = "atoken/configs/atoken-soc.yaml"


def _samples(shapes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t, x, y in shapes:
        c = np.stack(np.meshgrid(np.arange(t), np.arange(x), np.arange(y), [0], indexing="ij"), -1).reshape(-1, 4)
        out.append((torch.from_numpy(rng.uniform(-1, 1, (len(c), 3072)).astype(np.float32)), torch.from_numpy(c)))
    return out


def _model(config, blocks=None):
    cfg = ATokenConfig.load(config)
    cfg = dataclasses.replace(cfg, use_decoder=False, encoder_num_blocks=blocks or cfg.encoder_num_blocks)
    torch.manual_seed(0)
    return AToken(cfg)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


# mixed lengths and an unsorted order: the length bucketing must give every sample back in its place
SHAPES = [(4, 16, 16), (1, 16, 16), (4, 8, 8), (1, 16, 16), (1, 8, 12), (4, 16, 16)]


def test_compiled_cpu_is_the_same_arithmetic():
    warnings.simplefilter("ignore")
    stats = torch._dynamo.utils.counters["stats"]
    eager = Tokenizer(_model("tiny-c"), device="cpu", compile=False)
    before = stats["unique_graphs"]
    comp = Tokenizer(_model("tiny-c"), device="cpu", compile=True)
    assert comp.accel.compiled and not eager.accel.compiled and comp.accel.compile_s > 0
    assert stats["unique_graphs"] - before == 2  # one graph before and one after attention, shared by all blocks
    before = stats["unique_graphs"]
    for shapes in (SHAPES, [(2, 5, 7)] * 3):  # a second batch layout: new token counts, no new graph
        samples = _samples(shapes)
        a, b = eager.encode(samples), comp.encode(samples)
        assert [len(x["coords"]) for x in b] == [t * x * y for t, x, y in shapes]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x["coords"], y["coords"])
            assert _rel(y["latent"], x["latent"]) < 1e-3  # fp16 storage rounding only
    assert stats["unique_graphs"] == before


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_compiled_bf16_matches_eager_bf16_and_fp32_reference():
    """Full-width So/C encoder (8 of its 27 blocks, random weights). Bounds: compiled vs eager bf16 within 1 %,
    bf16 (compiled, the chosen kernel) vs an fp32 eager reference within 3 % (relative L2 of the latent mean),
    pooled embeddings at cosine >= 0.999."""
    samples = _samples(SHAPES)
    ref = Tokenizer(_model(SOC, 8), device="cuda", dtype=torch.float32, attention="math", compile=False)
    fp32 = ref.encode(samples)
    del ref
    eager = Tokenizer(_model(SOC, 8), device="cuda", compile=False).encode(samples)
    fast = Tokenizer(_model(SOC, 8), device="cuda")
    assert fast.accel.compiled and fast.accel.attention != "default"
    out = fast.encode(samples)
    for e, f, r in zip(eager, out, fp32):
        assert _rel(f["latent"], e["latent"]) < 1e-2
        assert _rel(f["latent"], r["latent"]) < 3e-2
        p, q = f["pooled"].astype(np.float32), r["pooled"].astype(np.float32)
        assert float(p @ q / np.linalg.norm(p) / np.linalg.norm(q)) >= 0.999


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient", "math"])
def test_each_attention_kernel_gives_the_same_tokens(kernel):
    from atoken.accel import time_attention

    model = _model(SOC, 2)
    head = model.encoder.blocks[0].attn
    if kernel not in time_attention(torch.device("cuda"), torch.bfloat16, head.heads, head.head_dim):
        pytest.skip(f"SDPA kernel {kernel} does not run on this GPU at head_dim {head.head_dim}")
    samples = _samples(SHAPES)
    base = Tokenizer(_model(SOC, 2), device="cuda", attention="math", compile=False).encode(samples)
    out = Tokenizer(model, device="cuda", attention=kernel, compile=False).encode(samples)
    for b, o in zip(base, out):
        assert _rel(o["latent"], b["latent"]) < 1e-2


def test_clips_are_patchified_on_the_device_as_one_batch_with_the_same_tokens():
    """encode_clips (one uint8 copy per shape, patchified in one go) gives what per-sample video_to_tokens +
    encode gives: images, clips shorter than a patch, frame counts off a multiple of 4, sizes that need a crop,
    shapes interleaved so the results must come back in their places."""
    from atoken.sparse import SparseBatch, clips_to_batch, image_to_tokens, video_to_tokens

    rng = np.random.default_rng(1)
    shapes = [(1, 40, 56), (9, 32, 32), (2, 33, 47), (1, 41, 60), (9, 32, 32), (4, 16, 16), (1, 40, 56)]
    clips = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    same = [c for c in clips if c.shape == clips[1].shape]
    batch = clips_to_batch(torch.from_numpy(np.stack(same)))
    ref = SparseBatch.pack([video_to_tokens(c) for c in same])
    torch.testing.assert_close(batch.feats, ref.feats, rtol=0, atol=0)
    torch.testing.assert_close(batch.coords, ref.coords, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        clips_to_batch(torch.zeros(1, 4, 16, 16, 3))
    with pytest.raises(ValueError, match="patch"):
        clips_to_batch(torch.zeros(1, 4, 8, 16, 3, dtype=torch.uint8))

    model = _model("tiny-c")
    want = Tokenizer(model, device="cpu", compile=False).encode(
        [image_to_tokens(c[0]) if len(c) == 1 else video_to_tokens(c) for c in clips]
    )
    for max_tokens in (10, 100_000):  # a pass per shape or two; one pass of every shape
        tok = Tokenizer(model, device="cpu", compile=False, max_tokens=max_tokens)
        passes = list(tok.clip_batches(clips))
        assert len(passes) == (1 if max_tokens > 1000 else 6)
        got = tok.encode_clips(clips)
        for g, w in zip(got, want):  # the same inputs; passes grouped differently round fp16 storage differently
            np.testing.assert_array_equal(g["coords"], w["coords"])
            assert _rel(g["latent"], w["latent"]) < 1e-3 and _rel(g["pooled"], w["pooled"]) < 1e-3
