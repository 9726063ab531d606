"""3D stage throughput: objects/s for render + voxelise + features, by asset size and backend.

  python benchmarks/bench_3d.py --out benchmarks/results/3d.json            # make bench-3d
  python benchmarks/bench_3d.py --backends cuda --views-cuda 150             # GPU only (nvdiffrast)

Assets: procedural meshes (small / medium / large triangle counts, exported to GLB and loaded back) and the real
meshes in ../shared/data/meshes when present. Loading (trimesh, CPU) is timed separately from the GPU-able part
(render all views in one batch + 64^3 voxelisation + 768-d features), because in the pipeline loading runs in CPU
workers and overlaps the GPU work. The goal on one H100: >= 20 objects/s at 150 views, 256 px.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import trimesh

from atoken.voxelize import occupied_voxels, voxel_features
from pipeline.mesh.cameras import sphere_cameras
from pipeline.mesh.load import load_mesh
from pipeline.mesh.normalize import normalize
from pipeline.mesh.procedural import colored_icosphere, textured_cube, vertex_colored_torus
from pipeline.mesh.render import RenderConfig, Renderer, cuda_available

ROOT = Path(__file__).resolve().parents[1]
SHARED_MESHES = ROOT / ".." / "shared" / "data" / "meshes"
REAL = ["BoxTextured.glb", "cubevc.glb", "spot.obj", "fuze.obj", "ShapeCollection.glb", "cycloidal.ply"]


def size_class(faces: int) -> str:
    return "small" if faces < 5_000 else "medium" if faces < 100_000 else "large"


def make_assets(tmp: Path, mesh_dir: Path = SHARED_MESHES) -> dict:
    meshes = {
        "proc/cube_tex": textured_cube(),
        "proc/torus_vc": vertex_colored_torus(48),
        "proc/sphere_20k": colored_icosphere(5),
        "proc/torus_100k": vertex_colored_torus(320),
        "proc/sphere_1.3M": colored_icosphere(8),
    }
    paths = {}
    for name, m in meshes.items():
        p = tmp / (name.split("/")[1] + ".glb")
        trimesh.Scene(m).export(str(p))
        paths[name] = p
    for f in REAL:
        if (Path(mesh_dir) / f).exists():
            paths[f"real/{f}"] = Path(mesh_dir) / f
    return paths


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(renderer: Renderer, mesh, views: int, mode: str, repeats: int) -> dict:
    dev = renderer.device

    def run(i):
        cams = sphere_cameras(views, f"bench-{i}")
        out = renderer.render(mesh, cams)
        coords = occupied_voxels(out.depth, out.mask, cams.w2c, cams.intrinsics)
        feats = voxel_features(out.rgb, coords, cams.w2c, cams.intrinsics, mode=mode, depth=out.depth, mask=out.mask)
        feats = feats.to(torch.float16).cpu()  # the stage hands numpy arrays on
        return coords.shape[0]

    run(-1)  # warm-up (nvdiffrast plugin, allocator, caches)
    sync(dev)
    t0 = time.perf_counter()
    for i in range(repeats):
        m = run(i)
    sync(dev)
    dt = (time.perf_counter() - t0) / repeats
    return {"ms_per_object": 1000 * dt, "objects_per_s": 1.0 / dt, "num_voxels": m}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/3d.json")
    ap.add_argument("--mesh-dir", default=str(SHARED_MESHES), help="real meshes to include (if present)")
    ap.add_argument("--backends", default="auto", help="comma list of cuda,cpu; auto = cuda (if present) + cpu")
    ap.add_argument("--views-cuda", type=int, default=150)
    ap.add_argument("--views-cpu", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--feature-mode", default="nearest", choices=["nearest", "visible_mean"])
    ap.add_argument("--repeats-cuda", type=int, default=20)
    ap.add_argument("--repeats-cpu", type=int, default=2)
    ap.add_argument("--cpu-max-faces", type=int, default=100_000, help="skip bigger assets on the CPU path")
    args = ap.parse_args()

    backends = args.backends.split(",") if args.backends != "auto" else (["cuda"] if cuda_available() else []) + ["cpu"]
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_assets(Path(tmp), Path(args.mesh_dir))
        loaded = {}
        for name, p in paths.items():
            t0 = time.perf_counter()
            mesh, _ = normalize(load_mesh(p))
            loaded[name] = (mesh, 1000 * (time.perf_counter() - t0))
        for backend in backends:
            dev = "cuda" if backend == "cuda" else "cpu"
            renderer = Renderer(RenderConfig(resolution=args.resolution, backend=backend, device=dev))
            views = args.views_cuda if backend == "cuda" else args.views_cpu
            repeats = args.repeats_cuda if backend == "cuda" else args.repeats_cpu
            for name, (mesh, load_ms) in loaded.items():
                if backend == "cpu" and mesh.num_faces > args.cpu_max_faces:
                    continue
                if backend == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                r = bench_one(renderer, mesh, views, args.feature_mode, repeats)
                r.update(
                    asset=name,
                    faces=mesh.num_faces,
                    size=size_class(mesh.num_faces),
                    backend=backend,
                    views=views,
                    resolution=args.resolution,
                    feature_mode=args.feature_mode,
                    load_ms=load_ms,
                )
                if backend == "cuda":
                    r["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
                results.append(r)
                print(
                    f"{backend:4s} {name:28s} {r['faces']:>9,d} tris {r['size']:6s} {views:4d} views  "
                    f"{r['ms_per_object']:9.1f} ms  {r['objects_per_s']:7.2f} obj/s  M={r['num_voxels']:6d}  "
                    f"load {load_ms:7.1f} ms",
                    flush=True,
                )

    print("\n| backend | asset | triangles | size | views | ms/object | objects/s | voxels | load ms |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['backend']} | {r['asset']} | {r['faces']:,} | {r['size']} | {r['views']} | "
            f"{r['ms_per_object']:.1f} | {r['objects_per_s']:.2f} | {r['num_voxels']} | {r['load_ms']:.1f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "args": vars(args), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
