"""Crash matrix: kill -9 the driver or a worker at a named point of a real job (a `python -m pipeline run`
subprocess with its own Ray cluster), then rerun.

Between the crash and the rerun, what a reader sees is checked: every file matching OUT/*/data/**/*.parquet reads
whole with pyarrow, no id appears twice, and Hugging Face `datasets` loads them. After the rerun every sample is in
exactly one shard, the ledger agrees (`verify`), no staging file is left, and a third run changes nothing. Worker
kills must be survived within the same run (Ray retries the task: fetch/decode/mesh run in the prepare actors,
tokenize in its actor, the writer is a task; `shard_staged:N:self` kills a writer after it wrote and staged its
files, so two attempts wrote the same rows and only one may be committed).

The commit-protocol points run on S3 too (SeaweedFS, which has no rename: the commit copies staged files into
place), through the same helpers.

Points (pipeline/faults.py): writer `shard_write` (before writing) and `shard_staged` (after staging), driver
`record_received` (a record arrived, not committed), `commit_written` (commit record written, moves not done: the
rerun rolls it forward), `commit_moved` (moves done, in-memory state not updated). The rerun and the third run run
in-process on a shared Ray cluster (the same `run_job` the CLI calls; only the crash needs its own process).
"""

import pytest

from pipeline.job import validate_job
from pipeline.run import run_job
from tests.reliability.conftest import (
    Target,
    count_lost_dup,
    expected_ids,
    final_state,
    make_inputs,
    reader_invariant,
    run_cli,
    shard_ids,
)

slow = pytest.mark.slow
POINTS = [
    "commit_written:2:driver",  # commit record written, no move done: the roll-forward path
    "shard_staged:2:self",  # a writer dies after staging its files: the task is retried
    pytest.param("record_received:2:driver", marks=slow),
    pytest.param("commit_written:4:driver", marks=slow),
    pytest.param("commit_moved:3:driver", marks=slow),
    pytest.param("fetch:5:driver", marks=slow),
    pytest.param("decode:6:driver", marks=slow),
    pytest.param("tokenize:3:driver", marks=slow),
    pytest.param("shard_write:2:driver", marks=slow),
    pytest.param("fetch:4:self", marks=slow),
    pytest.param("decode:5:self", marks=slow),
    pytest.param("mesh:1:self", marks=slow),
    pytest.param("tokenize:2:self", marks=slow),
]
# on S3 (no rename: staged files are copied into place by the commit), the points of the commit protocol
S3_POINTS = [
    "commit_written:2:driver",
    pytest.param("shard_staged:2:self", marks=slow),
    pytest.param("record_received:2:driver", marks=slow),
    pytest.param("commit_moved:3:driver", marks=slow),
]


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory):
    src = make_inputs(shared_data, tmp_path_factory.mktemp("crash") / "in")
    return src, expected_ids(src)


@pytest.mark.parametrize("fault", POINTS)
def test_kill_and_rerun(fault, inputs, ray_local, tmp_path, figures):
    kill_and_rerun(Target("local", str(tmp_path / "out"), {}), fault, inputs, tmp_path, figures)


@pytest.mark.parametrize("fault", S3_POINTS)
def test_kill_and_rerun_on_s3(fault, inputs, ray_local, tmp_path, figures, s3_server, s3_prefix):
    kill_and_rerun(Target("s3", s3_server.uri(s3_prefix), s3_server.env(), s3_server), fault, inputs, tmp_path, figures)


def kill_and_rerun(target: Target, fault: str, inputs, tmp_path, figures) -> None:
    src, expected = inputs
    out, opts = target.out, target.options
    job, _, cfg = target.job(tmp_path, [{"type": "folder", "path": str(src), "name": "local"}])
    point, nth, victim = fault.split(":")

    crash = run_cli(job, out, fault=fault, fault_dir=tmp_path / "fault", env=target.env)
    fired = tmp_path / "fault" / "fired"
    assert fired.exists(), f"fault {fault} never fired:\n{crash.stderr[-3000:]}"
    if victim == "driver":
        assert crash.rc == -9, f"driver should die by SIGKILL, got rc {crash.rc}:\n{crash.stderr[-3000:]}"
    else:
        assert crash.rc == 0, f"a killed worker must be survived:\n{crash.stderr[-3000:]}"
        assert "Traceback" not in crash.stdout

    # between crash and rerun: what a reader globbing data/**/*.parquet sees is whole and has no duplicate
    before = reader_invariant(out, tmp_path / "hf", target.s3)
    staged_after_crash = len(final_state(out, opts)["staging"])

    rerun = run_job(validate_job(cfg))  # the same job again (in-process: no fault, no kill)
    after = shard_ids(out, opts)
    state = final_state(out, opts)
    lost, dups = count_lost_dup(expected, after)
    figures.setdefault("crash_matrix", []).append(
        {
            "storage": target.kind,
            "point": point,
            "nth": int(nth),
            "victim": "driver" if victim == "driver" else "worker",
            "crash_rc": crash.rc,
            "committed_before_rerun": len(before),
            "staging_after_crash": staged_after_crash,
            "redone_by_rerun": rerun.finished,
            "lost": len(lost),
            "duplicates": dups,
            "verify_problems": len(state["problems"]),
            "staging_after_rerun": len(state["staging"]),
            "crash_s": round(crash.wall_s, 1),
            "rerun_s": round(rerun.wall_s, 1),
        }
    )
    assert not lost, f"lost samples: {sorted(lost)}"
    assert dups == 0, f"duplicated samples: {[i for i, c in after.items() if c > 1]}"
    assert set(after) == expected == state["ok"] and not state["other"], state["other"]
    assert state["problems"] == []
    assert state["staging"] == [], f"orphan staging files after the rerun: {state['staging']}"
    assert not state["lock"], "the rerun left its lock behind"
    if victim == "driver":  # a worker kill was survived in the crash run: the rerun above already did nothing
        third = run_job(validate_job(cfg))
        assert third.finished == 0 and third.shards == [] and shard_ids(out, opts) == after
    else:
        assert rerun.finished == 0 and rerun.shards == []
