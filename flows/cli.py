"""Command line helpers around the artifact store.

    python -m flows.cli results            # newest metrics summary table in the store
    python -m flows.cli results --all      # every metrics artifact, newest last
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq

from tasks.store import ArtifactStore
from tasks.tables import markdown_table


# tasks.evaluation.METRICS_STAGE; not imported (nor torch, via distill.formats), so this CLI
# answers in well under a second.
METRICS_STAGE = "metrics"


def results(show_all: bool = False, store_uri: str | None = None) -> str:
    store = ArtifactStore(store_uri)
    keys = store.list(METRICS_STAGE)
    if not keys:
        return f"no metrics yet in {store.uri}"
    manifests = sorted((store.manifest(METRICS_STAGE, k) for k in keys), key=lambda m: m["created_at"])
    out = []
    for m in manifests if show_all else manifests[-1:]:
        art = store.open(METRICS_STAGE, m["key"], verify=False)
        name = (m.get("config") or {}).get("name", m["key"])
        out.append(f"{name} ({art.uri})\n" + markdown_table(pq.read_table(art.file("summary.parquet"), filesystem=art.fs).to_pylist()))
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
