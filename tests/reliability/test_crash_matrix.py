"""Crash matrix: kill -9 the driver or a worker at a named point of a real job, then rerun.

After the crash (before the rerun) every visible shard loads with pyarrow and `datasets`; after the rerun every
sample is in exactly one shard and `verify` passes. Worker kills must be survived within the same run (Ray task
retries for fetch/decode/mesh, actor restart for tokenize).
"""
import pytest

from pipeline.sources import local_files
from tests.reliability.conftest import (final_state, job_dict, load_with_datasets, make_inputs, run_cli, shard_ids,
                                        write_job)

slow = pytest.mark.slow
POINTS = [
    "shard_renamed:2:driver",            # between rename and manifest commit: the adoption path
    "tokenize:2:self",                   # a tokenize actor dies mid-batch
    pytest.param("fetch:5:driver", marks=slow),
    pytest.param("decode:6:driver", marks=slow),
    pytest.param("tokenize:3:driver", marks=slow),
    pytest.param("shard_write:2:driver", marks=slow),
    pytest.param("shard_tmp_written:2:driver", marks=slow),
    pytest.param("shard_renamed:4:driver", marks=slow),
    pytest.param("manifest_appended:3:driver", marks=slow),
    pytest.param("fetch:4:self", marks=slow),
    pytest.param("decode:5:self", marks=slow),
    pytest.param("mesh:1:self", marks=slow),
]


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory):
    src = make_inputs(shared_data, tmp_path_factory.mktemp("crash") / "in")
    return src, {r["id"] for r in local_files(src, source="local")}


@pytest.mark.parametrize("fault", POINTS)
def test_kill_and_rerun(fault, inputs, tmp_path, figures):
    src, expected = inputs
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_dict(out, [{"type": "folder", "path": str(src), "name": "local"}]))
    point, nth, victim = fault.split(":")

    crash = run_cli(job, out, fault=fault, fault_dir=tmp_path / "fault")
    assert (tmp_path / "fault" / "fired").exists(), f"fault {fault} never fired:\n{crash.stderr[-3000:]}"
    if victim == "driver":
        assert crash.rc == -9, f"driver should die by SIGKILL, got rc {crash.rc}:\n{crash.stderr[-3000:]}"
    else:
        assert crash.rc == 0, f"a killed worker must be survived:\n{crash.stderr[-3000:]}"

    # between crash and rerun: nothing partial is visible to readers
    before = shard_ids(out)  # pyarrow reads every data/*/*.parquet
    assert load_with_datasets(out, tmp_path / "hf") == sum(before.values())
    assert not any(c > 1 for c in before.values()), f"duplicates already after the crash: {before}"

    rerun = run_cli(job, out)
    assert rerun.rc == 0, rerun.stderr[-3000:]
    after = shard_ids(out)
    state = final_state(out)
    lost = expected - set(after)
    dups = sum(c - 1 for c in after.values())
    figures.setdefault("crash_matrix", []).append(
        {"point": point, "nth": int(nth), "victim": "driver" if victim == "driver" else "worker",
         "crash_rc": crash.rc, "committed_before_rerun": len(before), "lost": len(lost), "duplicates": dups,
         "verify_problems": len(state["problems"]), "crash_s": round(crash.wall_s, 1),
         "rerun_s": round(rerun.wall_s, 1)})
    assert not lost, f"lost samples: {sorted(lost)}"
    assert dups == 0, f"duplicated samples: {[i for i, c in after.items() if c > 1]}"
    assert set(after) == expected == state["ok"] and not state["other"]
    assert state["problems"] == []
    assert run_cli(job, out).rc == 0 and shard_ids(out) == after  # a third run changes nothing
