"""Untrusted metadata: hostile ids, file names, URL schemes, captions and checkpoints.

- ids and file names from CSVs and folders never make a file outside out/ (the fetch cache is set to
  out/fetch-cache; downloads are otherwise uuid-named scratch files, deleted after decoding);
- only the schemes allowed in the job file are fetched (also after a redirect);
- checkpoints load with weights_only=True: a pickle whose __reduce__ would create a file is refused;
- captions with any Unicode or control characters round-trip through Parquet exactly. Decision on lone
  surrogates: Arrow strings are UTF-8 and cannot hold them, so sources decode CSVs with errors="replace";
  invalid bytes (a lone surrogate encoded as ED A0 80, a stray FF) arrive as U+FFFD and the job goes on.
  Captions are stripped of leading/trailing whitespace by the sources (by design); inner characters are kept.
"""

import csv
import io
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from atoken.checkpoint import load_weights, read_state_dict
from atoken.config import ATokenConfig
from atoken.model import AToken
from pipeline.job import validate_job
from pipeline.run import run_job
from tests.http_server import Fault, FaultServer
from tests.reliability.conftest import job_dict, store_state

HOSTILE_IDS = [
    "../../etc/passwd",
    "/etc/shadow",
    "..",
    ".",
    "a/../../b",
    "x\x00y",
    "L" * 5000,
    "..\\..\\win",
    "~root",
    "$(touch pwned)",
    "CON",
    "ü/../ü",
    "-rf",
    ".hidden",
    "a b\tc",
]
CAPTIONS = [
    "NUL in\x00the middle",
    "right\u202eto-left \u200fmark\u200e",
    "emoji 🧪🚀👩‍👩‍👧 and flags 🇸🇪",
    "line one\nline two\r\nline three",
    "bell\x07 esc\x1b[31m del\x7f",
    "zero\u200bwidth\ufeffbom",
    "combining e\u0301 vs \u00e9",
    "line\u2028sep\u2029para",
    "tab\tinside",
    "long " + "ж" * 100_000,
    "Ω≈ç√∫ 中文 العربية עברית",
    'quote " and , comma',
]
BAD_SCHEMES = [
    "ftp://127.0.0.1/clip.mov",
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/1",
    "javascript:alert(1)",
    "data:video/mp4;base64,AAAAIGZ0eXBpc29t",
    "../../etc/passwd",
    "/etc/passwd",
    "dict://127.0.0.1/x",
]
SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def tree(root: Path) -> set[Path]:
    return {p.resolve() for p in root.rglob("*")}


