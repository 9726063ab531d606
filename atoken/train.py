"""Train a small AToken from scratch on procedural data: a continuous stage ("c"), then FSQ fine-tuning ("d").

    python -m atoken.train --config atoken/configs/tiny-train.yaml [--resume] [--stage c|d|all]
    python -m atoken.train --config atoken/configs/tiny-finetune.yaml     # fine-tunes the above (init_from)
    python -m atoken.train --config atoken/configs/tiny-motion.yaml       # ... and that, into atoken/weights
    python -m atoken.train --config atoken/configs/tiny-motion.yaml --eval-only --eval-dir PHOTOS

Recipe (paper §3.4, scaled down): AdamW (0.9, 0.95), wd 0.1; linear warmup then cosine decay to 0.1x peak;
encoder LR multiplier (paper 0.1); EMA of the weights, the exported weights are the EMA; loss = L1 + Gram (fixed
random conv net, see losses.py) + KL (continuous stage) [+ LPIPS if available offline], optionally + MSE, a
patch-seam term and video temporal terms (the PSNR / no-grid / no-flicker fine-tunes, tiny-finetune.yaml and
tiny-motion.yaml). Stage d starts from the stage-c EMA weights and trains encoder + decoder through the straight-through FSQ (atoken/fsq.py).
Each stage is time-boxed by wall clock as well as by steps, checkpoints atomically (model, EMA, optimizer,
schedule position, RNG) and always exports fp16 safetensors with the official key names when it stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from .checkpoint import load_state_dict
from .config import ATokenConfig
from .images import IMAGE_SUFFIXES, load_rgb
from .losses import GramLoss, kl_loss, lpips_if_available, psnr, ssim
from .model import AToken
from .sparse import SparseBatch
from .train_data import DataConfig, SceneGenerator, TrainStream, from_tokens, to_tokens

# keys of ATokenConfig that are hard-coded in the official model, not part of its YAML arch_cfg
NON_YAML_KEYS = ("name", "num_sample_frames_batch_size", "num_sample_frames_stride", "kv_cache_size", "pos_table_size")


# ----------------------------------------------------------------------------- config


@dataclass
class StageConfig:
    steps: int = 1000
    max_minutes: float = 10.0  # wall-clock box for the stage (training loop only)
    lr: float = 3e-4  # peak LR (decoder, proj)
    encoder_lr_mult: float = 0.1  # paper: encoder at 0.1x
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to this x peak
    kl_weight: float = 1e-8  # continuous stage only (paper 1e-8)
    init_from: str = ""  # weights (safetensors, same arch) to fine-tune; stage d otherwise starts from stage c


@dataclass
class TrainConfig:
    name: str = "tiny"  # weights are <weights_dir>/<name>-c.safetensors and -d
    model: dict = field(default_factory=dict)  # flat arch_cfg keys of the continuous model
    data: DataConfig = field(default_factory=DataConfig)
    continuous: StageConfig = field(default_factory=StageConfig)
    fsq: StageConfig = field(default_factory=StageConfig)
    batch_size: int = 256
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    l1_weight: float = 1.0
    mse_weight: float = 0.0  # MSE on the [-1, 1] scale: what PSNR measures
    seam_weight: float = 0.0  # L1 of the pixel steps across 16-px patch borders, rec vs input (patch grid)
    temporal_weight: float = 0.0  # L1 of the frame-to-frame differences of videos, rec vs input (flicker)
    temporal_border_weight: float = 0.0  # the same over the steps across temporal patches only (4k-1 -> 4k)
    gram_weight: float = 1.0
    lpips_weight: float = 0.0  # used only if LPIPS is available offline
    sample_posterior: bool = True  # decode mean + std * eps in the continuous stage (paper)
    init_std: float = 0.02
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    compile: bool = False  # torch.compile the transformer MLPs
    seed: int = 0
    log_every: int = 50
    ckpt_every_minutes: float = 1.0
    eval_images: int = 64  # held-out procedural images for the final evaluation
    eval_batch: int = 16
    max_weights_mb: float = 6.0  # fp16 size limit per exported model
    out_dir: str = "runs/tiny"  # checkpoints
    weights_dir: str = "atoken/weights"
    config_dir: str = "atoken/configs"  # where <name>-c.yaml / <name>-d.yaml are written

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        nested = {"data": DataConfig, "continuous": StageConfig, "fsq": StageConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config: unknown keys {unknown}")
        for key, typ in nested.items():
            if key in d:
                sub = d[key] or {}
                bad = sorted(set(sub) - {f.name for f in dataclasses.fields(typ)})
                if bad:
                    raise ValueError(f"train config: unknown keys in {key}: {bad}")
                d[key] = typ(**sub)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @classmethod
    def from_yaml(cls, path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train config not found: {path}")
        d = yaml.safe_load(path.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a YAML mapping")
        return cls.from_dict(d)

    def arch(self, discrete: bool) -> ATokenConfig:
        d = dict(self.model)
        if discrete:
            d.update(
                use_quantizer=True,
                quantizer_type="fsq",
                quantizer_codebook_size=4096,
                quantizer_feature_dim=d.get("latent_channels", 48),
                quantizer_num_codebooks=8,
                quantizer_chunk_size=1,
            )
        return ATokenConfig.from_dict(d, name=f"{self.name}-{'d' if discrete else 'c'}")


def write_model_yaml(cfg: ATokenConfig, path: Path, comment: str):
    """Model config in the official layout (model.model_cfg.arch_cfg)."""
    arch = {k: v for k, v in cfg.to_dict().items() if k not in NON_YAML_KEYS}
    if not cfg.use_quantizer:
        arch = {k: v for k, v in arch.items() if not k.startswith("quantizer_") and k != "use_quantizer"}
    doc = {
        "model": {
            "class_name": "models.pretrained.autoencoder_kl.AutoencoderKLTrain",
            "model_cfg": {
                "eval_imagenet_zeroshot": True,
                "disentangle_itc_rec": True,
                "eval_fid": True,
                "arch_cfg": arch,
            },
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"# {comment}\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- model helpers


def init_weights(model: AToken, std: float):
    """From-scratch init: truncated-normal linears/embeddings, zero biases (norms keep ones/zeros)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
    with torch.no_grad():
        model.encoder.head.probe.normal_(0, std)


