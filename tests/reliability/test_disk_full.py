"""Disk full or read-only output: the run stops with one clear error line and a non-zero status, no visible shard is
corrupt, and a rerun once there is space again completes with every sample exactly once.

Two ways to run out of space: an injected OSError(ENOSPC) at shard write (PIPELINE_FAULT=shard_write:2:enospc,
works anywhere), and a real 144 kB tmpfs as the output root, later remounted read-only and then larger (needs
mount rights: skipped where `mount -t tmpfs` is refused)."""

import subprocess

import pytest

from tests.reliability.conftest import expected_ids, final_state, job_dict, make_inputs, run_cli, shard_ids, write_job

IMAGES = ["camera.png", "cell.png", "coins.png", "hopper_gray.jpg", "text.png", "brick.png"]


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory):
    src = make_inputs(shared_data, tmp_path_factory.mktemp("disk") / "in", images=IMAGES, videos=[], meshes=[])
    return src, expected_ids(src)


def check_error(run, fragment: str) -> str:
    """Non-zero exit, no traceback, and one readable error line naming the cause."""
    assert run.rc == 1, f"rc {run.rc}:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [l for l in run.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and fragment in lines[0], run.stderr[-3000:]
    return lines[0]


def resume_and_check(job, out, expected) -> dict:
    before = shard_ids(out)  # every visible shard reads back (a corrupt one raises here)
    rerun = run_cli(job, out)
    assert rerun.rc == 0, rerun.stderr[-3000:]
    after = shard_ids(out)
    state = final_state(out)
    assert set(after) == expected == state["ok"] and max(after.values()) == 1 and state["problems"] == []
    assert state["staging"] == [] and not state["lock"]  # the failed run's staging is collected by the rerun
    return {
        "corrupt_shards": 0,
        "resumed_ok": f"{len(before)} kept + {len(after) - len(before)} redone",
        "lost": len(expected - set(after)),
        "duplicates": sum(c - 1 for c in after.values()),
    }


def test_injected_enospc_then_resume(inputs, tmp_path, figures):
    src, expected = inputs
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_dict(out, [{"type": "folder", "path": str(src), "name": "local"}]))
    run = run_cli(job, out, fault="shard_write:2:enospc", fault_dir=tmp_path / "fault")
    line = check_error(run, "No space left on device")
    assert not list(out.glob("*/data/**/.*")) and not list(out.glob("*/data/**/*.tmp"))
    assert not list(out.glob("*/LOCK.json")), "a run that failed must release its lock"
    row = resume_and_check(job, out, expected)
    figures.setdefault("disk_full", []).append(
        {"variant": "injected ENOSPC at 2nd shard write", "rc": run.rc, "error_line": line[:110], **row}
    )


@pytest.fixture()
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=144k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)


@pytest.mark.slow
def test_real_full_then_read_only_tmpfs_then_resume(inputs, small_tmpfs, tmp_path, figures):
    src, expected = inputs
    out = small_tmpfs / "out"
    job = write_job(
        tmp_path / "job.yaml",
        job_dict(out, [{"type": "folder", "path": str(src), "name": "local"}], write={"rows_per_write": 1}),
    )
    full = run_cli(job, out)
    line = check_error(full, "No space left on device")
    kept = shard_ids(out)
    # writers stage ahead of the commits, so how many commits fit before the disk is full varies (0-3 here)
    assert len(kept) < len(expected), "the 144 kB disk should not hold every shard"
    figures.setdefault("disk_full", []).append(
        {
            "variant": "real 144 kB tmpfs fills up (1 row per commit)",
            "rc": full.rc,
            "error_line": line[:110],
            "corrupt_shards": 0,
            "resumed_ok": f"{len(kept)} committed before the disk filled",
            "lost": "-",
            "duplicates": "-",
        }
    )
    remount(small_tmpfs, "ro")
    ro = run_cli(job, out)
    ro_line = check_error(ro, "Read-only file system")
    assert shard_ids(out) == kept
    remount(small_tmpfs, "rw,size=16m")
    row = resume_and_check(job, out, expected)
    figures["disk_full"].append(
        {"variant": "same tmpfs read-only, then rw 16 MB: resume", "rc": ro.rc, "error_line": ro_line[:110], **row}
    )
