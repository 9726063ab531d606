"""AToken: a unified tokenizer for images, videos and 3D (arXiv 2509.14476), checkpoint-compatible re-implementation.

Import what you use from its module: the package itself imports nothing, so a light module (`atoken.identity`,
`atoken.config`, `atoken.images`, `atoken.video_io`) loads without torch.

    atoken.tokenizer   Tokenizer (batched encode/decode, numpy in and out), pick_device
    atoken.identity    tokenizer_identity (config + weights, without building the model), shipped_checkpoint
    atoken.model       AToken, Encoder, Decoder, EncodeOutput
    atoken.config      ATokenConfig, available_configs
    atoken.sparse      SparseBatch, image_to_tokens, video_to_tokens, voxels_to_tokens, tokens_to_image/video
    atoken.checkpoint  load_weights, save_weights, read_state_dict, load_state_dict
    atoken.fsq         FSQ
"""
