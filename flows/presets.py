"""Presets (`tiny`, `cpu`, `paper`) for every flow, kept as YAML in `deployments/presets/`.

`tiny` runs in seconds for tests, `cpu` in minutes on 2 cores (benchmarks, demo), `paper`
uses the papers' hyperparameters and wants a GPU. The same files feed the deployments in
`deployments/prefect.yaml` (see `flows.deployments`), so a preset run from Python and the
deployment of the same name run with identical parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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


def resolve_store(uri: str | None) -> str:
    """The artifact store URI a flow writes to: explicit, else $DISTILLERY_STORE, else ./artifacts."""
    from tasks.store import ArtifactStore

    return ArtifactStore(uri).uri
