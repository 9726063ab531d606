"""AToken: a unified tokenizer for images, videos and 3D (arXiv 2509.14476), checkpoint-compatible re-implementation."""

from .checkpoint import load_state_dict, load_weights, read_state_dict, save_weights
from .config import ATokenConfig, available_configs
from .fsq import FSQ
from .model import AToken, Decoder, Encoder, EncodeOutput
from .sparse import (
    SparseBatch,
    image_to_tokens,
    tokens_to_image,
    tokens_to_video,
    video_to_tokens,
    voxels_to_tokens,
)
from .tokenizer import Tokenizer, tokenizer_identity

__all__ = [
    "AToken",
    "ATokenConfig",
    "Decoder",
    "EncodeOutput",
    "Encoder",
    "FSQ",
    "SparseBatch",
    "Tokenizer",
    "available_configs",
    "image_to_tokens",
    "load_state_dict",
    "load_weights",
    "read_state_dict",
    "save_weights",
    "tokenizer_identity",
    "tokens_to_image",
    "tokens_to_video",
    "video_to_tokens",
    "voxels_to_tokens",
]
