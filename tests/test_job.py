"""Job files: loading, `--set` overrides, one readable line per problem, and the preprocessing identity."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import ConfigError, validate
from pipeline.decode import DecodeConfig
from pipeline.fetch import FetchConfig
from pipeline.job import JobConfig, load_job, preprocess_identity, validate_job

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
WEBVID = REPO / "jobs" / "webvid.yaml"


def problems(**kw) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_job(**kw)
    return str(exc.value).splitlines()


def video_job(**over) -> dict:
    return {"out": "out/x", "sources": [{"type": "webvid", "path": "w.csv"}], **over}


def folder_job(**over) -> dict:
    return {"out": "out/x", "sources": [{"type": "folder", "path": "data"}], **over}


# ---- loading -------------------------------------------------------------------------------------------


def test_every_job_file_loads():
    assert {p.stem for p in JOBS} >= {"demo", "images", "objaverse", "panda70m", "webvid"}
    for path in JOBS:
        job = load_job(path)
        assert isinstance(job, JobConfig) and job.name == path.stem and job.sources
        assert preprocess_identity(job)["id"]
    webvid = load_job(WEBVID)
    assert webvid.decode.fps == 4 and webvid.fetch.schemes == ("https", "http") and webvid.sources[0].type == "webvid"
    obj = load_job(REPO / "jobs" / "objaverse.yaml").sources[0]
    assert obj.allow_download is True and obj.mirror_dir.endswith("hf-objaverse-v1")  # flat source fields


def test_set_overrides_and_out():
    job = load_job(
        WEBVID,
        overrides=[
            "decode.fps=8",
            "sources.0.path=x.csv",
            "fetch.retries=0",
            "decode.buckets.max_side=256",
            "ray.prepare_actors=[1, 4]",
        ],
        out="s3://b/o",
    )
    assert job.decode.fps == 8.0 and job.sources[0].path == "x.csv" and job.fetch.retries == 0
    assert job.decode.buckets.max_side == 256 and job.ray.prepare_actors == (1, 4) and job.out == "s3://b/o"
    # a new key in a section that the file does not have, and an appended list entry
    job = load_job(WEBVID, overrides=["qa.samples=0", "sources.1={type: folder, path: imgs, name: extra}"])
    assert job.qa.samples == 0 and [s.source_name for s in job.sources] == ["webvid", "extra"]
    assert load_job(WEBVID).decode.fps == 4  # the file itself is never modified
    assert load_job(data=video_job(), overrides=["name=mine"]).name == "mine"


def test_set_errors_are_clear():
    assert problems(path=WEBVID, overrides=["sources.3.path=x.csv"]) == [
        "--set sources.3.path: '3' is not an index of a list of 1"
    ]
    assert problems(path=WEBVID, overrides=["sources.x.path=x.csv"]) == [
        "--set sources.x.path: 'x' is not an index of a list of 1"
    ]
    assert problems(path=WEBVID, overrides=["decode.fps"]) == ["--set 'decode.fps': expected key.path=value"]
    assert problems(path=REPO / "jobs" / "nope.yaml")[0].endswith("nope.yaml: No such file or directory")


def test_bad_yaml_and_not_a_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("out: [unclosed\n")
    assert "not valid YAML" in problems(path=tmp_path / "bad.yaml")[0]
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert problems(path=tmp_path / "list.yaml") == [
        f"{tmp_path / 'list.yaml'}: a job file is a mapping of keys, got list"
    ]


# ---- one line per problem ----------------------------------------------------------------------------------


def test_bad_values_one_line_each():
    lines = problems(path=WEBVID, overrides=["decode.fps=four"])
    assert len(lines) == 1 and lines[0].startswith("decode.fps: got 'four'; ") and "number" in lines[0]
    lines = problems(
        path=WEBVID,
        overrides=["decode.fps=four", "decode.fpz=1", "out=ftp://x", "fetch.retries=-1", "sources.0.bogus=1"],
    )
    assert len(lines) == 5
    by_key = {line.split(":", 1)[0]: line for line in lines}
    assert set(by_key) == {"decode.fps", "decode.fpz", "out", "fetch.retries", "sources.0.bogus"}
    assert by_key["decode.fpz"] == "decode.fpz: got 1; unknown key"
    assert by_key["sources.0.bogus"] == "sources.0.bogus: got 1; unknown key"
    assert by_key["out"].startswith("out: got 'ftp://x'; ") and "scheme 'ftp'" in by_key["out"]
    assert by_key["fetch.retries"] == "fetch.retries: got -1; Input should be greater than or equal to 0"


@pytest.mark.parametrize(
    "source,expected",
    [
        ({"type": "nosuch", "path": "a"}, "sources.0.type: got 'nosuch'; expected one of "),
        ({"type": "Folder", "path": "a"}, "sources.0.type: got 'Folder'; expected one of "),
        ({"type": "ids", "path": "a"}, "sources.0.type: got 'ids'; expected one of "),  # a helper module
        ({"type": "tables", "path": "a"}, "sources.0.type: got 'tables'; expected one of "),
        ({"path": "a"}, "sources.0.type: got ''; expected one of "),
        ("a.csv", "sources.0: expected a mapping, got 'a.csv'"),
        ({"type": "folder"}, "sources.0.path: missing; Field required"),
        ({"type": "webvid", "path": "w.csv", "mirror_dir": "m"}, "sources.0.mirror_dir: got 'm'; unknown key"),
        ({"type": "url_list", "path": "u.csv", "modality": "audio"}, "sources.0.modality: got 'audio'; "),
        ({"type": "folder", "path": "a", "limit": 0}, "sources.0.limit: got 0; "),
    ],
)
def test_bad_sources(source, expected):
    lines = problems(data={"out": "out/x", "sources": [source]})
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    if "expected one of" in expected:
        assert lines[0].endswith("folder, objaverse, panda70m, url_list, webdataset, webvid")


def test_several_sources_several_problems():
    lines = problems(
        data={
            "out": "ftp://x",
            "decode": {"fps": 0},
            "sources": [{"type": "nosuch"}, {"type": "folder", "path": "a", "extra": 1}],
        }
    )
    assert len(lines) == 4
    assert lines[0].startswith("sources.0.type: got 'nosuch'")
    assert lines[1] == "sources.1.extra: got 1; unknown key"
    assert any(l.startswith("out: got 'ftp://x'") for l in lines)
    assert "decode.fps: got 0; Input should be greater than 0" in lines


def test_required_keys():
    assert problems(data={"sources": [{"type": "folder", "path": "a"}]}) == ["out: missing; Field required"]
    assert problems(data={"out": "o"}) == ["sources: missing; Field required"]
    lines = problems(data={"out": "o", "sources": []})
    assert len(lines) == 1 and lines[0].startswith("sources: got []; ")


def test_out_locations():
    for ok in ("out/x", "/abs/out", "file:///tmp/out", "s3://bucket/out", "gs://bucket/out"):
        assert load_job(data=video_job(out=ok)).out == ok
    for bad in ("ftp://x", "hf://datasets/a/b", "https://host/out"):
        lines = problems(data=video_job(out=bad))
        assert len(lines) == 1 and lines[0].startswith(f"out: got {bad!r}; unsupported output location")


def test_duplicate_source_names_refused():
    two = [{"type": "webvid", "path": "a.csv"}, {"type": "webvid", "path": "b.csv"}]
    lines = problems(data={"out": "o", "sources": two})
    assert len(lines) == 1 and lines[0].startswith("sources: ")
    assert "two sources are named 'webvid'" in lines[0]
    named = [{**two[0], "name": "wv_a"}, {**two[1], "name": "wv_b"}]
    assert [s.source_name for s in load_job(data={"out": "o", "sources": named}).sources] == ["wv_a", "wv_b"]
    clash = [{"type": "folder", "path": "a", "name": "x"}, {"type": "webvid", "path": "b.csv", "name": "x"}]
    assert "named 'x'" in problems(data={"out": "o", "sources": clash})[0]


def test_config_models():
    assert DecodeConfig(fps=4).fps == 4.0
    with pytest.raises(ValidationError):
        DecodeConfig(fps="four")
    with pytest.raises(ValidationError):
        DecodeConfig(fps=-1)
    with pytest.raises(ValidationError):
        DecodeConfig(fsp=4)  # unknown keys are errors
    cfg = DecodeConfig()
    with pytest.raises(ValidationError):
        cfg.max_frames = 0  # assignments are validated too
    with pytest.raises(ConfigError) as exc:
        validate(FetchConfig, {"retries": "many", "schemes": ["ftp"], "nope": 1}, prefix="fetch")
    lines = str(exc.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith("fetch.retries: got 'many'; ")
    assert (
        any(l.startswith("fetch.schemes.0: got 'ftp'; ") for l in lines) and "fetch.nope: got 1; unknown key" in lines
    )
    assert validate(FetchConfig, None) == FetchConfig()
    assert validate_job(video_job()).decode == DecodeConfig()


# ---- preprocessing identity --------------------------------------------------------------------------------


def ident(data: dict, *overrides: str) -> str:
    return preprocess_identity(load_job(data=data, overrides=list(overrides)))["id"]


@pytest.mark.parametrize("make", [video_job, folder_job])
def test_identity_changes_with_what_changes_the_tokens(make):
    base = ident(make())
    assert base == ident(make())  # deterministic
    for change in (
        "decode.fps=4",
        "decode.max_frames=8",
        "decode.buckets.area=40000",
        "decode.buckets.max_side=256",
        "decode.background=0",
        "decode.icc_to_srgb=false",
        "tokenize.logvar=true",
    ):
        assert ident(make(), change) != base, change


@pytest.mark.parametrize("make", [video_job, folder_job])
def test_identity_ignores_what_does_not(make):
    base = ident(make())
    for change in (
        "decode.timeout_s=5",
        "decode.decoder_threads=4",
        "decode.isolate=[image, video]",
        "fetch.retries=0",
        "fetch.deadline_s=30",
        "fetch.concurrency=2",
        "ray.prepare_batch_rows=64",
        "ray.max_task_retries=0",
        "ray.restarts=0",
        "write.rows_per_write=7",
        "tokenize.batch_rows=3",
        "tokenize.batch_tokens=4096",
        "qa.samples=0",
        "name=other",
        "out=out/elsewhere",
        "mesh.backend=cpu",
        "mesh.max_faces=10",
    ):
        assert ident(make(), change) == base, change


def test_mesh_settings_count_only_for_3d():
    video = ident(video_job())
    for change in ("mesh.views=24", "mesh.resolution=128", "mesh.fov_deg=30", "mesh.feature_mode=visible_mean"):
        assert ident(video_job(), change) == video, change  # a video-only job: mesh settings do not count
        assert ident(folder_job(), change) != ident(folder_job()), change  # a folder may hold meshes
    settings = preprocess_identity(load_job(data=video_job()))["settings"]
    assert "mesh" not in settings and "decode" in settings and "tokenize" in settings
    objaverse = {"out": "o", "sources": [{"type": "objaverse", "mirror_dir": "m"}]}
    settings = preprocess_identity(load_job(data=objaverse))["settings"]
    assert "mesh" in settings and "decode" not in settings  # a 3D-only job: decode settings do not count
    assert ident(objaverse, "decode.fps=2") == ident(objaverse) != ident(objaverse, "mesh.views=24")
    assert ident(video_job(), "sources.0.path=other.csv") == video  # the inputs are not the preprocessing


def test_submit_sends_the_resolved_job_with_cluster_checkpoints(monkeypatch):
    from pipeline.cli import _job_source
    from pipeline.job import job_data
    from pipeline.submit import JOB_ENV, cluster_data, excludes, runtime_env

    data = cluster_data(job_data(WEBVID, out="out/wv", overrides=["decode.fps=8"]))
    assert data["tokenize"]["checkpoint"] == "/mnt/checkpoints/atoken-soc.pt"  # as jobs/webvid.yaml says
    assert data["out"] == str((Path.cwd() / "out" / "wv").resolve())
    ex = excludes(data, root=Path.cwd())
    assert "/checkpoints/" in ex and "/out/wv/" in ex and ".git" in ex
    env = runtime_env(data)
    monkeypatch.setenv(JOB_ENV, env["env_vars"][JOB_ENV])
    back = load_job(**_job_source(f"env:{JOB_ENV}"))  # what `python -m pipeline run env:PIPELINE_JOB` runs
    assert back.decode.fps == 8 and back.tokenize.checkpoint == "/mnt/checkpoints/atoken-soc.pt"
    with pytest.raises(ConfigError, match="ray.cluster_checkpoints"):
        cluster_data(job_data(WEBVID, overrides=["ray.cluster_checkpoints=null"]))
    monkeypatch.delenv(JOB_ENV)
    with pytest.raises(ConfigError, match="no environment variable PIPELINE_JOB"):
        load_job(**_job_source(f"env:{JOB_ENV}"))


def test_3d_workers_keep_a_share_of_each_gpu_beside_the_tokenizers():
    from pipeline.run import mesh_reserve

    job = validate_job(folder_job())
    assert mesh_reserve(job.ray, job.ray.mesh_gpus) == pytest.approx(0.4)  # 4 workers x 0.1
    assert mesh_reserve(job.ray, 0.0) == 0.0  # no GPU for meshes: the tokenizers keep it all
    lines = problems(path=WEBVID, overrides=["ray.mesh_gpus=0.25", "ray.mesh_workers_per_gpu=4"])
    assert len(lines) == 1 and "leaves no GPU for the tokenizer actors" in lines[0], lines
