"""Training loop, losses and procedural data of atoken/train*.py, on CPU with a very small model."""

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from atoken.checkpoint import load_weights
from atoken.config import ATokenConfig
from atoken.losses import GramLoss, kl_loss, psnr, ssim
from atoken.model import AToken
from atoken.sparse import image_to_tokens, video_to_tokens
from atoken.train import StageConfig, TrainConfig, Trainer, load_eval_photos, lr_factor, main, make_batch
from atoken.train_data import DataConfig, SceneGenerator, TrainStream, from_tokens, to_tokens

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

SMALL_MODEL = dict(
    encoder_model_channels=72,
    encoder_num_blocks=1,
    encoder_num_heads=1,
    encoder_mlp_channels=144,
    decoder_model_channels=72,
    decoder_num_blocks=1,
    decoder_num_heads=1,
    decoder_mlp_channels=144,
)


def small_cfg(tmp_path, **over) -> TrainConfig:
    cfg = TrainConfig(
        name="t",
        model=dict(SMALL_MODEL),
        data=DataConfig(
            image_size=32,
            video_size=32,
            video_frames=8,
            video_ratio=0.25,
            pool_size=8,
            refresh=4,
            min_shapes=3,
            max_shapes=8,
        ),
        continuous=StageConfig(steps=4, max_minutes=5, lr=3e-3, warmup_steps=2, kl_weight=1e-6),
        fsq=StageConfig(steps=3, max_minutes=5, lr=1e-3, warmup_steps=1),
        batch_size=4,
        device="cpu",
        log_every=1000,
        eval_images=4,
        eval_batch=4,
        out_dir=str(tmp_path / "runs"),
        weights_dir=str(tmp_path / "weights"),
        config_dir=str(tmp_path / "configs"),
    )
    return dataclasses.replace(cfg, **over)


def quiet(*_):
    pass


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on the 2-core CI machine
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- data


def test_to_tokens_matches_sparse_converters():
    gen = SceneGenerator(
        DataConfig(image_size=32, video_size=32, video_frames=8, min_shapes=2, max_shapes=4), log=quiet
    )
    g = gen.generator(0)
    img = gen.images(g, 2)
    vid = gen.videos(g, (img.permute(0, 3, 1, 2) + 1) / 2)
    f, c = to_tokens(img[:, None])
    f0, c0 = image_to_tokens(img[1])
    assert torch.equal(f[c[:, 0] == 1], f0) and torch.equal(c[c[:, 0] == 1, 1:], c0)
    fv, cv = to_tokens(vid, b0=5)
    fv0, cv0 = video_to_tokens(vid[0])
    assert torch.equal(fv[cv[:, 0] == 5], fv0) and torch.equal(cv[cv[:, 0] == 5, 1:], cv0)
    assert torch.equal(from_tokens(fv, 2, 8, 32, 32), vid)
    assert torch.equal(from_tokens(f, 2, 1, 32, 32)[:, 0], img)


def test_stream_deterministic_resumable_and_never_reads_test_data():
    opened = []
    active = {"on": True}

    def hook(event, args):
        if active["on"] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed; `active` turns it off after the test
    try:
        cfg = DataConfig(
            image_size=32,
            video_size=32,
            video_frames=8,
            video_ratio=0.25,
            pool_size=8,
            refresh=4,
            refresh_every=2,
            min_shapes=3,
            max_shapes=8,
            seed=3,
        )
        a = TrainStream(cfg, log=quiet)
        seq = [a.batch(s, 4) for s in range(8)]
        b = TrainStream(cfg, log=quiet)  # fresh stream asked for step 5 directly (as after a resume)
        again = [b.batch(s, 4) for s in (5, 6, 7)]
        other = TrainStream(dataclasses.replace(cfg, seed=4), log=quiet).batch(2, 4)
    finally:
        active["on"] = False
    for (i1, v1), (i2, v2) in zip(seq[5:], again):
        assert torch.equal(i1, i2) and torch.equal(v1, v2)
    assert not torch.equal(seq[2][0], other[0])
    assert not torch.equal(seq[2][0], seq[3][0])
    img, vid = seq[0]
    assert img.shape == (3, 32, 32, 3) and vid.shape == (1, 8, 32, 32, 3)
    assert img.min() >= -1 and img.max() <= 1 and img.std() > 0.05
    assert not [p for p in opened if str(SHARED_DATA) in str(Path(p).resolve())], opened


def test_stream_rejects_bad_config():
    with pytest.raises(ValueError, match="multiple of"):
        TrainStream(DataConfig(pool_size=10, refresh=4), log=quiet)
    with pytest.raises(ValueError, match="video_frames"):
        TrainStream(DataConfig(image_size=32, video_frames=6, pool_size=4, refresh=4), log=quiet)


