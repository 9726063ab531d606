"""Job files: YAML -> validated configs (pydantic). Everything is checked before any work starts, with one line
per problem naming the key, the value and what is allowed; `--set key.path=value` overrides any key.

Each stage gets its own slice (`job.fetch`, `job.decode`, ...). `preprocess_identity` hashes the settings that
change the tokens; with the tokenizer identity it names the store's version directory, so a rerun with other
settings never appends to shards made with the old ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SerializeAsAny, field_validator, model_validator

from pipeline.config import Config, ConfigError, explain, identity_hash
from pipeline.decode import DecodeConfig
from pipeline.fetch import FetchConfig
from pipeline.mesh.config import MeshConfig
from pipeline.sources import SourceConfig, make_source, source_config
from pipeline.storage import StorageOptions, check_uri
from pipeline.tokenize import TokenizeConfig
from pipeline.writer import WriteConfig
from schemas.tokens import SCHEMA_VERSION


class QAConfig(Config):
    samples: int = Field(8, ge=0)  # decoded back per modality for PSNR/SSIM; 0 disables
    grid: bool = True  # labelled pictures (a card per sample, a grid per modality) beside qa.json and index.html
    gs_checkpoint: str | None = None  # Gaussian decoder weights (3d_decode_gs.pt): 3D pictures add its splats
    # (32 Gaussians per voxel: meant for a GPU; on a CPU that row takes minutes per asset)
    gs_config: str | None = None  # its YAML (default: atoken/configs/3d_decode_gs.yaml)

    @field_validator("gs_checkpoint", "gs_config")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"not a file: {v}")
        return v


class RayConfig(Config):
    address: str | None = None  # None: RAY_ADDRESS or a fresh local cluster
    num_cpus: int | None = Field(None, ge=1)  # local cluster size
    num_gpus: int | None = Field(None, ge=0)
    max_task_retries: int = Field(3, ge=0)
    prepare_actors: int | tuple[int, int] | None = None  # fetch+decode pool (default: 1..CPUs, autoscaled)
    prepare_cpus: float | None = Field(None, gt=0)  # per fetch+decode worker (default 1, or 0.5 on <= 4 CPUs)
    prepare_batch_rows: int = Field(8, ge=1)
    mesh_actors: int | tuple[int, int] | None = None  # fetch+mesh pool for 3D sources
    mesh_gpus: float = Field(0.1, ge=0, le=1)  # GPU share per 3D worker when the cluster has GPUs
    mesh_workers_per_gpu: int = Field(4, ge=1)  # 3D workers beside the tokenizers on each GPU: theirs is what is left
    write_cpus: float = Field(0.25, gt=0)
    cluster_checkpoints: str | None = None  # `submit`: where checkpoints/ is on the cluster's nodes (not uploaded)
    buckets: int = Field(256, ge=1, le=65536)  # ledger hash buckets (fixed when a store is created)
    restarts: int = Field(2, ge=0)  # in-run re-executions after an infrastructure failure (lost node, ...)
    interrupt_grace_s: float = Field(120.0, ge=0)  # after Ctrl-C: how long in-flight rows may take to finish
    progress_bars: bool = False  # Ray Data's own progress output and execution log (`--ray-progress`)

    @model_validator(mode="after")
    def _room_for_tokenizers(self):
        if self.mesh_gpus * self.mesh_workers_per_gpu >= 1.0:
            raise ValueError(
                f"mesh_gpus {self.mesh_gpus} x mesh_workers_per_gpu {self.mesh_workers_per_gpu} leaves no GPU for "
                "the tokenizer actors: lower one of them"
            )
        return self


class ProgressConfig(Config):
    bar: bool = True  # the driver's live bar when stdout is a terminal
    every_s: float = Field(10.0, gt=0)  # otherwise a plain progress line this often


class JobConfig(Config):
    name: str = "job"
    out: str
    sources: list[SerializeAsAny[SourceConfig]] = Field(min_length=1)
    storage: StorageOptions = Field(default_factory=StorageOptions)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)
    qa: QAConfig = Field(default_factory=QAConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    require_licence: list[str] | None = None  # only samples with one of these licences; the others are skipped

    @field_validator("require_licence")
    @classmethod
    def _licences(cls, v: list[str] | None) -> list[str] | None:
        from pipeline.licences import normalise

        if v is not None and not [x for x in v if normalise(x)]:
            raise ValueError("an empty list would skip every sample; leave it out to keep every licence")
        return None if v is None else sorted({normalise(x) for x in v if normalise(x)})

    def allowed_licences(self) -> frozenset[str] | None:
        return None if self.require_licence is None else frozenset(self.require_licence)

    progress: ProgressConfig = Field(default_factory=ProgressConfig)

    @field_validator("out")
    @classmethod
    def _out(cls, v: str) -> str:
        check_uri(v, writable=True)
        return v

    @field_validator("sources")
    @classmethod
    def _names(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.source_name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two sources are named {dup[0]!r}: give each a distinct `name` (ids start with it)")
        return v

    def branches(self) -> set[str]:
        return {b for s in self.sources for b in make_source(s, self.storage).branches}


def preprocess_identity(job: JobConfig) -> dict:
    """The settings that change the tokens (decode for images/videos, mesh for 3D, tokenize), and their hash."""
    branches = job.branches()
    settings = {"schema": SCHEMA_VERSION, "tokenize": job.tokenize.identity()}
    if "media" in branches:
        settings["decode"] = job.decode.identity()
    if "3d" in branches:
        settings["mesh"] = job.mesh.identity()
    return {"id": identity_hash(settings), "settings": settings}


# ---- loading -------------------------------------------------------------------------------------------------


def parse_set(items: list[str] | None) -> list[tuple[list[str], Any]]:
    """`key.path=value` overrides; values are YAML (`8`, `true`, `[a, b]`, `null`)."""
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        out.append((key.strip().split("."), yaml.safe_load(value) if value.strip() else ""))
    return out


def apply_set(data: dict, path: list[str], value: Any) -> None:
    node: Any = data
    for i, key in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            node = node[_index(node, key, path)]
            continue
        if key not in node or node[key] is None:
            node[key] = [] if nxt.isdigit() else {}
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        idx = _index(node, last, path, allow_append=True)
        if idx == len(node):
            node.append(value)
        else:
            node[idx] = value
    else:
        node[last] = value


def _index(node: list, key: str, path: list[str], allow_append: bool = False) -> int:
    if not key.isdigit() or int(key) > len(node) - (0 if allow_append else 1):
        raise ConfigError(f"--set {'.'.join(path)}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def load_job(
    path: str | Path | None = None, data: dict | None = None, out: str | None = None, overrides: list[str] | None = None
) -> JobConfig:
    """A validated job from a YAML file (or a dict), with `--out` and `--set` overrides applied."""
    return validate_job(job_data(path, data, out, overrides))


def job_data(
    path: str | Path | None = None, data: dict | None = None, out: str | None = None, overrides: list[str] | None = None
) -> dict:
    """The job's plain data (YAML file or dict, then `--set`, then `--out`), not yet validated."""
    if data is None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file is a mapping of keys, got {type(data).__name__}")
    data = yaml.safe_load(yaml.safe_dump(data))  # a private copy
    for keys, value in parse_set(overrides):
        apply_set(data, keys, value)
    if out:
        data["out"] = out
    data.setdefault("name", Path(path).stem if path else "job")
    return data


def validate_job(data: dict) -> JobConfig:
    """Validates everything and reports every problem at once (sources by their own modules' configs)."""
    from pydantic import ValidationError

    errors, raw = [], data.get("sources")
    sources = raw
    if isinstance(raw, list):
        sources = []
        for i, s in enumerate(raw):
            try:
                sources.append(source_config(s, i))
            except ConfigError as exc:
                errors.append(str(exc))
    source_errors = bool(errors)
    try:
        job = JobConfig.model_validate({**data, "sources": sources} if "sources" in data else data)  # else "missing"
    except ValidationError as exc:
        errors += [l for l in explain(exc).splitlines() if not (source_errors and l.startswith("sources"))]
    if errors:
        raise ConfigError("\n".join(errors))
    return job
