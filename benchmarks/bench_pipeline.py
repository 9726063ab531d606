"""Speed of light of the pipeline: for each workload, the standalone encoder (compiled, the attention kernel the
tokenizer picks) against the whole pipeline on the same inputs, on one GPU.

Workloads (real test files repeated as hard links; `--workloads` picks):
  video4096  16-frame clips at 8 fps, 512^2-area buckets: 4,096 tokens a clip (`../shared/data/videos`)
  video1024  the same at 256^2: 1,024 tokens a clip
  image256   the test images at 256^2: 256 tokens each (`../shared/data/images`)
  mesh       the test meshes (150 views, 64^3 voxel features): their own token counts (`../shared/data/meshes`)

Per workload it reports, from one run:
  - encoder tokens/s: the pipeline's own tokenizer stage code (`Tokenize` + backend, compiled) over prepared rows of
    the same inputs already on the GPU, packed as the stage packs them;
  - pipeline tokens/s: the job's steady state (between the 10th and 90th percentile rows to finish) x the mean
    tokens per row of the committed shards;
  - pipeline efficiency = pipeline / encoder tokens/s; GPU busy (nvidia-smi every 100 ms, same window);
  - each stage's capacity: its measured rate per worker x the workers it can have;
  - the tokenizer actor's host overhead: one actor call's ms per row (unpickle, pack, pinned copy + patchify, the
    encoder, host arrays, output pickle) against the encoder's own ms per row, on the same prepared rows.
Optionally (`--baseline-clips N`) a plain sequential loop on the first workload, and (`--decode-capacity N`) the
decode stage alone on N inputs, in this process. Videos: with the resize of clips that upscale deferred to the
tokenizer's device (the default) and done by the decoder: ms per clip per worker, frames/s, bytes per row through
the object store, the capacity on this machine's CPUs, and the deferred resize's own cost on the device. Images: in
the decode child and in-process, with the resize in the decoder and on the device (`--image-resize` picks the
job's): wall and CPU ms per row, bytes per row and the capacity on this machine's CPUs.
`--decode-only` runs just that (no Ray job, no encoder; CPU machines too).

  python benchmarks/bench_pipeline.py --out benchmarks/results/pipeline.json
  python benchmarks/bench_pipeline.py --workloads video4096 --samples 2000 --baseline-clips 100
  python benchmarks/bench_pipeline.py --workloads video4096,video1024 --decode-only --decode-capacity 40
  python benchmarks/bench_pipeline.py --workloads image256 --decode-only --decode-capacity 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job import JobConfig, validate_job  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VIDEOS = (
    "Big_Buck_Bunny_180_10s.webm",
    "bbb_480p_vp9_opus_1second.webm",
    "chaplin.mp4",
    "stub_mp4v.mp4",
    "max-heromode.mp4",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tiff", ".tif", ".webp", ".bmp", ".pgm")
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # videos | images | meshes: which input folder
    area: int  # bucket area (pixels)
    samples: int
    batch_rows: int  # rows per tokenizer call: about 16-64k tokens, so that forward passes are dense


WORKLOADS = {
    w.name: w
    for w in (
        Workload("video4096", "videos", 512 * 512, 2000, 16),
        Workload("video1024", "videos", 256 * 256, 3000, 32),
        Workload("image256", "images", 256 * 256, 12000, 128),
        Workload("mesh", "meshes", 256 * 256, 400, 16),
    )
}


class GpuSampler(threading.Thread):
    """Samples GPU utilisation (%) with nvidia-smi until stopped."""

    def __init__(self, period_ms: int = 100):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        self.period_ms = period_ms

    def run(self):
        if not shutil.which("nvidia-smi"):
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={self.period_ms}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in self.proc.stdout:
            try:
                self.samples.append((time.time(), float(line.split(",")[0])))
            except ValueError:
                pass

    def stop(self):
        if self.proc:
            self.proc.terminate()

    def busy(self, start: float, end: float, trim: float = 0.1) -> float | None:
        span = end - start
        vals = [u for t, u in self.samples if start + trim * span <= t <= end - trim * span]
        return sum(vals) / len(vals) / 100.0 if vals else None


def make_inputs(src: Path, names: list[str] | None, n: int, dest: Path, suffixes: tuple[str, ...] = ()) -> Path:
    """n inputs as hard links (or copies) of the real files (`names`, or every file with one of `suffixes`)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = (
        [src / f for f in names if (src / f).exists()]
        if names
        else sorted(f for f in src.iterdir() if f.suffix.lower() in suffixes)
    )
    if not files:
        raise SystemExit(f"no input files found in {src}")
    for i in range(n):
        f = files[i % len(files)]
        link = dest / f"in_{i:05d}{f.suffix}"
        if not link.exists():
            try:
                os.link(f, link)
            except OSError:
                shutil.copy(f, link)
    return dest


