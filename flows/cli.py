"""Command line helpers around the artifact store.

    python -m flows.cli results            # newest pipeline report or metrics summary in the store
    python -m flows.cli results --all      # every one of them, newest last
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq

from tasks.store import ArtifactStore
from tasks.tables import markdown_table


# stage -> its table file: tasks.evaluation (eval-metrics), tasks.transfer (transfer-metrics), tasks.krr
# (krr-metrics) and tasks.pipeline (pipeline-report); "metrics" is where stores written before the
# split kept both metrics schemas. Not imported (nor torch, via distill.formats), so this CLI answers
# in well under a second.
TABLES = {
    "eval-metrics": "summary.parquet", "transfer-metrics": "summary.parquet", "krr-metrics": "summary.parquet",
    "pipeline-report": "report.parquet", "metrics": "summary.parquet",
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
        out.append(f"{name} ({art.uri})\n{notes}" + markdown_table(rows))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    res = sub.add_parser("results", help="print the newest metrics summary")
    res.add_argument("--all", action="store_true")
    res.add_argument("--store", default=None, help="store URI (default $DISTILLERY_STORE or ./artifacts)")
    args = parser.parse_args()
    if args.command == "results":
        print(results(args.all, args.store))


if __name__ == "__main__":
    main()
