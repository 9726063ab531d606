"""3D stage speed, per part, with the pipeline's own code: objects/s of render + voxels + features and of the whole
path (load, render, features, tokenize), per mesh and backend.

  python benchmarks/bench_3d.py --out benchmarks/results/3d.json            # make bench-3d
  python benchmarks/bench_3d.py --backends cuda --views-cuda 150             # GPU only (nvdiffrast)
  python benchmarks/bench_3d.py --backends cpu --views-cpu 16 --no-procedural --config tiny-c   # CPU only

What runs is what the prepare and tokenize stages run, not a copy:
- load: `pipeline.mesh.stage.load_isolated`, the prepare stage's call (trimesh in the worker's killable child, the
  MeshData pickled back), and `load_mesh` in this process beside it (`load_inproc`), so the child's cost shows;
- normalize / render / voxelize / features / to_host: `MeshStage.process(..., timings=...)`, the stage's own
  method, synchronising the device after each part (the pipeline does not sync);
- tokenize: the tokenize backend's 3D path (`pipeline.tokenizers.atoken.Model.pack` then `.encode`), one object
  at a time (`pack`, `encode`) and all objects of the run in one call (`tokenize_batch`, as an actor gets them).
Assets: every file of --mesh-dir (../shared/data/meshes: the mixed real meshes, bad ones included: they are
reported with their recorded failure) and procedural meshes (12 to 1.3 M triangles, exported to GLB). Setup
(renderer + CUDA context + nvdiffrast plugin; tokenizer load + compile) and the first call are timed apart.
Goal (issue 10): render + features >= 100 objects/s for every mesh under 100k triangles; >= 8 objects/s whole.
"""

import argparse
import json
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import trimesh

from pipeline.isolate import IsolateError, Isolator
from pipeline.mesh.config import MeshConfig
from pipeline.mesh.load import SUPPORTED_SUFFIXES, MeshError, load_mesh
from pipeline.mesh.procedural import colored_icosphere, textured_cube, vertex_colored_torus
from pipeline.mesh.render import cuda_available
from pipeline.mesh.stage import MeshStage, load_isolated

ROOT = Path(__file__).resolve().parents[1]
SHARED_MESHES = ROOT / ".." / "shared" / "data" / "meshes"
SOC = str(ROOT / "atoken" / "configs" / "atoken-soc.yaml")
GPU_PART = ("normalize", "render", "voxelize", "features", "to_host")  # what the mesh stage does after loading


def size_class(faces: int) -> str:
    return "small" if faces < 5_000 else "medium" if faces < 100_000 else "large"