def fp16_bytes(model: torch.nn.Module) -> int:
    return sum(v.numel() * 2 for v in model.state_dict().values())


def export_weights(state: dict, path: Path):
    """fp16 safetensors with the official flat key names, written tmp + rename."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def param_groups(model: AToken, stage: StageConfig, weight_decay: float):
    """(encoder | rest) x (decay | no decay); matrices decay, vectors/embeddings/gains do not."""
    groups = {}
    for name, p in model.named_parameters():
        enc = name.startswith("encoder.")
        decay = p.ndim >= 2 and "position_embedding" not in name and not name.endswith(".gamma")
        g = groups.setdefault(
            (enc, decay),
            {
                "params": [],
                "lr_mult": stage.encoder_lr_mult if enc else 1.0,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_factor(step: int, progress: float, stage: StageConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from 1 to min_lr_ratio over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, stage.warmup_steps))
    p = min(1.0, max(0.0, progress))
    return warm * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# ----------------------------------------------------------------------------- batches and losses


def make_batch(images: torch.Tensor, videos: torch.Tensor | None) -> tuple[SparseBatch, int]:
    """Pack images [ni, S, S, 3] and videos [nv, T, s, s, 3] into one SparseBatch; returns (batch, image rows)."""
    fi, ci = to_tokens(images[:, None])
    if videos is None or len(videos) == 0:
        return SparseBatch(fi, ci), len(fi)
    fv, cv = to_tokens(videos, b0=len(images))
    return SparseBatch(torch.cat([fi, fv]), torch.cat([ci, cv])), len(fi)


def seam_loss(rec: torch.Tensor, x: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """Mean |step(rec) - step(x)| over the pixel steps that cross a patch border, rows and columns; [n, H, W, 3]."""
    cols = torch.arange(patch, x.shape[2], patch, device=x.device)
    rows = torch.arange(patch, x.shape[1], patch, device=x.device)
    dc = (rec[:, :, cols] - rec[:, :, cols - 1]) - (x[:, :, cols] - x[:, :, cols - 1])
    dr = (rec[:, rows] - rec[:, rows - 1]) - (x[:, rows] - x[:, rows - 1])
    return 0.5 * (dc.abs().mean() + dr.abs().mean())


def temporal_loss(rec: torch.Tensor, x: torch.Tensor, period: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |step(rec) - step(x)| over the frame steps of [n, T, H, W, 3] clips: all of them, and those across
    temporal patches only (frame 4k-1 -> 4k)."""
    err = ((rec[:, 1:] - rec[:, :-1]) - (x[:, 1:] - x[:, :-1])).abs()  # [n, T-1, ...]: the step into frame t + 1
    return err.mean(), err[:, period - 1 :: period].mean()