def job_for(w: "Workload", inputs: Path, out: Path, args) -> JobConfig:
    ray = {"prepare_batch_rows": args.prepare_batch_rows}
    if args.prepare_actors:
        ray["prepare_actors"] = args.prepare_actors
    # upscale: every clip fills its bucket (the workload's token count), as in the figures before the
    # no-upscaling default; at native sizes the small test videos give fewer tokens and are not comparable
    return validate_job(
        {
            "name": "bench",
            "out": str(out),
            "sources": [{"type": "folder", "path": str(inputs), "name": "bench"}],
            "decode": {
                "fps": args.fps,
                "max_frames": args.frames,
                "timeout_s": args.decode_timeout,
                "upscale": True,
                "buckets": {"area": w.area, "min_side": 128, "max_side": 1024},
                "image_resize": args.image_resize,
            },
            "mesh": {"views": args.views},
            "tokenize": {
                "config": args.config,
                "device": args.device,
                "batch_tokens": args.batch_tokens,
                "batch_rows": args.batch_rows or w.batch_rows,
                "actors_per_gpu": args.actors_per_gpu,
                "attention": args.attention,
                "compile": args.compile,
            },
            "write": {"rows_per_write": args.rows_per_write},
            "qa": {"samples": 0},
            "ray": ray,
        }
    )


def sequential_loop(job: JobConfig, inputs: Path, n: int) -> dict:
    """The baseline: one clip at a time, fetch+decode -> tokenize -> write + commit, in one process."""
    import torch

    from pipeline.prepare import Prepare
    from pipeline.run import identities, version_name
    from pipeline.sources import iter_rows, make_source
    from pipeline.storage import Storage
    from pipeline.store import Store
    from pipeline.tokenize import Tokenize
    from pipeline.writer import ShardWriter
    from schemas.tokens import TokenDims

    rows = list(iter_rows(make_source(job.sources[0])))[:n]
    from pipeline.decode import for_tokenizer

    decode = for_tokenizer(job.decode, gpu=torch.cuda.is_available())  # as the job decides it
    prepare = Prepare(job.fetch, decode, job.mesh, job.storage, batch_size=1)
    first = prepare([rows[0]])[0]  # loads the decoder before CUDA starts
    stage = Tokenize(job.tokenize, "loop", gpus=1.0 if torch.cuda.is_available() else 0.0)
    tok, pre = identities(job)
    store = Store(Storage(job.out).child(version_name(tok, pre)))
    store.init({"name": "loop", "buckets": 256}, tok, pre)
    store.recover("loop")
    writer = ShardWriter(store.uri, {}, "loop", TokenDims(**tok["dims"]), job.write)
    stage([first])  # warm-up (CUDA context, kernels)
    t0 = time.perf_counter()
    ok, buf = 0, []
    for r in rows:
        out = stage(prepare([r]))[0]
        ok += out["status"] == "ok"
        buf.append(out)
        if len(buf) >= job.write.rows_per_write:
            store.commit(writer.write(buf), "loop")
            buf = []
    if buf:
        store.commit(writer.write(buf), "loop")
    wall = time.perf_counter() - t0
    prepare.teardown()
    return {"clips": len(rows), "ok": ok, "wall_s": wall, "clips_per_s": len(rows) / wall}


