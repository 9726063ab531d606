"""Pipeline throughput: a video job over real test videos repeated to a few thousand clips, against a plain
sequential loop (decode -> tokenize -> write) doing the same work.

Reports clips/s of both, the speed-up, per-stage throughput, and the GPU-busy fraction in steady state
(`nvidia-smi` utilisation sampled every 100 ms between the arrivals of the 10th and 90th percentile clips,
so Ray start-up, model loading and the tail are excluded; whole-run figures are reported too).

  python benchmarks/bench_pipeline.py --videos ../shared/data/videos --clips 2000 --out benchmarks/results/pipeline.json
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job import JobConfig, validate_job  # noqa: E402

DEFAULT_VIDEOS = ("Big_Buck_Bunny_180_10s.webm", "bbb_480p_vp9_opus_1second.webm", "chaplin.mp4", "stub_mp4v.mp4",
                  "max-heromode.mp4")


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
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      f"-lms={self.period_ms}"], stdout=subprocess.PIPE, text=True)
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


def make_inputs(src: Path, names: list[str], n: int, dest: Path) -> Path:
    """n clips as hard links (or copies) of the real videos under distinct names."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [src / f for f in names if (src / f).exists()]
    if not files:
        raise SystemExit(f"no test videos found in {src}")
    for i in range(n):
        f = files[i % len(files)]
        link = dest / f"clip_{i:05d}{f.suffix}"
        if not link.exists():
            try:
                os.link(f, link)
            except OSError:
                shutil.copy(f, link)
    return dest


def job_for(inputs: Path, out: Path, args) -> JobConfig:
    ray = {"prepare_batch_rows": args.prepare_batch_rows}
    if args.prepare_actors:
        ray["prepare_actors"] = args.prepare_actors
    return validate_job({
        "name": "bench", "out": str(out), "sources": [{"type": "folder", "path": str(inputs), "name": "bench"}],
        # upscale: every clip fills its bucket (4096 tokens at the defaults), as in the figures before the
        # no-upscaling default; at native sizes the small test videos give fewer tokens and are not comparable
        "decode": {"fps": args.fps, "max_frames": args.frames, "timeout_s": args.decode_timeout, "upscale": True,
                   "buckets": {"area": args.area, "min_side": 128, "max_side": 1024}},
        "tokenize": {"config": args.config, "device": args.device, "batch_tokens": args.batch_tokens,
                     "batch_rows": args.batch_rows, "actors_per_gpu": args.actors_per_gpu},
        "write": {"rows_per_write": args.rows_per_write}, "qa": {"samples": 0}, "ray": ray})


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
    prepare = Prepare(job.fetch, job.decode, job.mesh, job.storage, batch_size=1)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"))
    p.add_argument("--names", default=",".join(DEFAULT_VIDEOS))
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--baseline-clips", type=int, default=100)
    p.add_argument("--config", default="atoken/configs/atoken-soc.yaml")
    p.add_argument("--device", default="auto")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--area", type=int, default=512 * 512, help="pixel area of the resolution buckets")
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--batch-rows", type=int, default=16)
    p.add_argument("--actors-per-gpu", type=int, default=2)
    p.add_argument("--prepare-actors", type=int, default=None, help="fetch+decode actors (default: autoscaled)")
    p.add_argument("--rows-per-write", type=int, default=128)
    p.add_argument("--prepare-batch-rows", type=int, default=8)
    p.add_argument("--decode-timeout", type=float, default=120.0,
                   help="per-clip wall-clock limit; 0 decodes in the Ray worker itself (no forked child)")
    p.add_argument("--work", default="/tmp/bench-pipeline")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("PIPELINE_PROGRESS", "0")

    work = Path(args.work)
    shutil.rmtree(work / "out", ignore_errors=True)
    shutil.rmtree(work / "loop", ignore_errors=True)
    inputs = make_inputs(Path(args.videos), args.names.split(","), args.clips, work / "clips")
    job = job_for(inputs, work / "out", args)

    from pipeline.run import run_job
    sampler = GpuSampler()
    sampler.start()
    t0 = time.time()
    summary = run_job(job)
    t1 = time.time()
    sampler.stop()
    print(summary.render())
    print(summary.ray_stats)
    steady, s0, s1 = summary.steady_rate() or (summary.todo / summary.wall_s, t0, t1)
    pipe = {"clips": summary.todo, "ok": summary.counts.get("ok", 0), "wall_s": summary.wall_s,
            "clips_per_s": summary.todo / summary.wall_s, "gpu_busy_whole_run": sampler.busy(t0, t1, trim=0.0),
            "commits": summary.commits, "commit_ms": 1e3 * summary.commit_s / max(summary.commits, 1),
            "written_MB": sum(s["bytes"] for s in summary.shards) / 1e6,
            "steady_clips_per_s": steady, "gpu_busy": sampler.busy(s0, s1, trim=0.0),
            "stages": {k: {"samples": summary.stage_n[k], "s_per_sample_per_worker": summary.stage_s[k] /
                           max(summary.stage_n[k], 1)} for k in summary.stage_s}}

    import ray
    ray.shutdown()
    write_json(args.out, {"pipeline": pipe})  # kept even if the baseline fails
    if args.baseline_clips <= 0:
        return 0
    loop_job = job_for(inputs, work / "loop", args)
    loop_job.decode.timeout_s = 0  # a plain loop: decode in-process, no isolation
    loop = sequential_loop(loop_job, inputs, args.baseline_clips)

    import torch
    result = {"machine": {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                          "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
              "settings": vars(args), "pipeline": pipe, "sequential_loop": loop,
              "speedup": pipe["clips_per_s"] / loop["clips_per_s"],
              "steady_speedup": pipe["steady_clips_per_s"] / loop["clips_per_s"]}
    print(f"\n{'':24s}{'clips':>8s}{'wall s':>10s}{'clips/s':>10s}")
    print(f"{'ray data pipeline':24s}{pipe['clips']:8d}{pipe['wall_s']:10.1f}{pipe['clips_per_s']:10.2f}")
    print(f"{'sequential loop':24s}{loop['clips']:8d}{loop['wall_s']:10.1f}{loop['clips_per_s']:10.2f}")
    busy = pipe["gpu_busy"]
    print(f"speed-up {result['speedup']:.1f}x (whole run, startup included); steady state "
          f"{pipe['steady_clips_per_s']:.2f} clips/s = {result['steady_speedup']:.1f}x the loop; GPU busy in steady "
          f"state {'n/a' if busy is None else f'{busy * 100:.0f} %'}")
    for k, v in pipe["stages"].items():
        print(f"  {k:9s} {1 / max(v['s_per_sample_per_worker'], 1e-9):8.1f} clips/s per worker")
    write_json(args.out, result)
    return 0


def write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