# ----------------------------------------------------------------------------- losses and schedule


def test_losses_and_metrics():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert psnr(x, x).min() > 90 and torch.allclose(ssim(x, x), torch.ones(2))
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    p = psnr(noisy, x)
    assert 20 < float(p.mean()) < 30  # sigma 0.05 on the [0, 1] scale ~ 26 dB
    assert float(ssim(noisy, x).mean()) < 0.99
    g = GramLoss()
    assert float(g(x, x)) == 0.0 and float(g(noisy, x)) > 0
    assert float(g(torch.zeros_like(x), x)) > float(g(noisy, x))
    assert float(kl_loss(torch.zeros(5, 48), torch.zeros(5, 48))) == 0.0
    assert float(kl_loss(torch.ones(5, 48), torch.zeros(5, 48))) == pytest.approx(24.0)


def test_lr_schedule():
    st = StageConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, st) == pytest.approx(0.1)
    assert lr_factor(9, 0.0, st) == pytest.approx(1.0)
    assert lr_factor(500, 0.5, st) == pytest.approx(0.55)
    assert lr_factor(1000, 1.0, st) == pytest.approx(0.1)
    assert lr_factor(5000, 3.0, st) == pytest.approx(0.1)  # past the time box: stays at the floor


# ----------------------------------------------------------------------------- training