def make_assets(tmp: Path, mesh_dir: Path, procedural: bool, names: list[str] | None) -> dict:
    paths = {}
    if procedural:
        meshes = {
            "proc/cube_tex": textured_cube(),
            "proc/torus_vc": vertex_colored_torus(48),
            "proc/sphere_20k": colored_icosphere(5),
            "proc/torus_100k": vertex_colored_torus(320),
            "proc/sphere_1.3M": colored_icosphere(8),
        }
        for name, m in meshes.items():
            p = tmp / (name.split("/")[1] + ".glb")
            trimesh.Scene(m).export(str(p))
            paths[name] = p
    if Path(mesh_dir).is_dir():
        for p in sorted(Path(mesh_dir).iterdir()):
            if p.suffix.lower() in SUPPORTED_SUFFIXES and (not names or p.name in names):
                paths[f"real/{p.name}"] = p
    return paths


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ms(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    sync()
    return out, 1e3 * (time.perf_counter() - t0)


def tokenizer_model(args):
    """The tokenize stage's backend (pipeline/tokenizers/atoken.py), as a tokenize actor builds it."""
    from pipeline.tokenize import TokenizeConfig
    from pipeline.tokenizers.atoken import Model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = args.config if args.config != "auto" else (SOC if device == "cuda" else "tiny-c")
    cfg = TokenizeConfig(config=config, batch_tokens=args.batch_tokens, compile=args.compile)
    model, setup_ms = ms(Model, cfg, device)
    return model, {"config": config, "device": device, "setup_ms": setup_ms, "batch_tokens": args.batch_tokens}


def bench_asset(stage: MeshStage, iso: Isolator, model, name: str, path: Path, repeats: int) -> dict:
    cfg = stage.cfg
    r = {"asset": name}
    loads, inproc = [], []
    try:
        for _ in range(repeats):
            mesh, t = ms(load_mesh, path, cfg.budget())
            inproc.append(t)
            mesh, t = ms(load_isolated, iso, path, cfg)  # the prepare stage's own call
            loads.append(t)
    except (MeshError, IsolateError) as exc:
        return {**r, "status": "failed", "reason": str(exc)}
    r["load_inproc_ms"], r["load_ms"] = statistics.median(inproc), statistics.median(loads)
    r.update(faces=mesh.num_faces, size=size_class(mesh.num_faces), mesh_pickle_mb=len(pickle.dumps(mesh, 5)) / 1e6)
    runs = []
    for i in range(repeats + 1):  # the first is a warm-up for this asset's shapes
        t = {}
        try:
            got = stage.process(path, name, mesh, timings=t)
        except MeshError as exc:
            return {**r, "status": "failed", "reason": str(exc)}
        if i:
            runs.append(t)
    for part in GPU_PART:
        r[f"{part}_ms"] = statistics.median(t[part] for t in runs)
    r["render_features_ms"] = statistics.median(sum(t[p] for p in GPU_PART) for t in runs)
    r["render_features_per_s"] = 1e3 / r["render_features_ms"]
    r.update(status="ok", num_voxels=got["num_voxels"], renderer=got["renderer"])
    row = {"id": name, "modality": "3d", **got}
    r["row_pickle_mb"] = len(pickle.dumps(row, 5)) / 1e6  # what goes through Ray's object store to the tokenizer
    if model is not None:
        packs, encs = [], []
        for _ in range(min(repeats, 3)):  # the encoder's time hardly varies; a big mesh takes a while
            packed, p_ms = ms(model.pack, row)
            _, e_ms = ms(model.encode, [packed])
            packs.append(p_ms)
            encs.append(e_ms)
        r["pack_ms"], r["encode_ms"] = statistics.median(packs), statistics.median(encs)
        r["end_to_end_ms"] = r["load_ms"] + r["render_features_ms"] + r["pack_ms"] + r["encode_ms"]
        r["_row"] = row
    return r


def run_backend(backend: str, args, paths: dict, model) -> tuple[dict, list]:
    raster, _, device = backend.partition("@")  # cpu@cuda: the torch rasterizer on the GPU
    views = args.views_cuda if (device or raster) == "cuda" else args.views_cpu
    repeats = args.repeats_cuda if (device or raster) == "cuda" else args.repeats_cpu
    cfg = MeshConfig(
        views=views,
        resolution=args.resolution,
        backend=raster,
        device=device or "auto",
        feature_mode=args.feature_mode,
    )
    stage, setup_ms = ms(MeshStage, cfg)
    iso = Isolator()
    first_ms = None
    for p in paths.values():  # the first call (kernels, allocator, plugin) on the first mesh that loads
        try:
            _, first_ms = ms(lambda: stage.process(p, "warm-up", load_isolated(iso, p, cfg)))
            break
        except (MeshError, IsolateError):
            continue
    info = {"backend": backend, "renderer": stage.describe(), "views": views, "setup_ms": setup_ms}
    info["first_call_ms"] = first_ms
    print(f"{backend}: {stage.describe()}, {views} views; setup {setup_ms:.0f} ms, first call {first_ms} ms")
    results = []
    for name, p in paths.items():
        faces = None
        try:
            faces = load_mesh(p, cfg.budget()).num_faces
        except MeshError:
            pass
        if raster == "cpu" and not device and faces and faces > args.cpu_max_faces:
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        r = bench_asset(stage, iso, model, name, p, repeats)
        r.update(backend=backend, views=views, resolution=args.resolution, feature_mode=args.feature_mode)
        if torch.cuda.is_available():
            r["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        results.append(r)
        print_row(r)
    iso.close()
    ok = [r for r in results if r["status"] == "ok"]
    if model is not None and ok:  # the tokenize actor's call: a batch of rows at once
        rows = [r.pop("_row") for r in ok]
        packed, p_ms = ms(lambda: [model.pack(x) for x in rows])
        _, e_ms = ms(model.encode, packed)
        info["tokenize_batch"] = {
            "objects": len(rows),
            "tokens": sum(x["num_voxels"] for x in rows),
            "pack_ms": p_ms,
            "encode_ms": e_ms,
            "objects_per_s": len(rows) / ((p_ms + e_ms) / 1e3),
        }
        print(f"{backend}: tokenize {len(rows)} objects in one call: pack {p_ms:.0f} ms, encode {e_ms:.0f} ms")
    for r in results:
        r.pop("_row", None)
    return info, results


def print_row(r: dict) -> None:
    if r["status"] != "ok":
        print(f"{r['backend']:8s} {r['asset']:34s} failed: {r['reason']}", flush=True)
        return
    parts = " ".join(f"{p} {r[f'{p}_ms']:6.1f}" for p in GPU_PART)
    tok = f" pack {r['pack_ms']:6.1f} encode {r['encode_ms']:7.1f}" if "pack_ms" in r else ""
    print(
        f"{r['backend']:8s} {r['asset']:34s} {r['faces']:>9,d} tris M={r['num_voxels']:6d} load {r['load_ms']:6.1f} "
        f"(in-process {r['load_inproc_ms']:6.1f}) {parts} = {r['render_features_ms']:6.1f} ms "
        f"({r['render_features_per_s']:6.1f} obj/s){tok}",
        flush=True,
    )


def table(infos: list, results: list) -> None:
    cols = ["load", *GPU_PART, "render_features", "pack", "encode", "end_to_end"]
    print("\n| backend | asset | triangles | voxels | " + " | ".join(f"{c} ms" for c in cols) + " | r+f obj/s |")
    print("|---|---|---:|---:|" + "---:|" * (len(cols) + 1))
    for r in results:
        if r["status"] != "ok":
            print(f"| {r['backend']} | {r['asset']} | failed: {r['reason']} |")
            continue
        vals = " | ".join(f"{r[f'{c}_ms']:.1f}" if f"{c}_ms" in r else "" for c in cols)
        print(
            f"| {r['backend']} | {r['asset']} | {r['faces']:,} | {r['num_voxels']} | {vals} | "
            f"{r['render_features_per_s']:.1f} |"
        )
    for info in infos:
        ok = [r for r in results if r["backend"] == info["backend"] and r["status"] == "ok"]
        if not ok:
            continue
        means = {p: statistics.mean(r[f"{p}_ms"] for r in ok) for p in ("load", *GPU_PART, "render_features")}
        slowest = min(ok, key=lambda r: r["render_features_per_s"])
        line = ", ".join(f"{p} {v:.1f}" for p, v in means.items())
        print(f"\n{info['backend']} ({info['renderer']}), mean ms per object over {len(ok)} meshes: {line}")
        print(
            f"  render + features: {1e3 / means['render_features']:.1f} objects/s on average; slowest "
            f"{slowest['asset']} {slowest['render_features_per_s']:.1f} objects/s"
        )
        if "pack_ms" in ok[0]:
            e2e = statistics.mean(r["end_to_end_ms"] for r in ok)
            print(f"  one worker, one object at a time, load + render + features + tokenize: {1e3 / e2e:.2f} obj/s")
        if "tokenize_batch" in info:
            tb = info["tokenize_batch"]
            print(f"  tokenize, {tb['objects']} objects in one call: {tb['objects_per_s']:.1f} objects/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/3d.json")
    ap.add_argument("--mesh-dir", default=str(SHARED_MESHES), help="real meshes to include (if present)")
    ap.add_argument("--meshes", default="", help="comma list of file names in --mesh-dir (default: all)")
    ap.add_argument("--no-procedural", action="store_true", help="leave out the procedural meshes")
    ap.add_argument(
        "--backends",
        default="auto",
        help="comma list of cuda, cpu, cpu@cuda (the torch rasterizer on the GPU); auto = cuda (if present) + cpu",
    )
    ap.add_argument("--views-cuda", type=int, default=150)
    ap.add_argument("--views-cpu", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--feature-mode", default="nearest", choices=["nearest", "visible_mean"])
    ap.add_argument("--repeats-cuda", type=int, default=10)
    ap.add_argument("--repeats-cpu", type=int, default=2)
    ap.add_argument("--cpu-max-faces", type=int, default=100_000, help="skip bigger assets on the CPU path")
    ap.add_argument("--config", default="auto", help="tokenizer config; auto = So/C on CUDA, tiny-c on CPU")
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--no-tokenize", action="store_true", help="time the mesh stage only")
    args = ap.parse_args()

    backends = args.backends.split(",") if args.backends != "auto" else (["cuda"] if cuda_available() else []) + ["cpu"]
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    model = None
    if not args.no_tokenize:
        model, env["tokenizer"] = tokenizer_model(args)
        print(
            f"tokenizer {env['tokenizer']['config']} on {env['tokenizer']['device']}: "
            f"{model.tokenizer.accel.describe()}"
        )
    infos, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        names = [n for n in args.meshes.split(",") if n]
        paths = make_assets(Path(tmp), Path(args.mesh_dir), not args.no_procedural, names)
        for backend in backends:
            info, res = run_backend(backend, args, paths, model)
            infos.append(info)
            results += res
    table(infos, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "args": vars(args), "backends": infos, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
