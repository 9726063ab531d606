"""Layering: the tokenizer package `atoken/` never imports the data pipeline `pipeline/` (not even lazily)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATOKEN = REPO / "atoken"
FORBIDDEN = "pipeline"


def _is_forbidden(name: str | None) -> bool:
    return bool(name) and (name == FORBIDDEN or name.startswith(FORBIDDEN + "."))


def pipeline_imports(source: str, package: list[str], where: str = "<src>") -> list[str]:
    """`where:line: statement` for every import of `pipeline` in `source` (a module of `package`, e.g.
    ["atoken"]), at any depth: top level, functions, classes, plus __import__/importlib.import_module("...")."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module
            elif node.level > len(package):  # climbs out of the top package: `from .. import pipeline`
                base = node.module or node.names[0].name
            else:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            names = [base]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            names = [node.args[0].value]
        if any(_is_forbidden(n) for n in names):
            hits.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return hits


def _file_imports(path: Path) -> list[str]:
    package = list(path.relative_to(REPO).parent.parts)  # atoken/x.py and atoken/__init__.py -> ["atoken"]
    return pipeline_imports(path.read_text(), package, str(path.relative_to(REPO)))


def test_scanner_sees_imports_everywhere():
    """The scanner itself: top level, inside functions and methods, `from` forms and dynamic imports."""
    code = (
        "import os\n"
        "import pipeline.mesh as m\n"  # 2
        "def f():\n"
        "    from pipeline.mesh.load import load_mesh\n"  # 4
        "    import importlib; importlib.import_module('pipeline.rows')\n"  # 5
        "class C:\n"
        "    def g(self):\n"
        "        from pipeline import rows\n"  # 8
        "from .. import pipeline\n"  # 9: relative, out of atoken/
        "from . import sparse\n"
        "from atoken.pipelined import x\n"
        "import pipelines\n"
    )
    hits = pipeline_imports(code, ["atoken"])
    assert sorted(int(h.split(":")[1]) for h in hits) == [2, 4, 5, 8, 9], hits
    assert pipeline_imports("from .. import pipeline\n", ["atoken", "sub"]) == []  # that is atoken.pipeline


def test_atoken_never_imports_pipeline():
    files = sorted(ATOKEN.rglob("*.py"))
    assert len(files) > 10 and ATOKEN / "voxelize.py" in files
    hits = [h for f in files for h in _file_imports(f)]
    assert not hits, "atoken/ must not import pipeline/ (that code belongs in pipeline/):\n" + "\n".join(hits)


def run_fresh(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (nothing imported yet) with the repository on its path."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_atoken_cli_and_voxelize_load_without_pipeline():
    """At run time too: importing the package, its CLI and the voxeliser leaves `pipeline` unloaded."""
    code = (
        "import sys, atoken, atoken.cli, atoken.voxelize, atoken.gs_decoder, atoken.splat\n"
        "bad = sorted(m for m in sys.modules if m == 'pipeline' or m.startswith('pipeline.'))\n"
        "assert not bad, bad\n"
    )
    r = run_fresh(code)
    assert r.returncode == 0, r.stderr


def test_a_job_and_its_store_version_are_known_without_torch_or_ray():
    """What a no-op rerun needs (the CLI, the validated job, the tokenizer's and preprocessing's identity, the
    no-op check itself) imports neither torch nor Ray: both cost seconds, and only real work needs them."""
    code = (
        "import sys\n"
        "import pipeline.cli, pipeline.noop\n"
        "from pipeline.job import load_job\n"
        "from pipeline.run import identities, version_name\n"
        "job = load_job('jobs/demo.yaml', overrides=['tokenize.config=tiny-c'])\n"
        "print(version_name(*identities(job)))\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'trimesh') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    r = run_fresh(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tiny-c-"), r.stdout
