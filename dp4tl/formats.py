"""Parquet formats of DP4TL selections.

Two files, both plain Parquet readable by `pyarrow` and `datasets.load_dataset("parquet")`, with
the `huggingface` schema metadata `datasets` writes and a `distillery` JSON metadata key, as in
distill.formats:

- selection (`format: "selection"`): one row per source class or cluster: `class` (int64),
  `name`, `score`, `votes`, `rank` (0 = best), `method`, plus one float64 column per per-class
  detail of the selection (e.g. `softmax_mass`, `mean_distance`). The metadata records what the
  scores depend on: the surrogate fingerprint, the feature settings (layer, resolution,
  augmentation "none", as DP4TL extracts them) and the selection's scalar details.
- kept samples (`format: "selection_kept"`): one row per (method, ratio, seed): `kept_classes`
  (list<int64>; null for data-wise selectors), `num_kept_samples` and `kept` (list<int64>, the
  sorted source sample indices to pretrain on).

Readers raise distill.formats.FormatError naming the file and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from distill.formats import FormatError, read_table, schema_metadata, write_table
from dp4tl.selection import ClassSelection

SELECTION_KIND = "selection"
KEPT_KIND = "selection_kept"
_SELECTION_COLUMNS = ("class", "name", "score", "votes", "rank", "method")
_KEPT_COLUMNS = ("method", "ratio", "seed", "kept_classes", "num_kept_samples", "kept")


@dataclass(frozen=True)
class KeptSamples:
    """The source samples one pruning keeps: `kept` sorted indices, `kept_classes` None for data-wise selectors."""

    method: str
    ratio: float  # fraction of classes pruned (DP4TL convention); for data-wise selectors, of samples
    seed: int
    kept: list[int]
    kept_classes: list[int] | None = None

    @classmethod
    def from_selection(
        cls,
        selection: ClassSelection,
        ratio: float,
        seed: int,
        labels: torch.Tensor | None = None,
        *,
        reverse: bool = False,
    ) -> KeptSamples:
        """Prune `ratio` of the classes of `selection` (the best ones if reverse: the bottom-K ablation)."""
        return cls(
            method=selection.method + ("_reverse" if reverse else ""),
            ratio=ratio,
            seed=seed,
            kept=selection.kept_samples(ratio, labels, reverse=reverse).tolist(),
            kept_classes=selection.kept_classes(ratio, reverse=reverse).tolist(),
        )


def _read(path: str, filesystem: pafs.FileSystem | None, kind: str, columns: tuple[str, ...]) -> tuple[pa.Table, dict]:
    table, _, meta = read_table(path, filesystem, kind, columns)
    if not meta:
        raise FormatError(f"{path}: no `distillery` schema metadata; not a {kind} file")
    for name in columns:
        if table.column(name).null_count and name != "kept_classes":
            raise FormatError(f"{path}: column {name!r} has {table.column(name).null_count} null entries")
    return table, meta


def _json_scalar(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return None


def write_selection(
    path: str,
    selection: ClassSelection,
    *,
    class_names: list[str] | None = None,
    surrogate_fingerprint: str | None = None,
    feature_settings: dict | None = None,
    extra_metadata: dict | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> int:
    """Write one row per class (in class-id order); returns rows.

    class_names default to the ids ("cluster_<i>" for clustered FM). feature_settings: e.g.
    {"layer": "penultimate", "resolution": 32, "augmentation": "none"}. Per-class tensor details
    (length C) become columns and scalar details go to the metadata; `cluster_of_sample` is
    per source sample and is recorded through its effect, the kept-samples file.
    """
    c = selection.num_classes
    clustered = "cluster_of_sample" in selection.details
    if class_names is None:
        class_names = [f"cluster_{i}" if clustered else str(i) for i in range(c)]
    names = list(class_names)
    if len(names) != c:
        raise ValueError(f"got {len(names)} class names for a selection over {c} classes")
    columns = {
        "class": pa.array(np.arange(c, dtype=np.int64)),
        "name": pa.array(names, pa.string()),
        "score": pa.array(selection.scores.double().numpy()),
        "votes": pa.array(selection.votes.long().numpy()),
        "rank": pa.array(selection.rank.numpy()),
        "method": pa.array([selection.method] * c, pa.string()),
    }
    dtypes = {
        "class": "int64",
        "name": "string",
        "score": "float64",
        "votes": "int64",
        "rank": "int64",
        "method": "string",
    }
    scalars = {}
    for key, value in selection.details.items():
        if key == "cluster_of_sample":
            continue  # one entry per source sample, not per class: the kept-samples file carries its effect
        if isinstance(value, torch.Tensor) and value.shape == (c,) and key not in columns:
            integer = not (value.is_floating_point() or value.is_complex())
            columns[key] = pa.array(value.long().numpy() if integer else value.double().numpy())
            dtypes[key] = "int64" if integer else "float64"
        elif _json_scalar(value) is not None:
            scalars[key] = _json_scalar(value)
    features = {k: {"dtype": v, "_type": "Value"} for k, v in dtypes.items()}
    extra = {
        "method": selection.method,
        "num_classes": c,
        "surrogate_fingerprint": surrogate_fingerprint,
        "features": feature_settings or {},
        "details": scalars,
        **(extra_metadata or {}),
    }
    table = pa.table(columns).replace_schema_metadata(schema_metadata(features, SELECTION_KIND, extra))
    return write_table(table, path, filesystem)


def read_selection(path: str, *, filesystem: pafs.FileSystem | None = None) -> tuple[ClassSelection, list[str], dict]:
    """Read a selection file: (selection, class names, `distillery` metadata)."""
    table, meta = _read(path, filesystem, SELECTION_KIND, _SELECTION_COLUMNS)
    table = table.sort_by("class")
    c = table.num_rows
    ids = table.column("class").to_numpy()
    if c == 0 or not np.array_equal(ids, np.arange(c)):
        raise FormatError(f"{path}: `class` must hold each id 0..N-1 exactly once; got {c} rows")
    rank = table.column("rank").to_numpy()
    if not np.array_equal(np.sort(rank), np.arange(c)):
        raise FormatError(f"{path}: `rank` is not a permutation of 0..{c - 1}")
    methods = set(table.column("method").to_pylist())
    if len(methods) != 1:
        raise FormatError(f"{path}: one selection per file, but `method` holds {sorted(methods)}")
    ranking = torch.from_numpy(np.argsort(rank, kind="stable")).long()
    details = dict(meta.get("details", {}))
    for name in table.column_names:
        if name not in _SELECTION_COLUMNS:
            details[name] = torch.from_numpy(table.column(name).to_numpy().copy())
    selection = ClassSelection(
        scores=torch.from_numpy(table.column("score").to_numpy().astype(np.float64)),
        votes=torch.from_numpy(table.column("votes").to_numpy().astype(np.int64)),
        ranking=ranking,
        method=methods.pop(),
        details=details,
    )
    return selection, table.column("name").to_pylist(), meta


def write_kept(
    path: str,
    rows: list[KeptSamples],
    *,
    num_source_samples: int,
    extra_metadata: dict | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> int:
    """Write one row per (method, ratio, seed); `num_source_samples` bounds the indices. Returns rows."""
    for r in rows:
        if r.kept and not 0 <= min(r.kept) <= max(r.kept) < num_source_samples:
            raise ValueError(f"{r.method} ratio {r.ratio}: kept indices must lie in [0, {num_source_samples})")
    ints = pa.list_(pa.int64())
    table = pa.table(
        {
            "method": pa.array([r.method for r in rows], pa.string()),
            "ratio": pa.array([float(r.ratio) for r in rows], pa.float64()),
            "seed": pa.array([int(r.seed) for r in rows], pa.int64()),
            "kept_classes": pa.array([r.kept_classes for r in rows], ints),
            "num_kept_samples": pa.array([len(r.kept) for r in rows], pa.int64()),
            "kept": pa.array([sorted(r.kept) for r in rows], ints),
        }
    )
    int_list = {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "List"}
    features = {
        "method": {"dtype": "string", "_type": "Value"},
        "ratio": {"dtype": "float64", "_type": "Value"},
        "seed": {"dtype": "int64", "_type": "Value"},
        "kept_classes": int_list,
        "num_kept_samples": {"dtype": "int64", "_type": "Value"},
        "kept": int_list,
    }
    extra = {"num_source_samples": num_source_samples, **(extra_metadata or {})}
    return write_table(table.replace_schema_metadata(schema_metadata(features, KEPT_KIND, extra)), path, filesystem)


def read_kept(path: str, *, filesystem: pafs.FileSystem | None = None) -> list[KeptSamples]:
    """Read a kept-samples file; checks counts and index bounds."""
    table, meta = _read(path, filesystem, KEPT_KIND, _KEPT_COLUMNS)
    bound = meta.get("num_source_samples")
    out = []
    for i, row in enumerate(table.to_pylist()):
        kept = row["kept"]
        if len(kept) != row["num_kept_samples"]:
            raise FormatError(
                f"{path}: row {i} has {len(kept)} kept indices but num_kept_samples={row['num_kept_samples']}"
            )
        if kept and (min(kept) < 0 or (bound is not None and max(kept) >= bound)):
            raise FormatError(f"{path}: row {i} has kept indices outside [0, {bound})")
        out.append(KeptSamples(row["method"], row["ratio"], row["seed"], kept, row["kept_classes"]))
    return out