def encoder_alone(job: JobConfig, w: Workload, n: int, repeats: int) -> dict:
    """The tokenizer stage's own model code on n prepared rows, its forward passes already on the GPU: tokens/s
    of encode alone."""
    import torch

    from pipeline.prepare import Prepare
    from pipeline.sources import iter_rows, make_source
    from pipeline.tokenize import Tokenize
    from pipeline.tokenizers.atoken import voxels_of

    from pipeline.decode import for_tokenizer

    rows = list(iter_rows(make_source(job.sources[0])))[:n]
    gpu = torch.cuda.is_available()
    prepare = Prepare(
        job.fetch,
        for_tokenizer(job.decode, gpu=gpu),  # as the job decides it
        job.mesh,
        job.storage,
        branch="3d" if w.kind == "meshes" else "media",
        gpus=0.1 if gpu and w.kind == "meshes" else 0.0,
        batch_size=8,
    )
    prepared = [r for i in range(0, len(rows), 8) for r in prepare(rows[i : i + 8]) if r["status"] == "ok"]
    prepare.teardown()
    stage = Tokenize(job.tokenize, "encoder-alone", gpus=1.0 if gpu else 0.0)
    t0 = time.perf_counter()
    stage.setup()
    setup_s = time.perf_counter() - t0
    tk, logvar = stage.model.tokenizer, job.tokenize.logvar
    if w.kind == "meshes":  # as the stage packs them: compact voxels, widened to tokens on the device
        packed = [voxels_of(r) for r in prepared]
        tokens = sum(len(p) for p in packed)

        def run():
            tk.encode_voxels(packed, with_logvar=logvar)
    else:  # the forward passes the stage makes, already on the device: the encoder's own ceiling
        # (pack: the stage's own checks, and pending resizes of clips that upscale, made on the device)
        packed = stage.model.resize_pending([stage.model.pack(r) for r in prepared])
        batches = [b for _, b in tk.clip_batches(packed)]
        del packed
        tokens = sum(len(b) for b in batches)

        def run():
            for b in batches:
                tk.encode_batch(b, logvar)  # host arrays out: synchronised

    n_rows = len(prepared)
    run()  # warm-up (kernels, allocator)
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    sec = (time.perf_counter() - t0) / repeats
    host = None if w.kind == "meshes" else tokenize_host_split(stage, prepared, job.tokenize.batch_rows, repeats)
    del prepared
    acc = stage.model.tokenizer.accel
    out = {
        "rows": n_rows,
        "tokens": tokens,
        "tokens_per_row": tokens / max(n_rows, 1),
        "s_per_pass": sec,
        "tokens_per_s": tokens / sec,
        "rows_per_s": n_rows / sec,
        "attention": acc.attention,
        "compiled": acc.compiled,
        "compile_s": acc.compile_s,
        "attention_timings_ms": acc.timings_ms,
        "setup_s": setup_s,
        "host_split": host,
    }
    if host:
        host["encoder_ms_per_row"] = sec / max(n_rows, 1) * 1e3
        host["host_ms_per_row"] = host["actor_ms_per_row"] - host["encoder_ms_per_row"]
    del run, stage
    if gpu:
        torch.cuda.empty_cache()
    return out


def tokenize_host_split(stage, prepared: list, batch_rows: int, repeats: int) -> dict:
    """What one tokenizer actor call costs per row beyond the encoder: the actor's own path (`StageActor`: the
    payload table unpickled, the stage, its output pickled into a table) on the prepared rows, in calls of
    `batch_rows`, timed in parts (ms per row; the device synchronised between parts): unpickle, pack (checks, and
    pending resizes on the device), clip batches (pinned copy to the device, patchify), encode_batch (forward +
    host arrays), the whole stage call, and the output pickle. Best of `repeats`."""
    import torch

    from pipeline.ray_job import from_table, to_table

    tk, lv = stage.model.tokenizer, stage.cfg.logvar
    sync = torch.cuda.synchronize if tk.device.type == "cuda" else (lambda: None)
    calls = [to_table(prepared[i : i + batch_rows]) for i in range(0, len(prepared), batch_rows)]
    parts = dict.fromkeys(("unpickle", "pack", "clip_batches", "encode_batch", "stage", "pickle", "actor"), 1e9)
    for _ in range(repeats + 1):  # the first pass warms up
        got = dict.fromkeys(parts, 0.0)
        for table in calls:
            sync()
            t0 = time.perf_counter()
            rows = from_table(table)
            t1 = time.perf_counter()
            packed = stage.model.resize_pending([stage.model.pack(r) for r in rows])
            sync()
            t2 = time.perf_counter()
            batches = list(tk.clip_batches(packed))
            sync()
            t3 = time.perf_counter()
            for _, b in batches:
                tk.encode_batch(b, lv)
            t4 = time.perf_counter()
            del packed, batches
            sync()
            t5 = time.perf_counter()
            out = stage(from_table(table))
            t6 = time.perf_counter()
            to_table(out)
            t7 = time.perf_counter()
            for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5, t7 - t6, t7 - t5)):
                got[k] += dt
        parts = {k: min(v, got[k]) for k, v in parts.items()}
    n = max(len(prepared), 1)
    return {f"{k}_ms_per_row": v / n * 1e3 for k, v in parts.items()} | {"rows_per_call": min(batch_rows, n)}


