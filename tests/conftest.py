"""Shared fixtures: the real test files in /work/shared (resolved relative to the repo root)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real test inputs: videos/, images/, meshes/, metadata/, bad/."""
    path = Path(os.environ.get("ATOKEN_TEST_DATA", SHARED / "data"))  # override: a copy carried to a GPU box
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Reference outputs of the official AToken code at reduced width (atoken-mini)."""
    path = SHARED / "reference" / "atoken-mini"
    if not path.is_dir():
        pytest.skip(f"AToken reference vectors not found at {path}")
    return path


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray cluster for the jobs of one test module (tests/reliability has its own, per package)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """Each test's own scratch root (PIPELINE_SCRATCH; the stages make their worker folders inside it), with no
    fault injection inherited from the environment."""
    root = tmp_path / "scratch"
    root.mkdir()
    monkeypatch.setenv("PIPELINE_SCRATCH", str(root))
    monkeypatch.delenv("PIPELINE_FAULT", raising=False)
    return root


@pytest.fixture
def media_stage(scratch):
    """make(decode_cfg) -> a set-up media Prepare stage (no retries, CPU mesh settings); all torn down after."""
    from pipeline.fetch import FetchConfig
    from pipeline.mesh.config import MeshConfig
    from pipeline.prepare import Prepare

    stages = []

    def make(decode):
        st = Prepare(FetchConfig(retries=0), decode, MeshConfig(views=4, backend="cpu"), branch="media")
        stages.append(st)
        return st

    yield make
    for st in stages:
        st.teardown()


from tests.s3_server import s3_prefix, s3_server  # noqa: E402,F401  (one SeaweedFS for the whole session)
