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