def decode_capacity(job: JobConfig, n: int, repeats: int = 3) -> dict:
    """The prepare (fetch + decode) stage alone on the first n inputs, one worker (this process, the job's
    isolation and batch size), with the resize of clips that upscale deferred to the tokenizer's device and
    without (the decoder scales them). The two settings alternate, `repeats` timed passes each after a warm-up;
    the best pass of each counts (a shared machine's noise only ever adds time)."""
    import pickle

    import torch

    from pipeline.buckets import resize_crop_frames
    from pipeline.decode import DecodeConfig
    from pipeline.prepare import Prepare
    from pipeline.sources import iter_rows, make_source

    rows = list(iter_rows(make_source(job.sources[0])))[:n]
    cpus = os.cpu_count() or 1
    gpus = 1 if torch.cuda.is_available() else 0
    tok_workers = job.tokenize.actors_per_gpu * gpus or job.tokenize.actors
    workers = max(1, int((cpus - tok_workers) / (job.ray.prepare_cpus or 1.0)))
    out = {"clips": len(rows), "cpus": cpus, "workers": workers}
    batch = job.ray.prepare_batch_rows
    settings = {"deferred": "on", "decoder": "off"}
    stages = {}
    for name, defer in settings.items():
        cfg = DecodeConfig.model_validate({**job.decode.model_dump(), "defer_upscale": defer})
        stages[name] = Prepare(job.fetch, cfg, job.mesh, job.storage, batch_size=batch)
        stages[name](rows[:1])  # warm-up: the decode child, the decoder's libraries
    best: dict[str, tuple[float, list]] = {}
    for _ in range(repeats):
        for name, prepare in stages.items():
            t0 = time.perf_counter()
            got = [r for i in range(0, len(rows), batch) for r in prepare(rows[i : i + batch])]
            wall = time.perf_counter() - t0
            if name not in best or wall < best[name][0]:
                best[name] = (wall, got)
    for prepare in stages.values():
        prepare.teardown()
    for name, (wall, got) in best.items():
        ok = [r for r in got if r["status"] == "ok"]
        up = [r["timings"]["decode"] for r in ok if r.get("upscaled")]
        up_bytes = [len(pickle.dumps(r, protocol=5)) for r in ok if r.get("upscaled")]
        per = wall / max(len(rows), 1)
        res = {
            "ok": len(ok),
            "upscaled_rows": len(up),
            "deferred_rows": sum(r.get("resize_to") is not None for r in ok),
            "ms_per_clip_per_worker": per * 1e3,
            "upscaled_ms_per_clip": sum(up) / len(up) * 1e3 if up else None,
            "frames_per_s_per_worker": sum(int(r["num_frames"]) for r in ok) / wall,
            "pixel_MB_per_row": sum(r["pixels"].nbytes for r in ok) / max(len(ok), 1) / 1e6,
            "payload_MB_per_row": sum(len(pickle.dumps(r, protocol=5)) for r in ok) / max(len(ok), 1) / 1e6,
            "upscaled_payload_MB_per_row": sum(up_bytes) / len(up_bytes) / 1e6 if up_bytes else None,
            "capacity_clips_per_s": workers / per,
        }
        todo = [r for r in ok if r.get("resize_to") is not None]
        if todo:  # what the tokenizer then spends per clip on the resize, on its device
            dev = "cuda" if gpus else "cpu"
            clips = [torch.from_numpy(r["pixels"]).to(dev) for r in todo]
            resize_crop_frames(clips[0], todo[0]["resize_to"])  # warm-up
            if gpus:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for c, r in zip(clips, todo):
                resize_crop_frames(c, r["resize_to"])
            if gpus:
                torch.cuda.synchronize()
            res["resize_device"] = dev
            res["resize_ms_per_clip"] = (time.perf_counter() - t0) * 1e3 / len(todo)
        out[name] = res
    d, c = out["deferred"], out["decoder"]
    out["speedup"] = c["ms_per_clip_per_worker"] / d["ms_per_clip_per_worker"]
    out["payload_ratio"] = c["payload_MB_per_row"] / max(d["payload_MB_per_row"], 1e-12)
    return out


