"""Network faults: a WebVid-style job over a loopback HTTP server where ~30 % of the samples misbehave.

Recoverable faults (one 500, one reset, one truncated body, a wrong Content-Type on real bytes) end ok; the rest
(404, persistent 500 / reset / truncation, a body slower than the deadline, a stalled server, an HTML page, a
body over the size cap, a redirect loop) end failed at fetch with their reason, and the job ends in bounded time.
"""

import csv
import shutil
import time

from pipeline.job import validate_job
from pipeline.run import run_job
from tests.http_server import Fault, FaultServer
from tests.reliability.conftest import final_state, job_dict

VIDEOS = ["video_90.mov", "bbb_480p_vp9_opus_1second.webm", "video_270.mov", "stub_mp4v.mp4", "stub_mjpeg.avi"]
MAX_BYTES = 400_000
DEADLINE_S, READ_TIMEOUT_S, RETRIES = 2.0, 1.0, 1

# name -> (fault or None, expected reason fragment or None for ok)
UNRECOVERABLE = {
    "http404.mov": (Fault("status", code=404), "http 404"),
    "http500.mov": (Fault("status", code=500), "http 500"),
    "reset.mov": (Fault("reset"), "connection error"),
    "drip.mov": (Fault("drip", chunk=64, seconds=0.2), "deadline exceeded"),
    "stall.mov": (Fault("stall", seconds=30), "timeout"),
    "truncated.mov": (Fault("truncate", fraction=0.5), "truncated body"),
    "html.mov": (Fault("html"), "content is not a video"),
    "oversize.mov": (Fault("oversize", size=MAX_BYTES + 1), "exceeds max_bytes"),
    "oversize_claim.mov": (Fault("oversize", size=10 << 30, claim_only=True), "exceeds max_bytes"),
    "loop_a.mov": (Fault("redirect", location="/loop_b.mov"), "redirect loop"),
}
RECOVERABLE = {
    "flaky500.mov": Fault("status", code=503, times=1),
    "flakyreset.mov": Fault("reset", times=1),
    "flakytrunc.mov": Fault("truncate", fraction=0.3, times=1),
    "wrongtype.mov": Fault("content_type", content_type="text/html"),
    "redirect_ok.mov": Fault("redirect", location="/clean00.mov"),
}


def build_site(shared, root, n_clean):
    root.mkdir()
    names = list(UNRECOVERABLE) + list(RECOVERABLE) + [f"clean{i:02d}.mov" for i in range(n_clean)] + ["loop_b.mov"]
    for i, name in enumerate(names):  # every path holds a real video; the faults decide what the client gets
        shutil.copy(shared / "videos" / VIDEOS[i % len(VIDEOS)], root / name)
    faults = {f"/{k}": f for k, (f, _) in UNRECOVERABLE.items()} | {f"/{k}": f for k, f in RECOVERABLE.items()}
    faults["/loop_b.mov"] = Fault("redirect", location="/loop_a.mov")
    return faults, [n for n in names if n != "loop_b.mov"]


def run_network_job(shared, tmp_path, n_clean):
    faults, names = build_site(shared, tmp_path / "www", n_clean)
    with FaultServer(tmp_path / "www", faults) as srv:
        csv_path = tmp_path / "webvid.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
            w.writerows([[n.split(".")[0], srv.url(n), "PT00H00M01S", "p", n] for n in names])
        cfg = job_dict(
            tmp_path / "out",
            [{"type": "webvid", "path": str(csv_path)}],
            fetch={
                "retries": RETRIES,
                "backoff_s": 0.05,
                "read_timeout_s": READ_TIMEOUT_S,
                "deadline_s": DEADLINE_S,
                "max_bytes": MAX_BYTES,
                "schemes": ["http"],
            },
            write={"rows_per_write": 4},
            tokenize={"batch_rows": 4},
            ray={"prepare_batch_rows": 4},
        )
        job = validate_job(cfg)
        t0 = time.perf_counter()
        summary = run_job(job)
        wall = time.perf_counter() - t0
    return summary, wall, names, tmp_path / "out"


def check_and_record(summary, wall, names, out, bound_s, name, figures):
    state = final_state(out)
    ok, other = state["ok"], state["other"]
    by_vid = {i.split("-", 1)[1]: i for i in list(ok) + list(other)}
    outcomes = {}
    for n in names:
        key = n.split(".")[0]
        sid = by_vid.get(key)
        assert sid is not None, f"{n}: no recorded outcome"
        if n in UNRECOVERABLE:
            rec = other.get(sid)
            assert rec is not None, f"{n} should have failed"
            want = UNRECOVERABLE[n][1]
            assert rec["status"] == "failed" and rec["stage"] == "fetch" and want in rec["reason"], (n, rec)
            outcomes[f"{n} ({UNRECOVERABLE[n][0].kind})"] = f"failed at fetch: {rec['reason'][:90]}"
        else:
            assert sid in ok, f"{n} should be fetched: {other.get(sid)}"
    failed = len(other)
    figures.setdefault("network", []).append(
        {
            "name": name,
            "samples": len(names),
            "faulty": len(UNRECOVERABLE) + len(RECOVERABLE),
            "ok": len(ok),
            "failed": failed,
            "wall_s": wall,
            "bound_s": bound_s,
            "outcomes": {
                **outcomes,
                f"{len(RECOVERABLE)} recoverable ({', '.join(RECOVERABLE)})": "ok",
                f"{len(names) - len(UNRECOVERABLE) - len(RECOVERABLE)} clean": "ok",
            },
        }
    )
    assert failed == len(UNRECOVERABLE) and len(ok) == len(names) - len(UNRECOVERABLE)
    assert abs(failed / len(names) - 0.3) < 0.1, "the mix should be ~30 % unrecoverable"
    assert state["problems"] == [] and state["staging"] == []
    assert wall < bound_s, f"job took {wall:.1f}s, bound {bound_s}s"


def test_fault_mix_is_recorded_in_bounded_time(ray_local, shared_data, tmp_path, figures):
    # worst single sample: (retries + 1) deadlines + backoff; the bound adds generous Ray/decode/tokenize time
    summary, wall, names, out = run_network_job(shared_data, tmp_path, n_clean=18)
    check_and_record(summary, wall, names, out, bound_s=120.0, name="33 samples, 10 unrecoverable", figures=figures)
