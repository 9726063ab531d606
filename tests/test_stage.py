"""The Stage contract (pipeline/stage.py) and the row helpers (pipeline/rows.py), without Ray."""

import time

import pytest

from pipeline.rows import FAILED, MAX_REASON_CHARS, OK, SKIPPED, describe, fail, is_ok, new_row, outcome, skip
from pipeline.stage import Resources, Stage


def rows(*xs):
    return [new_row(f"s-{i}", "image", "s", x=x, uri=f"/x/{i}") for i, x in enumerate(xs)]


class Double(Stage):
    name = "double"

    def __init__(self):
        self.setups = 0
        self.calls = []

    def setup(self):
        self.setups += 1
        self.model = 2  # what a real stage would load once

    def process(self, row):
        self.calls.append(row["id"])
        if row["x"] < 0:
            raise ValueError("negative x")
        if row["x"] == 0:
            raise ZeroDivisionError()
        return {**row, "x": row["x"] * self.model}


class Batched(Stage):
    """A stage that works on whole batches and cannot handle a bad row inside one."""

    name = "batched"

    def __init__(self, wrong_count=False):
        self.batches = []
        self.wrong_count = wrong_count

    def process_batch(self, batch):
        self.batches.append([r["id"] for r in batch])
        if any(r["x"] < 0 for r in batch):
            raise RuntimeError("bad row in batch")
        out = [{**r, "x": r["x"] + 1} for r in batch]
        return out[:-1] if self.wrong_count else out


# ---- row helpers -----------------------------------------------------------------------------------------


def test_row_helpers():
    r = new_row("s-1", "image", "s", x=3)
    assert is_ok(r) and r["stage"] == "source" and r["reason"] is None and r["status"] == OK
    assert r["span_start"] is None and r["span_end"] is None and r["meta"] == "{}" and "error" not in r
    failed = fail(r, "fetch", "http 404")
    assert failed is not r and r["status"] == OK and not is_ok(failed)
    assert (failed["status"], failed["stage"], failed["reason"]) == (FAILED, "fetch", "http 404")
    assert len(fail(r, "x", "e" * 10_000)["reason"]) == MAX_REASON_CHARS
    skipped = skip(r, "source", "empty file")
    assert skipped["status"] == SKIPPED and not is_ok(skipped)
    assert describe(ValueError("bad  ")) == "ValueError: bad" and describe(KeyError()) == "KeyError"
    rec = outcome({**failed, "bucket": 7, "pixels": object()})
    assert rec == {
        "id": "s-1",
        "bucket": 7,
        "status": FAILED,
        "stage": "fetch",
        "reason": "http 404",
        "modality": "image",
        "source": "s",
        "uri": None,
    }


# ---- Stage ---------------------------------------------------------------------------------------------


def test_ok_rows_get_stage_and_timings():
    st = Double()
    before = time.time()
    out = st(rows(1, 2, 3))
    assert [r["x"] for r in out] == [2, 4, 6]
    for r in out:
        assert r["status"] == OK and r["stage"] == "double" and r["reason"] is None
        assert set(r["timings"]) == {"double", "_done"} and r["timings"]["double"] >= 0
        assert before <= r["timings"]["_done"] <= time.time()
    # earlier stages' timings are kept
    again = Double()(out)
    assert again[0]["x"] == 4 and set(again[0]["timings"]) == {"double", "_done"}
    prior = {**rows(5)[0], "timings": {"fetch": 1.5, "_done": 0.0}}
    got = st([prior])[0]
    assert got["timings"]["fetch"] == 1.5 and got["timings"]["_done"] > 0 and "double" in got["timings"]


def test_failed_and_skipped_rows_pass_through_untouched():
    st = Double()
    bad = fail(rows(1)[0], "fetch", "http 404")
    skipped = skip(rows(2)[0], "source", "empty file")
    good = rows(3)[0]
    out = st([bad, good, skipped])
    assert out[0] is bad and out[2] is skipped  # the very same objects, not copies
    assert bad == fail(rows(1)[0], "fetch", "http 404") and "timings" not in bad
    assert out[1]["x"] == 6 and out[1]["stage"] == "double"
    assert st.calls == ["s-0"]  # only the ok row reached process() (rows() numbers each list from s-0)
    # a batch with nothing to do comes back as it was
    assert st([bad, skipped]) == [bad, skipped]