class Objective:
    """Reconstruction objective over a packed batch of images (+ videos)."""

    def __init__(self, cfg: TrainConfig, device, log=print):
        self.cfg = cfg
        self.gram = GramLoss().to(device) if cfg.gram_weight > 0 else None
        self.lpips = lpips_if_available(device, log) if cfg.lpips_weight > 0 else None
        if cfg.lpips_weight <= 0:
            log("losses: LPIPS off (lpips_weight 0; no offline weights on the training machines)")

    def __call__(self, model: AToken, images, videos, kl_weight: float, amp_dtype):
        batch, n_img_rows = make_batch(images, videos)
        dev = batch.feats.device
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            enc = model.encode(batch)
            if model.discrete:
                latent, indices = model.quantize(enc.mean)  # straight-through FSQ
            else:
                latent, indices = (enc.sample() if self.cfg.sample_posterior else enc.mean), None
            rec = model.decode(latent, batch.coords).float()
        ni, s = images.shape[0], images.shape[1]
        # images: only the real first frame (the 3 padding frames are discarded at inference)
        rec_img = from_tokens(rec[:n_img_rows], ni, 1, s, s)[:, 0]
        l1_img = (rec_img - images).abs().sum()
        count = images.numel()
        if videos is not None and len(videos):
            l1_vid = (rec[n_img_rows:] - batch.feats[n_img_rows:]).abs().sum()
            count += videos.numel()
        else:
            l1_vid = rec.new_zeros(())
        l1 = (l1_img + l1_vid) / count
        loss = self.cfg.l1_weight * l1
        parts = {"l1": l1.detach()}
        rec_vid = None
        if videos is not None and len(videos):
            rec_vid = from_tokens(rec[n_img_rows:], *videos.shape[:4])
        if self.cfg.mse_weight > 0:
            sq = (rec_img - images).pow(2).sum()
            if rec_vid is not None:
                sq = sq + (rec_vid - videos).pow(2).sum()
            mse = sq / count
            loss = loss + self.cfg.mse_weight * mse
            parts["mse"] = mse.detach()
        if self.cfg.seam_weight > 0:
            seam = seam_loss(rec_img, images)
            if rec_vid is not None:
                seam = 0.5 * (seam + seam_loss(rec_vid.flatten(0, 1), videos.flatten(0, 1)))
            loss = loss + self.cfg.seam_weight * seam
            parts["seam"] = seam.detach()
        if (self.cfg.temporal_weight > 0 or self.cfg.temporal_border_weight > 0) and rec_vid is not None:
            tmp, border = temporal_loss(rec_vid, videos)
            loss = loss + self.cfg.temporal_weight * tmp + self.cfg.temporal_border_weight * border
            parts["temporal"], parts["t_border"] = tmp.detach(), border.detach()
        x_hat, x = rec_img.permute(0, 3, 1, 2), images.permute(0, 3, 1, 2)
        if self.gram is not None:
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                g = self.gram(x_hat, x)
            loss = loss + self.cfg.gram_weight * g
            parts["gram"] = g.detach()
        if self.lpips is not None:
            lp = self.lpips(x_hat.clamp(-1, 1), x).mean()
            loss = loss + self.cfg.lpips_weight * lp
            parts["lpips"] = lp.detach()
        if not model.discrete and kl_weight > 0:
            kl = kl_loss(enc.mean, enc.logvar)
            loss = loss + kl_weight * kl
            parts["kl"] = kl.detach()
        parts["psnr"] = psnr(x_hat.detach(), x).mean()
        return loss, parts, indices


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """One stage ("c" continuous or "d" FSQ) of training: model, EMA, optimizer, schedule, checkpoints."""

    def __init__(self, cfg: TrainConfig, stage: str, device: torch.device, log=print):
        self.cfg, self.stage, self.device, self.log = cfg, stage, device, log
        self.scfg = cfg.continuous if stage == "c" else cfg.fsq
        self.arch = cfg.arch(discrete=stage == "d")
        torch.manual_seed(cfg.seed + (0 if stage == "c" else 1))
        self.model = AToken(self.arch).to(device)
        init_weights(self.model, cfg.init_std)
        size = fp16_bytes(self.model)
        if size > cfg.max_weights_mb * 1e6:
            raise ValueError(
                f"model {self.arch.name}: fp16 weights {size / 1e6:.2f} MB exceed max_weights_mb "
                f"{cfg.max_weights_mb}; reduce widths/blocks"
            )
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.opt = torch.optim.AdamW(
            param_groups(self.model, self.scfg, cfg.weight_decay),
            lr=self.scfg.lr,
            betas=cfg.betas,
            eps=1e-8,
            fused=device.type == "cuda",
        )
        self.step, self.elapsed, self.done = 0, 0.0, False
        self.amp_dtype = torch.bfloat16 if (cfg.amp and device.type == "cuda") else None
        self.objective = Objective(cfg, device, log)
        if cfg.compile:  # the MLPs are plain tensor code; attention/packing has host-side layout logic
            for blk in list(self.model.encoder.blocks) + list(self.model.decoder.blocks):
                blk.mlp.compile(dynamic=True)
        self.ckpt_path = Path(cfg.out_dir) / f"ckpt-{stage}.pt"
        self.weights_path = Path(cfg.weights_dir) / f"{cfg.name}-{stage}.safetensors"
        log(
            f"[{stage}] model {self.arch.name}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, "
            f"fp16 {size / 1e6:.2f} MB, device {device}, amp {self.amp_dtype}"
        )

    # -- state
    def init_from(self, state: dict):
        """Start from given weights (stage d from the stage-c EMA); EMA restarts from them."""
        load_state_dict(self.model, state, strict=True)
        self.ema = {k: v.detach().clone().float().to(self.device) for k, v in self.model.state_dict().items()}

    def state(self) -> dict:
        return {
            "stage": self.stage,
            "step": self.step,
            "elapsed": self.elapsed,
            "done": self.done,
            "model": self.model.state_dict(),
            "ema": self.ema,
            "opt": self.opt.state_dict(),
            "arch": self.arch.to_dict(),
            "train_config": dataclasses.asdict(self.cfg),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save(self):
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_path.with_name(self.ckpt_path.name + ".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, self.ckpt_path)

    def load(self, path: Path):
        ck = torch.load(path, map_location=self.device, weights_only=False)
        if ck.get("stage") != self.stage:
            raise ValueError(f"{path}: checkpoint of stage {ck.get('stage')!r}, expected {self.stage!r}")
        self.model.load_state_dict(ck["model"], strict=True)
        self.ema = {k: v.to(self.device) for k, v in ck["ema"].items()}
        self.opt.load_state_dict(ck["opt"])
        self.step, self.elapsed, self.done = ck["step"], ck["elapsed"], ck["done"]
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.log(f"[{self.stage}] resumed from {path} at step {self.step} ({self.elapsed / 60:.1f} min trained)")

    def ema_model(self) -> AToken:
        m = AToken(self.arch).to(self.device)
        m.load_state_dict(self.ema, strict=True)
        return m.eval()

    def export(self):
        export_weights(self.ema, self.weights_path)
        write_model_yaml(
            self.arch,
            Path(self.cfg.config_dir) / f"{self.cfg.name}-{self.stage}.yaml",
            f"{self.cfg.name}-{self.stage}: tiny AToken trained by atoken/train.py "
            f"({'FSQ, discrete' if self.stage == 'd' else 'continuous'}); weights "
            f"{self.weights_path.as_posix()}",
        )
        self.log(
            f"[{self.stage}] exported EMA weights -> {self.weights_path} "
            f"({self.weights_path.stat().st_size / 1e6:.2f} MB)"
        )

    # -- loop
    def progress(self) -> float:
        return max(self.step / max(1, self.scfg.steps), self.elapsed / max(1e-9, self.scfg.max_minutes * 60))

    def train_step(self, images, videos) -> dict:
        self.model.train()
        f = lr_factor(self.step, self.progress(), self.scfg)
        for g in self.opt.param_groups:
            g["lr"] = self.scfg.lr * g["lr_mult"] * f
        kl_w = self.scfg.kl_weight if self.stage == "c" else 0.0
        loss, parts, indices = self.objective(self.model, images, videos, kl_w, self.amp_dtype)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"[{self.stage}] non-finite loss at step {self.step}: { {k: float(v) for k, v in parts.items()} }"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        # EMA with a warm-up so early weights are not over-weighted on short runs
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            sd = self.model.state_dict()
            keys = list(self.ema)
            torch._foreach_lerp_([self.ema[k] for k in keys], [sd[k].float() for k in keys], 1 - d)
        self.step += 1
        parts.update(loss=loss.detach(), gnorm=gnorm.detach(), lr=torch.tensor(self.scfg.lr * f))
        if indices is not None:
            parts["codes_used"] = torch.tensor(float(torch.unique(indices).numel()))
        return parts

    def run(self, stream: TrainStream, stop_flag: dict) -> None:
        cfg, scfg = self.cfg, self.scfg
        t_last_ckpt = time.time()
        t0, el0, step0 = time.time(), self.elapsed, self.step
        stop_reason = "error"
        try:
            while self.step < scfg.steps:
                if self.elapsed >= scfg.max_minutes * 60:
                    stop_reason = "time box"
                    break
                if stop_flag.get("stop"):
                    stop_reason = "signal"
                    break
                images, videos = stream.batch(self.step, cfg.batch_size)
                parts = self.train_step(images, videos)
                self.elapsed = el0 + time.time() - t0
                if self.step % cfg.log_every == 0 or self.step == scfg.steps or self.step == step0 + 1:
                    rate = (self.step - step0) / max(1e-9, self.elapsed - el0)
                    msg = " ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
                    self.log(
                        f"[{self.stage}] step {self.step}/{scfg.steps} {msg} | {rate:.2f} it/s "
                        f"{self.elapsed / 60:.2f}/{scfg.max_minutes:g} min"
                    )
                if time.time() - t_last_ckpt > cfg.ckpt_every_minutes * 60:
                    self.save()
                    t_last_ckpt = time.time()
            else:
                stop_reason = "steps"
        finally:
            # whatever happened (time box, signal, error): keep a resumable checkpoint and usable weights
            self.done = stop_reason in ("steps", "time box")
            if self.step > 0:
                self.save()
                self.export()
        self.log(f"[{self.stage}] stopped at step {self.step} ({stop_reason}), {self.elapsed / 60:.2f} min")


# ----------------------------------------------------------------------------- evaluation


def load_eval_photos(directory: Path, size: int = 256, log=print) -> list[tuple[str, torch.Tensor]]:
    """Photos in `directory` resized (shorter side) and centre-cropped to size x size, [size, size, 3] in [-1, 1].
    Unreadable files are reported by name and skipped; the count read is logged."""
    from PIL import Image, ImageOps

    if not directory.is_dir():
        raise FileNotFoundError(f"--eval-dir {directory} is not a directory")
    out, other, failed = [], [], []
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            other.append(path.name)
            continue
        try:  # the pipeline's reader: EXIF orientation, ICC -> sRGB, 16-bit, alpha, AVIF, HEIC (pillow-heif)
            im = Image.fromarray(load_rgb(str(path)))
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1)
            out.append((path.name, x))
        except Exception as e:  # a broken photo must not stop the evaluation
            log(f"eval: skipping {path.name}: {type(e).__name__}: {e}")
            failed.append(path.name)
    log(f"eval: read {len(out)} of {len(out) + len(failed)} image files in {directory}")
    if other:
        log(f"eval: {len(other)} file(s) that are not images ignored: {', '.join(other[:5])}")
    if not out:
        raise ValueError(f"--eval-dir {directory}: no readable images")
    return out


@torch.no_grad()
def evaluate(model: AToken, images: torch.Tensor, device, amp_dtype, batch: int = 16) -> dict:
    """Reconstruct images [n, S, S, 3] in [-1, 1] (deterministic: posterior mean / FSQ codes), 8-bit
    quantised output; returns mean PSNR and SSIM and per-image PSNR."""
    model.eval()
    ps, ss = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        sb, n_rows = make_batch(x, None)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            enc = model.encode(sb)
            latent = model.quantize(enc.mean)[0] if model.discrete else enc.mean
            rec = model.decode(latent, sb.coords).float()
        r = from_tokens(rec, len(x), 1, x.shape[1], x.shape[2])[:, 0]
        r = ((r.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # what a saved PNG would hold
        ps.append(psnr(r.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2)).cpu())
        ss.append(ssim(r.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2)).cpu())
    p, s = torch.cat(ps), torch.cat(ss)
    return {"psnr": float(p.mean()), "ssim": float(s.mean()), "per_image_psnr": p.tolist()}


def heldout_images(cfg: TrainConfig, device) -> torch.Tensor:
    """Procedural images from a seed never used in training."""
    gen = SceneGenerator(dataclasses.replace(cfg.data, seed=cfg.data.seed + 10_000_019), device, log=lambda *_: None)
    g = gen.generator(0, salt=9)
    return torch.cat(
        [gen.images(g, min(cfg.eval_batch, cfg.eval_images - i)) for i in range(0, cfg.eval_images, cfg.eval_batch)]
    )


def run_eval(cfg: TrainConfig, stage: str, model: AToken, device, amp_dtype, eval_dir, log=print) -> dict:
    res = {"heldout": evaluate(model, heldout_images(cfg, device), device, amp_dtype, cfg.eval_batch)}
    log(
        f"[{stage}] eval held-out procedural ({cfg.eval_images} x {cfg.data.image_size}^2): "
        f"PSNR {res['heldout']['psnr']:.2f} dB, SSIM {res['heldout']['ssim']:.4f}"
    )
    if eval_dir:
        photos = load_eval_photos(Path(eval_dir), cfg.data.image_size, log)
        r = evaluate(model, torch.stack([x for _, x in photos]), device, amp_dtype, cfg.eval_batch)
        r["per_image_psnr"] = dict(zip([n for n, _ in photos], r["per_image_psnr"]))
        res["photos"] = r
        log(
            f"[{stage}] eval photos in {eval_dir} ({len(photos)} at {cfg.data.image_size}^2): "
            f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}"
        )
        for name, p in r["per_image_psnr"].items():
            log(f"    {name}: {p:.2f} dB")
    return res


