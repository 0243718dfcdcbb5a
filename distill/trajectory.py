"""Expert trajectories on disk: one Parquet file per expert, one row (and row group) per snapshot.

MTT-style distillation samples a random expert and start epoch every iteration and needs two
parameter vectors from it (the start and the target snapshot). The reference code keeps lists
of tensors in `torch.save` pickles of 10 experts each and loads whole buffers into memory.
Here each expert is a plain Parquet file that
`pyarrow.parquet.read_table` and `datasets.load_dataset("parquet")` read:

    epoch          int32     0 = right after init, then one row after every epoch
    params         fixed_size_list<float32>[num_params]: the net's parameters flattened
                   in `distill.nets.param_layout` order
    train_acc, train_loss, loss, grad_penalty, test_acc, test_loss, lr, param_change
                   float64, null where undefined (nothing was trained before epoch 0)

Layout choices, for fast single-snapshot reads: every snapshot is its own row group, `params`
is stored uncompressed with PLAIN encoding and without statistics (trained float32 weights
barely compress, and decompression would cost more than the bytes saved), and the reader
memory-maps the file and reads one row group of one column. Loading a snapshot therefore
touches num_params * 4 bytes plus a page header, whatever the length of the trajectory.

The schema metadata holds the `huggingface` features and, under `distillery`, the format,
version, parameter layout, net, training recipe, fingerprints, seed and whether the
trajectory is complete. Files are written to a hidden temporary sibling, fsynced and renamed,
so a crash never leaves a half-written file under the final name.
Pure: imports neither prefect nor ray.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn

from distill.formats import FormatError
from distill.fsio import atomic_file
from distill.nets import param_layout

FORMAT = "trajectory"
FORMAT_VERSION = 1

Layout = list[tuple[str, tuple[int, ...]]]

# Keys every trajectory's `distillery` metadata must carry besides format/version/layout:
# enough to rebuild the net (net, net_kwargs, num_classes, channels, image_size) and to
# refuse mixing experts trained differently or on different data (recipe, fingerprints).
_NET_META = ("net", "net_kwargs", "num_classes", "channels", "image_size")
_ORIGIN_META = ("recipe", "dataset_fingerprint", "preprocessor_fingerprint")
REQUIRED_META = (*_NET_META, *_ORIGIN_META, "seed", "complete", "epochs_planned")
# Keys all experts of one TrajectorySet must agree on.
SHARED_META = ("layout", *_NET_META, *_ORIGIN_META)
_EXPERT_FILE = re.compile(r"^expert-(\d{5,})\.parquet$")


class TrajectoryError(FormatError):
    """A trajectory file that is unreadable, truncated, of the wrong kind, or does not fit."""


@dataclass(frozen=True)
class Snapshot:
    """One row: the parameters after `epoch` epochs and what was measured on the way there."""

    epoch: int
    params: torch.Tensor  # flat float32 in param_layout order
    train_acc: float | None = None  # on this epoch's augmented batches, as trained
    train_loss: float | None = None  # plain cross-entropy on those batches (comparable across recipes)
    loss: float | None = None  # the objective actually minimized (ramp-scaled CE + gradient penalty)
    grad_penalty: float | None = None  # mean gradient-penalty term (AST), 0 when disabled
    test_acc: float | None = None  # on the held-out set, after the epoch
    test_loss: float | None = None
    lr: float | None = None  # learning rate used during the epoch


METRIC_COLUMNS = tuple(f.name for f in fields(Snapshot) if f.name not in ("epoch", "params"))
# Computed by the writer from consecutive snapshots, so it always matches the stored params.
DERIVED_COLUMNS = ("param_change",)


def expert_file(expert_id: int) -> str:
    """The file name of expert `expert_id`: expert-00007.parquet (sorts in id order)."""
    if expert_id < 0:
        raise ValueError(f"expert_id must be >= 0, got {expert_id}")
    return f"expert-{expert_id:05d}.parquet"


def param_change(previous: torch.Tensor, current: torch.Tensor) -> float:
    """L2 norm of the parameter change between two flat snapshots (float64 accumulation)."""
    return torch.linalg.vector_norm(current.double() - previous.double()).item()


def layout_to_json(layout: Layout) -> list:
    return [[name, list(shape)] for name, shape in layout]


def layout_from_json(items: list) -> Layout:
    return [(str(name), tuple(int(s) for s in shape)) for name, shape in items]


# ---------------------------------------------------------------- writing


def _schema(num_params: int, meta: dict) -> pa.Schema:
    columns = [("epoch", pa.int32()), ("params", pa.list_(pa.float32(), num_params))]
    columns += [(name, pa.float64()) for name in METRIC_COLUMNS + DERIVED_COLUMNS]
    value = lambda dtype: {"dtype": dtype, "_type": "Value"}  # noqa: E731
    features = {"epoch": value("int32"), "params": {"feature": value("float32"), "length": num_params, "_type": "List"}}
    features.update({name: value("float64") for name in METRIC_COLUMNS + DERIVED_COLUMNS})
    metadata = {"huggingface": json.dumps({"info": {"features": features}}), "distillery": json.dumps(meta)}
    return pa.schema(columns, metadata=metadata)


def net_meta(
    net: nn.Module, name: str, net_kwargs: dict, *, num_classes: int, channels: int = 3, image_size: int = 32
) -> dict:
    """What a matching student needs to rebuild `net` (built as create_net(name, **net_kwargs)): its
    parameter layout and constructor arguments, the subset of expert metadata that benchmarks and
    tests make without training an expert."""
    return {
        "layout": layout_to_json(param_layout(net)),
        "net": name,
        "net_kwargs": dict(net_kwargs),
        "num_classes": num_classes,
        "channels": channels,
        "image_size": image_size,
    }


def _full_meta(layout: Layout, meta: dict) -> dict:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"trajectory metadata is missing {missing}; required: {list(REQUIRED_META)}")
    reserved = {"format", "format_version", "layout", "num_params"} & set(meta)
    if reserved:
        raise ValueError(f"trajectory metadata may not set the reserved keys {sorted(reserved)}")
    num_params = sum(math.prod(shape) for _, shape in layout)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout_to_json(layout),
        "num_params": num_params,
        **meta,
    }


def _row(snapshot: Snapshot, change: float | None, schema: pa.Schema) -> pa.Table:
    flat = snapshot.params.detach().cpu().to(torch.float32).reshape(-1).numpy()
    num_params = schema.field("params").type.list_size
    if flat.size != num_params:
        raise ValueError(f"snapshot of epoch {snapshot.epoch} has {flat.size} parameters; the layout has {num_params}")
    columns = {
        "epoch": pa.array([snapshot.epoch], pa.int32()),
        "params": pa.FixedSizeListArray.from_arrays(pa.array(flat), num_params),
        **{name: pa.array([getattr(snapshot, name)], pa.float64()) for name in METRIC_COLUMNS},
        "param_change": pa.array([change], pa.float64()),
    }
    return pa.table(columns, schema=schema)


def write_trajectory(path: str | os.PathLike, snapshots: Iterable[Snapshot], layout: Layout, meta: dict) -> int:
    """Stream `snapshots` (epochs strictly increasing) into a trajectory file; returns the row count.

    `meta` must hold REQUIRED_META; format, version, layout and num_params are added here.
    Each snapshot becomes one row group, so only one snapshot is in memory at a time and a
    reader can load any one of them alone. param_change is computed from consecutive rows.
    """
    schema = _schema(sum(math.prod(s) for _, s in layout), _full_meta(layout, meta))
    rows, previous = 0, None
    with atomic_file(path) as f:
        # Uncompressed, PLAIN, no statistics for params: fastest to read back (see module doc).
        writer = pq.ParquetWriter(f, schema, compression="none", use_dictionary=False, write_statistics=["epoch"])
        with writer:
            for snap in snapshots:
                if previous is not None and snap.epoch <= previous.epoch:
                    raise ValueError(f"{path}: epochs must increase; got {snap.epoch} after {previous.epoch}")
                change = None if previous is None else param_change(previous.params, snap.params)
                writer.write_table(_row(snap, change, schema))
                rows, previous = rows + 1, snap
        if rows == 0:
            raise ValueError(f"{path}: no snapshots to write")
    return rows


# ---------------------------------------------------------------- reading


def _as_layout(layout_or_net: Layout | nn.Module) -> Layout:
    return param_layout(layout_or_net) if isinstance(layout_or_net, nn.Module) else layout_from_json(layout_or_net)


class TrajectoryReader:
    """A memory-mapped trajectory file: metadata and metrics up front, parameters on demand.

    layout: a net or a param_layout to check the file against (error names the first
    mismatching parameter). allow_incomplete: let `snapshot` read a trajectory whose
    training has not finished (metrics are always readable).
    """

    def __init__(
        self, path: str | os.PathLike, *, layout: Layout | nn.Module | None = None, allow_incomplete: bool = False
    ):
        self.path = str(path)
        self.allow_incomplete = allow_incomplete
        try:
            self._file = pq.ParquetFile(self.path, memory_map=True)
        except FileNotFoundError as e:
            raise TrajectoryError(f"{self.path}: no such trajectory file") from e
        except (pa.ArrowException, OSError) as e:
            raise TrajectoryError(f"{self.path}: not a readable Parquet file, truncated or corrupt? ({e})") from e
        self.meta = self._read_meta()
        self.layout: Layout = layout_from_json(self.meta["layout"])
        self.num_params: int = self.meta["num_params"]
        self._check_schema()
        self.epochs: list[int] = self._read_column("epoch")
        # epoch -> (row group, row within it); our writer makes one group per row, others may not.
        self._where: dict[int, tuple[int, int]] = {}
        row = 0
        for group in range(self._file.num_row_groups):
            for offset in range(self._file.metadata.row_group(group).num_rows):
                self._where[self.epochs[row]] = (group, offset)
                row += 1
        if layout is not None:
            self.check_layout(layout)

    def _fail(self, problem: str) -> TrajectoryError:
        return TrajectoryError(f"{self.path}: {problem}")

    def _read_meta(self) -> dict:
        raw = (self._file.schema_arrow.metadata or {}).get(b"distillery")
        if raw is None:
            raise self._fail("no `distillery` schema metadata; not a trajectory file")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise self._fail(f"schema metadata is not valid JSON ({e})") from e
        if meta.get("format") != FORMAT:
            raise self._fail(f"is a {meta.get('format')!r} file, expected {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise self._fail(
                f"unsupported trajectory format version {meta.get('format_version')!r} (this reads {FORMAT_VERSION})"
            )
        missing = [k for k in REQUIRED_META + ("layout", "num_params") if k not in meta]
        if missing:
            raise self._fail(f"trajectory metadata lacks {missing}")
        return meta

    def _check_schema(self) -> None:
        schema = self._file.schema_arrow
        missing = [c for c in ("epoch", "params") + METRIC_COLUMNS if c not in schema.names]
        if missing:
            raise self._fail(f"missing column(s) {missing}; it has {schema.names}")
        params = schema.field("params").type
        if not (
            pa.types.is_fixed_size_list(params)
            and params.value_type == pa.float32()
            and params.list_size == self.num_params
        ):
            raise self._fail(f"`params` has type {params}, expected fixed_size_list<float>[{self.num_params}]")
        covered = sum(math.prod(shape) for _, shape in self.layout)
        if covered != self.num_params:
            raise self._fail(f"the layout covers {covered} values, num_params says {self.num_params}")

    def _read_column(self, name: str) -> list:
        try:
            return self._file.read(columns=[name]).column(name).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise self._fail(f"cannot read column {name!r}, truncated or corrupt? ({e})") from e

    def check_layout(self, layout_or_net: Layout | nn.Module) -> None:
        """Raise TrajectoryError naming the first parameter whose name or shape differs."""
        expected = _as_layout(layout_or_net)
        for i, (stored, wanted) in enumerate(zip(self.layout, expected)):
            if stored != wanted:
                raise self._fail(
                    f"parameter layout does not match the net at parameter {i}: file has "
                    f"{stored[0]!r} {list(stored[1])}, the net has {wanted[0]!r} {list(wanted[1])}"
                )
        if len(self.layout) != len(expected):
            longer, who = (self.layout, "file") if len(self.layout) > len(expected) else (expected, "net")
            first = longer[min(len(self.layout), len(expected))]
            raise self._fail(
                f"parameter layout does not match the net: the file has {len(self.layout)} parameters, the net "
                f"{len(expected)}; first unmatched: {first[0]!r} {list(first[1])} (only in the {who})"
            )

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def num_snapshots(self) -> int:
        return len(self.epochs)

    @property
    def last_epoch(self) -> int:
        return self.epochs[-1]

    def snapshot(self, epoch: int) -> torch.Tensor:
        """The flat float32 parameters after `epoch` epochs, reading only that row's `params`."""
        if not self.complete and not self.allow_incomplete:
            raise self._fail(
                f"incomplete trajectory ({self.last_epoch} of {self.meta['epochs_planned']} epochs); "
                "pass allow_incomplete=True to read it anyway"
            )
        if epoch not in self._where:
            raise self._fail(f"no snapshot for epoch {epoch}; stored epochs {self.epochs[0]}..{self.last_epoch}")
        group, offset = self._where[epoch]
        try:
            column = self._file.read_row_group(group, columns=["params"]).column("params")
        except (pa.ArrowException, OSError) as e:
            raise self._fail(f"cannot read the snapshot of epoch {epoch}, truncated or corrupt? ({e})") from e
        values = column.slice(offset, 1).combine_chunks()
        if values.null_count:
            raise self._fail(f"the snapshot of epoch {epoch} is null")
        # Arrow buffers are read-only (memory-mapped); one copy gives torch its own memory.
        return torch.from_numpy(np.array(values.flatten().to_numpy(zero_copy_only=False), copy=True))

    def metrics(self) -> list[dict]:
        """One dict per snapshot: epoch and every metric column (None where undefined)."""
        names = ["epoch", *METRIC_COLUMNS, *DERIVED_COLUMNS]
        try:
            return self._file.read(columns=names).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise self._fail(f"cannot read the metrics, truncated or corrupt? ({e})") from e

    def iter_snapshots(self) -> Iterator[Snapshot]:
        """Every row as a Snapshot, in epoch order, one parameter vector in memory at a time."""
        for record in self.metrics():
            yield Snapshot(params=self.snapshot(record["epoch"]), **{k: record[k] for k in ("epoch", *METRIC_COLUMNS)})

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TrajectoryReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- a directory of experts


