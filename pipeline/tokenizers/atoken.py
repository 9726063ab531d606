"""AToken (arXiv 2509.14476) as a pipeline tokenizer: the `atoken` package's Tokenizer over prepared rows.

Images and videos are patchified (4 x 16 x 16 x 3) on the model's device from uint8 pixels; 3D rows are
64^3 voxel features, sent compact (fp16, 768-d) and widened to 3072-d tokens on the device. Batches are packed
into forward passes of at most `batch_tokens` tokens. A row with a pending
resize (`resize_to`: a video that upscales, decoded at native size) travels to the device at native size and is
resized and cropped there (`pipeline/buckets.resize_crop_frames`) before patching.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline.buckets import resize_crop_frames
from pipeline.rows import Row

RESIZE = "torch bicubic, antialias"  # how pending resizes are made (printed with the device at start-up)


def identity(cfg) -> dict:
    from atoken.identity import tokenizer_identity  # no torch: a no-op rerun never loads it

    return tokenizer_identity(cfg.config, cfg.checkpoint)


def _host_tensor(a):
    """A row's array as a CPU tensor without a copy (an unpickled row's buffers are read-only; nothing writes to
    them, so torch's warning about that is silenced)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(a))


def voxels_of(row: Row):
    """A 3D row's checked voxels (`atoken.sparse.Voxels`): its fp16 features and int16 coords as they are, no copy
    (widened to tokens where the model is, by `Tokenizer.encode_voxels`)."""
    from atoken.sparse import check_voxels

    return check_voxels(_host_tensor(row["voxel_feats"]), _host_tensor(row["voxel_coords"]))


def frames_on(row: Row, device="cpu"):
    """The row's uint8 pixels as a tensor on `device`, with its pending resize (if any) applied there."""
    import torch

    pixels = _host_tensor(row["pixels"]).to(device)
    if row.get("resize_to"):
        with torch.no_grad():
            pixels = resize_crop_frames(pixels, tuple(row["resize_to"]))
    return pixels


class Pending(NamedTuple):
    """A checked uint8 clip [T, H, W, 3] (host) whose resize to `size` (h, w) is made on the device in encode()."""

    clip: np.ndarray
    size: tuple[int, int]


class Model:
    def __init__(self, cfg, device: str):
        from atoken.tokenizer import Tokenizer

        self.cfg = cfg
        compile = {"auto": None, "on": True, "off": False}[cfg.compile]
        self.tokenizer = Tokenizer.from_files(
            cfg.config,
            cfg.checkpoint,
            device=device,
            max_tokens=cfg.batch_tokens,
            attention=cfg.attention,
            compile=compile,
        )
        self.device = self.tokenizer.device
        print(
            f"tokenizer {cfg.config} on {self.device}: {self.tokenizer.accel.describe()}; "
            f"pending resizes (videos that upscale) on {self.device}, {RESIZE}",
            flush=True,
        )

    def pack(self, row: Row):
        """3D rows: their checked Voxels (widened to tokens on the device in encode()). Pixel rows: the checked
        uint8 clip itself, sent to the device and patchified there in encode() (one copy per shape in a batch); a
        clip with a pending resize is checked now (its resized shape included) and resized on the device in
        encode(), one copy and one resize per (shape, size) in a batch (`Pending`)."""
        if row["modality"] == "3d":
            return voxels_of(row)
        from atoken.sparse import check_clip_shape

        clip = np.asarray(row["pixels"])
        check_clip_shape(clip.shape, row["modality"])
        if clip.dtype != np.uint8:
            raise ValueError(f"{row['modality']}: expected uint8 pixels, got {clip.dtype}")
        if row["modality"] == "image" and len(clip) != 1:
            raise ValueError(f"an image row holds one frame, got {len(clip)}")
        if row.get("resize_to"):
            size = tuple(int(s) for s in row["resize_to"])
            check_clip_shape((len(clip), *size, 3), row["modality"])  # what resize_crop_frames makes
            return Pending(clip, size)
        return clip

    def resize_pending(self, packed: list) -> list:
        """`packed` with each Pending clip replaced by its resized uint8 tensor on the device: the clips of one
        (shape, size) travel as one (pinned) copy and are resized in one call, frames of all of them together (the
        same per-frame result as resizing each clip alone)."""
        import torch

        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(packed):
            if isinstance(p, Pending):
                groups.setdefault((p.clip.shape, p.size), []).append(i)
        out = list(packed)
        pin = self.device.type == "cuda"
        for (shape, size), idx in groups.items():
            host = torch.empty((len(idx), *shape), dtype=torch.uint8, pin_memory=pin)
            for k, i in enumerate(idx):
                host[k].numpy()[...] = packed[i].clip
            with torch.no_grad():
                frames = host.to(self.device, non_blocking=pin).flatten(0, 1)
                resized = resize_crop_frames(frames, size).unflatten(0, (len(idx), shape[0]))
            for k, i in enumerate(idx):
                out[i] = resized[k]
        return out

    def encode(self, packed: list) -> list[dict]:

        from atoken.sparse import Voxels

        packed = self.resize_pending(packed)
        voxels = [i for i, p in enumerate(packed) if isinstance(p, Voxels)]
        clips = [i for i, p in enumerate(packed) if not isinstance(p, Voxels)]  # uint8 arrays / device tensors
        out: list[dict | None] = [None] * len(packed)
        lv = self.cfg.logvar
        for idx, enc in (
            (clips, self.tokenizer.encode_clips([packed[i] for i in clips], with_logvar=lv)),
            (voxels, self.tokenizer.encode_voxels([packed[i] for i in voxels], with_logvar=lv)),
        ):
            for i, e in zip(idx, enc):
                out[i] = e
        return out

    def reconstruct(self, rec: dict, prepared: Row) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from atoken.sparse import tokens_to_video

        coords = np.asarray(rec["coords"], np.int64)
        kv = self.cfg.kv_cache_size
        if rec.get("fsq_indices") is not None:
            feats = self.tokenizer.decode_indices(
                [(np.asarray(rec["fsq_indices"], np.int64), coords)], kv_cache_size=kv
            )[0]
        else:
            feats = self.tokenizer.decode([(np.asarray(rec["latent"], np.float32), coords)], kv_cache_size=kv)[0]
        feats = torch.from_numpy(feats)
        if rec["modality"] == "3d":
            ref = np.asarray(prepared["voxel_feats"], np.float32)
            return ref, ((feats[:, : ref.shape[1]].numpy() + 1) / 2).clip(0, 1)
        out = ((tokens_to_video(feats, torch.as_tensor(coords)).numpy() + 1) / 2).clip(0, 1)
        ref = frames_on(prepared).numpy().astype(np.float32) / 255.0  # as tokenized: pending resize applied
        t = min(len(ref), len(out)) if rec["modality"] == "video" else 1
        h, w = out.shape[1:3]
        top, left = (ref.shape[1] - h) // 2, (ref.shape[2] - w) // 2  # the tokenizer's centre crop
        return ref[:t, top : top + h, left : left + w], out[:t]
