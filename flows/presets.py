"""Presets (`tiny`, `cpu`, `paper`) for every flow, kept as YAML in `deployments/presets/`.

`tiny` runs in seconds for tests, `cpu` in minutes on 2 cores (benchmarks, demo), `paper`
uses the papers' hyperparameters and wants a GPU. The same files feed the deployments in
`deployments/prefect.yaml` (see `flows.deployments`), so a preset run from Python and the
deployment of the same name run with identical parameters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

if TYPE_CHECKING:
    from tasks.runtime import Resources

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = PROJECT_ROOT / "deployments" / "presets"


def presets(flow: str) -> dict[str, dict[str, Any]]:
    """All presets of a flow, by name."""
    path = PRESET_DIR / f"{flow}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"no presets for flow {flow!r}; flows with presets: {', '.join(known)}")
    return yaml.safe_load(path.read_text())


def load_preset(flow: str, name: str) -> dict[str, Any]:
    """The parameters of one preset; an unknown name lists the valid ones."""
    known = presets(flow)
    if name not in known:
        raise ValueError(f"unknown preset {name!r} for flow {flow!r}; valid presets: {', '.join(known)}")
    return known[name]


def start(store: str | None, resources: Resources) -> str:
    """What every flow does first, before any stage: tie a worker-started run to its worker, refuse a
    CPU/GPU request no Ray node can hold (Ray would queue it forever), remove temporary directories
    that dead writers left in the store (older than an hour: a live writer only stages files for the
    short write at the end of its task), and return the store URI (`store`, else $DISTILLERY_STORE,
    else ./artifacts)."""
    from tasks.runtime import tie_to_worker
    from tasks.store import ArtifactStore

    tie_to_worker()  # a worker-started run stops with its worker (a no-op anywhere else)
    resources.check_feasible()
    st = ArtifactStore(store)
    st.gc_tmp()
    return st.uri


def _set_path(params: dict[str, Any], dotted: str, value: Any) -> None:
    """params["a"]["b"][0]["c"] = value for "a.b.0.c"; intermediate dicts are created, list items must exist."""
    node: Any = params
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(
                    f"--set {dotted}: {'.'.join(parts[:i]) or 'the preset'} is a list of {len(node)}; "
                    f"use an index 0..{len(node) - 1}"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ValueError(f"--set {dotted}: {'.'.join(parts[:i])} is a value, not a block")


def flow_params(
    flow: str, argv: Sequence[str] | None = None, *, doc: str | None = None, extra: Any = None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Command-line parameters of a flow's module entry point: a preset, your data, and overrides.

        python -m flows.baseline --preset cpu --data /my/images --set ipc=5 --set eval.num_models=3

    `--data` replaces the `data` block's source; `--source` / `--target` replace those blocks'
    sources (DP4TL, KRR-ST, the pipeline); `--set KEY=VALUE` sets any field by its dotted path
    (list items by index), the value read as YAML (numbers, booleans, lists, null). The result
    is validated by the flow's config model like the UI form, so a bad value is refused before
    any stage runs. `extra(parser)` adds flow-specific options first.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    parser.add_argument("--preset", default="tiny", help=f"preset in deployments/presets/{flow}.yaml")
    parser.add_argument(
        "--data",
        help="your labelled dataset (the `data` block's source): a folder of "
        "Parquet files (Hugging Face layout), an ImageFolder tree, an .npz, or hub:<name>",
    )
    parser.add_argument("--source", help="the source dataset to prune or distill (DP4TL, KRR-ST, pipeline)")
    parser.add_argument("--target", help="the target task's dataset (DP4TL, KRR-ST, pipeline)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field of the preset, e.g. --set data.image_size=28 (repeatable)",
    )
    args = parser.parse_args(argv)
    name = getattr(args, "flow", None) or flow
    params = load_preset(name, args.preset)
    for option, block in (("data", "data"), ("source", "source"), ("target", "target")):
        value = getattr(args, option)
        if value is None:
            continue
        if block not in params:
            parser.error(f"--{option}: flow {name!r} has no `{block}` block; its blocks: {', '.join(params)}")
        params[block] = {**params[block], "source": value}
    for item in args.overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            _set_path(params, key, yaml.safe_load(text))
        except (ValueError, yaml.YAMLError) as e:
            parser.error(str(e))
    return args, params


def build_config(config_cls: Any, params: dict[str, Any]) -> Any:
    """The flow's config from `params`, or one clear message per problem and exit code 2."""
    from pydantic import ValidationError

    try:
        return config_cls(**params)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "parameters"
            print(f"error: {where}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
