"""Encoder throughput of the full-size AToken-So/C encoder (random weights): tokens/s, samples/s, memory, MFU.

Workloads (packed batches of ~`--batch-tokens` tokens):
  image  256x256 images: 16x16 = 256 tokens each (65536 tokens -> 256 images)
  video  16-frame 256x256 clips: 4x16x16 = 1024 tokens each (65536 tokens -> 64 clips), one temporal tile
  video512  16-frame 512x512 clips: 4x32x32 = 4096 tokens each (65536 tokens -> 16 clips)

The encoder runs as the pipeline runs it (`atoken.accel`): compiled on CUDA, once per attention kernel listed in
`--attention` (`auto` = the kernel the tokenizer picks by timing; each listed SDPA kernel pinned in turn).

FLOP count of one `AToken.encode` (forward only; norms, RoPE, GELU, softmax and the PE resize are ignored):
  per token:  input layer 2*C*D  +  blocks * (qkv 2*D*3D + out 2*D*D + MLP 2*2*D*M)  +  head K/V 2*D*2D  +  proj 2*D*2z
  attention:  blocks * 4*L*D per token (QK^T and PV, 2*L*D each) for a sample of L tokens  ->  4*D*sum(L^2) per block
  per sample: head query 2*D*D + head out 2*D*D + head MLP 2*2*D*M + head attention 4*L*D
with C = 3072 input channels, D = 1152 width, M = 4304 MLP width, z = 48 latent channels.
MFU = achieved TFLOP/s / TFLOP/s of a dense matmul in the same dtype (8192^3 on CUDA) measured in the same run.

  python benchmarks/bench_tokenizer.py --out benchmarks/results/tokenizer.json            # GPU, full size
  python benchmarks/bench_tokenizer.py --attention cudnn,flash,efficient --compile off     # eager, per kernel
  python benchmarks/bench_tokenizer.py --device cpu --blocks 1 --batch-tokens 2048         # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from atoken.accel import accelerate  # noqa: E402
from atoken.config import ATokenConfig  # noqa: E402
from atoken.model import AToken  # noqa: E402
from atoken.sparse import SparseBatch  # noqa: E402

WORKLOADS = {  # name -> (latent frames, patch rows, patch cols) of one sample
    "image": (1, 16, 16),
    "video": (4, 16, 16),
    "video512": (4, 32, 32),
}
EXTRA_WORKLOADS = ("gs",)  # 3D Gaussian decoder + splat render of a synthetic 64^3 shell asset (not in the default run)


@dataclass
class BenchConfig:
    config: str = "atoken/configs/atoken-soc.yaml"
    device: str = "cuda"
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are very slow)
    blocks: int | None = None  # encoder blocks (None: as in the config)
    batch_tokens: int = 65536
    workloads: tuple[str, ...] = ("image", "video", "video512")
    warmup: int = 3
    iters: int = 10
    compile: str = "auto"  # auto (on CUDA) | on | off
    attention: tuple[str, ...] = ("auto",)  # kernels to run the encoder with (atoken.accel.ATTENTION)
    matmul_size: int | None = None  # None: 8192 on CUDA, 1024 on CPU
    seed: int = 0
    out: str | None = None


def parse_args(argv=None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=d.config, help="official AToken YAML")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--blocks", type=int, default=None, help="shrink the encoder to this many blocks (smoke runs)")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
    p.add_argument(
        "--workloads", default=",".join(d.workloads), help=f"comma list of {sorted(WORKLOADS) + list(EXTRA_WORKLOADS)}"
    )
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile the encoder blocks as the tokenizer does (auto: on CUDA)",
    )
    p.add_argument(
        "--attention",
        default="auto",
        help="comma list of attention kernels: auto (timed pick), cudnn, flash, efficient, math, flash-attn",
    )
    p.add_argument("--matmul-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="write results as JSON here")
    a = p.parse_args(argv)
    wl = tuple(w for w in a.workloads.split(",") if w)
    bad = [w for w in wl if w not in WORKLOADS and w not in EXTRA_WORKLOADS]
    if bad:
        p.error(f"unknown workloads {bad}; choose from {sorted(WORKLOADS) + list(EXTRA_WORKLOADS)}")
    return BenchConfig(
        config=a.config,
        device=a.device,
        dtype=a.dtype,
        blocks=a.blocks,
        batch_tokens=a.batch_tokens,
        workloads=wl,
        warmup=a.warmup,
        iters=a.iters,
        compile=a.compile,
        attention=tuple(k for k in a.attention.split(",") if k),
        matmul_size=a.matmul_size,
        seed=a.seed,
        out=a.out,
    )


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_encoder(cfg: ATokenConfig, device, dtype) -> AToken:
    """The AToken encoder side only (no decoder), random init, in `dtype` on `device`."""
    with torch.device(device):
        model = AToken(cfg)
    return model.to(dtype).eval().requires_grad_(False)


def make_batch(workload: str, n_samples: int, in_channels: int, device, dtype, gen: torch.Generator) -> SparseBatch:
    """n_samples random samples of the workload's shape (pixels uniform in [-1, 1])."""
    nt, nx, ny = WORKLOADS[workload]
    t, x, y = torch.meshgrid(torch.arange(nt), torch.arange(nx), torch.arange(ny), indexing="ij")
    coords = torch.stack([t.reshape(-1), x.reshape(-1), y.reshape(-1), torch.zeros(nt * nx * ny, dtype=torch.long)], 1)
    samples = [(torch.rand(len(coords), in_channels, generator=gen) * 2 - 1, coords) for _ in range(n_samples)]
    return SparseBatch.pack(samples).to(device=device, dtype=dtype)