def test_exception_becomes_failed_row():
    st = Double()
    out = st(rows(1, -1, 0, 4))
    assert [r["status"] for r in out] == [OK, FAILED, FAILED, OK]
    assert (out[1]["stage"], out[1]["reason"]) == ("double", "ValueError: negative x")
    assert (out[2]["stage"], out[2]["reason"]) == ("double", "ZeroDivisionError")
    assert "timings" not in out[1] and out[1]["x"] == -1  # the input as it was, marked failed
    assert [out[0]["x"], out[3]["x"]] == [2, 8]


def test_setup_runs_once_before_the_first_call():
    class Checked(Double):
        def process(self, row):
            assert self.setups == 1
            return super().process(row)

    st = Checked()
    assert st.setups == 0  # not at construction (stages are pickled to workers first)
    st(rows(1))
    st(rows(2, 3))
    st([fail(rows(1)[0], "fetch", "x")])
    assert st.setups == 1 and st.calls == ["s-0", "s-0", "s-1"]
    assert st.stateful and not Batched().stateful  # a setup makes a stage an actor pool


def test_batch_failure_falls_back_to_one_row_at_a_time():
    st = Batched()
    out = st(rows(1, -5, 2))
    assert [r["status"] for r in out] == [OK, FAILED, OK]
    assert [out[0]["x"], out[2]["x"]] == [2, 3]  # the good rows survive
    assert (out[1]["stage"], out[1]["reason"]) == ("batched", "RuntimeError: bad row in batch")
    assert st.batches == [["s-0", "s-1", "s-2"], ["s-0"], ["s-1"], ["s-2"]]
    assert all(r["stage"] == "batched" and "batched" in r["timings"] for r in (out[0], out[2]))
    # only the ok rows are given to process_batch
    st.batches.clear()
    st([fail(rows(1)[0], "fetch", "x"), *rows(7, 8)[1:]])
    assert st.batches == [["s-1"]]


def test_wrong_number_of_rows_raises():
    with pytest.raises(RuntimeError, match="returned 1 rows for 2"):
        Batched(wrong_count=True)(rows(1, 2))


def test_resources_and_defaults():
    assert Stage().resources() == Resources(cpus=1.0, gpus=0.0, memory=None)
    assert not Stage().stateful

    class Gpu(Stage):
        def resources(self):
            return Resources(gpus=0.5)

    assert Gpu().stateful
    with pytest.raises(NotImplementedError):
        Stage().process(rows(1)[0])
    # a stage that implements neither process nor process_batch fails each row, it does not crash
    out = Stage()(rows(1))
    assert out[0]["status"] == FAILED and out[0]["stage"] == "stage" and out[0]["reason"] == "NotImplementedError"


def test_fault_point_is_the_stage_name(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULT", "decode:2:enospc")  # a known point; the stage is named after it
    monkeypatch.setenv("PIPELINE_FAULT_DIR", str(tmp_path))

    class Decode(Double):
        name = "decode"

    st = Decode()
    assert st(rows(1))[0]["status"] == OK  # first arrival
    with pytest.raises(OSError, match="No space left on device"):
        st(rows(1))  # second arrival: the injected fault fires once, for the whole call
    assert st(rows(1))[0]["status"] == OK
    assert Double()(rows(1))[0]["status"] == OK  # other stages are not affected


def test_remote_args_give_ray_what_the_stage_declares_without_its_experimental_warning():
    import logging

    from ray.data._internal.execution.operators import map_operator

    from pipeline.ray_job import remote_args

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    map_operator.logger.addHandler(handler)  # Ray's loggers do not propagate to pytest's
    try:
        ray_canon = map_operator._canonicalize_ray_remote_args
        ray_canon({"num_cpus": 1, "num_gpus": 0.5})
        assert any("experimental" in m for m in said)  # what every GPU run printed
        said.clear()
        gpu = remote_args(Resources(cpus=1.0, gpus=0.5, memory=2**30))
        assert gpu == {"num_gpus": 0.5, "memory": 2**30}
        assert ray_canon(gpu)["num_cpus"] == 1 and not said  # Ray Data books the one CPU itself, quietly
    finally:
        map_operator.logger.removeHandler(handler)
    assert remote_args(Resources(cpus=0.5)) == {"num_cpus": 0.5}
    assert remote_args(Resources(cpus=0.5, gpus=0.1)) == {"num_cpus": 0.5, "num_gpus": 0.1}  # other CPU shares kept
