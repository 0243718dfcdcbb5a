"""Presets (`tiny`, `cpu`, `paper`) for every flow, kept as YAML in `deployments/presets/`.

`tiny` runs in seconds for tests, `cpu` in minutes on 2 cores (benchmarks, demo), `paper`
uses the papers' hyperparameters and wants a GPU. The same files feed the deployments in
`deployments/prefect.yaml` (see `flows.deployments`), so a preset run from Python and the
deployment of the same name run with identical parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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