@pytest.fixture()
def site(shared_data, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(shared_data / "videos" / "video_90.mov", www / "clip.mov")
    faults = {
        "/to_file": Fault("redirect", location="file:///etc/passwd"),
        "/to_ftp": Fault("redirect", location="ftp://127.0.0.1/clip.mov"),
    }
    with FaultServer(www, faults) as srv:
        yield srv


def write_csv(path: Path, rows: list[list[str]], bad_bytes_row: list[bytes]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode("utf-8") + b",".join(bad_bytes_row) + b"\r\n")


def test_hostile_metadata_through_a_job(ray_local, site, shared_data, tmp_path, figures):
    clip = site.url("clip.mov")
    rows = [[vid, clip, "PT1S", "p", f"id case {i}"] for i, vid in enumerate(HOSTILE_IDS)]
    rows += [[f"cap{i}", clip, "PT1S", "p", c] for i, c in enumerate(CAPTIONS)]
    rows += [[f"scheme{i}", u, "PT1S", "p", u] for i, u in enumerate(BAD_SCHEMES)]
    rows += [
        ["https", clip.replace("http://", "https://"), "PT1S", "p", "https is not in the job's schemes"],
        ["redir_file", site.url("to_file"), "PT1S", "p", "redirect to file://"],
        ["redir_ftp", site.url("to_ftp"), "PT1S", "p", "redirect to ftp://"],
        ["traverse_url", site.url("../../etc/passwd"), "PT1S", "p", "server-side traversal"],
    ]
    csv_path = tmp_path / "meta.csv"
    write_csv(csv_path, rows, [b"badutf8", clip.encode(), b"PT1S", b"p", b"caf\xff \xed\xa0\x80 end"])
    names = tmp_path / "names"  # hostile file names in a folder source
    names.mkdir()
    for n in ["..evil.png", "a b.png", "ü.png", "x" * 200 + ".png", "-rf.png", "$(touch pwned).png", "\\..\\x.png"]:
        shutil.copy(shared_data / "images" / "camera.png", names / n)
    out = tmp_path / "out"
    before = tree(tmp_path)
    cache = out.resolve() / "fetch-cache"
    batch = dict(write={"rows_per_write": 8}, tokenize={"batch_rows": 8}, ray={"num_cpus": 2, "prepare_batch_rows": 8})
    cfg = job_dict(
        out,
        [{"type": "webvid", "path": str(csv_path), "name": "wv"}],
        fetch={"schemes": ["http"], "retries": 0, "cache": "local", "cache_dir": str(cache)},
        **batch,
    )
    summary = run_job(validate_job(cfg))
    st = store_state(summary.store_dir)
    assert st["problems"] == [] and st["staging"] == []
    ok, other = st["ok"], st["other"]
    # the folder source needs file:// (refused above): its own job (a folder may hold 3D, so its preprocessing
    # identity, and version folder under out/, differ), reading the files in place
    files_summary = run_job(
        validate_job(job_dict(out, [{"type": "folder", "path": str(names), "name": "files"}], **batch))
    )
    files_st = store_state(files_summary.store_dir)
    assert files_st["problems"] == []

    # 1. every file the job made is under out/ (shards, manifest, cache); ids are safe file names
    made = tree(tmp_path) - before
    outside = [p for p in made if p != out.resolve() and out.resolve() not in p.parents]
    assert made and outside == [], f"files created outside out/: {outside}"
    assert not list(tmp_path.rglob("pwned")) and not (Path.cwd() / "pwned").exists()
    assert any(cache in p.parents for p in made), "the http fetches should have used the cache under out/"
    ids = list(files_st["ok"]) + list(files_st["other"])
    assert all(SAFE_ID.match(i) and len(i) < 120 for i in ids), [i for i in ids if not SAFE_ID.match(i)]
    hostile_ok = [i for i in ok if i.startswith("wv-") and not i.startswith(("wv-cap", "wv-bad"))]
    assert len(hostile_ok) == len(HOSTILE_IDS) and len(set(hostile_ok)) == len(HOSTILE_IDS)  # no collisions
    assert sum(i.startswith("files-") for i in files_st["ok"]) == 7

    # 2. schemes: everything not allowed by the job fails at fetch (or source) with the reason
    scheme_recs = {i: r for i, r in other.items() if i.startswith(("wv-scheme", "wv-https", "wv-redir"))}
    assert len(scheme_recs) == len(BAD_SCHEMES) + 3
    for i, r in scheme_recs.items():
        assert r["stage"] == "fetch" and "not allowed" in r["reason"], (i, r)
    assert "(redirect)" in other["wv-redir_file"]["reason"]
    assert "http 404" in other["wv-traverse_url"]["reason"]

    # 3. captions round-trip exactly (as parsed from the CSV, which strips outer whitespace)
    store = st["store"]
    stored = {}
    for path in store.shards:
        with store.storage.open_input(path) as f:
            stored |= {r["id"]: r["caption"] for r in pq.read_table(f, columns=["id", "caption"]).to_pylist()}
    for i, c in enumerate(CAPTIONS):
        assert stored[f"wv-cap{i}"] == c.strip(), f"caption {i} changed"
    assert stored["wv-badutf8"] == "caf\ufffd \ufffd\ufffd\ufffd end"  # invalid UTF-8 -> U+FFFD, job goes on

    figures.setdefault("untrusted", []).extend(
        [
            {
                "check": "hostile ids / file names: files outside out/",
                "cases": len(HOSTILE_IDS) + 7,
                "result": f"0 outside ({len(made)} files made, all under out/); ids all [A-Za-z0-9._-], no collisions",
            },
            {
                "check": "URL schemes not in job (ftp, file, gopher, javascript, data, dict, https, paths, redirects)",
                "cases": len(scheme_recs),
                "result": f"{len(scheme_recs)}/{len(scheme_recs)} refused at fetch: '{other['wv-scheme0']['reason']}'",
            },
            {
                "check": "captions (NUL, RTL, emoji, CR/LF, ESC, DEL, ZW, U+2028, 100k chars) round-trip",
                "cases": len(CAPTIONS),
                "result": f"{len(CAPTIONS)}/{len(CAPTIONS)} exact after Parquet",
            },
            {
                "check": "invalid UTF-8 / lone-surrogate bytes in a CSV",
                "cases": 1,
                "result": "replaced by U+FFFD, sample ok (Arrow UTF-8 cannot hold lone surrogates)",
            },
        ]
    )


class Evil:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_checkpoint_is_refused(tmp_path, figures):
    model = AToken(ATokenConfig.named("tiny"))
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"encoder.x": Evil(target)}, evil)
    with pytest.raises(ValueError, match="not a loadable torch checkpoint"):
        load_weights(model, evil)
    assert not target.exists(), "unpickling ran attacker code"
    torch.save({"payload": Evil(target)}, tmp_path / "evil2.pt")  # the same trick inside a plain object
    with pytest.raises(ValueError):
        read_state_dict(tmp_path / "evil2.pt")
    assert not target.exists()
    good = tmp_path / "good.pt"  # the refusal is specific: a real checkpoint loads
    torch.save(model.state_dict(), good)
    assert load_weights(AToken(ATokenConfig.named("tiny")), good) == ([], [])
    figures.setdefault("untrusted", []).append(
        {
            "check": "checkpoint with malicious __reduce__ (creates a file)",
            "cases": 2,
            "result": "refused by weights_only=True, file not created; a real .pt still loads",
        }
    )