# ----------------------------------------------------------------------------- main


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def run_stage(cfg: TrainConfig, stage: str, device, resume: bool, stop_flag: dict, eval_dir, log=print) -> dict:
    tr = Trainer(cfg, stage, device, log)
    if resume and tr.ckpt_path.is_file():
        tr.load(tr.ckpt_path)
    elif tr.scfg.init_from:
        from .checkpoint import read_state_dict

        init = Path(tr.scfg.init_from)
        if not init.is_file():
            raise FileNotFoundError(f"[{stage}] init_from {init} not found")
        tr.init_from({k: v.float() for k, v in read_state_dict(init).items()})
        log(f"[{stage}] fine-tuning from {init}")
    elif stage == "d":
        c_ckpt = Path(cfg.out_dir) / "ckpt-c.pt"
        c_weights = Path(cfg.weights_dir) / f"{cfg.name}-c.safetensors"
        if c_ckpt.is_file():
            tr.init_from(torch.load(c_ckpt, map_location=device, weights_only=False)["ema"])
            log(f"[d] initialised from the stage-c EMA weights in {c_ckpt}")
        elif c_weights.is_file():  # e.g. on a fresh machine: the exported fp16 EMA weights
            from .checkpoint import read_state_dict

            tr.init_from({k: v.float() for k, v in read_state_dict(c_weights).items()})
            log(f"[d] initialised from the exported stage-c weights {c_weights}")
        else:
            raise FileNotFoundError(f"stage d starts from {c_ckpt} or {c_weights}; run stage c first")
    if tr.done:
        log(f"[{stage}] already finished at step {tr.step}; skipping training")
        if not tr.weights_path.is_file():
            tr.export()
    else:
        stream = TrainStream(cfg.data, device, log=log)
        tr.run(stream, stop_flag)
    return run_eval(cfg, stage, tr.ema_model(), device, tr.amp_dtype, eval_dir, log)


