"""`make checkpoints` (`python -m atoken.download`) against a loopback server that serves small files under the
official paths: dry run, a download cut in the middle and resumed by a Range request, size checks, SHA256SUMS, the
licence beside the weights, a no-op rerun, a 404, and the missing-checkpoint error that names the make target."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atoken.download import FILES
from tests.http_server import Fault, FaultServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    (root / "models" / "atoken").mkdir(parents=True)
    blobs = {}
    for k, name in enumerate(FILES):
        blobs[name] = os.urandom(200_000 + 37_000 * k)
        (root / "models" / "atoken" / name).write_bytes(blobs[name])
    licence = root / "apple" / "ml-atoken" / "main" / "MODEL-LICENSE"
    licence.parent.mkdir(parents=True)
    licence.write_text("Apple Machine Learning Research Model Terms of Use (test copy)\n")
    return root, blobs


def download(srv, dest: Path, *args) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "atoken.download",
        "--dest",
        str(dest),
        "--base-url",
        srv.url("models/atoken/"),
        "--licence-url",
        srv.url("apple/ml-atoken/main/MODEL-LICENSE"),
        "--timeout",
        "5",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_dry_run_then_cut_download_resumes_and_rerun_is_a_no_op(served, tmp_path):
    root, blobs = served
    dest = tmp_path / "checkpoints"
    soc = "/models/atoken/atoken-soc.pt"
    with FaultServer(root, {soc: Fault("truncate", times=1, fraction=0.4)}) as srv:
        dry = download(srv, dest, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        for name, blob in blobs.items():
            assert f"{name}: {srv.url('models/atoken/' + name)}" in dry.stdout
            assert f"({len(blob) / 1e6:.1f} MB; to fetch)" in dry.stdout
        assert not dest.exists() and srv.total_hits() == len(FILES) and srv.hits[soc] == 0  # HEADs only

        cut = download(srv, dest)
        assert cut.returncode == 1 and "atoken-soc.pt: failed" in cut.stderr, cut.stderr
        assert "run the same command again to resume" in cut.stderr
        part = dest / "atoken-soc.pt.part"
        assert not (dest / "atoken-soc.pt").exists() and 0 < part.stat().st_size < len(blobs["atoken-soc.pt"])
        have = part.stat().st_size
        assert all((dest / n).read_bytes() == b for n, b in blobs.items() if n != "atoken-soc.pt")

        again = download(srv, dest)
        assert again.returncode == 0, again.stderr
        assert "atoken-soc.pt: resumed" in again.stdout and srv.ranges == [(soc, have)]
        assert not part.exists()
        for name, blob in blobs.items():
            assert (dest / name).read_bytes() == blob
        sums = dict(line.split("  ")[::-1] for line in (dest / "SHA256SUMS").read_text().splitlines())
        assert sums == {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}
        assert (dest / "MODEL-LICENSE").read_text().startswith("Apple Machine Learning Research Model")

        gets = {p: n for p, n in srv.hits.items() if not p.startswith("HEAD ")}
        third = download(srv, dest)
        assert third.returncode == 0, third.stderr
        assert third.stdout.count(": present") == len(FILES) + 1  # and the licence
        assert {p: n for p, n in srv.hits.items() if not p.startswith("HEAD ")} == gets  # no GET at all


def test_a_missing_file_fails_clearly_and_the_rest_is_fetched(served, tmp_path):
    root, blobs = served
    (root / "models" / "atoken" / "atoken-sod.pt").unlink()
    dest = tmp_path / "checkpoints"
    with FaultServer(root) as srv:
        r = download(srv, dest, "atoken-soc.pt", "atoken-sod.pt")
    assert r.returncode == 1
    assert "atoken-sod.pt: failed:" in r.stderr and "HTTP 404" in r.stderr, r.stderr
    assert (dest / "atoken-soc.pt").read_bytes() == blobs["atoken-soc.pt"]
    assert not (dest / "atoken-sod.pt").exists() and not (dest / "atoken-sod.pt.part").exists()
    bad = subprocess.run([sys.executable, "-m", "atoken.download", "nope.pt"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown checkpoint nope.pt" in bad.stderr


def test_missing_checkpoint_error_names_the_make_target(tmp_path):
    from atoken.tokenizer import Tokenizer

    with pytest.raises(FileNotFoundError, match=r"make checkpoints"):
        Tokenizer.from_files("atoken-soc", str(tmp_path / "checkpoints" / "atoken-soc.pt"), device="cpu")