def _child_cpu_s(prepare) -> float:
    """CPU seconds used so far by the prepare stage's decode child (0 when none runs: in-process decode)."""
    child = prepare.isolator.child if prepare.isolator else None
    if child is None or not child.alive():
        return 0.0
    try:
        with open(f"/proc/{child.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def image_decode_capacity(job: JobConfig, n: int, repeats: int = 3) -> dict:
    """The prepare (fetch + decode) stage alone on the first n images, one worker (this process), for: the job's
    isolation (decode child) and in-process decode (timeout 0: no child), each with the resize in the decoder and
    on the tokenizer's device (`decode.image_resize`). Per setting: wall and CPU ms per row (this process + the
    decode child: a shared machine's noise inflates wall time, CPU time much less), payload bytes per row, and the
    capacity on this machine's CPUs (workers / CPU ms per row). Settings alternate; the best pass of each counts."""
    import pickle

    import torch

    from pipeline.decode import DecodeConfig
    from pipeline.prepare import Prepare
    from pipeline.sources import iter_rows, make_source

    rows = list(iter_rows(make_source(job.sources[0])))[:n]
    cpus = os.cpu_count() or 1
    gpus = 1 if torch.cuda.is_available() else 0
    tok_workers = job.tokenize.actors_per_gpu * gpus or job.tokenize.actors
    workers = max(1, int((cpus - tok_workers) / (job.ray.prepare_cpus or 1.0)))
    batch = job.ray.prepare_batch_rows
    timeout = job.decode.timeout_s or 60.0
    settings = {
        f"{iso}/{where}": {"timeout_s": t, "image_resize": where}
        for iso, t in (("child", timeout), ("in-process", 0.0))
        for where in ("decoder", "device")
    }
    stages = {}
    for name, change in settings.items():
        cfg = DecodeConfig.model_validate({**job.decode.model_dump(), **change})
        stages[name] = Prepare(job.fetch, cfg, job.mesh, job.storage, batch_size=batch)
        stages[name](rows[:batch])  # warm-up: the decode child, the codecs, the ICC transforms
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, prepare in stages.items():
            c0, k0, t0 = time.process_time(), _child_cpu_s(prepare), time.perf_counter()
            got = [r for i in range(0, len(rows), batch) for r in prepare(rows[i : i + batch])]
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0 + _child_cpu_s(prepare) - k0
            old = best.get(name)
            best[name] = {"wall": min(wall, old["wall"]) if old else wall, "cpu": min(cpu, old["cpu"]) if old else cpu}
            best[name]["got"] = got
    for prepare in stages.values():
        prepare.teardown()
    out = {"rows": len(rows), "cpus": cpus, "workers": workers}
    for name, b in best.items():
        ok = [r for r in b["got"] if r["status"] == "ok"]
        cpu_ms = b["cpu"] / max(len(rows), 1) * 1e3
        out[name] = {
            "ok": len(ok),
            "deferred_rows": sum(r.get("resize_to") is not None for r in ok),
            "wall_ms_per_row": b["wall"] / max(len(rows), 1) * 1e3,
            "cpu_ms_per_row": cpu_ms,
            "payload_MB_per_row": sum(len(pickle.dumps(r, protocol=5)) for r in ok) / max(len(ok), 1) / 1e6,
            "capacity_rows_per_s": workers / cpu_ms * 1e3 if cpu_ms else None,
        }
    out["isolation_cpu_ms_per_row"] = (
        out["child/decoder"]["cpu_ms_per_row"] - out["in-process/decoder"]["cpu_ms_per_row"]
    )
    return out


def print_image_decode(name: str, r: dict) -> None:
    print(
        f"\nimage decode stage alone ({name}, {r['rows']} rows, 1 worker; capacity = {r['workers']} workers of "
        f"{r['cpus']} CPUs / CPU ms per row):"
    )
    print(f"{'setting':22s} {'wall ms/row':>11s} {'CPU ms/row':>10s} {'MB/row':>7s} {'capacity rows/s':>16s}  deferred")
    for k, v in r.items():
        if isinstance(v, dict):
            cap = "n/a" if v["capacity_rows_per_s"] is None else f"{v['capacity_rows_per_s']:.0f}"
            print(
                f"{k:22s} {v['wall_ms_per_row']:11.2f} {v['cpu_ms_per_row']:10.2f} {v['payload_MB_per_row']:7.3f} "
                f"{cap:>16s}  {v['deferred_rows']}/{v['ok']}"
            )
    print(f"isolation (decode child) costs {r['isolation_cpu_ms_per_row']:.2f} CPU ms per row")


def print_decode(name: str, r: dict) -> None:
    print(
        f"\ndecode stage alone ({name}, {r['clips']} clips, 1 worker; capacity x {r['workers']} workers of "
        f"{r['cpus']} CPUs):"
    )
    print(
        f"{'resize':10s} {'ms/clip':>8s} {'frames/s':>9s} {'MB/row':>7s} {'capacity clips/s':>17s} "
        f"{'upscaled: ms/clip':>18s} {'MB/row':>7s}  rows deferred"
    )
    for k in ("deferred", "decoder"):
        v = r[k]
        up = "n/a" if v["upscaled_ms_per_clip"] is None else f"{v['upscaled_ms_per_clip']:.1f}"
        up_mb = "n/a" if v["upscaled_payload_MB_per_row"] is None else f"{v['upscaled_payload_MB_per_row']:.2f}"
        extra = f"{v['deferred_rows']}/{v['ok']}"
        if v.get("resize_device"):
            extra += f"; tokenizer-side resize {v['resize_ms_per_clip']:.1f} ms/clip on {v['resize_device']}"
        print(
            f"{k:10s} {v['ms_per_clip_per_worker']:8.1f} {v['frames_per_s_per_worker']:9.1f} "
            f"{v['payload_MB_per_row']:7.2f} {v['capacity_clips_per_s']:17.1f} {up:>18s} {up_mb:>7s}  {extra}"
        )
    print(f"deferred: {r['speedup']:.2f}x the decode capacity, {r['payload_ratio']:.2f}x fewer bytes per row")


def shard_tokens(store_dir: str) -> tuple[int, int]:
    """(ok rows, tokens) committed in a store version, from the shards' coords lists."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    data = Path(store_dir) / "data"
    files = sorted(str(f) for f in data.rglob("*.parquet"))
    if not files:
        return 0, 0
    table = ds.dataset(files, format="parquet").to_table(columns=["coords"])
    return table.num_rows, int(pc.sum(pc.list_value_length(table.column("coords"))).as_py() or 0)


def capacities(summary, job: JobConfig, w: Workload) -> dict:
    """Per stage: rows/s per worker (its measured time per row) and x the workers it can have on this machine."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)) if ray.is_initialized() else os.cpu_count()
    gpus = 1 if shutil.which("nvidia-smi") else 0
    tok_workers = job.tokenize.actors_per_gpu * gpus if gpus else job.tokenize.actors
    workers = {"tokenize": tok_workers, "write": None}
    prep = "mesh" if w.kind == "meshes" else "decode"
    workers[prep] = max(1, int((cpus - tok_workers) / (job.ray.prepare_cpus or 1.0)))
    out = {}
    for k, s in summary.stage_s.items():
        per = s / max(summary.stage_n[k], 1)
        n = workers.get(k)
        out[k] = {
            "rows": summary.stage_n[k],
            "s_per_row_per_worker": per,
            "workers": n,
            "rows_per_s_capacity": (n / per) if n and per else None,
        }
    return out


def run_workload(w: Workload, args, sampler: "GpuSampler") -> dict:
    from pipeline.run import run_job

    src = Path(getattr(args, w.kind))
    names = list(VIDEOS) if w.kind == "videos" else None
    suffixes = {"images": IMAGE_SUFFIXES, "meshes": MESH_SUFFIXES}.get(w.kind, ())
    n = args.samples or w.samples
    work = Path(args.work) / w.name
    shutil.rmtree(work / "out", ignore_errors=True)
    inputs = make_inputs(src, names, n, work / "inputs", suffixes)
    job = job_for(w, inputs, work / "out", args)
    decode = None
    if args.decode_capacity and w.kind == "videos":
        decode = decode_capacity(job, args.decode_capacity)
        print_decode(w.name, decode)
    elif args.decode_capacity and w.kind == "images":
        decode = image_decode_capacity(job, args.decode_capacity)
        print_image_decode(w.name, decode)
    if args.decode_only:
        return {"workload": w.name, "inputs": n, "decode_capacity": decode, "job": job.model_dump(mode="json")}
    t0 = time.time()
    summary = run_job(job)
    t1 = time.time()
    print(summary.render())
    steady, s0, s1 = summary.steady_rate() or (summary.todo / summary.wall_s, t0, t1)
    rows, tokens = shard_tokens(summary.store_dir)
    per_row = tokens / max(rows, 1)
    pipe = {
        "rows": summary.todo,
        "ok": summary.counts.get("ok", 0),
        "wall_s": summary.wall_s,
        "rows_per_s": summary.todo / summary.wall_s,
        "steady_rows_per_s": steady,
        "tokens_per_row": per_row,
        "steady_tokens_per_s": steady * per_row,
        "gpu_busy": sampler.busy(s0, s1, trim=0.0),
        "gpu_busy_whole_run": sampler.busy(t0, t1, trim=0.0),
        "commits": summary.commits,
        "written_MB": sum(s["bytes"] for s in summary.shards) / 1e6,
        "stages": capacities(summary, job, w),
    }
    import ray

    ray.shutdown()
    enc = encoder_alone(job, w, args.encoder_rows, args.encoder_repeats)
    return {
        "workload": w.name,
        "inputs": n,
        "pipeline": pipe,
        "encoder": enc,
        "efficiency": pipe["steady_tokens_per_s"] / enc["tokens_per_s"] if enc["tokens_per_s"] else None,
        "decode_capacity": decode,
        "job": job.model_dump(mode="json"),
    }


def print_table(results: list[dict]) -> None:
    print(
        f"\n{'workload':10s} {'tok/row':>8s} {'encoder tok/s':>14s} {'pipeline tok/s':>15s} {'efficiency':>10s} "
        f"{'rows/s':>8s} {'GPU busy':>8s}  stage capacity (rows/s)"
    )
    for r in results:
        p, e = r["pipeline"], r["encoder"]
        busy = "n/a" if p["gpu_busy"] is None else f"{p['gpu_busy'] * 100:.0f} %"
        caps = ", ".join(
            f"{k} {v['rows_per_s_capacity']:.0f}" for k, v in p["stages"].items() if v["rows_per_s_capacity"]
        )
        print(
            f"{r['workload']:10s} {p['tokens_per_row']:8.0f} {e['tokens_per_s']:14,.0f} "
            f"{p['steady_tokens_per_s']:15,.0f} {r['efficiency']:10.1%} {p['steady_rows_per_s']:8.1f} {busy:>8s}  "
            f"{caps}"
        )
    split = [(r["workload"], r["encoder"].get("host_split")) for r in results if r["encoder"].get("host_split")]
    if split:
        print(
            f"\n{'tokenize actor, ms/row':22s} {'actor call':>10s} {'encoder':>8s} {'host':>8s} {'unpickle':>9s} "
            f"{'pack':>8s} {'to device':>9s} {'pickle':>8s}"
        )
        for name, h in split:
            print(
                f"{name:22s} {h['actor_ms_per_row']:10.3f} {h['encoder_ms_per_row']:8.3f} {h['host_ms_per_row']:8.3f} "
                f"{h['unpickle_ms_per_row']:9.3f} {h['pack_ms_per_row']:8.3f} {h['clip_batches_ms_per_row']:9.3f} "
                f"{h['pickle_ms_per_row']:8.3f}"
            )
    if results:
        e = results[0]["encoder"]
        print(
            f"encoder: attention {e['attention']}, compiled={e['compiled']}"
            + (f" (compile {e['compile_s']:.1f} s per process)" if e["compile_s"] else "")
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--samples", type=int, default=None, help="inputs per workload (default: per workload)")
    p.add_argument("--videos", default=str(DATA / "videos"))
    p.add_argument("--images", default=str(DATA / "images"))
    p.add_argument("--meshes", default=str(DATA / "meshes"))
    p.add_argument("--baseline-clips", type=int, default=0, help="also run the sequential loop on N inputs")
    p.add_argument("--encoder-rows", type=int, default=64, help="prepared rows the standalone encoder runs over")
    p.add_argument("--encoder-repeats", type=int, default=5)
    p.add_argument("--config", default="atoken/configs/atoken-soc.yaml")
    p.add_argument("--device", default="auto")
    p.add_argument("--attention", default="auto")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--views", type=int, default=150)
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--batch-rows", type=int, default=None, help="rows per tokenizer call (default: per workload)")
    p.add_argument("--actors-per-gpu", type=int, default=2)
    p.add_argument("--prepare-actors", type=int, default=None, help="fetch+decode actors (default: autoscaled)")
    p.add_argument("--rows-per-write", type=int, default=128)
    p.add_argument("--prepare-batch-rows", type=int, default=8)
    p.add_argument(
        "--decode-timeout",
        type=float,
        default=120.0,
        help="per-clip wall-clock limit; 0 decodes in the Ray worker itself (no forked child)",
    )
    p.add_argument(
        "--decode-capacity", type=int, default=0, help="video and image workloads: time decode alone on N inputs"
    )
    p.add_argument(
        "--image-resize",
        default="decoder",
        choices=["decoder", "device"],
        help="decode.image_resize: images that downscale resized by the decoder (CPU) or on the tokenizer's device",
    )
    p.add_argument("--decode-only", action="store_true", help="only the decode measurement (no job, no encoder)")
    p.add_argument("--work", default="/tmp/bench-pipeline")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("PIPELINE_PROGRESS", "0")
    names = [x for x in args.workloads.split(",") if x]
    if bad := [x for x in names if x not in WORKLOADS]:
        p.error(f"unknown workloads {bad}; choose from {', '.join(WORKLOADS)}")

    import torch

    machine = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    result = {"machine": machine, "settings": vars(args), "workloads": []}
    sampler = GpuSampler()
    sampler.start()
    for name in names:
        result["workloads"].append(run_workload(WORKLOADS[name], args, sampler))
        write_json(args.out, result)  # kept as each workload finishes
    sampler.stop()
    if ran := [r for r in result["workloads"] if "pipeline" in r]:
        print_table(ran)
    if args.baseline_clips > 0 and not args.decode_only:
        w = WORKLOADS[names[0]]
        work = Path(args.work) / w.name
        shutil.rmtree(work / "loop", ignore_errors=True)
        loop_job = job_for(w, work / "inputs", work / "loop", args)
        loop_job.decode.timeout_s = 0  # a plain loop: decode in-process, no isolation
        loop = sequential_loop(loop_job, work / "inputs", args.baseline_clips)
        steady = result["workloads"][0]["pipeline"]["steady_rows_per_s"]
        result["sequential_loop"] = loop | {"steady_speedup": steady / loop["clips_per_s"]}
        print(
            f"sequential loop ({w.name}): {loop['clips_per_s']:.2f} rows/s; the pipeline's steady state is "
            f"{steady / loop['clips_per_s']:.1f}x that"
        )
    write_json(args.out, result)
    return 0


def write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
