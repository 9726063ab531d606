"""GPU speed settings of the encoder, chosen once per model: the attention kernel (timed on this device at the
model's head size, fastest wins) and `torch.compile` of each block's tensor code around that kernel.
On CPU nothing changes: eager fp32, PyTorch's default SDPA kernel."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import attention
from .layers import attention_inputs, attention_outputs

ATTENTION = ("auto", "cudnn", "flash", "efficient", "math", "flash-attn")
_SDPA = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
TIMED_LENGTHS = (256, 1024, 4096)  # tokens per sample: a 256^2 image, a 16x256^2 clip, a 16x512^2 clip


@dataclass
class Acceleration:
    attention: str  # the kernel used: an SDPA backend name, "flash-attn" (varlen), or "default"
    compiled: bool
    timings_ms: dict[str, float] = field(default_factory=dict)  # per kernel: ms for the timed lengths together
    compile_s: float | None = None

    def describe(self) -> str:
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(self.timings_ms.items(), key=lambda kv: kv[1]))
        comp = (
            f"compiled in {self.compile_s:.1f} s"
            if self.compile_s is not None
            else ("compiled" if self.compiled else "eager")
        )
        return f"attention {self.attention}" + (f" (timed: {times})" if times else "") + f"; encoder {comp}"

    def context(self):
        """The SDPA kernel priority for calls made inside (the chosen kernel first, the others as fallbacks)."""
        if self.attention not in _SDPA:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [self.attention] + [k for k in _SDPA if k != self.attention]
        return sdpa_kernel([getattr(SDPBackend, _SDPA[k]) for k in order], set_priority=True)


def _time(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def time_attention(device, dtype, heads: int, head_dim: int, tokens: int = 16384) -> dict[str, float]:
    """ms per dense self-attention over `tokens` tokens at each TIMED_LENGTHS, summed, for every kernel that runs
    here (a kernel that refuses these shapes is left out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, float] = {}
    for name in list(_SDPA) + (["flash-attn"] if attention.flash_attn_varlen_func is not None else []):
        total = 0.0
        try:
            for L in TIMED_LENGTHS:
                B = max(1, tokens // L)
                q, k, v = (torch.randn(B, heads, L, head_dim, device=device, dtype=dtype) for _ in range(3))
                if name == "flash-attn":
                    cu = torch.arange(0, (B + 1) * L, L, device=device, dtype=torch.int32)
                    qf, kf, vf = (x.transpose(1, 2).reshape(B * L, heads, head_dim) for x in (q, k, v))
                    total += _time(lambda: attention.flash_attn_varlen_func(qf, kf, vf, cu, cu, L, L))
                    continue
                with sdpa_kernel(getattr(SDPBackend, _SDPA[name])):
                    total += _time(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError:  # "No available kernel" for this dtype/shape/GPU
            continue
        out[name] = total
    return out


def accelerate(
    model, device: torch.device, dtype: torch.dtype, attention_kernel: str = "auto", compile: bool | None = None
) -> Acceleration:
    """Set up `model` (an AToken) for speed on `device`: pick the attention kernel (timed when "auto") and compile
    the encoder blocks (default: on CUDA). Returns what was chosen; the caller runs encode inside `.context()`."""
    if attention_kernel not in ATTENTION:
        raise ValueError(f"attention: got {attention_kernel!r}; expected one of {', '.join(ATTENTION)}")
    if device.type != "cuda":
        if compile:
            _compile(model)
        return Acceleration("default", bool(compile))
    blk = model.encoder.blocks[0].attn
    timings = {}
    if attention_kernel == "auto":
        timings = time_attention(device, dtype, blk.heads, blk.head_dim)
        attention_kernel = min(timings, key=timings.get) if timings else "default"
    model.encoder.attention_backend = "flash" if attention_kernel == "flash-attn" else "sdpa"
    compile = True if compile is None else compile
    if compile:
        _compile(model)
    return Acceleration(attention_kernel, compile, timings)


def _compile(model) -> None:
    """One compiled graph for the code before and one for the code after the attention kernel, shared by every
    block (their weights are graph inputs) and dynamic in the token count, so a new batch size never recompiles."""
    pre = torch.compile(attention_inputs, dynamic=True, fullgraph=True)
    post = torch.compile(attention_outputs, dynamic=True, fullgraph=True)
    for block in model.encoder.blocks:
        block.fused = (pre, post)
