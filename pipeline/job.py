"""Job files: YAML -> dataclasses. Unknown keys are errors, so a typo never silently does nothing."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipeline.tokenize import TokenizeConfig

SOURCE_TYPES = ("folder", "webvid", "panda70m", "objaverse")


@dataclass
class SourceConfig:
    type: str                         # folder | webvid | panda70m | objaverse
    path: str | None = None           # folder root or CSV file
    name: str | None = None           # source name in ids and shards (default: the type)
    limit: int | None = None          # first N samples only
    base_dir: str | None = None       # resolves relative URIs in a CSV (local mirrors of WebVid/Panda)
    objaverse: dict = field(default_factory=dict)   # ObjaverseConfig fields

    def __post_init__(self):
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"unknown source type {self.type!r}; expected one of {SOURCE_TYPES}")


@dataclass
class WriteConfig:
    shard_rows: int = 512
    compression: str = "zstd"


@dataclass
class QAConfig:
    samples: int = 8                  # decoded back per modality for PSNR/SSIM; 0 disables
    grid: bool = True                 # write a PNG grid of inputs next to reconstructions


@dataclass
class RayConfig:
    address: str | None = None        # None: RAY_ADDRESS or a local cluster
    num_cpus: int | None = None       # local cluster size
    fetch_cpus: float = 0.25          # CPU share per fetch task (I/O bound)
    decode_cpus: float = 1.0
    max_task_retries: int = 3


@dataclass
class JobConfig:
    name: str
    out: str
    sources: list[SourceConfig]
    fetch: Any = None
    decode: Any = None
    mesh: Any = None
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        from pipeline.decode import DecodeConfig
        from pipeline.fetch import FetchConfig
        from pipeline.mesh.stage import MeshConfig

        if not isinstance(self.fetch, FetchConfig):
            self.fetch = build(FetchConfig, {"cache_dir": str(Path(self.out) / "fetch-cache"), **(self.fetch or {})})
        self.decode = self.decode if isinstance(self.decode, DecodeConfig) else build(DecodeConfig, self.decode or {})
        self.mesh = self.mesh if isinstance(self.mesh, MeshConfig) else build(MeshConfig, self.mesh or {})


def build(cls, data: dict):
    """Dataclass from a dict, recursing into nested dataclass fields; unknown keys raise."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in data.items():
        f = fields[k]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if (cls, k) == (JobConfig, "sources"):
            kwargs[k] = [build(SourceConfig, s) for s in v]
        elif dataclasses.is_dataclass(default) and isinstance(v, dict):
            kwargs[k] = build(type(default), v)
        elif isinstance(v, list) and isinstance(default, tuple):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def load_job(path: str | Path, **overrides) -> JobConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    data.setdefault("name", Path(path).stem)
    return build(JobConfig, data)


def job_to_dict(job: JobConfig) -> dict:
    return dataclasses.asdict(job)


def iter_descriptors(src: SourceConfig) -> Iterator[dict]:
    """Sample descriptors of one source, in a stable order."""
    from pipeline import sources

    name = src.name or src.type
    if src.type == "folder":
        it = sources.local_files(src.path, source=name)
    elif src.type == "webvid":
        it = sources.webvid_csv(src.path, source=name)
    elif src.type == "panda70m":
        it = sources.panda70m_csv(src.path, source=name)
    else:
        it = sources.objaverse_objects(build(sources.ObjaverseConfig, src.objaverse))
    for i, row in enumerate(it):
        if src.limit is not None and i >= src.limit:
            break
        if src.base_dir and row.get("uri") and "://" not in row["uri"] and not Path(row["uri"]).is_absolute():
            row["uri"] = str(Path(src.base_dir) / row["uri"])
        yield row
