"""Hangs: a decoder stuck forever (PIPELINE_FAULT=decode_child:<n>:hang sleeps inside the isolated decode child) is
killed after the wall-clock limit and recorded on its row; the worker and the job go on."""

import shutil
import time

import pytest

from pipeline.decode import DecodeConfig
from pipeline.fetch import FetchConfig
from pipeline.mesh.stage import MeshConfig
from pipeline.prepare import Prepare
from pipeline.rows import new_row
from tests.reliability.conftest import final_state, job_dict, run_cli, write_job


def media_row(path, modality, i=0):
    return new_row(f"t-{i}", modality, "t", uri=str(path))


@pytest.mark.parametrize("modality", ["video", "image"])
def test_hanging_decoder_is_killed_and_recorded(modality, shared_data, tmp_path, monkeypatch, figures):
    """The prepare stage (fetch + decode, what a Ray worker runs), called directly."""
    monkeypatch.setenv("PIPELINE_FAULT", "decode_child:1:hang")
    monkeypatch.setenv("PIPELINE_FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / "scratch"))
    cfg = DecodeConfig(timeout_s=2.0, isolate=("image", "video"))
    stage = Prepare(FetchConfig(retries=0), cfg, MeshConfig(backend="cpu"), branch="media")
    src = shared_data / ("videos/video_90.mov" if modality == "video" else "images/camera.png")
    try:
        t0 = time.perf_counter()
        (hung,) = stage([media_row(src, modality, 0)])
        killed_after = time.perf_counter() - t0
        assert (tmp_path / "fired").exists()
        assert hung["status"] == "failed" and hung["stage"] == "decode"
        assert hung["reason"] == "decode timed out after 2s"
        assert 2.0 <= killed_after < 6.0
        (after,) = stage([media_row(src, modality, 1)])  # the same worker goes on with the next sample
        assert after["status"] == "ok" and after["pixels"].ndim == 4
    finally:
        stage.teardown()
    figures.setdefault("hangs", []).append(
        {
            "name": f"{modality} decode child hangs (prepare stage)",
            "timeout_s": 2.0,
            "killed_after_s": round(killed_after, 2),
            "reason": hung["reason"],
            "job_ok": "next sample ok",
        }
    )


@pytest.mark.slow
def test_hang_inside_a_job_costs_one_sample(shared_data, tmp_path, figures):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        shutil.copy(shared_data / "videos" / "video_90.mov", src / f"clip{i}.mov")
    shutil.copy(shared_data / "videos" / "bbb_480p_vp9_opus_1second.webm", src / "bbb.webm")
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        job_dict(out, [{"type": "folder", "path": str(src), "name": "local"}], decode={"timeout_s": 3}),
    )
    run = run_cli(job, out, fault="decode_child:2:hang", fault_dir=tmp_path / "fault", timeout=240)
    assert run.rc == 0, run.stderr[-3000:]
    assert (tmp_path / "fault" / "fired").exists()
    state = final_state(out)
    assert len(state["ok"]) == 4 and len(state["other"]) == 1
    (rec,) = state["other"].values()
    assert rec["stage"] == "decode" and rec["reason"] == "decode timed out after 3s"
    assert state["problems"] == []
    figures.setdefault("hangs", []).append(
        {
            "name": "video decode child hangs in a Ray job (5 videos)",
            "timeout_s": 3.0,
            "killed_after_s": "3 (limit)",
            "reason": rec["reason"],
            "job_ok": f"rc 0, 4/5 ok, wall {run.wall_s:.0f}s",
        }
    )
