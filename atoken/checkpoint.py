"""Checkpoint loading: flat state dicts with the official key names, from .pt (weights_only) or .safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DEFAULT_DROP = ("lpips_loss.",)


def missing_checkpoint(path: str | Path) -> str:
    """The error for a checkpoint file that is not there, with the command that fetches a released one."""
    from .download import FILES

    name = Path(path).name
    how = (
        f"`make checkpoints` (or `python -m atoken.download {name}`) downloads it"
        if name in FILES
        else "pass an existing .pt or .safetensors file"
    )
    return f"checkpoint not found: {path}; {how}"  # training-only loss modules saved in the official GS checkpoint


def read_state_dict(path: str | Path, drop_prefixes=DEFAULT_DROP) -> dict[str, torch.Tensor]:
    """Read a flat state dict; keys starting with any of `drop_prefixes` are removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing_checkpoint(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a loadable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(sd)[:5] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path}: expected a flat state dict of tensors (official layout), got {keys}")
    return {k: v for k, v in sd.items() if not any(k.startswith(p) for p in drop_prefixes)}


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Compare key sets and shapes; raises ValueError naming missing/unexpected/mismatched keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if bad_shape:
        problems.append(f"shape mismatches ({len(bad_shape)}): {bad_shape}")
    if problems:
        raise ValueError("state dict does not match the model:\n  " + "\n  ".join(problems))
    return missing, unexpected


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
    """Checked load; `assign=True` takes the tensors as they are (e.g. meta tensors into a meta model)."""
    missing, unexpected = check_state_dict(model, sd, strict)
    model.load_state_dict(sd, strict=strict, assign=assign)
    return missing, unexpected


def load_weights(model: nn.Module, path: str | Path, strict: bool = True, drop_prefixes=DEFAULT_DROP):
    """Load a .pt / .safetensors checkpoint into `model`. Returns (missing, unexpected) (both empty when strict)."""
    return load_state_dict(model, read_state_dict(path, drop_prefixes), strict=strict)


def save_weights(model: nn.Module, path: str | Path):
    """Save as .safetensors (or .pt by suffix), flat official key names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
