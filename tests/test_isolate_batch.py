"""Batched isolated calls (`Isolator.run_many`) and the prepare stage's batched image decode: one round trip to the
decode child per batch, yet a call that hangs, crashes or runs out of memory fails alone, with its reason, and
every other call gives what it gives alone (real child processes, real shared images)."""

import os
import signal
import time

import numpy as np
import pytest

from pipeline.decode import DecodeConfig, decode_file
from pipeline.fetch import FetchConfig
from pipeline.isolate import IsolateError, Isolator
from pipeline.mesh.stage import MeshConfig
from pipeline.prepare import Prepare
from pipeline.rows import new_row


def work(kind: str, n: int):
    if kind == "hang":
        time.sleep(60)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "raise":
        raise ValueError(f"bad input {n}")
    if kind == "oom":
        return bytearray(512 << 20)  # over the cap below
    return {"pid": os.getpid(), "pixels": np.full((4, 5, 3), n, np.uint8)}


def test_each_call_fails_alone_and_the_rest_run_in_a_fresh_child():
    calls = [("ok", 1), ("hang", 2), ("ok", 3), ("crash", 4), ("raise", 5), ("oom", 6), ("ok", 7)]
    with Isolator() as iso:
        got = iso.run_many(work, calls, timeout_s=2, label="decode", memory_bytes=256 << 20)
    assert [s for s, _ in got] == ["ok", "err", "ok", "err", "err", "err", "ok"]
    for (kind, n), (status, value) in zip(calls, got):
        if status == "ok":
            np.testing.assert_array_equal(value["pixels"], work(kind, n)["pixels"])
    assert isinstance(got[1][1], IsolateError) and str(got[1][1]) == "decode timed out after 2s"
    assert isinstance(got[3][1], IsolateError) and str(got[3][1]) == "decode crashed (signal 11, SIGSEGV)"
    assert type(got[4][1]) is ValueError and str(got[4][1]) == "bad input 5"
    assert isinstance(got[5][1], IsolateError) and "decode: out of memory (over the 256 MiB cap)" == str(got[5][1])
    pids = [v["pid"] for s, v in got if s == "ok"]
    assert len(set(pids)) == 3 and os.getpid() not in pids  # a new child after the hang and after the crash


def test_a_batch_in_one_child_and_in_process():
    calls = [("ok", k) for k in range(5)]
    with Isolator() as iso:
        got = iso.run_many(work, calls, timeout_s=10)
        again = iso.run_many(work, calls, timeout_s=10)
    assert len({v["pid"] for _, v in got + again}) == 1  # one reused child for both batches
    here = Isolator().run_many(work, calls + [("raise", 9)], timeout_s=0)
    assert [v["pid"] for _, v in here[:5]] == [os.getpid()] * 5
    assert here[5][0] == "err" and str(here[5][1]) == "bad input 9"
    assert Isolator().run_many(work, [], timeout_s=5) == []


IMAGES = ["astronaut.png", "camera.png", "retina.jpg", "coffee.png", "Channel_digital_image_CMYK_color.jpg"]
CFG = DecodeConfig(upscale=True, timeout_s=5, buckets={"area": 256 * 256, "min_side": 128, "max_side": 1024})


@pytest.fixture
def stage(scratch):
    st = Prepare(FetchConfig(retries=0), CFG, MeshConfig(views=4, backend="cpu"), branch="media", batch_size=8)
    yield st
    st.teardown()


def image_rows(shared_data):
    rows = [new_row(f"{k}-{n}", "image", "test", uri=str(shared_data / "images" / n)) for k, n in enumerate(IMAGES)]
    return rows + [new_row("broken", "image", "test", uri=str(shared_data / "bad" / "broken.png"))]


@pytest.mark.parametrize(
    "action,reason", [("hang", "decode timed out after 5s"), ("self", "decode crashed (signal 9, SIGKILL)")]
)
def test_batched_image_decode_equals_single_decodes_and_fails_one_alone(
    stage, shared_data, scratch, monkeypatch, action, reason
):
    rows = image_rows(shared_data)
    faults = scratch / "fault"
    faults.mkdir()
    monkeypatch.setenv("PIPELINE_FAULT_DIR", str(faults))
    monkeypatch.setenv("PIPELINE_FAULT", f"decode_child:3:{action}")  # the third image decoded, in the child
    t0 = time.perf_counter()
    out = stage(rows)
    assert time.perf_counter() - t0 < 60 and (faults / "fired").exists()
    assert out[-1]["status"] == "failed" and out[-1]["stage"] == "decode" and out[-1]["reason"]  # broken.png
    hit = [r for r in out[:-1] if r["status"] != "ok"]
    assert len(hit) == 1 and (hit[0]["status"], hit[0]["stage"], hit[0]["reason"]) == ("failed", "decode", reason)
    monkeypatch.delenv("PIPELINE_FAULT")
    for row, got in zip(rows, out[:-1]):
        if got["status"] == "ok":
            want = decode_file(row["uri"], "image", CFG)
            np.testing.assert_array_equal(got["pixels"], want["pixels"])
            assert (got["orig_width"], got["orig_height"]) == (want["orig_width"], want["orig_height"])
            assert got["timings"]["decode"] > 0
    assert not (scratch / "attempts").exists()  # every attempt file gone with its sample


def test_batched_image_decode_keeps_the_attempt_limit(stage, shared_data, scratch):
    rows = image_rows(shared_data)[:3]
    root = scratch / "attempts" / "local"
    root.mkdir(parents=True)
    (root / rows[1]["id"]).write_text("2")  # its worker died twice on it already
    out = stage(rows)
    assert [r["status"] for r in out] == ["ok", "failed", "ok"]
    assert out[1]["reason"] == "its worker died 2 times while preparing it (killed for memory?); not tried again"
    assert not (scratch / "attempts").exists()


def unpicklable(kind: str, n: int):
    if kind == "lambda":
        return {"fn": lambda: n}  # cannot be pickled back to the parent
    return work(kind, n)


def test_an_unpicklable_result_fails_alone():
    with Isolator() as iso:
        got = iso.run_many(unpicklable, [("ok", 1), ("lambda", 2), ("ok", 3)], timeout_s=10)
    assert [s for s, _ in got] == ["ok", "err", "ok"]
    assert "pickle" in str(got[1][1]).lower() or "lambda" in str(got[1][1])
    assert got[2][1]["pixels"][0, 0, 0] == 3


def test_attempt_start_survives_another_worker_removing_the_folders(tmp_path, monkeypatch):
    """Workers of a node share the attempts folder and each removes it when empty (close()): the parent can go
    while makedirs creates the leaf, which raised FileNotFoundError and failed a sample (seen on the H200 bench)."""
    import pipeline.prepare as prepare

    real, calls = os.makedirs, []

    def racing_makedirs(path, exist_ok=False):
        calls.append(path)
        if len(calls) == 1:  # the first try loses the race
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path, exist_ok=exist_ok)

    monkeypatch.setattr(prepare.os, "makedirs", racing_makedirs)
    att = prepare.Attempts(str(tmp_path / "attempts" / "run1"), limit=2)
    assert att.start("s1") == 0
    assert len(calls) >= 2 and (tmp_path / "attempts" / "run1" / "s1").read_text() == "1"
    assert att.start("s1") == 1  # a second start without finish: the first one died
    att.finish("s1")
    att.close()
    assert not (tmp_path / "attempts").exists()
