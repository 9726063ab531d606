"""AToken architecture config: a dataclass that reads the official YAML layout (model.model_cfg.arch_cfg)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# short names -> shipped YAML files in atoken/configs
ALIASES = {
    "so400m-c": "atoken-soc",
    "soc": "atoken-soc",
    "so400m-d": "atoken-sod",
    "sod": "atoken-sod",
    "so400m-c-s1": "atoken-soc-s1",
    "soc-s1": "atoken-soc-s1",
    "mini-c": "mini",
    "mini-d": "mini-fsq",
}


@dataclass
class ATokenConfig:
    """Field names are the official `arch_cfg` keys; the last block holds values hard-coded in the official model."""

    patch_size: tuple[int, int, int] = (4, 16, 16)
    in_channels: int = 3072
    out_channels: int = 3072
    latent_channels: int = 48
    # encoder (SigLIP2-So400m shape)
    encoder_model_channels: int = 1152
    encoder_num_blocks: int = 27
    encoder_num_heads: int = 16
    encoder_mlp_channels: int = 4304
    encoder_attn_mode: str = "full"
    encoder_pe_mode: str = "joint"
    encoder_qk_rms_norm: bool = False
    encoder_use_bias: bool = True
    encoder_use_rms_norm: bool = False
    encoder_window_size: int = 8
    # decoder
    decoder_model_channels: int = 1152
    decoder_num_blocks: int = 27
    decoder_num_heads: int = 16
    decoder_mlp_channels: int = 4304
    decoder_attn_mode: str = "full"
    decoder_pe_mode: str = "joint"
    decoder_qk_rms_norm: bool = True
    decoder_use_bias: bool = False
    decoder_use_rms_norm: bool = True
    decoder_window_size: int = 8
    use_decoder: bool = True
    # quantizer (So/D)
    use_quantizer: bool = False
    quantizer_type: str = "fsq"
    quantizer_codebook_size: int = 4096
    quantizer_feature_dim: int = 48
    quantizer_num_codebooks: int = 8
    quantizer_chunk_size: int = 1
    # hard-coded in the official AutoencoderKL (not in YAML); raw-frame units
    num_sample_frames_batch_size: int = 16
    num_sample_frames_stride: int = 16
    kv_cache_size: int = 0
    pos_table_size: int = 16  # learned PE table is pos_table_size**2 entries
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.validate()

    def validate(self):
        pt, ph, pw = self.patch_size
        if self.in_channels != pt * ph * pw * 3:
            raise ValueError(f"in_channels {self.in_channels} != prod(patch_size)*3 = {pt * ph * pw * 3}")
        for side in ("encoder", "decoder"):
            width, heads = getattr(self, f"{side}_model_channels"), getattr(self, f"{side}_num_heads")
            if width % heads:
                raise ValueError(f"{side}_model_channels {width} not divisible by {side}_num_heads {heads}")
            if (width // heads) % 8:
                raise ValueError(f"{side} head dim {width // heads} must be a multiple of 8 (4D RoPE: 4 axes x pairs)")
            if getattr(self, f"{side}_attn_mode") != "full":
                raise ValueError(f"{side}_attn_mode {getattr(self, f'{side}_attn_mode')!r} not supported (only 'full')")
            if getattr(self, f"{side}_pe_mode") != "joint":
                raise ValueError(f"{side}_pe_mode {getattr(self, f'{side}_pe_mode')!r} not supported (only 'joint')")
        if self.use_quantizer:
            if self.quantizer_type != "fsq":
                raise ValueError(f"quantizer_type {self.quantizer_type!r} not supported (only 'fsq')")
            if self.quantizer_feature_dim != self.latent_channels:
                raise ValueError("quantizer_feature_dim must equal latent_channels")
            if self.latent_channels % self.quantizer_num_codebooks:
                raise ValueError("latent_channels must be divisible by quantizer_num_codebooks")
        if self.kv_cache_size % pt or self.num_sample_frames_batch_size % pt or self.num_sample_frames_stride % pt:
            raise ValueError("tile sizes and kv_cache_size are in raw frames and must be multiples of patch_size[0]")

    # derived sizes
    @property
    def tile_latent_frames(self) -> int:
        return self.num_sample_frames_batch_size // self.patch_size[0]

    @property
    def decode_stride_latent_frames(self) -> int:
        return self.num_sample_frames_stride // self.patch_size[0]

    @property
    def fsq_group_dim(self) -> int:
        return self.latent_channels // self.quantizer_num_codebooks

    # loading
    @classmethod
    def from_dict(cls, d: dict, name: str = "custom") -> "ATokenConfig":
        """Accepts the official nesting (model.model_cfg.arch_cfg), `arch_cfg`, or a flat dict of keys."""
        if "model" in d and isinstance(d["model"], dict):
            d = d["model"]
        if "model_cfg" in d and isinstance(d["model_cfg"], dict):
            d = d["model_cfg"]
        if "arch_cfg" in d and isinstance(d["arch_cfg"], dict):
            d = d["arch_cfg"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"ATokenConfig: ignoring unknown keys {unknown}")
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs.setdefault("name", name)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ATokenConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            d = yaml.safe_load(f)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a YAML mapping, got {type(d).__name__}")
        return cls.from_dict(d, name=path.stem)

    @classmethod
    def named(cls, name: str) -> "ATokenConfig":
        key = ALIASES.get(name, name)
        path = CONFIG_DIR / f"{key}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown config {name!r}; available: {available_configs()}")
        cfg = cls.from_yaml(path)
        cfg.name = key
        return cfg

    @classmethod
    def load(cls, name_or_path: str | Path) -> "ATokenConfig":
        """A shipped config name or a path to a YAML file."""
        p = Path(name_or_path)
        if p.suffix in (".yaml", ".yml") or p.is_file():
            return cls.from_yaml(p)
        return cls.named(str(name_or_path))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) + sorted(ALIASES)
