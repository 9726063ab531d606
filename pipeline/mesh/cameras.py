"""Cameras on a sphere around the unit cube, deterministic per asset.

Convention (OpenCV, as the official recipe uses after its Blender->OpenCV flip): camera x right, y down, z forward;
`w2c` [N, 4, 4] maps world to camera; intrinsics are normalised (image spans [0, 1]):
fx = fy = 0.5 / tan(fov / 2), cx = cy = 0.5, so pixel (row i, col j) of an H x W image has its centre at
u = (j + 0.5) / W, v = (i + 0.5) / H. World "up" for the image is +y (glTF's up axis).
Directions: a Hammersley point set on the sphere (equal-area mapping), rotated by an offset drawn from the asset id
(sha256, so it is the same in every process and run), like TRELLIS's per-object random offset.
"""

import hashlib
import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Cameras:
    w2c: np.ndarray  # float32 [N, 4, 4]
    intrinsics: np.ndarray  # float32 [N, 3, 3], normalised
    fov_deg: float
    radius: float

    def __len__(self):
        return len(self.w2c)

    @property
    def c2w(self) -> np.ndarray:
        return np.linalg.inv(self.w2c.astype(np.float64)).astype(np.float32)


def _radical_inverse(i: np.ndarray) -> np.ndarray:
    """Van der Corput sequence in base 2 for a non-negative integer array."""
    i = i.astype(np.int64).copy()
    out, f = np.zeros(i.shape, np.float64), 0.5
    while i.any():
        out += (i & 1) * f
        i >>= 1
        f /= 2
    return out


def asset_offset(asset_id: str) -> tuple[float, float]:
    h = hashlib.sha256(str(asset_id).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64, int.from_bytes(h[8:16], "little") / 2**64


def sphere_directions(n: int, asset_id: str) -> np.ndarray:
    """n unit vectors, a Hammersley set with a per-asset offset (float64 [n, 3])."""
    ou, ov = asset_offset(asset_id)
    i = np.arange(n)
    u = (i + 0.5) / n + ou
    v = _radical_inverse(i) + ov
    u, v = u % 1.0, v % 1.0
    y = 1.0 - 2.0 * u  # equal-area: y uniform in [-1, 1]
    phi = 2 * math.pi * v
    r = np.sqrt(np.clip(1 - y * y, 0, None))
    return np.stack([r * np.cos(phi), y, r * np.sin(phi)], axis=1)


def look_at(eye: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """OpenCV world->camera matrices [N, 4, 4] for cameras at `eye` [N, 3] looking at `target`."""
    eye = np.asarray(eye, np.float64).reshape(-1, 3)
    fwd = np.asarray(target, np.float64) - eye
    fwd /= np.linalg.norm(fwd, axis=1, keepdims=True)
    up = np.broadcast_to(np.asarray(up, np.float64), eye.shape).copy()
    parallel = np.abs((fwd * up).sum(1)) > 0.999
    up[parallel] = (0.0, 0.0, 1.0)  # looking straight up/down: any other up will do
    right = np.cross(fwd, up)
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(fwd, right)
    R = np.stack([right, down, fwd], axis=1)  # rows = camera axes in world
    w2c = np.tile(np.eye(4), (len(eye), 1, 1))
    w2c[:, :3, :3] = R
    w2c[:, :3, 3] = -np.einsum("nij,nj->ni", R, eye)
    return w2c


def intrinsics_from_fov(fov_deg: float, n: int) -> np.ndarray:
    f = 0.5 / math.tan(math.radians(fov_deg) / 2)
    K = np.array([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]], np.float32)
    return np.tile(K, (n, 1, 1))


def sphere_cameras(num_views: int, asset_id: str, radius: float = 2.0, fov_deg: float = 40.0) -> Cameras:
    eye = sphere_directions(num_views, asset_id) * radius
    return Cameras(look_at(eye).astype(np.float32), intrinsics_from_fov(fov_deg, num_views), fov_deg, radius)
