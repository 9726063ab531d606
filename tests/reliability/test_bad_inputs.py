"""Bad inputs: every file in shared/data/bad plus >= 200 generated cases (truncations and bit flips of the real
images, videos and meshes, zero-byte files, wrong extensions, headers claiming huge sizes, a decompression bomb).

Each case ends recorded: failed or skipped with a readable reason, or ok where the decoder legitimately recovers
(listed in the report). No worker crashes: Ray restarts a dead prepare or tokenize actor and retries its batch
without a trace in the outcomes (`ray.max_task_retries` is not applied to the pools), so the Ray jobs count actor
restarts from the GCS actor table and require none. The good samples in the same batch are kept.
"""

from __future__ import annotations

import collections
import random
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from pipeline.job import validate_job
from pipeline.prepare import Prepare
from pipeline.run import run_job
from pipeline.sources import iter_rows, make_source, source_config
from pipeline.tokenize import Tokenize
from tests.reliability.conftest import final_state, job_dict, outcomes_by_key

# ---- generated cases -------------------------------------------------------------------------------------------

IMAGES = [
    "Channel_digital_image_CMYK_color.jpg",
    "Landscape_6.jpg",
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "hopper_16bit.pgm",
    "hopper_gray.jpg",
    "hubble_deep_field.jpg",
    "logo.png",
    "portrait-orientation-6.jpg",
    "prairie_falcon.jpg",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
    "tiff_16bit_RGB.tiff",
]
VIDEOS = [
    "bbb_480p_vp9_opus_1second.webm",
    "stub_mjpeg.avi",
    "stub_mp4v.mp4",
    "video_90.mov",
    "video_270.mov",
    "Big_Buck_Bunny_180_10s.webm",
    "chaplin.mp4",
]
MESHES = [
    "Box.glb",
    "BoxVertexColors.glb",
    "BoxTextured.glb",
    "alien.glb",
    "cakeBirthday.glb",
    "cubevc.glb",
    "nested.glb",
    "no_indices_3storybuilding.glb",
    "fuze.obj",
    "joined_tetrahedra.obj",
    "nancolor.obj",
    "wallhole.obj",
    "soup.stl",
]
MUTATIONS = ("trunc10", "trunc50", "trunc90", "flipbody", "fliphead")


def mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    if kind.startswith("trunc"):
        return data[: len(data) * int(kind[5:]) // 100]
    buf = bytearray(data)
    lo, hi = (64, len(buf)) if kind == "flipbody" else (4, min(64, len(buf)))
    for _ in range(8 if kind == "flipbody" else 3):
        if hi > lo:
            buf[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_claiming(w: int, h: int, rows: int = 1) -> bytes:
    """A PNG whose header claims w x h (grayscale) but that holds only `rows` zero rows of data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\0" * (rows * (w + 1)))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def png_bomb(side: int = 20000) -> bytes:
    """A complete, valid PNG of side x side zeros: ~400 MB of pixels in a few hundred kB."""
    comp, row = zlib.compressobj(9), b"\0" * (side + 1)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def gif_claiming(w: int, h: int) -> bytes:
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", w, h, 0, 0, 0)
        + b",\0\0\0\0"
        + struct.pack("<HH", w, h)
        + b"\0\x02\x02D\x01\0;"
    )


def bmp_claiming(w: int, h: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54 + 16, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 16, 2835, 2835, 0, 0)
    return header + info + b"\0" * 16


def jpeg_claiming(real_jpeg: bytes, w: int, h: int) -> bytes:
    """A real JPEG with its SOF0/SOF2 frame header rewritten to claim w x h."""
    buf = bytearray(real_jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = buf.find(marker)
        if i > 0:
            buf[i + 5 : i + 9] = struct.pack(">HH", h, w)
            return bytes(buf)
    raise ValueError("no SOF marker")


def make_cases(shared: Path, dest: Path, seed: int = 0) -> list[str]:
    """Writes every generated case into `dest` (flat); returns the file names."""
    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    names = []

    def put(name: str, data: bytes) -> None:
        (dest / name).write_bytes(data)
        names.append(name)

    for sub, files in (("images", IMAGES), ("videos", VIDEOS), ("meshes", MESHES)):
        for f in files:
            data = (shared / sub / f).read_bytes()
            stem, ext = Path(f).stem, Path(f).suffix
            for kind in MUTATIONS:
                put(f"{stem}__{kind}{ext}", mutate(data, kind, rng))
    for ext in (".jpg", ".png", ".mp4", ".webm", ".glb", ".obj", ".ply", ".stl"):
        put(f"zero__bytes{ext}", b"")
    wrong = {
        "astronaut.png": ".mp4",
        "chaplin.mp4": ".jpg",
        "Box.glb": ".png",
        "rocket.jpg": ".glb",
        "fuze.obj": ".jpg",
        "bbb_480p_vp9_opus_1second.webm": ".ply",
        "soup.stl": ".webm",
    }
    for f, ext in wrong.items():
        sub = "images" if f in IMAGES else "videos" if f in VIDEOS else "meshes"
        put(f"{Path(f).stem}__wrongext{ext}", (shared / sub / f).read_bytes())
    put("huge__png_header_100000x100000.png", png_claiming(100000, 100000))
    put("huge__png_header_30000x30000.png", png_claiming(30000, 30000))
    put("huge__png_bomb_20000x20000.png", png_bomb(20000))
    put("huge__gif_65535x65535.gif", gif_claiming(65535, 65535))
    put("huge__bmp_50000x50000.bmp", bmp_claiming(50000, 50000))
    put("huge__jpeg_65000x65000.jpg", jpeg_claiming((shared / "images" / "rocket.jpg").read_bytes(), 65000, 65000))
    return names


def copy_bad_dir(shared: Path, dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for p in sorted((shared / "bad").iterdir()):
        shutil.copy(p, dest / f"bad__{p.name}")
        names.append(f"bad__{p.name}")
    return names


# ---- running them ----------------------------------------------------------------------------------------------
GOOD = {
    "images": ["camera.png", "rocket.jpg", "hopper_16bit.pgm"],
    "videos": ["video_90.mov"],
    "meshes": ["BoxVertexColors.glb"],
}


def add_good(shared: Path, dest: Path) -> list[str]:
    names = []
    for sub, files in GOOD.items():
        for f in files:
            shutil.copy(shared / sub / f, dest / f"good__{f}")
            names.append(f"good__{f}")
    return names


def reason_key(stage: str, reason: str) -> str:
    """A histogram bucket: numbers, paths and quoted names folded away."""
    r = re.sub(r"'[^']*'|\"[^\"]*\"|/\S+", "…", reason or "")
    r = re.sub(r"^\S+?\.(png|jpg|jpeg|mov|mp4|webm|glb|obj|stl|ply|avi|gif|bmp|pgm|tiff): ", "", r)
    return f"{stage}: " + re.sub(r"\d+", "N", r)[:70]


def summarise(name: str, outcomes: dict[str, dict], generated: list[str], crashes: int) -> dict:
    cases = [n for n in outcomes if not n.startswith("good__")]
    failed = [n for n in cases if outcomes[n]["status"] != "ok"]
    recovered = sorted(n for n in cases if outcomes[n]["status"] == "ok")
    reasons = collections.Counter(reason_key(outcomes[n]["stage"], outcomes[n]["reason"]) for n in failed)
    good = [n for n in outcomes if n.startswith("good__")]
    return {
        "name": name,
        "cases": len(cases),
        "generated": len(generated),
        "failed": len(failed),
        "recovered": len(recovered),
        "recovered_cases": recovered,
        "worker_crashes": crashes,
        "good_kept": f"{sum(outcomes[n]['status'] == 'ok' for n in good)}/{len(good)}",
        "reasons": dict(reasons.most_common(25)),
    }


def check(outcomes: dict[str, dict], names: list[str]) -> None:
    assert set(outcomes) == set(names), f"unrecorded cases: {sorted(set(names) - set(outcomes))}"
    for n, o in outcomes.items():
        assert o["status"] in ("ok", "failed", "skipped"), (n, o)
        if o["status"] != "ok":
            assert o["reason"] and o["stage"], f"{n} has no reason: {o}"
        if n.startswith(("huge__", "zero__")):
            assert o["status"] != "ok", f"{n} must be refused: {o}"
        if n.startswith("good__"):
            assert o["status"] == "ok", f"good sample lost: {n}: {o}"
    for n in (n for n in names if n.startswith("zero__")):
        assert "empty file" in outcomes[n]["reason"]
    for n in (n for n in names if n.startswith("huge__")):  # refused from the header, never allocated
        assert re.search(r"too large|decompression bomb|exceeds", outcomes[n]["reason"]), (n, outcomes[n])


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    generated = make_cases(shared_data, root / "all")
    bad = copy_bad_dir(shared_data, root / "all")
    good = add_good(shared_data, root / "all")
    assert len(generated) >= 200 and len(bad) == len(list((shared_data / "bad").iterdir()))
    return root / "all", generated, bad, good


def test_all_cases_through_the_stage_functions(corpus, tmp_path, monkeypatch, figures):
    """Every case through source -> prepare (fetch + decode | mesh) -> tokenize as plain stage calls, in batches
    as the Ray workers get them."""
    folder, generated, bad, good = corpus
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / "scratch"))
    job = validate_job(job_dict(tmp_path / "out", [{"type": "folder", "path": str(folder)}]))
    prepare = Prepare(job.fetch, job.decode, job.mesh, job.storage, branch="media")
    tokenize = Tokenize(job.tokenize, "reliability")
    rows, raised = list(iter_rows(make_source(source_config({"type": "folder", "path": str(folder)})))), []
    out = []
    try:
        for i in range(0, len(rows), 8):
            batch = rows[i : i + 8]
            try:
                batch = tokenize(prepare(batch))
            except BaseException as exc:  # a stage must never raise: this is what would take a worker down
                raised.append(f"{[r['id'] for r in batch]}: {exc!r}")
                continue
            out += batch
    finally:
        prepare.teardown()
    outcomes = {
        r["id"].split("-", 1)[1]: {"status": r["status"], "stage": r["stage"], "reason": r.get("reason")} for r in out
    }
    figures.setdefault("bad_inputs", []).append(
        summarise("all cases, stage functions", outcomes, generated, crashes=len(raised))
    )
    assert raised == []
    check(outcomes, generated + bad + good)


def actor_restarts(ray) -> int:
    """Restarts of every actor in the cluster so far (a dead prepare/tokenize worker is restarted by Ray)."""
    from ray._private.state import state

    return sum(int(a.get("NumRestarts") or 0) for a in state.actor_table(None).values())


def run_ray_job(ray, folder: Path, out: Path) -> tuple[dict[str, dict], int]:
    cfg = job_dict(
        out,
        [{"type": "folder", "path": str(folder)}],
        write={"rows_per_write": 8},
        tokenize={"batch_rows": 8},
        ray={"num_cpus": 2, "prepare_batch_rows": 8},
    )
    before = actor_restarts(ray)
    run_job(validate_job(cfg))
    crashes = actor_restarts(ray) - before
    state = final_state(out)
    assert state["problems"] == [] and state["staging"] == []
    return outcomes_by_key(out), crashes


def test_subset_through_a_ray_job(ray_local, corpus, tmp_path, figures):
    folder, generated, bad, good = corpus
    subset = bad + generated[::10] + [n for n in generated if n.startswith("huge__")] + good
    sub = tmp_path / "in"
    sub.mkdir()
    for n in set(subset):
        shutil.copy(folder / n, sub / n)
    outcomes, crashes = run_ray_job(ray_local, sub, tmp_path / "out")
    figures.setdefault("bad_inputs", []).append(
        summarise("bad/ + every 10th generated case + huge headers, Ray job", outcomes, generated[::10], crashes)
    )
    assert crashes == 0, f"{crashes} worker (actor) restarts"
    check(outcomes, sorted(set(subset)))


@pytest.mark.slow
def test_all_cases_through_a_ray_job(ray_local, corpus, tmp_path, figures):
    folder, generated, bad, good = corpus
    outcomes, crashes = run_ray_job(ray_local, folder, tmp_path / "out")
    figures.setdefault("bad_inputs", []).append(summarise("all cases, Ray job", outcomes, generated, crashes))
    assert crashes == 0, f"{crashes} worker (actor) restarts"
    check(outcomes, generated + bad + good)
