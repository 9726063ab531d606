"""`python -m atoken` (images, videos) and `python -m pipeline.mesh.cli` (meshes) on real files, in a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


MESH_POINTER = (
    "3D meshes are rendered and voxelised by the pipeline: python -m pipeline.mesh.cli <encode|reconstruct> FILE"
)


def run_cli(*args, cwd, module="atoken"):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def run_mesh_cli(*args, cwd):
    return run_cli(*args, cwd=cwd, module="pipeline.mesh.cli")


def test_reconstruct_image(shared_data, tmp_path):
    src = shared_data / "images" / "chelsea.png"  # 451 x 300 RGB
    out = tmp_path / "rec.png"
    r = run_cli("reconstruct", src, "--config", "tiny", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = re.search(r"PSNR: ([0-9.]+|inf) dB", r.stdout)
    assert m, r.stdout
    assert 0 < float(m.group(1)) < 100
    assert "latent: (504, 48)" in r.stdout  # 300x451 -> 288x448 -> 18 x 28 tokens
    with Image.open(out) as im:
        assert im.size == (448, 288) and im.mode == "RGB"
        assert np.asarray(im).std() > 0


def test_encode_discrete_writes_npz(shared_data, tmp_path):
    out = tmp_path / "tok.npz"
    r = run_cli(
        "encode", shared_data / "images" / "hopper_gray.jpg", "--config", "tiny-fsq", "--out", out, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    with np.load(out) as z:
        assert z["fsq_indices"].shape == (64, 8) and z["coords"].shape == (64, 4) and z["pooled"].shape == (144,)
        assert z["fsq_indices"].min() >= 0 and z["fsq_indices"].max() < 4096


def test_reconstruct_video(shared_data, tmp_path):
    out = tmp_path / "rec.mp4"
    r = run_cli(
        "reconstruct",
        shared_data / "videos" / "bbb_480p_vp9_opus_1second.webm",
        "--max-frames",
        "6",
        "--max-side",
        "128",
        "--out",
        out,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "PSNR:" in r.stdout and out.stat().st_size > 0


def test_bad_file_gives_clear_error(shared_data, tmp_path):
    r = run_cli("encode", shared_data / "bad" / "broken.png", cwd=tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("encode", tmp_path / "missing.png", cwd=tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr
    r = run_cli("encode", shared_data / "images" / "chelsea.png", "--config", "no-such-config", cwd=tmp_path)
    assert r.returncode == 2 and "unknown config" in r.stderr


def test_reconstruct_mesh_renders_decoded_gaussians(shared_data, tmp_path):
    """mesh -> voxel features -> tokens -> decoded voxels -> Gaussian decoder -> splats vs the mesh's renders."""
    out = tmp_path / "rec.png"
    r = run_mesh_cli(
        "reconstruct",
        shared_data / "meshes" / "fuze.obj",
        "--views",
        "8",
        "--eval-views",
        "2",
        "--config",
        "tiny",
        "--device",
        "cpu",
        "--out",
        out,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    voxels = int(re.search(r"-> (\d+) active voxels of 64\^3", r.stdout).group(1))
    assert 500 < voxels < 64**3 and f"latent: ({voxels}, 48)" in r.stdout
    m = re.search(r"PSNR over 2 views \(Gaussian splats vs mesh renders\): ([0-9.]+) dB", r.stdout)
    assert m and 0 < float(m.group(1)) < 100, r.stdout
    assert "random weights" in r.stderr  # no GS checkpoint here: said, not hidden
    with Image.open(out) as im:
        assert im.size == (256 * 2, 256 * 2)  # two views side by side, mesh render above splats


def test_bad_mesh_gives_clear_error(shared_data, tmp_path):
    r = run_mesh_cli("encode", shared_data / "bad" / "empty.ply", "--views", "4", cwd=tmp_path)
    assert r.returncode == 2 and "error: empty.ply:" in r.stderr and "Traceback" not in r.stderr


def test_atoken_cli_points_meshes_to_the_pipeline(tmp_path):
    """`python -m atoken` does not do 3D (it would need the pipeline): one line saying where it moved, exit 2."""
    r = run_cli("reconstruct", "mesh.glb", cwd=tmp_path)  # the file need not exist
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() == MESH_POINTER and r.stdout == ""
    r = run_cli("encode", "Mesh.OFF", "--views", "8", cwd=tmp_path)  # old 3D options still get the pointer
    assert r.returncode == 2 and r.stderr.strip() == MESH_POINTER


def test_mesh_commands_register_on_a_parent_cli(shared_data, tmp_path, capsys):
    """`add_mesh_commands(subparsers)` gives a parent CLI `mesh encode|reconstruct MESH` with the same options."""
    import argparse

    from pipeline.mesh.cli import add_mesh_commands

    p = argparse.ArgumentParser(prog="parent")
    add_mesh_commands(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(
        [
            "mesh",
            "reconstruct",
            "m.glb",
            "--config",
            "tiny",
            "--checkpoint",
            "c.pt",
            "--views",
            "8",
            "--eval-views",
            "2",
            "--gs-config",
            "g.yaml",
            "--gs-checkpoint",
            "g.pt",
            "--out",
            "o.png",
            "--device",
            "cpu",
        ]
    )
    assert (args.cmd, args.command, args.file, args.views, args.eval_views, args.out) == (
        "mesh",
        "reconstruct",
        Path("m.glb"),
        8,
        2,
        Path("o.png"),
    )
    assert (args.config, args.checkpoint, args.gs_config, args.gs_checkpoint, args.device) == (
        "tiny",
        "c.pt",
        "g.yaml",
        "g.pt",
        "cpu",
    )
    args = p.parse_args(["mesh", "encode", str(shared_data / "bad" / "empty.ply"), "--views", "4"])
    assert (args.views, args.eval_views, args.config, args.device) == (4, 8, "tiny-c", "auto")
    assert args.fn(args) == 2 and "error: empty.ply:" in capsys.readouterr().err