def _brief(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TrajectorySet:
    """All complete expert files (expert-NNNNN.parquet) of a directory, checked to belong together."""

    def __init__(self, directory: str | os.PathLike, *, layout: Layout | nn.Module | None = None):
        self.directory = str(directory)
        # Only final names: temp files (".expert-...tmp-...") and checkpoints (".ckpt/") never match.
        names = sorted(p.name for p in Path(directory).glob("expert-*.parquet") if _EXPERT_FILE.match(p.name))
        if not names:
            raise TrajectoryError(f"{self.directory}: no expert trajectory files (expert-NNNNN.parquet)")
        self.expert_ids: list[int] = [int(_EXPERT_FILE.match(n).group(1)) for n in names]
        self._readers = [TrajectoryReader(os.path.join(self.directory, n), layout=layout) for n in names]
        self._check_consistent()
        self.last_epoch = min(r.last_epoch for r in self._readers)

    def _check_consistent(self) -> None:
        first = self._readers[0]
        for reader in self._readers:
            if not reader.complete:
                raise TrajectoryError(
                    f"{reader.path}: incomplete trajectory ({reader.last_epoch} of {reader.meta['epochs_planned']} "
                    "epochs); finish or remove it before using the set"
                )
            for key in SHARED_META:
                if reader.meta[key] != first.meta[key]:
                    raise TrajectoryError(
                        f"{reader.path}: {key} differs from {os.path.basename(first.path)}: "
                        f"{_brief(reader.meta[key])} vs {_brief(first.meta[key])}; all experts of a set must share it"
                    )

    def __len__(self) -> int:
        return len(self._readers)

    def reader(self, i: int) -> TrajectoryReader:
        """The i-th expert in id order (its id is expert_ids[i])."""
        return self._readers[i]

    @property
    def meta(self) -> dict:
        return self._readers[0].meta

    def random_segment(
        self, generator: torch.Generator, max_start_epoch: int, expert_epochs: int
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(start params, target params, expert id, start epoch) for one matching iteration.

        The expert is uniform over the set and start_epoch uniform over [0, max_start_epoch]
        (inclusive; MTT's randint excludes its upper bound, so MTT's T+ is max_start_epoch + 1);
        the target is the snapshot expert_epochs later.
        """
        if max_start_epoch < 0 or expert_epochs < 1:
            raise ValueError(
                f"need max_start_epoch >= 0 and expert_epochs >= 1, got {max_start_epoch} and {expert_epochs}"
            )
        if max_start_epoch + expert_epochs > self.last_epoch:
            raise ValueError(
                f"max_start_epoch + expert_epochs = {max_start_epoch} + {expert_epochs} = "
                f"{max_start_epoch + expert_epochs} exceeds the last stored epoch {self.last_epoch} of the "
                f"experts in {self.directory}; lower them or train longer experts"
            )
        i = int(torch.randint(len(self), (), generator=generator))
        start = int(torch.randint(max_start_epoch + 1, (), generator=generator))
        reader = self._readers[i]
        return reader.snapshot(start), reader.snapshot(start + expert_epochs), self.expert_ids[i], start

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
