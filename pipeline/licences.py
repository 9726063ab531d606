"""Licence and provenance per row: the sample's licence or terms (`licence`), the tokenizer weights' licence
(`tokenizer_licence`) and the 3D renderer (`renderer`); the job option `require_licence`; the card's summary.

Licence ids are short, lower-case and versionless: Objaverse's per-object Sketchfab licences become `cc-by`,
`cc-by-sa`, `cc-by-nc`, `cc-by-nc-sa`, `cc-by-nd`, `cc-by-nc-nd`, `cc0`, `sketchfab-standard`,
`sketchfab-editorial`; a dataset that grants none is `none-granted` (Panda-70M), a withdrawn one `withdrawn`
(WebVid), and anything the job does not state is `unknown` (a source's `licence:` states it).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.rows import OK, Row, skip

UNKNOWN = "unknown"
NONE_GRANTED = "none-granted"
WITHDRAWN = "withdrawn"
TERMS = {  # what the card says about an id
    NONE_GRANTED: "the dataset grants no licence (its videos keep their owners' terms)",
    WITHDRAWN: "the dataset was withdrawn by its publisher; its videos keep their owners' terms",
    UNKNOWN: "not stated by the source or the job",
    "sketchfab-standard": "Sketchfab Standard licence (no redistribution)",
    "sketchfab-editorial": "Sketchfab Editorial licence (editorial use only)",
}
_SKETCHFAB = {
    "by": "cc-by",
    "by-sa": "cc-by-sa",
    "by-nc": "cc-by-nc",
    "by-nc-sa": "cc-by-nc-sa",
    "by-nd": "cc-by-nd",
    "by-nc-nd": "cc-by-nc-nd",
    "cc0": "cc0",
    "st": "sketchfab-standard",
    "ed": "sketchfab-editorial",
}
APPLE_MODEL_TOU = "apple-ml-research-model-tou"  # AToken's released weights: research use only (MODEL-LICENSE)
SHIPPED = "apache-2.0"  # atoken/weights: trained by this project (pyproject's licence)
RANDOM = "none (random weights)"
WEIGHTS_TERMS = {
    APPLE_MODEL_TOU: "Apple ML Research Model Terms of Use: research use only (MODEL-LICENSE)",
    SHIPPED: "trained by this project on procedural data and the sample photos that scikit-learn and scikit-image "
    "ship (atoken/train_data.py PACKAGE_PHOTOS; scikit-learn's two are CC BY 2.0) (Apache-2.0)",
}


def normalise(raw) -> str | None:
    """A licence id from what a source states (`by`, `CC-BY 4.0`, `cc0`, ...); None when it states nothing."""
    if raw is None or not str(raw).strip():
        return None
    s = "-".join(str(raw).strip().lower().replace("_", "-").split())
    for suffix in ("-4.0", "-3.0", "-2.0", "-1.0"):
        s = s.removesuffix(suffix)
    return _SKETCHFAB.get(s.removeprefix("cc-") if s.startswith("cc-by") else s, s)


def apply(rows: list[Row], default: str, allowed: frozenset[str] | None) -> list[Row]:
    """Every row gets a `licence` (its own, else `default`); with `allowed` (the job's `require_licence`), an ok
    row whose licence is not in it is skipped with the rule as the reason."""
    out = []
    for r in rows:
        r = {**r, "licence": r.get("licence") or default}
        if allowed is not None and r.get("status", OK) == OK and r["licence"] not in allowed:
            r = skip(r, "source", f"require_licence: licence {r['licence']} is not one of {', '.join(sorted(allowed))}")
        out.append(r)
    return out


def weights_licence(identity: dict, stated: str | None = None) -> str:
    """The tokenizer weights' licence: `stated` (tokenize.weights_licence) if given; AToken's released files
    (by name, or a MODEL-LICENSE beside them, as `make checkpoints` writes) are research-only; the weights
    shipped in atoken/weights are this project's; random weights have none."""
    if stated:
        return stated
    ckpt = identity.get("checkpoint")
    if ckpt is None:
        return RANDOM
    from atoken.download import FILES

    path = Path(ckpt)
    if path.name in FILES or (path.parent / "MODEL-LICENSE").is_file():
        return APPLE_MODEL_TOU
    import atoken

    if path.resolve().parent == (Path(atoken.__file__).parent / "weights").resolve():
        return SHIPPED
    return UNKNOWN


def summary(storage, shards) -> dict[str, dict[str, int]]:
    """Counts per column (`licence`, `tokenizer_licence`, `renderer`) over the committed shards; a shard written
    before schema 1.3 counts as `not recorded`."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.store import read_parquet

    def one(path):  # three short string columns of one shard (or its row count), page checksums verified
        return read_parquet(storage, path, COLUMNS, present_only=True)

    counts: dict[str, collections.Counter] = {c: collections.Counter() for c in COLUMNS}
    with ThreadPoolExecutor(16) as pool:  # object stores: many small reads at once
        read = list(pool.map(one, sorted(shards)))
    for table in read:
        for c in COLUMNS:
            if c not in table.column_names:
                counts[c]["not recorded"] += table.num_rows
            else:
                counts[c].update("none" if v is None else v for v in table.column(c).to_pylist())
    return {c: dict(v.most_common()) for c, v in counts.items() if v}


COLUMNS = ("licence", "tokenizer_licence", "renderer")


def card_section(storage, shards) -> str:
    """The dataset card's licence and provenance lines."""
    got = summary(storage, shards)
    if not got:
        return ""
    lines = [
        "\n## Licences and provenance\n",
        "Every row says what it may be used for: `licence` (the sample's, as its source states it), "
        "`tokenizer_licence` (the weights that made the tokens) and `renderer` (3D). The most restrictive "
        "of these applies to a row; filter on them before you use or share the tokens.\n",
    ]
    for col, title, terms in (
        ("licence", "sample licences", TERMS),
        ("tokenizer_licence", "tokenizer weights", WEIGHTS_TERMS),
        ("renderer", "3D renderer", {}),
    ):
        for value, n in got.get(col, {}).items():
            if col == "renderer" and value == "none":
                continue
            note = f": {terms[value]}" if value in terms else ""
            lines.append(f"- {title}: `{value}` {n} rows{note}\n")
    return "".join(lines)
