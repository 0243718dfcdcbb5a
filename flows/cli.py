"""Command line helpers around the artifact store.

python -m flows.cli results            # newest pipeline report or metrics summary in the store
python -m flows.cli results --all      # every one of them, newest last
python -m flows.cli datasets           # published datasets: folder and a ready train_on command
python -m flows.cli checksums SOURCE   # sha256 of a data source's files, to pin as data.checksums
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq

from tasks.store import ArtifactStore
from tasks.tables import markdown_table, path_report

# stage -> its table file: tasks.evaluation (eval-metrics), tasks.transfer (transfer-metrics), tasks.krr
# (krr-metrics) and tasks.pipeline (pipeline-report); "metrics" is where stores written before the
# split kept both metrics schemas. Not imported (nor torch, via distill.formats), so this CLI answers
# in well under a second.
TABLES = {
    "eval-metrics": "summary.parquet",
    "transfer-metrics": "summary.parquet",
    "krr-metrics": "summary.parquet",
    "pipeline-report": "report.parquet",
    "metrics": "summary.parquet",
}


def results(show_all: bool = False, store_uri: str | None = None) -> str:
    store = ArtifactStore(store_uri)
    manifests = sorted(
        (store.manifest(stage, k) for stage in TABLES for k in store.list(stage)), key=lambda m: m["created_at"]
    )
    if not manifests:
        return f"no results yet in {store.uri}"
    out = []
    for m in manifests if show_all else manifests[-1:]:
        art = store.open(m["stage"], m["key"], verify=False)
        name = (m.get("config") or {}).get("name", m["key"])
        rows = pq.read_table(art.file(TABLES[m["stage"]]), filesystem=art.fs).to_pylist()
        notes = "".join(f"- {n}\n" for n in m.get("notes", []))
        table = path_report(rows) if m["stage"] == "pipeline-report" else markdown_table(rows)
        out.append(f"{name} ({art.uri})\n{notes}" + table)
    return "\n".join(out)


# Stages whose artifacts are datasets a user trains on, with what they are.
DATASETS = {
    "distill-tm": "distilled by trajectory matching",
    "krr-st": "KRR-ST pretraining set",
    "pruned": "DP4TL-pruned source",
    "random-real": "random real subset (baseline)",
}


def _recorded_test_split(manifest: dict) -> str | None:
    """A non-default test split recorded anywhere in the manifest's config (e.g. Tiny-ImageNet's 'valid')."""
    found: list[str] = []

    def walk(obj: object) -> None:
        if isinstance(obj, dict):
            if isinstance(obj.get("test_split"), str):
                found.append(obj["test_split"])
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    walk(manifest.get("config"))
    return next((s for s in found if s != "test"), None)


def datasets(store_uri: str | None = None, since: float | None = None, newest: int = 3) -> str:
    """The published datasets (newest first per kind; with `since`, those created after it)."""
    from datetime import datetime

    store = ArtifactStore(store_uri)
    lines = []
    for stage, what in DATASETS.items():
        manifests = sorted(
            (store.manifest(stage, k) for k in store.list(stage)), key=lambda m: m["created_at"], reverse=True
        )
        if since is not None:
            manifests = [m for m in manifests if datetime.fromisoformat(m["created_at"]).timestamp() >= since - 1]
        for m in manifests[:newest]:
            folder = store.uri_of(stage, m["key"])
            split = _recorded_test_split(m)
            extra = f" --test-split {split}" if split else ""
            lines.append(f"{what}: {folder}\n    .venv/bin/python -m distill.train_on {folder}{extra} --seeds 0 1 2")
    return "\n".join(lines) if lines else f"no published datasets in {store.uri}"


def checksums(source: str) -> str:
    """The `checksums:` block of a data config that pins `source`'s files (YAML)."""
    from distill.manifest import source_checksums

    digests = source_checksums(source)
    if not digests:
        raise SystemExit(f"{source}: no local files to hash (a hub name or remote URI cannot be pinned)")
    return f"checksums:   # sha256 of every file of {source} (data.checksums)\n" + "".join(
        f"  {name}: {digest}\n" for name, digest in digests.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    res = sub.add_parser("results", help="print the newest metrics summary")
    res.add_argument("--all", action="store_true")
    res.add_argument("--store", default=None, help="store URI (default $DISTILLERY_STORE or ./artifacts)")
    ds = sub.add_parser("datasets", help="published datasets with their folder and a train_on command")
    ds.add_argument("--store", default=None, help="store URI (default $DISTILLERY_STORE or ./artifacts)")
    ds.add_argument("--since", type=float, default=None, help="only those created after this Unix time")
    ck = sub.add_parser("checksums", help="sha256 of a data source's files, to pin as data.checksums")
    ck.add_argument("source", help="a Parquet file or folder, ImageFolder root or .npz file")
    args = parser.parse_args()
    if args.command == "results":
        print(results(args.all, args.store))
    elif args.command == "datasets":
        print(datasets(args.store, args.since))
    elif args.command == "checksums":
        print(checksums(args.source), end="")


if __name__ == "__main__":
    main()
