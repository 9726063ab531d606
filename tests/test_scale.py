"""The driver's memory bound: a dry run of a 1M-row WebVid-format source against a store that already holds 500k
done ids keeps the driver's memory far below the 2 GB budget and gives exact counts (benchmarks/bench_scale.py
runs the 10M point). The peaks come from /proc (the benchmark samples them; getrusage in a child of a big test
runner reports the runner's RSS, as it counts the image before exec)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_scale import dry_run_point  # noqa: E402

BUDGET_MB = 2048


@pytest.mark.timeout(900)
def test_dry_run_of_a_million_rows_stays_within_the_driver_budget(tmp_path):
    point = dry_run_point(tmp_path, 1_000_000, cpus=2)  # asserts exact counts: 500k to do, 500k done
    assert point["to_do"] == 500_000 and point["done_before"] == 500_000
    assert 0 < point["driver_peak_private_mb"] <= point["driver_peaks_mb"]["VmRSS"] < BUDGET_MB, point
    assert point["driver_peak_rss_mb"] < BUDGET_MB, point  # the CLI's own figure (VmHWM)


def test_planned_blocks_stay_bounded_at_scale():
    """Phase 2's input: one bundle (a prepare call) a block for small jobs, so every block can go to another
    actor; for a 10M-row job at 8 rows a bundle, blocks of 32 bundles (~39k blocks, not 1.25M block refs and
    their metadata on the driver)."""
    from pipeline.ray_job import bundles_per_block

    assert bundles_per_block(12, 2) == 1 and bundles_per_block(250, 16) == 1 and bundles_per_block(2000, 16) == 15
    assert bundles_per_block(10_000_000 // 8, 16) == 32 and bundles_per_block(10_000_000 // 8, 1024) == 32
    assert -(-(10_000_000 // 8) // bundles_per_block(10_000_000 // 8, 16)) < 40_000
