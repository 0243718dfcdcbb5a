"""Checkpoints of resumable loops, shared by every long loop of the core.

Expert training, trajectory matching, the Barlow Twins teacher and KRR-ST all resume through
`Checkpoint`, so a killed run continues from its last commit and ends bit-identical to an
uninterrupted one (their seeded streams come from distill.utils.derive_seed). A checkpoint is a
directory holding one committed state:

    state-SSSSSSS-XXXXXXXX.safetensors  every tensor of the state: weights, optimizer tensors, RNG states
    state.json                          the commit record: format, kind, step, identity, the state
                                        file's name and sha256, and the loop's JSON rest (curves, counters)

Both files are written atomically (temp sibling, fsync, rename), the tensors first and
state.json last, so a run killed at any moment leaves the previous commit loadable: state.json
only ever names a complete state file, and that file is deleted only after a newer record has
replaced it. Every save writes a fresh file name, so saving a step again never overwrites the
file the current record names.

Loading refuses, naming the reason and the remedy: another format or kind of checkpoint, an
identity (the config and data the loop depends on, as JSON values) other than the caller's, a
state file whose sha256 differs from the record, and non-finite tensors. Never pickle: tensors
go to safetensors, everything else to JSON. Pure: imports neither prefect nor ray.

    ckpt = Checkpoint(work_dir / "ckpt", {"config": cfg.model_dump(mode="json")}, kind="my-loop")
    saved = ckpt.load()                  # None on a fresh start, else Saved(step, tensors, record)
    ckpt.save(step, {"x": x, "rng": generator.get_state()}, {"history": history})
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from distill.fsio import atomic_file

CHECKPOINT_FORMAT = "distillery.checkpoint"
CHECKPOINT_VERSION = 2  # 2: one format for every loop (1: a format per loop)
RECORD_FILE = "state.json"
_STATE_FILE = re.compile(r"^state-\d{7,}-[0-9a-f]{8}\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: another run's, another format, or damaged."""


def _brief(value: Any, limit: int = 100) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_identity(stored: dict, wanted: dict, where: str, remedy: str = "delete it") -> None:
    """Refuse `where` when its stored identity differs from the wanted one, naming up to three differences."""
    diffs = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: stored {_brief(stored.get(k))}, requested {_brief(wanted.get(k))}" for k in diffs[:3])
        raise CheckpointError(
            f"{where} was made with a different configuration ({detail}), so it belongs to another run; {remedy}"
        )


@dataclass(frozen=True)
class Saved:
    """One loaded commit: the step it was saved at, its tensors (CPU) and the loop's JSON record."""

    step: int
    tensors: dict[str, torch.Tensor]
    record: dict


class Checkpoint:
    """The committed resume state of one run in `directory` (see the module docstring).

    identity: what the run's result depends on, JSON-able; a checkpoint of another identity is
    refused. kind: which loop wrote it ("expert", "matching", ...); another kind is refused.
    """

    def __init__(self, directory: str | Path, identity: dict, *, kind: str):
        self.dir = Path(directory)
        self.kind = kind
        self.identity = json.loads(json.dumps(identity))  # JSON values, so stored and fresh compare equal

    def save(self, step: int, tensors: dict[str, torch.Tensor], record: dict | None = None) -> None:
        """Commit `tensors` and `record` as the state after `step`; the previous commit stays until this one is done."""
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0; got {step}")
        data = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        name = f"state-{step:07d}-{uuid.uuid4().hex[:8]}.safetensors"
        with atomic_file(self.dir / name) as f:
            f.write(data)
        commit = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "kind": self.kind,
            "step": step,
            "state_file": name,
            "state_sha256": hashlib.sha256(data).hexdigest(),
            "identity": self.identity,
            "record": record or {},
        }
        with atomic_file(self.dir / RECORD_FILE) as f:
            f.write(json.dumps(commit, sort_keys=True).encode())
        for old in self.dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):  # temp files of a writer that was killed mid-write
            stale.unlink(missing_ok=True)

    def load(self) -> Saved | None:
        """The last commit, or None when there is none; raises CheckpointError for one that cannot be resumed."""
        path = self.dir / RECORD_FILE
        if not path.exists():
            return None
        fix = f"delete {self.dir} to start over"
        try:
            commit = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); {fix}") from e
        if not isinstance(commit, dict):
            commit = {}
        found = (commit.get("format"), commit.get("format_version"), commit.get("kind"))
        if found != (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, self.kind):
            raise CheckpointError(
                f"{path} is not a {self.kind} checkpoint of {CHECKPOINT_FORMAT} version {CHECKPOINT_VERSION} "
                f"(format, version, kind: {found}); {fix}"
            )
        check_identity(
            commit["identity"], self.identity, f"checkpoint {self.dir}", "delete it or use another directory"
        )
        name = commit.get("state_file", "")
        if not _STATE_FILE.match(name):
            raise CheckpointError(f"{path} names an invalid state file {name!r}; {fix}")
        try:
            data = (self.dir / name).read_bytes()
        except FileNotFoundError as e:
            raise CheckpointError(f"{path} names {name}, which is missing; {fix}") from e
        if hashlib.sha256(data).hexdigest() != commit.get("state_sha256"):
            raise CheckpointError(f"{self.dir / name} does not match the sha256 in {path} (damaged); {fix}")
        tensors = safetensors.torch.load(data)
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"{self.dir / name} holds non-finite values in {', '.join(bad[:5])}; {fix}")
        return Saved(int(commit["step"]), tensors, commit["record"])

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- modules and optimizers as tensors + JSON


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state_dict under `prefix.` (parameters and buffers, e.g. BatchNorm statistics)."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module_tensors(prefix: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (tensors named `prefix.<param index>.<key>`, the JSON rest)."""
    state = optimizer.state_dict()
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        rest["state"][str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                rest["state"][str(index)][key] = value
    return tensors, rest


def load_optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, rest: dict) -> None:
    """Inverse of optimizer_tensors: load the state saved under `prefix` into `optimizer`."""
    state = {int(index): dict(entries) for index, entries in rest["state"].items()}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