def encoder_flops(cfg: ATokenConfig, seqlens: list[int]) -> float:
    """Analytic forward FLOPs of AToken.encode for samples of these lengths (see the module docstring)."""
    C, D, M, z = cfg.in_channels, cfg.encoder_model_channels, cfg.encoder_mlp_channels, cfg.latent_channels
    nb, N = cfg.encoder_num_blocks, sum(seqlens)
    per_token = 2 * C * D + nb * (2 * D * 3 * D + 2 * D * D + 4 * D * M) + 2 * D * 2 * D + 2 * D * 2 * z
    attn = nb * 4 * D * sum(L * L for L in seqlens)
    per_sample = 2 * D * D * 2 + 4 * D * M
    head_attn = sum(4 * L * D for L in seqlens)
    return float(N * per_token + attn + len(seqlens) * per_sample + head_attn)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device, warmup: int, iters: int) -> float:
    """Mean seconds per call after `warmup` untimed calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_tflops(size: int, device, dtype, iters: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sec = time_it(lambda: a @ b, device, warmup=3, iters=iters)
    return 2 * size**3 / sec / 1e12


def peak_memory_gib(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: process max RSS (KiB on Linux)


def run(bc: BenchConfig) -> dict:
    device = torch.device(bc.device)
    bc = dataclasses.replace(bc, dtype=bc.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    dtype = DTYPES[bc.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu (with --blocks 1) for a smoke run")
    torch.manual_seed(bc.seed)
    cfg = ATokenConfig.load(bc.config)
    cfg = dataclasses.replace(
        cfg, use_decoder=False, encoder_num_blocks=bc.blocks if bc.blocks is not None else cfg.encoder_num_blocks
    )
    model = build_encoder(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    compile = {"auto": None, "on": True, "off": False}[bc.compile]

    msize = bc.matmul_size or (8192 if device.type == "cuda" else 1024)
    peak = matmul_tflops(msize, device, dtype, iters=max(bc.iters, 5))
    gen = torch.Generator().manual_seed(bc.seed)
    results, kernels = [], {}
    for kernel in bc.attention:
        t0 = time.perf_counter()
        acc = accelerate(model, device, dtype, kernel, compile if not kernels else False)  # compile once
        kernels[kernel] = {
            "chosen": acc.attention,
            "compiled": acc.compiled or any(k["compiled"] for k in kernels.values()),
            "timings_ms": acc.timings_ms,
            "setup_s": time.perf_counter() - t0,
        }
        for wl in bc.workloads:
            if wl == "gs":
                results.append(bench_gs(bc, device, dtype) | {"attention": acc.attention})
                continue
            results.append(
                bench_workload(model, acc, cfg, wl, bc, device, dtype, gen, peak)
                | {"attention": acc.attention, "compiled": kernels[kernel]["compiled"]}
            )
            if kernel == bc.attention[0] and wl == bc.workloads[0]:
                kernels[kernel]["first_call_s"] = results[-1].pop("first_call_s")
    return {
        "benchmark": "tokenizer_encoder",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": bc.dtype,
        "compile": bc.compile,
        "config": bc.config,
        "encoder_blocks": cfg.encoder_num_blocks,
        "encoder_params": n_params,
        "attention": kernels,
        "matmul_size": msize,
        "matmul_tflops": peak,
        "warmup": bc.warmup,
        "iters": bc.iters,
        "flop_formula": "per token 2CD + blocks*(2D*3D + 2D*D + 4DM) + 2D*2D + 2D*2z; attention blocks*4*D*sum(L^2); "
        "per sample 4D*D + 4DM + 4LD (pooling head); forward only",
        "results": results,
    }


def bench_workload(model, acc, cfg, wl, bc, device, dtype, gen, peak) -> dict:
    nt, nx, ny = WORKLOADS[wl]
    per_sample = nt * nx * ny
    n = max(1, bc.batch_tokens // per_sample)
    batch = make_batch(wl, n, cfg.in_channels, device, dtype, gen)
    flops = encoder_flops(cfg, [per_sample] * n)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.inference_mode(), acc.context():
            return model.encode(batch)

    t0 = time.perf_counter()
    out = step()  # shape check before timing (and the compile, on the first call)
    sync(device)
    first = time.perf_counter() - t0
    assert out.mean.shape == (n * per_sample, cfg.latent_channels) and out.pooled.shape[0] == n
    sec = time_it(step, device, bc.warmup, bc.iters)
    tflops = flops / sec / 1e12
    return {
        "workload": wl,
        "samples_per_batch": n,
        "tokens_per_sample": per_sample,
        "tokens_per_batch": n * per_sample,
        "sec_per_batch": sec,
        "tokens_per_s": n * per_sample / sec,
        "samples_per_s": n / sec,
        "flops_per_batch": flops,
        "tflops": tflops,
        "mfu": tflops / peak,
        "peak_mem_gib": peak_memory_gib(device),
        "first_call_s": first,
    }


def bench_gs(bc: BenchConfig, device, dtype) -> dict:
    """GS decoder (official size unless --blocks) on a sphere shell of voxels, then one render at 512 px."""
    from atoken.gs_decoder import GaussianDecoder, GSDecoderConfig
    from atoken.splat import RenderConfig, orbit_cameras, render

    cfg = GSDecoderConfig.from_yaml()
    if bc.blocks is not None:
        cfg = dataclasses.replace(cfg, num_blocks=bc.blocks)
    with torch.device(device):
        dec = GaussianDecoder(cfg)
    dec = dec.to(dtype).eval()
    r = torch.arange(64)
    xyz = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    d = ((xyz.float() + 0.5) / 64 - 0.5).norm(dim=-1)
    xyz = xyz[(d > 0.4) & (d < 0.4 + 1.5 / 64)]  # ~ a typical Objaverse surface voxel count
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).to(device)
    feats = torch.rand(len(xyz), cfg.latent_channels, device=device, dtype=dtype) * 2 - 1
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        dec_s = time_it(lambda: dec(feats, coords), device, bc.warmup, bc.iters)
        (g,) = dec(feats, coords)
        cam, rcfg = orbit_cameras(1)[0], RenderConfig(resolution=512)
        ren_s = time_it(lambda: render(g, cam, rcfg), device, 1, max(1, bc.iters // 5))
    return {
        "workload": "gs",
        "samples_per_batch": 1,
        "tokens_per_sample": len(xyz),
        "tokens_per_batch": len(xyz),
        "sec_per_batch": dec_s,
        "tokens_per_s": len(xyz) / dec_s,
        "samples_per_s": 1 / dec_s,
        "gaussians": len(g),
        "render_512_sec": ren_s,
        "flops_per_batch": None,
        "tflops": None,
        "mfu": None,
        "peak_mem_gib": peak_memory_gib(device),
    }


def print_table(rep: dict):
    print(
        f"\n{rep['device']} | torch {rep['torch']} | {rep['dtype']} | compile={rep['compile']} | "
        f"{rep['encoder_blocks']} blocks, {rep['encoder_params'] / 1e6:.1f}M params"
    )
    for k, v in rep["attention"].items():
        t = ", ".join(f"{n} {ms:.2f} ms" for n, ms in v["timings_ms"].items())
        print(f"attention {k}: uses {v['chosen']}" + (f" (attention alone: {t})" if t else ""))
    print(f"{rep['dtype']} matmul {rep['matmul_size']}^3: {rep['matmul_tflops']:.4g} TFLOP/s")
    cols = [
        "attention",
        "workload",
        "samples",
        "tokens",
        "ms/batch",
        "tokens/s",
        "samples/s",
        "TFLOP/s",
        "MFU",
        "peak GiB",
    ]
    print(" | ".join(f"{c:>10}" for c in cols))
    for r in rep["results"]:
        vals = [
            r.get("attention", "-"),
            r["workload"],
            r["samples_per_batch"],
            r["tokens_per_batch"],
            f"{r['sec_per_batch'] * 1e3:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['samples_per_s']:,.1f}",
            _fmt(r["tflops"], "{:.4g}"),
            _fmt(r["mfu"], "{:.1%}"),
            f"{r['peak_mem_gib']:.2f}",
        ]
        print(" | ".join(f"{v:>10}" for v in vals))
        if "render_512_sec" in r:
            print(
                f"{'':>10}   gs: {r['gaussians']:,} Gaussians from {r['tokens_per_batch']:,} voxels; "
                f"one 512 px render {r['render_512_sec'] * 1e3:.0f} ms"
            )


def _fmt(v, spec: str) -> str:
    return "-" if v is None else spec.format(v)


def main(argv=None):
    bc = parse_args(argv)
    rep = run(bc)
    print_table(rep)
    if bc.out:
        Path(bc.out).parent.mkdir(parents=True, exist_ok=True)
        Path(bc.out).write_text(json.dumps(rep, indent=2))
        print(f"wrote {bc.out}")


if __name__ == "__main__":
    main()