def eval_exported(cfg: TrainConfig, stage: str, device, eval_dir, log=print) -> dict:
    from .checkpoint import load_weights

    arch = cfg.arch(discrete=stage == "d")
    model = AToken(arch).to(device)
    path = Path(cfg.weights_dir) / f"{cfg.name}-{stage}.safetensors"
    load_weights(model, path, strict=True)
    log(f"[{stage}] evaluating {path}")
    amp = torch.bfloat16 if (cfg.amp and device.type == "cuda") else None
    return run_eval(cfg, stage, model.float(), device, amp, eval_dir, log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training YAML (e.g. atoken/configs/tiny-train.yaml)")
    ap.add_argument("--resume", action="store_true", help="continue from <out_dir>/ckpt-<stage>.pt when present")
    ap.add_argument("--stage", choices=["c", "d", "all"], default="all")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda")
    ap.add_argument("--max-steps", type=int, default=None, help="override the steps of each stage")
    ap.add_argument("--max-minutes", type=float, default=None, help="override the time box of each stage")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--pool-size", type=int, default=None, help="override data.pool_size (small for CPU smoke runs)")
    ap.add_argument(
        "--photo-dir",
        default=None,
        help="training photos from this folder instead of the installed packages' (e.g. PACKAGE_PHOTOS copied to a "
        "machine without scikit-learn/-image)",
    )
    ap.add_argument("--out-dir", default=None, help="checkpoint directory (default from config)")
    ap.add_argument("--weights-dir", default=None, help="where <name>-c/-d.safetensors go (default from config)")
    ap.add_argument("--config-dir", default=None, help="where <name>-c/-d.yaml go (default from config)")
    ap.add_argument("--eval-dir", default=None, help="photos to evaluate on at the end (never used for training)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the exported weights")
    args = ap.parse_args(argv)

    cfg = TrainConfig.from_yaml(args.config)
    over = {
        k: v
        for k, v in {
            "device": args.device,
            "batch_size": args.batch_size,
            "out_dir": args.out_dir,
            "weights_dir": args.weights_dir,
            "config_dir": args.config_dir,
        }.items()
        if v is not None
    }
    if args.pool_size is not None:
        over["data"] = dataclasses.replace(
            cfg.data, pool_size=args.pool_size, refresh=math.gcd(args.pool_size, cfg.data.refresh)
        )
    if args.photo_dir is not None:
        over["data"] = dataclasses.replace(over.get("data", cfg.data), photo_dir=args.photo_dir, package_photos=False)
    cfg = dataclasses.replace(cfg, **over)
    for st in (cfg.continuous, cfg.fsq):
        if args.max_steps is not None:
            st.steps = args.max_steps
            st.warmup_steps = min(st.warmup_steps, max(1, args.max_steps // 10))
        if args.max_minutes is not None:
            st.max_minutes = args.max_minutes

    def log(msg):
        print(msg, flush=True)

    try:  # needed to write the weights: fail now, not after the training
        import safetensors.torch  # noqa: F401
    except ImportError:
        ap.error(
            "the `safetensors` package is required (pip install safetensors; for the offline GPU machine add "
            "it to the bundle: ../shared/tools/device-bundle.sh --no-video safetensors==0.8.0)"
        )
    if args.eval_dir and not Path(args.eval_dir).is_dir():
        ap.error(f"--eval-dir {args.eval_dir} is not a directory")
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    stop_flag = {"stop": False}

    def on_signal(signum, _frame):
        log(f"received signal {signum}: stopping after this step (checkpoint + weights will be written)")
        stop_flag["stop"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stages = ["c", "d"] if args.stage == "all" else [args.stage]
    results = {}
    for stage in stages:
        if args.eval_only:
            results[stage] = eval_exported(cfg, stage, device, args.eval_dir, log)
        else:
            results[stage] = run_stage(cfg, stage, device, args.resume, stop_flag, args.eval_dir, log)
        if stop_flag["stop"]:
            break
    summary = {s: {k: {m: round(v[m], 4) for m in ("psnr", "ssim")} for k, v in r.items()} for s, r in results.items()}
    log(f"summary: {summary}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
