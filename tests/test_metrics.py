"""Patch-grid and 4-frame-flicker scores of atoken/metrics.py on synthetic clips with and without the artefact."""

import pytest
import torch

from atoken.metrics import (
    border_ratio,
    flicker_score,
    frame_psnr,
    grid_score,
    phase_psnr_spread,
    temporal_border_ratio,
)


def smooth_clip(t=16, h=64, w=96, seed=0):
    """A panning smooth texture: no structure tied to the 16-px grid or to 4-frame periods."""
    g = torch.Generator().manual_seed(seed)
    big = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 12, generator=g), size=(h + 64, w + 64), mode="bicubic")
    frames = [big[0, :, k : k + h, 2 * k : 2 * k + w].permute(1, 2, 0) for k in range(t)]
    return torch.stack(frames).clamp(0, 1).double()


def with_grid(x, step=0.05):
    """Adds a different constant to each 16 x 16 patch: steps at patch borders only."""
    t, h, w, _ = x.shape
    g = torch.Generator().manual_seed(1)
    offs = (torch.rand(t, h // 16, w // 16, 1, generator=g).double() - 0.5) * 2 * step
    return (x + offs.repeat_interleave(16, 1).repeat_interleave(16, 2)).clamp(0, 1)


def with_flicker(x, step=0.04):
    """Adds a different constant to each 4-frame group: jumps between frames 4k-1 and 4k only."""
    offs = torch.tensor([(-1) ** k * step for k in range(len(x) // 4)], dtype=x.dtype).repeat_interleave(4)
    return (x + offs.view(-1, 1, 1, 1)).clamp(0, 1)


def test_grid_score_is_one_without_a_grid_and_grows_with_one():
    x = smooth_clip()
    assert grid_score(x, x) == pytest.approx(1.0)
    assert 0.8 < border_ratio(x) < 1.25  # natural content: borders are like any other column
    assert grid_score(with_grid(x, 0.02), x) > 1.1
    assert grid_score(with_grid(x, 0.05), x) > grid_score(with_grid(x, 0.02), x)
    # a uniform blur is no grid
    blur = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=False)
    assert grid_score(blur.permute(0, 2, 3, 1), x) == pytest.approx(1.0, abs=0.1)


def test_flicker_score_is_one_without_flicker_and_grows_with_it():
    x = smooth_clip()
    assert flicker_score(x, x) == pytest.approx(1.0)
    assert 0.8 < temporal_border_ratio(x) < 1.25
    assert flicker_score(with_flicker(x, 0.02), x) > 1.1
    assert flicker_score(with_flicker(x, 0.05), x) > flicker_score(with_flicker(x, 0.02), x)
    # the grid does not count as flicker, nor flicker as a grid
    assert flicker_score(with_grid(x), x) < 1.3
    assert grid_score(with_flicker(x), x) == pytest.approx(1.0, abs=0.05)


def test_frame_psnr_and_phase_spread():
    x = smooth_clip()
    noisy = x.clone()
    noisy[0::4] += 0.05 * torch.randn(noisy[0::4].shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    p = frame_psnr(noisy, x)
    assert p.shape == (16,) and (p[0::4] < 30).all() and (p[1::4] > 90).all()
    assert phase_psnr_spread(noisy, x) > 50
    even = x + 0.01
    assert phase_psnr_spread(even.clamp(0, 1), x) == pytest.approx(0.0, abs=0.5)


def test_scores_refuse_clips_without_borders():
    with pytest.raises(ValueError, match="patch border"):
        border_ratio(torch.rand(1, 8, 8, 3))
    with pytest.raises(ValueError, match="more than 4 frames"):
        temporal_border_ratio(torch.rand(4, 32, 32, 3))
