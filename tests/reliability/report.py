"""Renders the figures collected by the reliability suite into out/reliability/report.md and report.json.

python -m tests.reliability.report out/reliability/report.json   # re-render a saved report
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines


def _counts(title: str, counts: dict) -> list[str]:
    return [f"{title}:", ""] + _table(
        [{"what": k, "n": v} for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))], ["what", "n"]
    )


def render(figs: dict) -> str:
    out = ["# Reliability and security report", ""]
    if rows := figs.get("crash_matrix"):
        rows = sorted(rows, key=lambda r: (r.get("storage", "local"), r["victim"], r["point"], r["nth"]))
        out += [
            "## Crash matrix (kill -9, then rerun)",
            "",
            f"{len(rows)} points tried; lost samples {sum(r['lost'] for r in rows)}, "
            f"duplicates {sum(r['duplicates'] for r in rows)}, "
            f"verify problems {sum(r['verify_problems'] for r in rows)}.",
            "",
        ]
        out += _table(
            rows,
            [
                "storage",
                "point",
                "nth",
                "victim",
                "crash_rc",
                "committed_before_rerun",
                "staging_after_crash",
                "redone_by_rerun",
                "lost",
                "duplicates",
                "verify_problems",
                "staging_after_rerun",
                "crash_s",
                "rerun_s",
            ],
        ) + [""]
    if rows := figs.get("interrupts"):
        out += ["## Interrupts (SIGINT at random times, SIGTERM, double SIGINT; then rerun)", ""]
        trials = [r for r in rows if isinstance(r["trial"], int)]
        for kind in sorted({r["storage"] for r in trials}):
            mine = [r for r in trials if r["storage"] == kind]
            codes = collections.Counter(r["rc"] for r in mine)
            out.append(
                f"- {kind}: {len(mine)} random SIGINT trials (seeded delays, "
                f"{sum(r.get('after') == 'first commit' for r in mine)} of them timed from the first commit); "
                "exit codes "
                + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items()))
                + f"; lost {sum(r['lost'] for r in mine)}, duplicated {sum(r['duplicates'] for r in mine)}, "
                f"verify problems {sum(r['verify_problems'] for r in mine)}; samples committed by the "
                f"interrupted runs {sum(r['committed_by_run'] or 0 for r in mine)}"
            )
        out += (
            [""]
            + _table(
                sorted(rows, key=lambda r: (str(r["storage"]), str(r["trial"]))),
                [
                    "storage",
                    "trial",
                    "signal",
                    "after",
                    "delay_s",
                    "rc",
                    "committed_by_run",
                    "visible_after_interrupt",
                    "redone_by_rerun",
                    "lost",
                    "duplicates",
                    "verify_problems",
                    "interrupted_s",
                    "rerun_s",
                ],
            )
            + [""]
        )
    if rows := figs.get("damage"):
        out += [
            "## Damage (flipped bits, truncated/deleted/copied shards, manifest damage; then repair and rerun)",
            "",
            f"{len(rows)} cases, {sum(r.get('trials', 1) for r in rows)} trials; lost "
            f"{sum(r.get('lost', 0) for r in rows)}, duplicated {sum(r.get('duplicated', 0) for r in rows)}, "
            f"wrong data served {sum(r.get('wrong_data_served', 0) for r in rows)}.",
            "",
        ]
        out += _table(
            rows,
            [
                "case",
                "trials",
                "errors_naming_file",
                "identical",
                "wrong_data_served",
                "unverified_pyarrow_wrong",
                "hf_errors",
                "requeued",
                "redone_by_rerun",
                "lost",
                "duplicated",
                "verify_problems",
            ],
        ) + [""]
    if rows := figs.get("hostile_inputs"):
        out += [
            "## Hostile inputs (colliding keys, unparsable rows and duplicates in every table format, "
            "memory-hungry samples, long fields)",
            "",
            f"{len(rows)} cases, {sum(r.get('trials', 1) for r in rows)} trials; lost "
            f"{sum(r.get('lost', 0) for r in rows)}, duplicated {sum(r.get('duplicated', 0) for r in rows)}, "
            f"wrong data served {sum(r.get('wrong data served', 0) for r in rows)}.",
            "",
        ]
        out += _table(rows, ["case", "trials", "lost", "duplicated", "wrong data served", "wall_s"]) + [""]
    if rows := figs.get("locks"):
        out += ["## Run lock", ""] + _table(rows, ["case", "rc", "result"]) + [""]
    if net := figs.get("network"):
        out += ["## Network faults (loopback HTTP server)", ""]
        for run in net:
            out += [
                f"- {run['name']}: {run['samples']} samples ({run['faulty']} with a fault), "
                f"{run['ok']} ok, {run['failed']} failed with a reason; "
                f"wall {run['wall_s']:.1f}s (bound {run['bound_s']:.0f}s)",
                "",
            ]
            out += _table(
                [{"sample (fault)": k, "outcome": v} for k, v in run["outcomes"].items()], ["sample (fault)", "outcome"]
            ) + [""]
    if bad := figs.get("bad_inputs"):
        out += ["## Bad inputs", ""]
        for run in bad:
            out += [
                f"- {run['name']}: {run['cases']} cases, {run['failed']} recorded as failed, "
                f"{run['recovered']} decoded anyway (ok), worker crashes {run['worker_crashes']}, "
                f"good samples kept {run.get('good_kept', '-')}",
                "",
            ]
            out += _counts("reasons", run["reasons"]) + [""]
            if run.get("recovered_cases"):
                out += ["recovered (decoder legitimately recovers): " + ", ".join(run["recovered_cases"][:40]), ""]
    if hangs := figs.get("hangs"):
        out += ["## Hangs", ""] + _table(hangs, ["name", "timeout_s", "killed_after_s", "reason", "job_ok"]) + [""]
    if untrusted := figs.get("untrusted"):
        out += ["## Untrusted metadata", ""] + _table(untrusted, ["check", "cases", "result"]) + [""]
    if disk := figs.get("disk_full"):
        out += ["## Disk full / output write errors", ""]
        out += _table(disk, ["variant", "rc", "error_line", "corrupt_shards", "resumed_ok", "lost", "duplicates"])
        out += [""]
    return "\n".join(out)


def write_report(figs: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(figs, indent=2, sort_keys=True, default=str))
    md = out_dir / "report.md"
    md.write_text(render(figs))
    return md


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "out/reliability/report.json").read_text())))