def test_training_reduces_loss_on_fixed_batch(tmp_path):
    cfg = small_cfg(tmp_path, continuous=StageConfig(steps=40, lr=3e-3, warmup_steps=3, kl_weight=1e-6))
    tr = Trainer(cfg, "c", torch.device("cpu"), log=quiet)
    images, videos = TrainStream(cfg.data, log=quiet).batch(0, 4)
    losses = [float(tr.train_step(images, videos)["loss"]) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.6 * losses[0], losses
    assert tr.step == 40


def test_resume_continues_identically(tmp_path):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)

    def run(tr, stream, steps):
        out = []
        for _ in range(steps):
            out.append(tr.train_step(*stream.batch(tr.step, cfg.batch_size)))
        return out

    ref = Trainer(cfg, "c", dev, log=quiet)
    ref_parts = run(ref, TrainStream(cfg.data, log=quiet), 4)

    cfg2 = dataclasses.replace(cfg, out_dir=str(tmp_path / "runs2"))
    a = Trainer(cfg2, "c", dev, log=quiet)
    run(a, TrainStream(cfg2.data, log=quiet), 2)
    a.save()
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    b = Trainer(cfg2, "c", dev, log=quiet)
    b.load(a.ckpt_path)
    assert b.step == 2
    assert all(torch.equal(b.ema[k], a.ema[k]) for k in a.ema)
    b_parts = run(b, TrainStream(cfg2.data, log=quiet), 2)  # a fresh stream, as after a restart

    assert b.step == ref.step == 4
    for r, q in zip(ref_parts[2:], b_parts):
        assert float(r["loss"]) == float(q["loss"])
    assert all(torch.equal(ref.ema[k], b.ema[k]) for k in ref.ema)
    sr, sb = ref.opt.state_dict()["state"], b.opt.state_dict()["state"]
    assert all(torch.equal(sr[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sr)


def test_cli_both_stages_export_official_weights(tmp_path):
    import yaml

    cfg = small_cfg(tmp_path)
    d = dataclasses.asdict(cfg)
    d["betas"] = list(d["betas"])
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(d))
    res = main(["--config", str(path), "--max-steps", "2", "--device", "cpu"])
    assert set(res) == {"c", "d"} and all(0 < r["heldout"]["psnr"] < 100 for r in res.values())

    for stage in ("c", "d"):
        w = tmp_path / "weights" / f"t-{stage}.safetensors"
        arch = ATokenConfig.from_yaml(tmp_path / "configs" / f"t-{stage}.yaml")  # official layout
        assert arch.use_quantizer == (stage == "d") and arch.encoder_model_channels == 72
        model = AToken(arch)
        load_weights(model, w, strict=True)
        from safetensors.torch import load_file

        sd = load_file(str(w))
        assert set(sd) == set(model.state_dict())
        assert all(v.dtype == torch.float16 for v in sd.values())
        assert {k.split(".")[0] for k in sd} == {"encoder", "proj", "decoder"}
        assert "encoder.blocks.0.attn.to_qkv.weight" in sd and "decoder.blocks.0.attn.q_rms_norm.gamma" in sd
        # the exported weights are the EMA of the checkpoint
        ck = torch.load(tmp_path / "runs" / f"ckpt-{stage}.pt", weights_only=False)
        assert ck["step"] == 2 and ck["done"]
        assert torch.equal(sd["proj.weight"], ck["ema"]["proj.weight"].half())

    # FSQ model: indices in range and the straight-through estimator passes gradients to the encoder
    model = AToken(ATokenConfig.from_yaml(tmp_path / "configs" / "t-d.yaml"))
    load_weights(model, tmp_path / "weights" / "t-d.safetensors", strict=True)
    model.float()
    images, videos = TrainStream(cfg.data, log=quiet).batch(0, 4)
    batch, _ = make_batch(images, videos)
    enc = model.encode(batch)
    codes, idx = model.quantize(enc.mean)
    assert idx.shape == (len(batch.feats), 8) and int(idx.min()) >= 0 and int(idx.max()) < 4096
    model.decode(codes, batch.coords).abs().mean().backward()
    assert model.encoder.input_layer.weight.grad.abs().sum() > 0

    # resume of a finished run skips training and keeps the weights
    res2 = main(["--config", str(path), "--max-steps", "2", "--device", "cpu", "--resume", "--stage", "d"])
    assert res2["d"]["heldout"]["psnr"] == pytest.approx(res["d"]["heldout"]["psnr"])


@pytest.mark.parametrize("name", ["tiny-train.yaml", "tiny-finetune.yaml", "tiny-motion.yaml"])
def test_shipped_tiny_config_fits_the_size_limit(name):
    cfg = TrainConfig.from_yaml(REPO / "atoken" / "configs" / name)
    total = 0
    for discrete in (False, True):
        arch = cfg.arch(discrete)
        assert arch.patch_size == (4, 16, 16) and arch.latent_channels == 48
        assert arch.encoder_model_channels // arch.encoder_num_heads == 72
        assert arch.decoder_model_channels // arch.decoder_num_heads == 72
        with torch.device("meta"):
            model = AToken(arch)
        total += sum(v.numel() * 2 for v in model.state_dict().values())
    assert total <= 12e6


def test_stage_d_needs_stage_c(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage c first"):
        main(["--config", str(_write_cfg(tmp_path)), "--stage", "d", "--device", "cpu", "--max-steps", "1"])


def test_bad_train_config_is_rejected(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_yaml(p)
    p.write_text("name: x\ndata: {image_sz: 3}\n")
    with pytest.raises(ValueError, match="unknown keys in data"):
        TrainConfig.from_yaml(p)


def test_eval_photos_skip_broken_files(tmp_path):
    from PIL import Image

    Image.new("RGB", (300, 200), (200, 10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    msgs = []
    photos = load_eval_photos(tmp_path, 64, log=msgs.append)
    assert [n for n, _ in photos] == ["ok.png"] and photos[0][1].shape == (64, 64, 3)
    assert any("broken.jpg" in m for m in msgs)
    (tmp_path / "ok.png").unlink()
    with pytest.raises(ValueError, match="no readable images"):
        load_eval_photos(tmp_path, 64, log=msgs.append)


def _write_cfg(tmp_path) -> Path:
    import yaml

    d = dataclasses.asdict(small_cfg(tmp_path))
    d["betas"] = list(d["betas"])
    p = tmp_path / "train.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_time_box_stops_and_still_exports(tmp_path):
    cfg = small_cfg(tmp_path, continuous=StageConfig(steps=10_000, max_minutes=1e-4, lr=1e-3, warmup_steps=2))
    tr = Trainer(cfg, "c", torch.device("cpu"), log=quiet)
    tr.run(TrainStream(cfg.data, log=quiet), {"stop": False})
    assert 1 <= tr.step < 10_000 and tr.done
    assert tr.weights_path.is_file() and tr.ckpt_path.is_file()
    # a stop request (SIGTERM handler) ends the loop too, leaving a resumable, unfinished checkpoint
    cfg2 = small_cfg(tmp_path / "b")
    tr2 = Trainer(cfg2, "c", torch.device("cpu"), log=quiet)
    tr2.step = 1  # as if one step had run
    tr2.run(TrainStream(cfg2.data, log=quiet), {"stop": True})
    assert not tr2.done and torch.load(tr2.ckpt_path, weights_only=False)["done"] is False


def test_stage_d_from_exported_weights_on_a_fresh_machine(tmp_path):
    path = _write_cfg(tmp_path)
    main(["--config", str(path), "--stage", "c", "--device", "cpu", "--max-steps", "1"])
    (tmp_path / "runs" / "ckpt-c.pt").unlink()  # only the exported fp16 weights travel
    res = main(["--config", str(path), "--stage", "d", "--device", "cpu", "--max-steps", "1"])
    assert (tmp_path / "weights" / "t-d.safetensors").is_file() and res["d"]["heldout"]["psnr"] > 0


def test_package_photos_are_not_test_images(tmp_path):
    """The guard refuses a copy of a test image (resized, flipped) and accepts the package photos that are
    installed: none of PACKAGE_PHOTOS is one of the test images of ../shared/data/images."""
    from PIL import Image

    from atoken.images import load_rgb
    from atoken.train_data import load_photos, package_photo_paths, refuse_test_images

    test_dir = SHARED_DATA / "images"
    astronaut = load_rgb(str(test_dir / "astronaut.png"))
    copy = np.asarray(Image.fromarray(astronaut).resize((200, 180)))[:, ::-1]
    with pytest.raises(ValueError, match="astronaut.png"):
        refuse_test_images({"copy": np.ascontiguousarray(copy)}, test_dir)
    other = SceneGenerator(DataConfig(image_size=64, package_photos=False), log=quiet)
    scene = ((other.images(other.generator(0), 1)[0].numpy() + 1) * 127.5).astype(np.uint8)
    refuse_test_images({"scene": scene}, test_dir)  # a procedural image is no test image
    (tmp_path / "astro.png").write_bytes((test_dir / "astronaut.png").read_bytes())
    with pytest.raises(ValueError, match="astronaut.png"):  # data.exclude_dir makes the trainer refuse it
        load_photos(DataConfig(package_photos=False, photo_dir=str(tmp_path), exclude_dir=str(test_dir)))
    if not package_photo_paths():
        pytest.skip("neither scikit-learn nor scikit-image is installed: no package photos to check")
    refuse_test_images(load_photos(DataConfig()), test_dir)


def test_seam_and_temporal_terms_see_the_artefacts():
    from atoken.train import seam_loss

    x = torch.rand(2, 32, 48, 3) * 2 - 1
    assert float(seam_loss(x, x)) == 0.0
    shifted = x + torch.arange(3).repeat_interleave(16).view(1, 1, 48, 1) * 0.1  # steps at the patch borders
    assert float(seam_loss(shifted, x)) > 0.03
    assert float(seam_loss(x + 0.1, x)) == pytest.approx(0.0, abs=1e-6)  # an offset is no seam


def test_temporal_term_singles_out_the_steps_across_temporal_patches():
    from atoken.train import temporal_loss

    x = torch.rand(2, 12, 8, 8, 3) * 2 - 1
    all_, border = temporal_loss(x, x)
    assert float(all_) == 0.0 and float(border) == 0.0
    jumps = x + (torch.arange(12) // 4).view(1, 12, 1, 1, 1) * 0.2  # a new offset at frames 4 and 8
    all_, border = temporal_loss(jumps, x)
    assert float(border) == pytest.approx(0.2, abs=1e-5)
    assert float(all_) == pytest.approx(0.2 * 2 / 11, abs=1e-5)  # 2 of the 11 steps
    inside = x + (torch.arange(12) % 4 == 1).view(1, 12, 1, 1, 1) * 0.2  # a blip at frames 1, 5, 9
    assert float(temporal_loss(inside, x)[1]) == pytest.approx(0.0, abs=1e-6)


def _pan_px(clip: np.ndarray) -> np.ndarray:
    """Per-step (dy, dx) translation of a clip [T, H, W, 3], by phase correlation."""
    out = []
    for a, b in zip(clip[1:], clip[:-1]):
        fa, fb = np.fft.fft2(a.mean(-1)), np.fft.fft2(b.mean(-1))
        r = np.fft.ifft2(fa * fb.conj() / (np.abs(fa * fb.conj()) + 1e-9)).real
        d = np.array(np.unravel_index(r.argmax(), r.shape))
        out.append((d + a.shape[0] // 2) % a.shape[0] - a.shape[0] // 2)
    return np.array(out)


def test_pan_clips_move_straight_at_up_to_pan_px():
    cfg = DataConfig(
        image_size=128,
        video_size=64,
        video_frames=8,
        video_ratio=1.0,
        pan_ratio=1.0,
        pan_px=8.0,
        pool_size=16,
        refresh=16,
        package_photos=False,
        seed=5,
    )
    _, vid = TrainStream(cfg, log=quiet).batch(0, 12)
    steps = [_pan_px(c.numpy()) for c in vid]
    speeds = [np.median(np.hypot(*s.T)) for s in steps]
    assert max(speeds) <= 8 + 1.5  # phase correlation rounds to whole pixels
    assert sum(v >= 2 for v in speeds) >= 4  # most are fast; speed is uniform in 0..pan_px
    for s, v in zip(steps, speeds):
        if v >= 2:  # one direction and speed through the clip (the disc may move one step off)
            assert (np.abs(s - np.median(s, axis=0)).max(axis=1) <= 1).sum() >= len(s) - 1
    _, drift = TrainStream(dataclasses.replace(cfg, pan_ratio=0.0), log=quiet).batch(0, 12)
    slow = [np.median(np.hypot(*_pan_px(c.numpy()).T)) for c in drift]
    assert max(slow) < 3 and np.mean(slow) * 3 < np.mean(speeds)  # the default camera drifts
