"""`python -m pipeline submit JOB --address http://head:8265`: the job on a Ray cluster (`ray job submit`).

What is sent works wherever the head is: the repository is uploaded as the job's working directory (without
`checkpoints/`, outputs, virtual environments and git: Ray refuses uploads over 512 MiB), the job itself travels
resolved (`--set` and `--out` applied, validated here) in the environment variable `PIPELINE_JOB`, and the entry
point is `python -m pipeline run env:PIPELINE_JOB`: the cluster's Python, no path of this machine.

Checkpoints stay on the cluster: `tokenize.checkpoint: checkpoints/x.pt` becomes `<ray.cluster_checkpoints>/x.pt`
(a path every node sees); without `ray.cluster_checkpoints` such a job is refused here, before anything is sent.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import yaml

from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
JOB_ENV = "PIPELINE_JOB"
ENTRYPOINT = f"python -m pipeline run env:{JOB_ENV}"
CHECKPOINTS = "checkpoints"
# gitignore syntax, relative to the working directory (Ray also honours .gitignore)
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    f"/{CHECKPOINTS}/",
    "/out/",
    "/runs/",
    "/.device/",
    "/.devdata/",
    "/.whl/",
    "/.gl/",
    "*.parquet",
]


def cluster_data(data: dict) -> dict:
    """The job's data as the cluster must see it: a checkpoint under `checkpoints/` mapped to
    `ray.cluster_checkpoints`, a local `out` made absolute (the job runs in a copy of the repository)."""
    from pipeline.job import validate_job
    from pipeline.storage import scheme_of

    job = validate_job(data)  # every problem reported here, before the upload
    data = yaml.safe_load(yaml.safe_dump(data))
    ckpt = job.tokenize.checkpoint
    if ckpt and scheme_of(ckpt) == "file" and not Path(ckpt).is_absolute():
        parts = PurePosixPath(ckpt).parts
        if parts and parts[0] == CHECKPOINTS:
            where = job.ray.cluster_checkpoints
            if not where:
                raise ConfigError(
                    f"tokenize.checkpoint: got {ckpt!r}; {CHECKPOINTS}/ is not uploaded to the "
                    "cluster: set ray.cluster_checkpoints to where it is on the cluster's nodes, or "
                    "give an absolute path there"
                )
            data.setdefault("tokenize", {})["checkpoint"] = str(PurePosixPath(where, *parts[1:]))
    if scheme_of(job.out) == "file":
        data["out"] = str(Path(job.out).resolve())
    return data


def excludes(data: dict, root: Path = ROOT) -> list[str]:
    """EXCLUDES, plus the job's own local output when it lies inside the repository."""
    from pipeline.storage import scheme_of

    out = list(EXCLUDES)
    if scheme_of(data["out"]) == "file":
        try:
            out.append("/" + Path(data["out"]).resolve().relative_to(root.resolve()).as_posix() + "/")
        except ValueError:
            pass
    return out


def runtime_env(data: dict, root: Path = ROOT) -> dict:
    from pipeline.ray_job import forwarded_env

    return {
        "working_dir": str(root),
        "excludes": excludes(data, root),
        "env_vars": {
            **forwarded_env(),
            "RAY_AUTH_MODE": "disabled",
            "PIPELINE_PROGRESS": "0",
            JOB_ENV: yaml.safe_dump(data, allow_unicode=True, sort_keys=False),
        },
    }


def job_from_env(name: str) -> dict:
    """`run env:NAME`: the job data `submit` put in the environment variable NAME."""
    import os

    text = os.environ.get(name)
    if text is None:
        raise ConfigError(f"env:{name}: no environment variable {name} (it is set by `python -m pipeline submit`)")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"env:{name}: a job is a mapping of keys, got {type(data).__name__}")
    return data
